//! The README demo, run as written: `hop keygen` twice, `hop listen --count 1 --read`,
//! `hop send --wait read`; and `hop presence`.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a test failure

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use common::{wait_with_patience, Hopd};
use serde_json::Value;

fn hop(home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hop"));
    // Trust on first use writes to $HOME/.config/hop/known_servers.
    command.env("HOME", home);
    command
}

fn keygen(home: &Path, name: &str) -> String {
    let output = hop(home)
        .args(["keygen", "--out"])
        .arg(home.join(name))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"))
        })
        .collect()
}

fn finish(child: Child) -> Output {
    let mut child = child;
    wait_with_patience(&mut child);
    child.wait_with_output().unwrap()
}

/// Starts `hop listen --read` for the key, trusting the server on first use.
fn spawn_listen(home: &Path, hopd: &Hopd, key: &str, count: &str) -> Child {
    hop(home)
        .args(["listen", "--server", &hopd.addr, "--key"])
        .arg(home.join(key))
        .args(["--count", count, "--read", "--timeout", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn readme_demo_shows_the_message_and_all_three_ticks() {
    let hopd = Hopd::start(&[]);
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let alice = keygen(home, "alice.key");
    let bob = keygen(home, "bob.key");
    assert_ne!(alice, bob);

    let mut listener = spawn_listen(home, &hopd, "bob.key", "1");
    // The listener trusts the server on first use and says so on stderr once connected.
    let mut stderr = BufReader::new(listener.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("trusting server key"), "{line}");
    // Its key is bound once the server has answered something; a presence probe from alice
    // would race, so alice just retries while bob is unknown.
    let send = loop {
        let output = hop(home)
            .args(["send", "--server", &hopd.addr, "--key"])
            .arg(home.join("alice.key"))
            .args(["--to", &bob, "--wait", "read", "--timeout", "30", "hello"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("UNKNOWN_USER") {
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        }
        break output;
    };
    assert!(
        send.status.success(),
        "{}",
        String::from_utf8_lossy(&send.stderr)
    );
    let events = json_lines(&send.stdout);
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["sent", "delivered", "read"]);
    let id = events[0]["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 16, "message ids are 16 hex digits: {id}");
    assert!(events.iter().all(|e| e["id"].as_str() == Some(id.as_str())));
    assert_eq!(events[1]["by"].as_str(), Some(bob.as_str()));

    let listened = finish(listener);
    assert!(listened.status.success());
    let messages = json_lines(&listened.stdout);
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["event"], "message");
    assert_eq!(messages[0]["text"], "hello");
    assert_eq!(messages[0]["from"].as_str(), Some(alice.as_str()));
    assert_eq!(messages[0]["id"].as_str(), Some(id.as_str()));
}

#[test]
fn presence_cli_prints_online_then_offline() {
    let hopd = Hopd::start(&[]);
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    keygen(home, "watcher.key");
    let watched = keygen(home, "watched.key");
    let watched_key = hop_protocol::StaticKey::load(&home.join("watched.key")).unwrap();
    let mut client = hopd.connect(&watched_key);
    common::ping(&mut client);

    let mut watcher = hop(home)
        .args(["presence", "--server", &hopd.addr, "--key"])
        .arg(home.join("watcher.key"))
        .args([
            "--server-key",
            &hex(&hopd.server_key),
            "--watch",
            &watched,
            "--count",
            "2",
            "--timeout",
            "30",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(watcher.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["online"], true);
    client.close();
    let mut second = String::new();
    stdout.read_line(&mut second).unwrap();
    let second: Value = serde_json::from_str(&second).unwrap();
    assert_eq!(second["online"], false);
    assert!(wait_with_patience(&mut watcher).success());
}

#[test]
fn cli_errors_are_clear() {
    let hopd = Hopd::start(&[]);
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    keygen(home, "a.key");
    // A wrong pinned server key.
    let output = hop(home)
        .args(["send", "--server", &hopd.addr, "--key"])
        .arg(home.join("a.key"))
        .args([
            "--server-key",
            &"00".repeat(32),
            "--to",
            &"5".repeat(32),
            "x",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("SERVER KEY MISMATCH"));
    // A malformed id, as version 1 printed them (decimal).
    let output = hop(home)
        .args(["send", "--key"])
        .arg(home.join("a.key"))
        .args(["--to", "12345", "x"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("32 hex digits"));
    // keygen never overwrites.
    let output = hop(home)
        .args(["keygen", "--out"])
        .arg(home.join("a.key"))
        .output()
        .unwrap();
    assert!(!output.status.success());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn hopd_reports_bad_configuration_with_exit_status_2() {
    let folder = tempfile::tempdir().unwrap();
    let config = folder.path().join("hop.toml");
    std::fs::write(&config, "shards = 1\nidle_timout_ms = 5\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_hopd"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("idle_timout_ms"), "{stderr}");

    std::fs::write(&config, "shards = 3\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_hopd"))
        .arg("--config")
        .arg(&config)
        .args(["--idle-timeout-ms", "1234", "--print-config"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("shards = 3") && printed.contains("idle_timeout_ms = 1234"),
        "{printed}"
    );
}
