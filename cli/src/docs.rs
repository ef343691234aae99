//! Shell completions and man pages, generated from a binary's own clap
//! definition so they never disagree with it (clap_complete, clap_mangen).
//!
//! A binary gets both with one enum variant and one call:
//!
//! ```ignore
//! #[derive(Subcommand)]
//! enum Cmd {
//!     // ... its own commands ...
//!     #[command(flatten)]
//!     Doc(lungate_cli::DocCmd),
//! }
//! // in main, before anything else:
//! if let Cmd::Doc(d) = &cli.cmd {
//!     return lungate_cli::docs::main(Cli::command(), d, &[Exit::Ok, Exit::Failed, Exit::Usage]);
//! }
//! ```
//!
//! `BIN completions bash|zsh|fish` prints a completion script;
//! `BIN man DIR` writes `BIN.1` and one `BIN-COMMAND.1` per subcommand
//! (`lunctl-create.1`, `lunctl-pool-init.1`), as git and rbd-nbd do;
//! `scripts/install` installs both.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Command, Subcommand, ValueEnum};

use crate::exit::Exit;

/// The shells completion scripts are made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// The documentation subcommands every lungate binary has.
#[derive(Debug, Clone, Subcommand)]
pub enum DocCmd {
    /// Print a shell completion script (bash, zsh or fish) on stdout
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write the man pages (BIN.1 and one BIN-COMMAND.1 per subcommand)
    /// into DIR
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// Run a documentation subcommand and return the process's exit code.
/// `exits` are the exit codes the binary uses (its man page lists them).
pub fn main(cmd: Command, doc: &DocCmd, exits: &[Exit]) -> ExitCode {
    let name = cmd.get_name().to_string();
    let r = match doc {
        DocCmd::Completions { shell } => completions(cmd, *shell, &mut io::stdout().lock()),
        DocCmd::Man { dir } => man_pages(cmd, dir, exits).map(|files| {
            for f in files {
                println!("{}", f.display());
            }
        }),
    };
    match r {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            eprintln!("{name}: error: {e}");
            Exit::Failed.into()
        }
    }
}

/// Write the completion script of `cmd` for `shell` into `w`.
pub fn completions(mut cmd: Command, shell: Shell, w: &mut dyn Write) -> io::Result<()> {
    let bin = cmd.get_name().to_string();
    let mut buf = Vec::new();
    match shell {
        Shell::Bash => {
            clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, &bin, &mut buf)
        }
        Shell::Zsh => clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, &bin, &mut buf),
        Shell::Fish => {
            clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, &bin, &mut buf)
        }
    }
    if shell == Shell::Bash && bin.contains('-') {
        buf = fix_bash_hyphenated(&bin, &buf).into_bytes();
    }
    w.write_all(&buf)?;
    w.flush()
}

/// clap_complete (4.6.12 and before, clap-rs/clap#6421) spells the bash
/// state of a subcommand of a hyphenated binary two ways: the dispatch loop
/// builds `vmm__shim__subcmd__run`, the `case` arms match
/// `vmm__subcmd__shim__subcmd__run`, so nothing past the first word
/// completes. Rewrite the arms' spelling to the loop's.
fn fix_bash_hyphenated(bin: &str, script: &[u8]) -> String {
    let text = String::from_utf8_lossy(script);
    let right = bin.replace('-', "__");
    let wrong = bin.replace('-', "__subcmd__");
    text.replace(&format!("{wrong}__subcmd__"), &format!("{right}__subcmd__"))
}

/// Write the man pages of `cmd` and of each of its (visible) subcommands,
/// recursively, into `dir` (created if missing). Returns the files written.
pub fn man_pages(cmd: Command, dir: &Path, exits: &[Exit]) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let top = cmd.get_name().to_string();
    let version = cmd.get_version().unwrap_or("").to_string();
    let mut pages = Vec::new();
    collect(&cmd, &mut pages);
    let names: Vec<String> = pages.iter().map(|c| page_name(c)).collect();
    let mut written = Vec::new();
    for (c, name) in pages.iter().zip(&names) {
        let man = clap_mangen::Man::new((*c).clone())
            .section("1")
            .source(format!("lungate {version}"))
            .manual("lungate manual");
        let mut page = Vec::new();
        man.render_title(&mut page)?;
        man.render_name_section(&mut page)?;
        man.render_synopsis_section(&mut page)?;
        man.render_description_section(&mut page)?;
        if c.get_arguments().any(|a| !a.is_hide_set()) {
            man.render_options_section(&mut page)?;
        }
        if c.has_subcommands() {
            man.render_subcommands_section(&mut page)?;
        }
        exit_status(&mut page, exits)?;
        let see: Vec<&String> = if *name == top {
            names.iter().filter(|n| **n != top).collect()
        } else {
            vec![&names[0]]
        };
        see_also(&mut page, &see)?;
        if c.get_version().is_some() {
            man.render_version_section(&mut page)?;
        }
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, &page)?;
        written.push(path);
    }
    Ok(written)
}

/// `cmd` and its visible subcommands, depth first, parents before children.
fn collect<'a>(cmd: &'a Command, out: &mut Vec<&'a Command>) {
    out.push(cmd);
    for s in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        collect(s, out);
    }
}

/// `lunctl`, `lunctl-create`, `lunctl-pool-init` (clap sets the display
/// name of a built subcommand to its path joined by '-').
fn page_name(c: &Command) -> String {
    c.get_display_name().unwrap_or(c.get_name()).to_string()
}

/// roff text, escaped: a backslash doubles and a leading '.' or '\'' is
/// protected so it is never read as a request.
fn roff_text(s: &str) -> String {
    let s = s.replace('\\', "\\\\").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

fn exit_status(w: &mut dyn Write, exits: &[Exit]) -> io::Result<()> {
    writeln!(w, ".SH \"EXIT STATUS\"")?;
    for e in exits {
        writeln!(w, ".TP\n\\fB{}\\fR\n{}", e.code(), roff_text(e.meaning()))?;
    }
    Ok(())
}

fn see_also(w: &mut dyn Write, pages: &[&String]) -> io::Result<()> {
    if pages.is_empty() {
        return Ok(());
    }
    writeln!(w, ".SH \"SEE ALSO\"")?;
    let refs: Vec<String> = pages
        .iter()
        .map(|p| format!("\\fB{}\\fR(1)", roff_text(p)))
        .collect();
    writeln!(w, "{}", refs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Parser};

    #[derive(Parser)]
    #[command(name = "demo", version = "1.2.3", about = "A demo tool")]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Subcommand)]
    enum Cmd {
        /// Make a thing
        Make(MakeArgs),
        /// Group of things
        Pool {
            #[command(subcommand)]
            cmd: PoolCmd,
        },
        #[command(hide = true)]
        Secret,
        #[command(flatten)]
        Doc(DocCmd),
    }

    #[derive(Args)]
    struct MakeArgs {
        name: String,
        #[arg(long)]
        size: Option<String>,
    }

    #[derive(Subcommand)]
    enum PoolCmd {
        /// Start a pool
        Init { dir: PathBuf },
    }

    #[test]
    fn man_pages_cover_every_visible_command_with_exit_status_and_see_also() {
        use clap::CommandFactory;
        let d = tempfile::tempdir().unwrap();
        let files = man_pages(Cli::command(), d.path(), &Exit::ALL).unwrap();
        let mut names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "demo-completions.1",
                "demo-make.1",
                "demo-man.1",
                "demo-pool-init.1",
                "demo-pool.1",
                "demo.1"
            ]
        );
        let top = std::fs::read_to_string(d.path().join("demo.1")).unwrap();
        assert!(top.contains(".TH demo 1"), "{top}");
        assert!(
            top.contains("EXIT STATUS") && top.contains("\\fB5\\fR"),
            "{top}"
        );
        assert!(top.contains("\\fBdemo\\-make\\fR(1)"), "{top}");
        let make = std::fs::read_to_string(d.path().join("demo-make.1")).unwrap();
        assert!(make.contains("\\-\\-size"), "{make}");
        assert!(make.contains("\\fBdemo\\fR(1)"), "{make}");
    }

    #[test]
    fn completion_scripts_name_the_binary_and_its_subcommands() {
        use clap::CommandFactory;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut b = Vec::new();
            completions(Cli::command(), shell, &mut b).unwrap();
            let s = String::from_utf8(b).unwrap();
            assert!(
                s.contains("demo") && s.contains("make") && s.contains("init"),
                "{shell:?}: {s}"
            );
        }
    }
}
