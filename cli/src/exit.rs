//! Exit codes, the same for every command of every lungate binary, so a
//! script can tell "try again later" from "this LUN is damaged" without
//! reading messages. A binary uses the subset that can happen to it.

use std::fmt;
use std::process::ExitCode;

/// Why a command ended. The discriminant is the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Exit {
    /// The command did what it was asked.
    Ok = 0,
    /// The operation failed; the message says what and why (an I/O error,
    /// a refused request, a name already taken, ...).
    Failed = 1,
    /// The command line is wrong (unknown option, missing argument).
    Usage = 2,
    /// The LUN is held by another process (a gateway without a route for
    /// this command, another lunctl, flock(1)): nothing was changed; try
    /// again once it is released.
    Busy = 3,
    /// What the command names does not exist: no such file, LUN, VM or
    /// snapshot.
    NotFound = 4,
    /// A LUN, one of its structures (label, state records, snapshot
    /// manifest) or an input file is damaged or is not what it claims.
    Damaged = 5,
}

impl Exit {
    /// Every code, in order.
    pub const ALL: [Exit; 6] = [
        Exit::Ok,
        Exit::Failed,
        Exit::Usage,
        Exit::Busy,
        Exit::NotFound,
        Exit::Damaged,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    /// The short name used in JSON `error` events (`"exit": "busy"`).
    pub fn name(self) -> &'static str {
        match self {
            Exit::Ok => "ok",
            Exit::Failed => "failed",
            Exit::Usage => "usage",
            Exit::Busy => "busy",
            Exit::NotFound => "not-found",
            Exit::Damaged => "damaged",
        }
    }

    /// One line for people (help texts, man pages, docs).
    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Ok => "success",
            Exit::Failed => "the operation failed (stderr says what and why)",
            Exit::Usage => "bad command line",
            Exit::Busy => "the LUN is held by another process; nothing was changed",
            Exit::NotFound => "no such file, LUN, VM or snapshot",
            Exit::Damaged => "not a LUN, or a LUN, its metadata or an input file is damaged",
        }
    }

    /// The table of `codes` (those a binary uses) as plain text, one per
    /// line, for `--help`.
    pub fn table(codes: &[Exit]) -> String {
        let mut s = String::from("Exit status:\n");
        for e in codes {
            s.push_str(&format!("  {}  {}\n", e.code(), e.meaning()));
        }
        s
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.name())
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_dense_and_usage_is_claps_own() {
        for (i, e) in Exit::ALL.iter().enumerate() {
            assert_eq!(usize::from(e.code()), i);
        }
        // clap exits 2 on a bad command line: our Usage must agree.
        let err = clap::Command::new("x")
            .try_get_matches_from(["x", "--nope"])
            .unwrap_err();
        assert_eq!(err.exit_code(), i32::from(Exit::Usage.code()));
    }
}
