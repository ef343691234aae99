//! Why a lunctl command failed: the message, and the exit code
//! ([`lungate_cli::Exit`]) chosen from the kind of the typed error it came
//! from — never from the message's text.

use std::fmt;

use lun_manager::owner;
use lungate_api::client as control;
use lungate_cli::Exit;

#[derive(Debug)]
pub struct Fail {
    pub exit: Exit,
    pub msg: String,
}

pub type Res<T = ()> = Result<T, Fail>;

impl Fail {
    pub fn new(exit: Exit, msg: impl Into<String>) -> Fail {
        Fail {
            exit,
            msg: msg.into(),
        }
    }

    pub fn not_found(msg: impl Into<String>) -> Fail {
        Fail::new(Exit::NotFound, msg)
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

/// lunctl's own refusals (bad sizes, missing --yes, ...).
impl From<String> for Fail {
    fn from(msg: String) -> Fail {
        Fail::new(Exit::Failed, msg)
    }
}

fn io_exit(e: &std::io::Error) -> Exit {
    if e.kind() == std::io::ErrorKind::NotFound {
        Exit::NotFound
    } else {
        Exit::Failed
    }
}

/// The exit code for a library error.
pub fn lun_exit(e: &lun_manager::Error) -> Exit {
    use lun_manager::Error as E;
    match e {
        E::NotALun { .. }
        | E::Damaged { .. }
        | E::Label { .. }
        | E::StateDir { .. }
        | E::Record { .. } => Exit::Damaged,
        E::NoSnapshot(_) => Exit::NotFound,
        E::Io { source, .. } => io_exit(source),
        _ => Exit::Failed,
    }
}

impl From<lun_manager::Error> for Fail {
    fn from(e: lun_manager::Error) -> Fail {
        Fail::new(lun_exit(&e), e.to_string())
    }
}

impl From<owner::Error> for Fail {
    fn from(e: owner::Error) -> Fail {
        let exit = match &e {
            owner::Error::Owned { .. } | owner::Error::Locked { .. } => Exit::Busy,
            owner::Error::Io { source, .. } => io_exit(source),
            owner::Error::Lun(l) => lun_exit(l),
        };
        Fail::new(exit, e.to_string())
    }
}

impl From<control::Error> for Fail {
    fn from(e: control::Error) -> Fail {
        let exit = match e.status() {
            Some(404) => Exit::NotFound,
            _ => Exit::Failed,
        };
        Fail::new(exit, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn each_error_kind_has_its_exit_code() {
        let p = PathBuf::from("x.lun");
        let damaged = lun_manager::Error::Damaged {
            path: p.clone(),
            why: "bad".into(),
        };
        assert_eq!(Fail::from(damaged).exit, Exit::Damaged);
        let gone = lun_manager::Error::Io {
            path: p.clone(),
            op: "open",
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(Fail::from(gone).exit, Exit::NotFound);
        let snap = lun_manager::Error::NoSnapshot("no snapshot named \"s\"".into());
        assert_eq!(Fail::from(snap).exit, Exit::NotFound);
        let held = owner::Error::Locked { lun: "x".into() };
        assert_eq!(Fail::from(held).exit, Exit::Busy);
        let wrapped = owner::Error::Lun(lun_manager::Error::NotALun {
            path: p,
            why: "no label".into(),
        });
        assert_eq!(Fail::from(wrapped).exit, Exit::Damaged);
        assert_eq!(Fail::from("no".to_string()).exit, Exit::Failed);
    }
}
