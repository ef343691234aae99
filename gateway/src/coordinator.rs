//! Several gateways on shared RBD pools, coordinated through etcd
//! (`[coordinator]`, `lungate serve --coordinator etcd://HOST:PORT`).
//!
//! * Each gateway holds one etcd lease (`lease_ttl` seconds, kept alive
//!   every third of it) and registers under it at
//!   `/lungate/gateways/NAME` (its NBD listeners, control socket, PID).
//! * A LUN (an RBD image of a pool) is owned by the gateway whose name is
//!   at `/lungate/luns/POOL[/NS]/IMAGE`, a key bound to that gateway's
//!   lease and created by a transaction that succeeds only if the key does
//!   not exist: at most one owner at any time.
//! * etcd alone does not stop a partitioned old owner from writing. Each
//!   owner records its librados client (the RBD lock owner string of its
//!   handle) at `/lungate/fence/POOL[/NS]/IMAGE` (no lease: it outlives
//!   the owner). A new owner opens the image with [`set_takeover`] for
//!   exactly that client: it breaks the old owner's RBD exclusive lock,
//!   which blocklists the old owner at the OSDs, before it serves a byte;
//!   the old owner's later writes fail in the cluster. A lock held by any
//!   other client (a `lunctl` at work, a gateway that just made a clone
//!   and has not claimed it yet) is never broken: the claim is given back
//!   and tried again a second later.
//! * A gateway that cannot renew its lease for `lease_ttl` seconds has lost
//!   its LUNs to whoever claims them next: it exits (status 75) rather than
//!   serve on.
//! * Every gateway claims, once a second, each RBD LUN of its pools that no
//!   lease holds: a dead gateway's LUNs move once its lease expires.
//!
//! The etcd client and the key names are `lungate_api::etcd`'s (lunctl
//! looks owners up with the same ones).
//!
//! [`set_takeover`]: lun_manager::backing::set_takeover

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lungate_api::etcd::{fence_key, lun_key, Registration};
pub use lungate_api::etcd::{Etcd, EtcdError};
use lungate_api::migrate::EtcdOwner;
use lungate_block::engine::IoEngine;

use crate::registry::Registry;
use crate::served::ServedLun;

/// How often unowned LUNs are claimed.
const CLAIM_EVERY: Duration = Duration::from_secs(1);
/// Exit status of a gateway that lost its lease.
pub const LEASE_LOST: i32 = 75;

/// This gateway in etcd.
pub struct Coordinator {
    etcd: Etcd,
    name: String,
    lease: i64,
    ttl: u64,
    /// The value of every LUN key this gateway holds.
    owner_value: String,
    pools: Vec<PathBuf>,
    engine: IoEngine,
    /// The served LUNs whose etcd key this gateway holds.
    keyed: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
    /// LUNs arriving by a planned handover (`crate::migrate::handover`):
    /// the handover opens and serves them, not the claim loop.
    incoming: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
}

static CURRENT: OnceLock<Arc<Coordinator>> = OnceLock::new();

impl Coordinator {
    /// Take a lease and register this gateway (`addrs`: where its NBD and
    /// control listeners are). Turns on RBD lock takeover for this process.
    pub async fn start(
        endpoint: &str,
        name: Option<&str>,
        ttl: u64,
        pools: &[PathBuf],
        listen: Vec<String>,
        engine: IoEngine,
    ) -> Result<Arc<Coordinator>, EtcdError> {
        let etcd = Etcd::new(endpoint);
        let name = name.map_or_else(
            || format!("{}-{}", lungate_block::sys::hostname(), std::process::id()),
            str::to_string,
        );
        let lease = etcd.grant(ttl).await?;
        let info = Registration {
            name: name.clone(),
            pid: std::process::id(),
            host: lungate_block::sys::hostname(),
            listen,
        };
        let info = serde_json::to_string(&info).map_err(|e| EtcdError::Reply {
            addr: endpoint.into(),
            op: "register".into(),
            why: e.to_string(),
        })?;
        etcd.put(&lungate_api::etcd::gateway_key(&name), &info, lease)
            .await?;
        tracing::info!(gateway = %name, lease, ttl, etcd = endpoint, "registered in etcd");
        let c = Arc::new(Coordinator {
            etcd,
            owner_value: info,
            name,
            lease,
            ttl,
            pools: pools.iter().filter(|p| is_rbd(p)).cloned().collect(),
            engine,
            keyed: Default::default(),
            incoming: Default::default(),
        });
        let _ = CURRENT.set(c.clone());
        // Renewals start now: the first claims (opening images) may take
        // longer than the lease.
        c.keep_alive();
        Ok(c)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The coordinator of this process, if it runs with one.
    pub fn current() -> Option<Arc<Coordinator>> {
        CURRENT.get().cloned()
    }

    /// What a LUN key this gateway owns holds, and its lease.
    pub fn owner(&self) -> EtcdOwner {
        EtcdOwner {
            value: self.owner_value.clone(),
            lease: self.lease,
        }
    }

    /// The commit point of a planned handover: in one transaction, if this
    /// gateway still owns every LUN of `paths`, make `to` their owner and
    /// `fences[i]` (`to`'s RBD lock owner) the client to fence for each.
    /// `Ok(false)`: some key is not this gateway's; nothing changed.
    pub async fn hand_over(
        &self,
        paths: &[PathBuf],
        to: &EtcdOwner,
        fences: &[String],
    ) -> Result<bool, EtcdError> {
        let keys: Vec<String> = paths.iter().map(|p| lun_key(p)).collect();
        let also: Vec<(String, String)> = paths
            .iter()
            .zip(fences)
            .map(|(p, f)| (fence_key(p), f.clone()))
            .collect();
        let done = self
            .etcd
            .swap(&keys, &self.owner_value, &to.value, to.lease, &also)
            .await?;
        if done {
            self.hand_over_done(paths);
        }
        Ok(done)
    }

    /// The keys of `paths` are another gateway's now (a handover
    /// committed).
    pub fn hand_over_done(&self, paths: &[PathBuf]) {
        let mut k = self.keyed.lock().unwrap_or_else(|e| e.into_inner());
        for p in paths {
            k.remove(p);
        }
    }

    /// The owner values of the keys of `paths` (`None`: nobody's).
    pub async fn holders(&self, paths: &[PathBuf]) -> Result<Vec<Option<String>>, EtcdError> {
        let mut out = Vec::new();
        for p in paths {
            out.push(self.etcd.get(&lun_key(p)).await?);
        }
        Ok(out)
    }

    /// Whether `v` is the value of this gateway's LUN keys.
    pub fn is_mine(&self, v: Option<&str>) -> bool {
        v == Some(self.owner_value.as_str())
    }

    /// Mark `paths` as arriving by a handover (`on`) or not any more: the
    /// claim loop leaves them alone meanwhile.
    pub fn expect(&self, paths: &[PathBuf], on: bool) {
        let mut i = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        for p in paths {
            if on {
                i.insert(p.clone());
            } else {
                i.remove(p);
            }
        }
    }

    /// A LUN that arrived by a handover is served: record it as this
    /// gateway's (its fence key names this gateway's client).
    pub async fn adopt(&self, l: &Arc<ServedLun>) {
        self.keep(l).await;
    }

    /// Claim and serve every RBD LUN of the pools that no gateway owns.
    pub async fn claim_pass(&self, reg: &Arc<Registry>) {
        for pool in &self.pools {
            let p = pool.clone();
            let luns =
                match tokio::task::spawn_blocking(move || lun_manager::pool::list_luns(&p)).await {
                    Ok(Ok(l)) => l,
                    Ok(Err(e)) => {
                        tracing::warn!(pool = %pool.display(), error = %e, "cannot list pool");
                        continue;
                    }
                    Err(_) => continue,
                };
            for path in luns {
                let served = reg.luns().into_iter().find(|l| l.lun.path() == path);
                match served {
                    // A LUN this gateway made (a clone) and serves: its key.
                    Some(l) if !self.is_keyed(&path) => {
                        match self
                            .etcd
                            .create(&lun_key(&path), &self.owner_value, self.lease)
                            .await
                        {
                            Ok(Ok(())) => self.keep(&l).await,
                            // claimed before it was made (`preclaim`)
                            Ok(Err(Some(v))) if v == self.owner_value => self.keep(&l).await,
                            _ => {}
                        }
                    }
                    Some(_) => {}
                    None => self.claim(reg, path).await,
                }
            }
        }
    }

    async fn claim(&self, reg: &Arc<Registry>, path: PathBuf) {
        let key = lun_key(&path);
        if self
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&path)
        {
            return;
        }
        let ours_already = match self.etcd.create(&key, &self.owner_value, self.lease).await {
            Ok(Ok(())) => false,
            // Ours already and not served: a handover committed to this
            // gateway and did not get to serve it (its source died at the
            // commit point, say). Serve it now; the handover closed its
            // handles, so the lock is free and nothing is broken.
            Ok(Err(Some(v))) if v == self.owner_value => {
                tracing::warn!(lun = %path.display(), "owned here in etcd but not served (an interrupted handover); serving it");
                true
            }
            Ok(Err(_holder)) => return,
            Err(e) => {
                tracing::warn!(lun = %path.display(), error = %e, "cannot claim LUN");
                return;
            }
        };
        tracing::info!(lun = %path.display(), gateway = %self.name, "owner in etcd; taking the RBD lock");
        let former = match self.etcd.get(&fence_key(&path)).await {
            Ok(_) if ours_already => None,
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(lun = %path.display(), error = %e, "cannot read the former owner; releasing the LUN");
                let _ = self.etcd.delete(&key).await;
                return;
            }
        };
        let (p, control, stats, engine) = (
            path.clone(),
            reg.control.clone(),
            reg.switch_stats.clone(),
            self.engine.clone(),
        );
        let opened = tokio::task::spawn_blocking(move || {
            lun_manager::backing::set_takeover(&p, former);
            let r = ServedLun::open(&p, false, control.as_deref(), stats, &engine);
            lun_manager::backing::set_takeover(&p, None);
            r
        })
        .await;
        let served = match opened {
            Ok(Ok(s)) => Arc::new(s),
            Ok(Err(e)) => {
                tracing::warn!(lun = %path.display(), error = %e, "cannot serve the claimed LUN; releasing it");
                let _ = self.etcd.delete(&key).await;
                return;
            }
            Err(_) => return,
        };
        self.keep(&served).await;
        match reg.add(served) {
            Ok(names) => {
                tracing::info!(lun = %path.display(), exports = ?names, "serving (owner)");
            }
            Err(e) => tracing::warn!(lun = %path.display(), error = %e, "cannot export"),
        }
    }

    fn is_keyed(&self, path: &Path) -> bool {
        self.keyed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(path)
    }

    /// Record this gateway's librados client as the LUN's owner to fence
    /// (`/lungate/fence/…`), now that its key is ours.
    async fn keep(&self, l: &Arc<ServedLun>) {
        let path = l.lun.path().to_path_buf();
        let me = match l.lun.backing().rbd_lock_owners() {
            Some(Ok(o)) if o.len() == 1 => o[0].clone(),
            other => {
                tracing::warn!(lun = %path.display(), owners = ?other.map(|r| r.map_err(|e| e.to_string())), "cannot tell this gateway's RBD lock owner");
                return;
            }
        };
        if let Err(e) = self.etcd.put(&fence_key(&path), &me, 0).await {
            tracing::warn!(lun = %path.display(), error = %e, "cannot record the owner to fence");
            return;
        }
        self.keyed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path);
    }

    /// Keep the lease alive until the process ends; exit when it is lost.
    fn keep_alive(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let every = Duration::from_millis(me.ttl * 1000 / 3);
            let mut last_ok = Instant::now();
            loop {
                tokio::time::sleep(every).await;
                match me.etcd.keepalive(me.lease).await {
                    Ok(t) if t > 0 => last_ok = Instant::now(),
                    Ok(_) => lost(&me.name, "the lease expired"),
                    Err(e) => {
                        tracing::warn!(error = %e, "lease keepalive failed");
                        if last_ok.elapsed() >= Duration::from_secs(me.ttl) {
                            lost(&me.name, "no keepalive within the lease TTL");
                        }
                    }
                }
            }
        });
    }

    /// Claim unowned LUNs once a second until the process ends.
    pub fn spawn(self: &Arc<Self>, reg: Arc<Registry>) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CLAIM_EVERY).await;
                me.claim_pass(&reg).await;
            }
        });
    }
}

/// The lease is gone: another gateway may own (and has fenced) our LUNs.
fn lost(name: &str, why: &str) -> ! {
    tracing::error!(gateway = %name, "{why}: this gateway no longer owns its LUNs; exiting");
    std::process::exit(LEASE_LOST)
}

fn is_rbd(p: &Path) -> bool {
    lun_manager::backing::is_rbd(p)
}

/// Own the keys of LUNs about to be made here (a clone's images) before
/// they exist. `Err`: one is owned already (nothing is kept).
pub async fn preclaim(paths: &[PathBuf]) -> Result<(), String> {
    let Some(c) = CURRENT.get() else {
        return Ok(());
    };
    let mut done = Vec::new();
    for p in paths.iter().filter(|p| is_rbd(p)) {
        match c.etcd.create(&lun_key(p), &c.owner_value, c.lease).await {
            Ok(Ok(())) => done.push(p.clone()),
            Ok(Err(_)) => {
                unclaim(&done).await;
                return Err(format!("{} is owned by another gateway", p.display()));
            }
            Err(e) => {
                unclaim(&done).await;
                return Err(e.to_string());
            }
        }
    }
    Ok(())
}

/// Give back keys [`preclaim`] took (the clone failed).
pub async fn unclaim(paths: &[PathBuf]) {
    let Some(c) = CURRENT.get() else { return };
    for p in paths.iter().filter(|p| is_rbd(p)) {
        let _ = c.etcd.delete(&lun_key(p)).await;
    }
}

/// Give up this gateway's lease (its LUN keys go with it), after its LUNs
/// are closed: other gateways take them at their next claim.
pub async fn release() {
    if let Some(c) = CURRENT.get() {
        if let Err(e) = c.etcd.revoke(c.lease).await {
            tracing::warn!(error = %e, "cannot revoke the etcd lease");
        }
    }
}
