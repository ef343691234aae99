//! The durable record each side keeps of a migration, in the pool it
//! concerns: `POOL/.lungate-migrations/ID.out.json` on the source,
//! `ID.in.json` on the target, beside the target's staging directory
//! `ID/`. A record is replaced atomically (a temporary file, `fsync`,
//! rename, `fsync` of the directory), so a crash leaves the old state or
//! the new one, and [`super::recover`] reads it at the next start.
//!
//! | side | state | meaning after a crash |
//! | --- | --- | --- |
//! | source | `copying` | the target never got a commit: it aborts; the source serves |
//! | source | `switching` | a commit may have been sent: ask the target before serving |
//! | source | `held` | asked, no answer yet: the LUN files wait in `ID/held/`, unserved |
//! | target | `staged` | never committed: remove the staging directory |
//! | target | `committed` | the target owns the LUNs: finish moving them into the pool |
//! | target | `done` | finished; kept to answer a source that asks later |

use std::io::Write;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::state_dir;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Copying,
    Switching,
    Held,
    Staged,
    Committed,
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberRec {
    pub name: String,
    pub uuid: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub id: Uuid,
    /// `true` on the source.
    pub outgoing: bool,
    pub state: State,
    /// The other gateway (`HOST:PORT`), or `local`.
    pub peer: String,
    pub members: Vec<MemberRec>,
    #[serde(default)]
    pub keep_source: bool,
    /// Unix seconds.
    pub created: u64,
}

impl Record {
    pub fn path(pool: &Path, id: Uuid, outgoing: bool) -> PathBuf {
        state_dir(pool).join(format!("{id}.{}.json", if outgoing { "out" } else { "in" }))
    }

    /// Write the record durably, replacing the previous one.
    pub fn store(&self, pool: &Path) -> std::io::Result<()> {
        let dir = state_dir(pool);
        // The pool's own entry for the state directory needs an fsync only
        // when the directory is new (a record changing state, inside a
        // migration's pause, saves it).
        let new_dir = !dir.is_dir();
        std::fs::create_dir_all(&dir)?;
        let path = Self::path(pool, self.id, self.outgoing);
        let tmp = dir.join(format!(".{}.tmp", self.id));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).expect("records serialise"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(&dir)?;
        if new_dir {
            sync_dir(pool)?;
        }
        Ok(())
    }

    pub fn set(&mut self, pool: &Path, state: State) -> std::io::Result<()> {
        self.state = state;
        self.store(pool)
    }

    pub fn remove(&self, pool: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(Self::path(pool, self.id, self.outgoing)) {
            Ok(()) => sync_dir(&state_dir(pool)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every record of `pool`; unreadable ones are reported and skipped.
    pub fn list(pool: &Path) -> Vec<Record> {
        let dir = state_dir(pool);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.ends_with(".out.json") || name.ends_with(".in.json")) {
                continue;
            }
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::error!(record = %p.display(), "unreadable migration record, left alone: {e}")
                }
            }
        }
        out.sort_by_key(|r| r.created);
        out
    }

    /// This migration's directory in `pool` (the target's staging area,
    /// the source's retired or held files).
    pub fn dir(pool: &Path, id: Uuid) -> PathBuf {
        state_dir(pool).join(id.to_string())
    }
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Move `from` to `to` if `from` exists (idempotent: a crash between two
/// moves is finished by doing them again). `to`'s directory must exist.
pub fn move_if_present(from: &Path, to: &Path) -> std::io::Result<bool> {
    match std::fs::symlink_metadata(from) {
        Ok(_) => {
            std::fs::rename(from, to)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Remove a migration's own directory, without following symlinks out of
/// it (`remove_dir_all` removes links, not their targets).
pub fn remove_own_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(dir),
        Ok(_) => std::fs::remove_file(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_replaced_whole_and_listed_by_pool() {
        let pool = tempfile::tempdir().unwrap();
        let mut r = Record {
            id: Uuid::new_v4(),
            outgoing: true,
            state: State::Copying,
            peer: "127.0.0.1:1".into(),
            members: vec![MemberRec {
                name: "vm".into(),
                uuid: Uuid::new_v4(),
            }],
            keep_source: false,
            created: 1,
        };
        r.store(pool.path()).unwrap();
        r.set(pool.path(), State::Switching).unwrap();
        let all = Record::list(pool.path());
        assert_eq!(all, vec![r.clone()]);
        std::fs::write(state_dir(pool.path()).join("x.in.json"), b"{").unwrap();
        assert_eq!(Record::list(pool.path()).len(), 1, "garbage is skipped");
        r.remove(pool.path()).unwrap();
        r.remove(pool.path()).unwrap();
        assert!(Record::list(pool.path()).is_empty());
    }
}
