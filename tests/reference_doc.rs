//! docs/reference.md is the `--help` of every command, so the operations guide never
//! drifts from the binary. `scripts/reference` rewrites it (`UPDATE_REFERENCE=1`).

use std::process::Command;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reference.md");

/// `toolrank ARGS... --help` with no `TOOLRANK_*` or AWS variable set (clap shows their
/// values) at a fixed width.
fn help(path: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_toolrank")).args(path).arg("--help").env_clear().env("COLUMNS", "100").output().expect("toolrank runs");
    assert!(out.status.success(), "toolrank {} --help failed: {}", path.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// The subcommands a help text lists under `Commands:` (but `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim_end() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

fn walk(path: Vec<String>, doc: &mut String) {
    let text = help(&path);
    let level = "#".repeat(2 + path.len().min(1));
    doc.push_str(&format!("{level} `toolrank{}{}`\n\n```text\n{}```\n\n", if path.is_empty() { "" } else { " " }, path.join(" "), text));
    for sub in subcommands(&text) {
        let mut next = path.clone();
        next.push(sub);
        walk(next, doc);
    }
}

#[test]
fn reference_doc_is_the_help_of_every_command() {
    let mut doc = String::from(
        "# Command reference\n\nThe `--help` of every command, as the binary prints it \
         (regenerate with `scripts/reference`). Every flag can also be set by the environment \
         variable shown beside it. [operations.md](operations.md) explains how the settings \
         work together.\n\n",
    );
    walk(Vec::new(), &mut doc);
    if std::env::var_os("UPDATE_REFERENCE").is_some() {
        std::fs::write(DOC, &doc).expect("docs/reference.md is writable");
        return;
    }
    let on_disk = std::fs::read_to_string(DOC).unwrap_or_default();
    assert!(on_disk == doc, "docs/reference.md is not the binary's --help: run scripts/reference");
}
