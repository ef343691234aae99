//! Shell completions and man pages of every lungate binary, generated
//! from their clap definitions (`BIN completions bash|zsh|fish`,
//! `BIN man DIR`) and installed by `scripts/install`: the scripts are run
//! by the real shells (bash completes, fish completes, zsh parses), the
//! pages are rendered by groff and man with no warning, and every visible
//! command of `BIN --help` has its page.

use std::path::{Path, PathBuf};
use std::process::Command;

use lungate_tests::{bin, require_tool, run_ok};

/// The binaries with the shared documentation subcommands.
const BINS: [&str; 3] = ["lunctl", "lungate", "vmm-shim"];

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run_ok(cmd).stdout).expect("utf-8")
}

/// The subcommands `BIN --help` lists (clap's own help, an independent
/// view of the same definition).
fn help_commands(b: &str) -> Vec<String> {
    let help = stdout(Command::new(bin(b)).arg("--help"));
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// What bash's completion of `words` (the last one being completed)
/// offers, with the completion script `script` loaded.
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
    let cword = words.len() - 1;
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "source '{}'\n\
         f=$(complete -p {} | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p')\n\
         COMP_WORDS=({})\nCOMP_CWORD={cword}\nCOMP_LINE=\"${{COMP_WORDS[*]}}\"\n\
         \"$f\" {} '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        words[0],
        quoted.join(" "),
        words[0],
        words[cword],
        if cword > 0 { words[cword - 1] } else { "" },
    );
    stdout(Command::new(require_tool("bash")).args(["--norc", "-c", &prog]))
        .lines()
        .map(str::to_string)
        .collect()
}

fn fish_complete(script: &Path, line: &str) -> Vec<String> {
    let prog = format!("source '{}'; complete -C '{line}'", script.display());
    stdout(Command::new(require_tool("fish")).args(["--no-config", "-c", &prog]))
        .lines()
        .map(|l| l.split('\t').next().unwrap_or("").to_string())
        .collect()
}

fn generate(dir: &Path, b: &str, shell: &str) -> PathBuf {
    let p = dir.join(format!("{b}.{shell}"));
    let text = stdout(Command::new(bin(b)).args(["completions", shell]));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bash_fish_and_zsh_complete_commands_options_and_values() {
    let d = tempfile::tempdir().unwrap();
    for b in BINS {
        let bash = generate(d.path(), b, "bash");
        let fish = generate(d.path(), b, "fish");
        let zsh = generate(d.path(), b, "zsh");
        let cmds = help_commands(b);
        assert!(cmds.iter().any(|c| c == "completions") && cmds.iter().any(|c| c == "man"));
        let offered = bash_complete(&bash, &[b, ""]);
        let fished = fish_complete(&fish, &format!("{b} "));
        for c in &cmds {
            assert!(
                offered.contains(c),
                "bash does not offer `{b} {c}`: {offered:?}"
            );
            assert!(
                fished.contains(c),
                "fish does not offer `{b} {c}`: {fished:?}"
            );
        }
        assert_eq!(
            bash_complete(&bash, &[b, "completions", ""])
                .into_iter()
                .filter(|w| !w.starts_with('-'))
                .collect::<Vec<_>>(),
            ["bash", "zsh", "fish"]
        );
        let z = std::fs::read_to_string(&zsh).unwrap();
        assert!(z.starts_with(&format!("#compdef {b}")), "{z}");
        run_ok(Command::new(require_tool("zsh")).arg("-n").arg(&zsh));
    }
    let bash = d.path().join("lunctl.bash");
    let fish = d.path().join("lunctl.fish");
    assert_eq!(bash_complete(&bash, &["lunctl", "fla"]), ["flatten"]);
    assert!(bash_complete(&bash, &["lunctl", "create", "--pre"]).contains(&"--prefill".into()));
    assert_eq!(
        bash_complete(&bash, &["lunctl", "create", "web", "--layout", ""]),
        ["offset", "truncate", "aligned"]
    );
    // fish sorts what it offers (some versions), bash keeps clap's order.
    let mut layouts = fish_complete(&fish, "lunctl create web --layout ");
    layouts.sort();
    assert_eq!(layouts, ["aligned", "offset", "truncate"]);
    assert_eq!(
        bash_complete(
            &bash,
            &["lunctl", "import", "disk.raw", "web", "--layout", ""]
        ),
        ["offset", "truncate", "aligned"]
    );
    assert!(fish_complete(&fish, "lunctl delete-snapshot --").contains(&"--json".into()));
    let gw = d.path().join("lungate.bash");
    assert!(bash_complete(&gw, &["lungate", "serve", "--po"]).contains(&"--pool".into()));
    let shim = d.path().join("vmm-shim.bash");
    assert_eq!(bash_complete(&shim, &["vmm-shim", "rest"]), ["restore"]);
    assert!(
        bash_complete(&shim, &["vmm-shim", "run", "vm", "--guest", ""])
            .contains(&"selftest".into())
    );
}

#[test]
fn every_command_has_a_man_page_that_renders_without_warnings() {
    require_tool("groff");
    let man = require_tool("man");
    let d = tempfile::tempdir().unwrap();
    for b in BINS {
        let dir = d.path().join(b);
        let listed = stdout(Command::new(bin(b)).arg("man").arg(&dir));
        let mut want = vec![format!("{b}.1")];
        want.extend(help_commands(b).iter().map(|c| format!("{b}-{c}.1")));
        for page in &want {
            assert!(
                listed.lines().any(|l| l.ends_with(page.as_str())),
                "`{b} man` did not write {page}: {listed}"
            );
        }
        for page in listed.lines() {
            let out = run_ok(Command::new("groff").args(["-man", "-ww", "-z"]).arg(page));
            assert!(
                out.stderr.is_empty(),
                "{page}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = stdout(
                Command::new(&man)
                    .env("MANWIDTH", "100")
                    .args(["-P", "cat", "-l"])
                    .arg(page),
            );
            for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "EXIT STATUS"] {
                assert!(text.contains(section), "{page} has no {section}:\n{text}");
            }
        }
    }
    let create = stdout(
        Command::new(&man)
            .env("MANWIDTH", "100")
            .args(["-P", "cat", "-l"])
            .arg(d.path().join("lunctl/lunctl-create.1")),
    );
    assert!(create.contains("--prefill") && create.contains("--cluster-size"));
    assert!(create.contains("is held by another process"), "{create}");
    assert!(d.path().join("lunctl/lunctl-pool-init.1").is_file());
    let top = stdout(
        Command::new(&man)
            .env("MANWIDTH", "100")
            .args(["-P", "cat", "-l"])
            .arg(d.path().join("lunctl/lunctl.1")),
    );
    assert!(
        top.contains("SEE ALSO") && top.contains("lunctl-flatten(1)"),
        "{top}"
    );
}

/// `scripts/install --debug PREFIX` puts binaries, pages and completion
/// scripts where man, bash-completion, zsh and fish look for them.
#[test]
fn scripts_install_puts_binaries_pages_and_completions_in_place() {
    let d = tempfile::tempdir().unwrap();
    let prefix = d.path().join("usr");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = lungate_tests::profile_dir()
        .parent()
        .expect("target dir")
        .to_path_buf();
    run_ok(
        Command::new(require_tool("bash"))
            .arg(root.join("scripts/install"))
            .arg("--debug")
            .arg(&prefix)
            .env("CARGO_TARGET_DIR", &target),
    );
    for b in BINS {
        let installed = prefix.join("bin").join(b);
        let v = stdout(Command::new(&installed).arg("--version"));
        assert!(v.starts_with(b), "{v}");
        for f in [
            format!("share/man/man1/{b}.1"),
            format!("share/bash-completion/completions/{b}"),
            format!("share/zsh/site-functions/_{b}"),
            format!("share/fish/vendor_completions.d/{b}.fish"),
        ] {
            assert!(prefix.join(&f).is_file(), "{f} not installed");
        }
    }
    // man finds an installed page by name.
    let found = stdout(
        Command::new(require_tool("man"))
            .arg("-M")
            .arg(prefix.join("share/man"))
            .args(["-w", "lunctl-flatten"]),
    );
    assert!(found.trim().ends_with("man1/lunctl-flatten.1"), "{found}");
    let offered = bash_complete(
        &prefix.join("share/bash-completion/completions/lunctl"),
        &["lunctl", "snap"],
    );
    assert_eq!(offered, ["snapshot", "snapshots"]);
}
