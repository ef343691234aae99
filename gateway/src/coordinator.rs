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
//! The client speaks etcd's v3 HTTP/JSON gateway (grpc-gateway: POST
//! `/v3/...` with JSON bodies, keys and values base64): the handful of
//! calls needed do not justify a gRPC stack.
//!
//! [`set_takeover`]: lun_manager::backing::set_takeover

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use lungate_block::engine::IoEngine;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::registry::Registry;
use crate::served::ServedLun;

/// How long one etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often unowned LUNs are claimed.
const CLAIM_EVERY: Duration = Duration::from_secs(1);
/// Exit status of a gateway that lost its lease.
pub const LEASE_LOST: i32 = 75;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd {addr}: {op}: {source}")]
    Io {
        addr: String,
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd {addr}: {op}: {why}")]
    Reply {
        addr: String,
        op: String,
        why: String,
    },
}

/// A client of etcd's v3 JSON gateway at `HOST:PORT`.
#[derive(Debug, Clone)]
pub struct Etcd {
    addr: String,
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn unb64(v: &Value) -> Option<String> {
    B64.decode(v.as_str()?)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}

/// An int64 of a JSON reply (grpc-gateway writes them as strings).
fn int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

/// Decode an HTTP/1.1 `Transfer-Encoding: chunked` body.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

impl Etcd {
    pub fn new(addr: &str) -> Etcd {
        Etcd { addr: addr.into() }
    }

    /// POST `path` with a JSON body; the JSON reply of a 200.
    pub async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let io = |op: &str| {
            let (addr, op) = (self.addr.clone(), format!("{op} {path}"));
            move |source| EtcdError::Io { addr, op, source }
        };
        let reply = |why: String| EtcdError::Reply {
            addr: self.addr.clone(),
            op: path.into(),
            why,
        };
        let body = body.to_string();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(&self.addr)
                .await
                .map_err(io("connect"))?;
            s.write_all(req.as_bytes()).await.map_err(io("send"))?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.map_err(io("receive"))?;
            Ok::<_, EtcdError>(buf)
        };
        let buf = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| reply(format!("no reply within {CALL_TIMEOUT:?}")))??;
        let split = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| reply("a reply without a header end".into()))?;
        let head = String::from_utf8_lossy(&buf[..split]).to_ascii_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| reply(format!("bad status line in {head:?}")))?;
        let raw = &buf[split + 4..];
        let body = if head.contains("transfer-encoding: chunked") {
            dechunk(raw).ok_or_else(|| reply("bad chunked body".into()))?
        } else {
            raw.to_vec()
        };
        if status != 200 {
            return Err(reply(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        // A streaming call (keepalive) writes one JSON object per message.
        let first = body.split(|b| *b == b'\n').next().unwrap_or_default();
        serde_json::from_slice(first).map_err(|e| reply(format!("not JSON ({e})")))
    }

    /// A new lease of `ttl` seconds.
    pub async fn grant(&self, ttl: u64) -> Result<i64, EtcdError> {
        let r = self.call("/v3/lease/grant", json!({"TTL": ttl})).await?;
        int(&r["ID"]).ok_or_else(|| EtcdError::Reply {
            addr: self.addr.clone(),
            op: "lease grant".into(),
            why: format!("no lease ID in {r}"),
        })
    }

    /// Renew `lease`; its remaining TTL (0: it has expired).
    pub async fn keepalive(&self, lease: i64) -> Result<i64, EtcdError> {
        let r = self
            .call("/v3/lease/keepalive", json!({"ID": lease.to_string()}))
            .await?;
        Ok(int(&r["result"]["TTL"]).unwrap_or(0))
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", json!({"ID": lease.to_string()}))
            .await
            .map(drop)
    }

    pub async fn put(&self, key: &str, value: &str, lease: i64) -> Result<(), EtcdError> {
        self.call(
            "/v3/kv/put",
            json!({"key": b64(key), "value": b64(value), "lease": lease.to_string()}),
        )
        .await
        .map(drop)
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>, EtcdError> {
        let r = self.call("/v3/kv/range", json!({"key": b64(key)})).await?;
        Ok(r["kvs"].get(0).and_then(|kv| unb64(&kv["value"])))
    }

    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        self.call("/v3/kv/deleterange", json!({"key": b64(key)}))
            .await
            .map(drop)
    }

    /// Create `key` = `value` under `lease` if the key does not exist, in
    /// one transaction. `Err(holder)`: the value already there.
    pub async fn create(
        &self,
        key: &str,
        value: &str,
        lease: i64,
    ) -> Result<Result<(), Option<String>>, EtcdError> {
        let k = b64(key);
        let r = self
            .call(
                "/v3/kv/txn",
                json!({
                    "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
                    "success": [{"request_put": {"key": k, "value": b64(value), "lease": lease.to_string()}}],
                    "failure": [{"request_range": {"key": k}}],
                }),
            )
            .await?;
        // proto3 JSON leaves out `succeeded` when it is false.
        if r["succeeded"].as_bool() == Some(true) {
            return Ok(Ok(()));
        }
        let holder = r["responses"]
            .get(0)
            .and_then(|x| x["response_range"]["kvs"].get(0))
            .and_then(|kv| unb64(&kv["value"]));
        Ok(Err(holder))
    }
}

/// The etcd key of the RBD LUN at `path` (`rbd:POOL[/NS]/IMAGE[:opts]`):
/// `/lungate/luns/POOL[/NS]/IMAGE`, the same whatever options name it.
pub fn lun_key(path: &Path) -> String {
    format!("/lungate/luns/{}", image_id(path))
}

/// The etcd key naming the librados client of the LUN's last owner.
fn fence_key(path: &Path) -> String {
    format!("/lungate/fence/{}", image_id(path))
}

/// `POOL[/NS]/IMAGE` of `rbd:POOL[/NS]/IMAGE[:opts]`.
fn image_id(path: &Path) -> String {
    let s = path.to_string_lossy();
    let rest = s.strip_prefix("rbd:").unwrap_or(&s);
    rest.split(':').next().unwrap_or_default().to_string()
}

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
        addrs: Value,
        engine: IoEngine,
    ) -> Result<Arc<Coordinator>, EtcdError> {
        let etcd = Etcd::new(endpoint);
        let name = name.map_or_else(
            || format!("{}-{}", lungate_block::sys::hostname(), std::process::id()),
            str::to_string,
        );
        let lease = etcd.grant(ttl).await?;
        let info = json!({"name": name, "pid": std::process::id(), "listen": addrs});
        etcd.put(
            &format!("/lungate/gateways/{name}"),
            &info.to_string(),
            lease,
        )
        .await?;
        tracing::info!(gateway = %name, lease, ttl, etcd = endpoint, "registered in etcd");
        let c = Arc::new(Coordinator {
            etcd,
            owner_value: info.to_string(),
            name,
            lease,
            ttl,
            pools: pools.iter().filter(|p| is_rbd(p)).cloned().collect(),
            engine,
            keyed: Default::default(),
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
        match self.etcd.create(&key, &self.owner_value, self.lease).await {
            Ok(Ok(())) => {}
            Ok(Err(_holder)) => return,
            Err(e) => {
                tracing::warn!(lun = %path.display(), error = %e, "cannot claim LUN");
                return;
            }
        }
        tracing::info!(lun = %path.display(), gateway = %self.name, "owner in etcd; taking the RBD lock");
        let former = match self.etcd.get(&fence_key(&path)).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_keys_ignore_options() {
        assert_eq!(
            lun_key(Path::new("rbd:rbd/ns/vm.lun:conf=/a/b.conf")),
            "/lungate/luns/rbd/ns/vm.lun"
        );
        assert_eq!(lun_key(Path::new("rbd:p/vm.lun")), "/lungate/luns/p/vm.lun");
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").as_deref(),
            Some(&b"abcde"[..])
        );
        assert_eq!(dechunk(b"5\r\nab"), None);
    }
}
