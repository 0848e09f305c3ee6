//! The `check` and `keygen` subcommands, run as a user would.

use crate::common;

use common::*;

fn run(args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = command(dir.path()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_example() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/bedrock-gate.example.toml"
    );
    let (ok, stdout, stderr) = run(&["check", "--config", example]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok (1 users, 2 profiles"), "{stdout}");
}

#[test]
fn check_names_the_offending_key_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    for (text, path) in [
        ("[aws]\nregoin = \"us-east-1\"\n", "aws.regoin"),
        (
            "[users.alice.models]\n\"anthropic.x\" = \"arn:aws:bedrock:us-east-1:42:application-inference-profile/a\"\n",
            "users.alice.models.\"anthropic.x\"",
        ),
        ("[users.a]\nkeys = [\"sha256:00\"]\n", "users.a.keys[0]"),
    ] {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        let (ok, _, stderr) = run(&["check", "--config", p.to_str().unwrap()]);
        assert!(!ok);
        assert!(stderr.contains(path), "expected {path} in: {stderr}");
    }
    let (ok, _, stderr) = run(&["check", "--config", "/nonexistent/bedrock-gate.toml"]);
    assert!(!ok);
    assert!(stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn serve_refuses_an_invalid_config_with_the_same_message() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "listen = \"nowhere\"\n").unwrap();
    let (ok, _, stderr) = run(&["serve", "--config", p.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("listen:"), "{stderr}");
}

#[test]
fn keygen_prints_a_key_whose_hash_line_works_in_a_config() {
    let (ok, stdout, _) = run(&["keygen"]);
    assert!(ok);
    let key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .unwrap()
        .trim()
        .to_string();
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("config:"))
        .unwrap()
        .trim()
        .to_string();
    assert!(key.starts_with("bgk_") && key.len() == 47, "{key}");
    assert_eq!(line, format!("keys = [\"{}\"]", hash(&key)));
    let (_, again, _) = run(&["keygen"]);
    assert_ne!(stdout, again);
}
