//! `lunctl replicate`, `lunctl replications` and `lunctl failover`:
//! continuous replication of a served VM to another gateway with a
//! checkpoint each interval, and promotion of a replica's newest complete
//! checkpoint on the target (docs/migration.md, "Replication and
//! failover"). The source's gateway runs the cycles; lunctl only starts,
//! stops and lists them through the control APIs.

use std::path::{Path, PathBuf};

use lun_manager::size::{human, parse_size};
use lungate_api::client as control;
use lungate_api::types::{FailoverRequest, ReplicateRequest, ReplicationInfo};
use lungate_cli::{Exit, Output};

use crate::fail::{Fail, Res};

/// What `lunctl replicate` was asked.
pub struct Args {
    pub to: Option<String>,
    pub target_pool: Option<String>,
    pub every: Option<String>,
    pub keep: Option<u32>,
    pub max_rate: Option<String>,
    pub token_file: Option<PathBuf>,
    pub stop: bool,
}

/// `30s`, `500ms`, `5m`, `1h`, or plain seconds.
pub fn parse_interval(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not an interval such as 30s, 500ms or 5m"))?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    ms.ok_or_else(|| format!("{s:?} is too long"))
}

fn summary(i: &ReplicationInfo) -> String {
    let mut s = format!("{} ({:?}, {}) {}", i.lun, i.side, i.peer, i.state);
    match &i.checkpoint {
        Some(c) => s.push_str(&format!(
            ", newest checkpoint {} (taken at {})",
            c.name, c.created
        )),
        None => s.push_str(", no checkpoint yet"),
    }
    if let Some(c) = i.cycles.last() {
        s.push_str(&format!(
            ", last cycle {} sent {} ({} file(s) sent, {} reused) in {} ms",
            c.seq,
            human(c.bytes),
            c.layers_sent,
            c.layers_reused,
            c.elapsed_ms
        ));
    }
    if let Some(e) = &i.error {
        s.push_str(&format!(": {e}"));
    }
    s
}

pub fn replicate(out: &Output, path: &Path, a: Args) -> Res {
    let (client, lun, name) = crate::migrate::gateway(path)?;
    if a.stop {
        let i = client.stop_replication(&lun)?;
        out.result("replicate", &i, || {
            format!("stopped replicating {}\n", summary(&i))
        });
        return Ok(());
    }
    let usage = |m: String| Fail::new(Exit::Usage, m);
    let to =
        a.to.ok_or_else(|| usage("give --to HOST:PORT (or --stop)".into()))?;
    let every = a.every.as_deref().unwrap_or("30s");
    let every_ms = parse_interval(every).map_err(|e| usage(format!("--every: {e}")))?;
    let token = match &a.token_file {
        None => None,
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| format!("{}: {e}", f.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        ),
    };
    let max_rate = match &a.max_rate {
        None => None,
        Some(r) => Some(parse_size(r).map_err(|e| usage(format!("--max-rate {r:?}: {e}")))?),
    };
    let req = ReplicateRequest {
        to,
        target_pool: a.target_pool,
        every_ms,
        keep: a.keep,
        max_rate,
        token,
    };
    let i = client.replicate(&lun, &req)?;
    out.result("replicate", &i, || {
        format!(
            "replicating {name} to {} every {every}; `lunctl replications` follows it, \
             `lunctl replicate {name} --stop` ends it\n",
            i.peer
        )
    });
    Ok(())
}

fn socket(pool: Option<&Path>, control_sock: Option<&Path>) -> Res<PathBuf> {
    match (control_sock, pool) {
        (Some(s), _) => Ok(s.to_path_buf()),
        (None, Some(p)) => Ok(p.join(".lungate.sock")),
        (None, None) => Err(Fail::new(
            Exit::Usage,
            "give --pool DIR or --control SOCKET",
        )),
    }
}

/// `lunctl replications --pool P` (or `--control SOCKET`).
pub fn list(out: &Output, pool: Option<&Path>, control_sock: Option<&Path>) -> Res {
    let client = control::Client::new(&socket(pool, control_sock)?)?;
    let v = client.replications()?;
    out.document(&v, || {
        if v.is_empty() {
            return "no replications\n".into();
        }
        v.iter().map(|i| format!("{}\n", summary(i))).collect()
    });
    Ok(())
}

/// `lunctl failover NAME --pool Q [--force]`, through the gateway that
/// holds the replica in pool Q.
pub fn failover(
    out: &Output,
    name: &str,
    pool: Option<&Path>,
    control_sock: Option<&Path>,
    force: bool,
) -> Res {
    let client = control::Client::new(&socket(pool, control_sock)?)?;
    let req = FailoverRequest {
        pool: pool.map(|p| p.display().to_string()),
        force,
    };
    let r = client.failover(name, &req)?;
    out.result("failover", &r, || {
        format!(
            "failed over {} to checkpoint {} (taken at {}){}; serving {}\n",
            r.members.join(", "),
            r.checkpoint.name,
            r.checkpoint.created,
            if r.aborted_cycle {
                ", after aborting the cycle being received"
            } else {
                ""
            },
            r.exports.join(", ")
        )
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_take_units() {
        assert_eq!(parse_interval("30s"), Ok(30_000));
        assert_eq!(parse_interval("500ms"), Ok(500));
        assert_eq!(parse_interval("2m"), Ok(120_000));
        assert_eq!(parse_interval("7"), Ok(7000));
        assert!(parse_interval("s").is_err());
        assert!(parse_interval("3d").is_err());
    }
}
