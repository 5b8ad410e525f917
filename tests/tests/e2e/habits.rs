//! The habits of the ecosystem through the binary: `kairos completions` writes scripts
//! that bash (and zsh and fish, where installed) accept and that name every subcommand;
//! `kairos man` writes one page per command and subcommand that `man` renders.

use std::collections::BTreeSet;
use std::process::Command;

use kairos_tests::{Kairos, kairos_bin};

/// The subcommands `kairos [PATH...] --help` lists under "Commands:" (without `help`).
fn subcommands(path: &[&str]) -> Vec<String> {
    let output = Command::new(kairos_bin())
        .args(path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    help.lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| {
            // A name starts at two spaces; a wrapped description is indented further.
            let name = line.strip_prefix("  ")?;
            (!name.starts_with(' ')).then(|| name.split_whitespace().next().unwrap().to_string())
        })
        .filter(|name| name != "help")
        .collect()
}

fn shell_accepts(shell: &str, script: &std::path::Path) -> Option<bool> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {shell}")])
        .output()
        .ok()?
        .status
        .success();
    if !found {
        return None;
    }
    let output = Command::new(shell).arg("-n").arg(script).output().unwrap();
    if !output.status.success() {
        panic!(
            "{shell} -n refuses the script: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Some(true)
}

#[test]
fn completion_scripts_name_every_subcommand_and_parse() {
    let kairos = Kairos::new();
    let top = subcommands(&[]);
    assert!(top.len() > 20, "{top:?}");
    assert!(top.iter().any(|name| name == "completions"));
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let script = String::from_utf8(kairos.ok(["completions", shell])).unwrap();
        for name in &top {
            assert!(
                script.contains(name.as_str()),
                "the {shell} script does not mention {name}"
            );
        }
        let path = dir.path().join(format!("kairos.{shell}"));
        std::fs::write(&path, &script).unwrap();
        let checked = shell_accepts(shell, &path);
        if shell == "bash" {
            assert_eq!(
                checked,
                Some(true),
                "bash is always there to check its script"
            );
            // Sourced, it registers the completion function for `kairos`.
            let output = Command::new("bash")
                .arg("-c")
                .arg(format!("source {} && complete -p kairos", path.display()))
                .output()
                .unwrap();
            let registered = String::from_utf8_lossy(&output.stdout);
            assert!(registered.contains("_kairos"), "{registered}");
        }
    }
    let refused = kairos.run(["completions", "tcsh"]);
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        error.contains("possible values: bash, zsh, fish"),
        "{error}"
    );
}

#[test]
fn man_pages_are_one_per_command_and_subcommand_and_render() {
    let kairos = Kairos::new();
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("man1");
    let listed = String::from_utf8(kairos.ok(["man", "--dir", pages.to_str().unwrap()])).unwrap();

    let mut expected = BTreeSet::from(["kairos.1".to_string()]);
    for name in subcommands(&[]) {
        expected.insert(format!("kairos-{name}.1"));
        for nested in subcommands(&[&name]) {
            expected.insert(format!("kairos-{name}-{nested}.1"));
        }
    }
    assert!(expected.contains("kairos-replica-add.1"), "{expected:?}");
    assert!(expected.contains("kairos-timeline-fork.1"), "{expected:?}");
    let written: BTreeSet<String> = std::fs::read_dir(&pages)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(written, expected);
    assert_eq!(listed.lines().count(), expected.len(), "{listed}");

    for name in &written {
        let text = std::fs::read_to_string(pages.join(name)).unwrap();
        let title = name.strip_suffix(".1").unwrap();
        assert!(
            text.lines()
                .any(|line| line.starts_with(&format!(".TH {title} 1 "))),
            "{name} has no .TH header"
        );
        assert!(text.contains(".SH NAME"), "{name}");
        assert!(text.contains(".SH SYNOPSIS"), "{name}");
    }
    let capture = std::fs::read_to_string(pages.join("kairos-capture.1")).unwrap();
    assert!(
        capture.contains("kairos capture"),
        "the synopsis names the command"
    );

    // Without --dir: the top page on standard output.
    let top = String::from_utf8(kairos.ok(["man"])).unwrap();
    assert_eq!(
        top,
        std::fs::read_to_string(pages.join("kairos.1")).unwrap()
    );

    let man_installed = Command::new("sh")
        .args(["-c", "command -v man"])
        .output()
        .unwrap()
        .status
        .success();
    if man_installed {
        for name in ["kairos.1", "kairos-capture.1", "kairos-replica-add.1"] {
            let output = Command::new("man")
                .arg("-l")
                .arg(pages.join(name))
                .env("MANWIDTH", "100")
                .env("MANPAGER", "cat")
                .env("PAGER", "cat")
                .output()
                .unwrap();
            let rendered = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success(),
                "man -l {name}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(rendered.contains("NAME"), "{rendered}");
            assert!(rendered.contains("SYNOPSIS"), "{rendered}");
            assert!(rendered.contains("Kairos Manual"), "{rendered}");
        }
    }
}

#[test]
fn deploy_install_puts_pages_completions_and_units_where_their_tools_look() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/install");
    let stage = tempfile::tempdir().unwrap();
    let output = Command::new("bash")
        .arg(&script)
        .arg("--binary")
        .arg(kairos_bin())
        .arg("--destdir")
        .arg(stage.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "deploy/install: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let prefix = stage.path().join("usr/local");
    assert!(prefix.join("bin/kairos").is_file());
    let pages = prefix.join("share/man/man1");
    for page in [
        "kairos.1",
        "kairos-up.1",
        "kairos-capture.1",
        "kairos-replica-add.1",
    ] {
        assert!(pages.join(page).is_file(), "{page} installed");
    }
    let page_count = std::fs::read_dir(&pages).unwrap().count();
    let generated = tempfile::tempdir().unwrap();
    let listed = Kairos::new().ok(["man", "--dir", generated.path().to_str().unwrap()]);
    assert_eq!(
        page_count,
        String::from_utf8(listed).unwrap().lines().count()
    );
    for (path, shell) in [
        ("share/bash-completion/completions/kairos", "bash"),
        ("share/zsh/site-functions/_kairos", "zsh"),
        ("share/fish/vendor_completions.d/kairos.fish", "fish"),
    ] {
        let installed = std::fs::read(prefix.join(path)).unwrap();
        assert_eq!(
            installed,
            Kairos::new().ok(["completions", shell]),
            "{path}"
        );
    }
    for unit in [
        "kairos.service",
        "kairos-capture@.service",
        "kairos-capture@.timer",
    ] {
        let text =
            std::fs::read_to_string(stage.path().join("etc/systemd/system").join(unit)).unwrap();
        if unit.ends_with(".service") {
            let documented = text
                .lines()
                .find_map(|line| line.strip_prefix("Documentation="))
                .unwrap_or_else(|| panic!("{unit} names its man page"));
            for reference in documented.split_whitespace() {
                let page = reference
                    .strip_prefix("man:")
                    .and_then(|page| page.strip_suffix("(1)"))
                    .unwrap_or_else(|| panic!("{unit}: {reference} is not man:PAGE(1)"));
                assert!(
                    pages.join(format!("{page}.1")).is_file(),
                    "{unit} names {page}(1)"
                );
            }
        }
    }
    // man finds the installed pages by name under the prefix.
    let man_installed = Command::new("sh")
        .args(["-c", "command -v man"])
        .output()
        .unwrap()
        .status
        .success();
    if man_installed {
        let found = Command::new("man")
            .args(["-w", "kairos-capture"])
            .env("MANPATH", prefix.join("share/man"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&found.stdout).trim(),
            pages.join("kairos-capture.1").display().to_string()
        );
    }
}
