//! Running hopd as a service: the admin listener (metrics, health, readiness, the JSON API
//! behind `hop admin`), SIGHUP, and the lame-duck drain. Real hopd processes on loopback.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a test failure

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{expect_kind, ping, Hopd, PATIENCE};
use hop_protocol::client::{Client, ClientError};
use hop_protocol::wire::{GoAway, GoAwayReason, Kind};
use hop_protocol::StaticKey;

/// One HTTP request to a hopd's admin listener: status and body.
fn request(method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(PATIENCE))
        .http_status_as_error(false)
        .build()
        .into();
    let response = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        ("POST", None) => agent.post(url).send_empty(),
        ("POST", Some(body)) => agent.post(url).send(body),
        ("PUT", Some(body)) => agent.put(url).send(body),
        _ => panic!("no such request in these tests: {method}"),
    };
    let mut response = response.unwrap_or_else(|error| panic!("{method} {url}: {error}"));
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().expect("a text body");
    (status, body)
}

fn get(hopd: &Hopd, path: &str) -> (u16, String) {
    request("GET", &format!("http://{}{path}", hopd.admin), None)
}

/// `hop admin --admin ADDR ARGS...`: exit success and stdout, parsed as JSON.
fn hop_admin(admin: &str, args: &[&str]) -> (bool, serde_json::Value, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_hop"))
        .args(["admin", "--admin", admin])
        .args(args)
        .output()
        .expect("hop runs");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (output.status.success(), json, stderr)
}

/// The samples of a Prometheus text exposition, by series (`name{labels}`), after checking
/// every line against the format: `# HELP`/`# TYPE` before a family's samples, valid names,
/// quoted label values, numeric values, `_total` on counters, cumulative histogram buckets.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    let mut last_bucket: Option<(String, f64)> = None;
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let (keyword, name) = (words.next().unwrap(), words.next().expect("a name"));
            assert!(valid_name(name), "bad metric name in {line:?}");
            if keyword == "TYPE" {
                let kind = words.next().expect("a type");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "type {kind:?} in {line:?}"
                );
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "counter without _total: {line:?}");
                }
                types.insert(name.to_string(), kind.to_string());
            } else {
                assert_eq!(keyword, "HELP", "unknown comment {line:?}");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample: series and value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            number => number
                .parse()
                .unwrap_or_else(|_| panic!("value in {line:?}")),
        };
        let name = series.split('{').next().unwrap();
        assert!(valid_name(name), "bad series name in {line:?}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("labels in {line:?}"));
                for pair in inner.split(',') {
                    let (key, quoted) = pair.split_once('=').expect("label=value");
                    assert!(valid_name(key), "label name in {line:?}");
                    assert!(
                        quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'),
                        "label value in {line:?}"
                    );
                }
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| types.get(*base).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample before its TYPE: {line:?}"
        );
        if name.ends_with("_bucket") {
            let key = series.split(",le=").next().unwrap().to_string();
            if let Some((previous, count)) = &last_bucket {
                if *previous == key {
                    assert!(value >= *count, "buckets are cumulative: {line:?}");
                }
            }
            last_bucket = Some((key, value));
        }
        samples.insert(series.to_string(), value);
    }
    samples
}

/// The sum of a family's samples whose series starts with `prefix` (`name{` or `name{shard=..`).
fn sum(samples: &HashMap<String, f64>, prefix: &str) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| series.starts_with(prefix))
        .map(|(_, value)| value)
        .sum()
}

/// Waits (bounded) until `check` holds for the metrics; the shards publish some counters once
/// per tick.
fn metrics_until(hopd: &Hopd, what: &str, check: impl Fn(&HashMap<String, f64>) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, text) = get(hopd, "/metrics");
        assert_eq!(status, 200);
        let samples = parse_prometheus(&text);
        if check(&samples) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn go_away(client: &mut Client) -> GoAway {
    expect_kind(client, "GoAway", |kind| match kind {
        Kind::GoAway(go_away) => Some(go_away),
        _ => None,
    })
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let hopd = Hopd::start(&["--shards", "2"]);
    // hopd prints its status line before its shards serve: ready is 1 only once they do.
    let deadline = Instant::now() + PATIENCE;
    while get(&hopd, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "hopd never became ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, text) = get(&hopd, "/metrics");
    assert_eq!(status, 200);
    let before = parse_prometheus(&text);
    for family in [
        "hop_connections_open{",
        "hop_handshakes_failed_total{",
        "hop_closes_total{",
        "hop_store_commit_seconds_bucket{",
        "hop_loop_turn_seconds_bucket{",
        "hop_mailbox_depth{",
        "hop_queue_bytes{",
        "hop_handshakes_waiting{",
    ] {
        assert!(
            before.keys().any(|series| series.starts_with(family)),
            "no {family}"
        );
    }
    assert!(before["hop_process_resident_bytes"] > 0.0);
    assert_eq!(before["hop_ready"], 1.0);
    assert_eq!(sum(&before, "hop_messages_accepted_total{"), 0.0);

    let (_, mut alice) = hopd.new_user();
    let (bob_key, bob) = hopd.new_user();
    bob.close();
    for n in 0..20u8 {
        alice.send_message(bob_key.user_id(), &[n; 24]).unwrap();
    }
    ping(&mut alice);
    metrics_until(
        &hopd,
        "20 messages accepted, queued and fsynced",
        |samples| {
            sum(samples, "hop_messages_accepted_total{") == 20.0
                && sum(samples, "hop_queue_items{") == 20.0
                && sum(samples, "hop_queue_bytes{") == 480.0
                && sum(samples, "hop_store_commit_seconds_count{") >= 1.0
        },
    );
    let (_, text) = get(&hopd, "/metrics");
    let after = parse_prometheus(&text);
    assert!(sum(&after, "hop_handshakes_completed_total{") >= 2.0);
    assert!(sum(&after, "hop_stanzas_in_total{") >= 22.0);
    assert!(sum(&after, "hop_received_bytes_total{") > sum(&before, "hop_received_bytes_total{"));
    assert!(sum(&after, "hop_sent_bytes_total{") > 0.0);
    // Every turn lands in one bucket; the turns that carried this traffic came after `before`.
    let turns = sum(&after, "hop_loop_turn_seconds_count{");
    assert!(turns > sum(&before, "hop_loop_turn_seconds_count{"));
    assert_eq!(
        after
            .iter()
            .filter(
                |(series, _)| series.starts_with("hop_loop_turn_seconds_bucket{")
                    && series.contains("le=\"+Inf\"")
            )
            .map(|(_, value)| value)
            .sum::<f64>(),
        turns,
        "the +Inf buckets count every turn"
    );

    // The same counters in the JSON stats that `hop admin stats` prints.
    let (ok, stats, stderr) = hop_admin(&hopd.admin, &["stats"]);
    assert!(ok, "{stderr}");
    assert_eq!(stats["total"]["messages_accepted"], 20);
    assert_eq!(stats["shards"].as_array().unwrap().len(), 2);
    assert_eq!(stats["ready"], true);
}

#[test]
fn health_and_readiness_through_start_and_drain() {
    let hopd = Hopd::start(&["--shards", "2", "--drain-ms", "60000"]);
    assert_eq!(get(&hopd, "/healthz"), (200, "ok\n".to_string()));
    // The banner comes before the shards have necessarily begun their loops: ready follows.
    let deadline = Instant::now() + PATIENCE;
    loop {
        match get(&hopd, "/readyz") {
            (200, body) => {
                assert_eq!(body, "ready\n");
                break;
            }
            (503, body) => assert_eq!(body, "starting\n"),
            other => panic!("readyz answered {other:?}"),
        }
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (_, mut client) = hopd.new_user();
    let (ok, answer, stderr) = hop_admin(&hopd.admin, &["drain"]);
    assert!(ok, "{stderr}");
    assert_eq!(answer["started"], true);
    assert_eq!(answer["drain_ms"], 60000);
    assert_eq!(get(&hopd, "/readyz"), (503, "draining\n".to_string()));
    assert_eq!(get(&hopd, "/healthz").0, 200, "alive while draining");
    // A draining server takes no new connection; the one it holds goes on meanwhile.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let key = StaticKey::generate().unwrap();
        match Client::connect(&hopd.addr, &key, &hopd.trust(), Duration::from_secs(2)) {
            Err(ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Closed) => break,
            Err(other) => panic!("a refused connection fails to connect, not with {other}"),
            Ok(_) => assert!(Instant::now() < deadline, "still accepting"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ping(&mut client);
    let (ok, again, _) = hop_admin(&hopd.admin, &["drain"]);
    assert!(ok);
    assert_eq!(again["started"], false, "one drain at a time");
}

#[test]
fn kick_user_and_log_level_through_hop_admin() {
    let hopd = Hopd::start(&["--shards", "2"]);
    let (key, mut client) = hopd.new_user();
    let id = key.user_id().to_string();

    let (ok, user, stderr) = hop_admin(&hopd.admin, &["user", &id]);
    assert!(ok, "{stderr}");
    assert_eq!(user["online"], true);
    assert_eq!(user["known"], true);
    assert_eq!(user["user"], id.as_str());

    let (ok, kicked, stderr) = hop_admin(&hopd.admin, &["kick", &id]);
    assert!(ok, "{stderr}");
    assert_eq!(kicked["kicked"], true);
    let go_away = go_away(&mut client);
    assert_eq!(go_away.reason, GoAwayReason::Kicked as i32);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, user, _) = hop_admin(&hopd.admin, &["user", &id]);
        if user["online"] == false {
            assert_eq!(user["known"], true);
            assert!(user["last_seen_ms"].as_u64().unwrap() > 0);
            break;
        }
        assert!(Instant::now() < deadline, "still online after the kick");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, again, _) = hop_admin(&hopd.admin, &["kick", &id]);
    assert!(ok);
    assert_eq!(again["kicked"], false, "no connection to kick");
    let mut back = hopd.connect(&key);
    ping(&mut back);

    let (ok, _, stderr) = hop_admin(&hopd.admin, &["user", "not-an-id"]);
    assert!(!ok);
    assert!(
        stderr.contains("invalid") || stderr.contains("not-an-id"),
        "{stderr}"
    );

    let (ok, answer, stderr) = hop_admin(&hopd.admin, &["log-level", "debug"]);
    assert!(ok, "{stderr}");
    assert_eq!(answer["log"], "debug");
    let (ok, _, stderr) = hop_admin(&hopd.admin, &["log-level", "hop=["]);
    assert!(!ok);
    assert!(
        stderr.contains("400") && stderr.contains("invalid log filter"),
        "{stderr}"
    );
    // Debug lines now reach the log: a handshake that fails is logged at debug at most. The
    // garbage stays connected: a connection that closes before its handshake input is worked
    // on (after the turn's other input, `handshakes_per_turn`) is dropped unread.
    back.close();
    let deadline = Instant::now() + PATIENCE;
    let mut garbage = Vec::new();
    while !hopd.log().contains("DEBUG") {
        let mut raw = std::net::TcpStream::connect(&hopd.addr).unwrap();
        std::io::Write::write_all(&mut raw, &[0, 4, 1, 2, 3, 4]).unwrap();
        garbage.push(raw);
        assert!(
            Instant::now() < deadline,
            "no debug line after log-level debug"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (unreachable, _, stderr) = hop_admin("127.0.0.1:1", &["stats"]);
    assert!(!unreachable && stderr.contains("cannot reach"), "{stderr}");
}

#[test]
fn sighup_reloads_the_log_filter_and_drain_window_and_never_exits() {
    let folder = tempfile::tempdir().unwrap();
    let config = folder.path().join("hopd.toml");
    std::fs::write(&config, "log = \"info\"\ndrain_ms = 0\nshards = 1\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hopd"))
        .arg("--config")
        .arg(&config)
        .arg("--data")
        .arg(folder.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--pin-cores", "false"])
        .args(common::backend_flags())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(folder.path().join("hopd.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let mut banner = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut banner)
        .unwrap();
    let (addr, server_key, admin) = common::parse_banner(&banner).expect("hopd started");
    let log = || std::fs::read_to_string(folder.path().join("hopd.log")).unwrap();
    let hup = |child: &std::process::Child| {
        common::signal(child, nix::sys::signal::Signal::SIGHUP);
    };
    let wait_for = |text: &str| {
        let deadline = Instant::now() + PATIENCE;
        while !log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    std::fs::write(&config, "log = \"debug\"\ndrain_ms = 1234\nshards = 1\n").unwrap();
    hup(&child);
    wait_for("drain_ms=1234");
    assert!(log().contains("SIGHUP: log filter set"));
    // A setting that needs a restart is named as such; a broken file changes nothing.
    std::fs::write(&config, "log = \"debug\"\ndrain_ms = 1234\nshards = 2\n").unwrap();
    hup(&child);
    wait_for("take effect at the next start");
    std::fs::write(&config, "log = \n").unwrap();
    hup(&child);
    wait_for("the settings did not load");
    assert!(child.try_wait().unwrap().is_none(), "hopd exited on SIGHUP");

    // Still serving, and the reloaded window is the drain's.
    let key = StaticKey::generate().unwrap();
    let trust = hop_protocol::client::ServerTrust::Pinned(server_key);
    let mut client = Client::connect(&addr, &key, &trust, PATIENCE).unwrap();
    ping(&mut client);
    let (ok, answer, stderr) = hop_admin(&admin, &["drain"]);
    assert!(ok, "{stderr}");
    assert_eq!(answer["drain_ms"], 1234);
    let go_away = go_away(&mut client);
    assert_eq!(go_away.reason, GoAwayReason::Shutdown as i32);
    assert_eq!(go_away.retry_after_ms, 1234, "the hint is the window");
    let status = common::wait_with_patience(&mut child);
    assert!(status.success(), "a drained hopd exits 0: {status:?}");
}

/// 2,000 connections on two shards; a drain with a 4-second window. The GoAways must be
/// spread over the window, not sent at once: clients that all reconnect in the same second
/// are what a drain exists to prevent.
#[test]
fn a_drain_of_2000_connections_spreads_their_goaways_over_the_window() {
    const CONNECTIONS: usize = 2_000;
    const THREADS: usize = 16;
    const WINDOW: Duration = Duration::from_secs(4);
    let hopd = Hopd::start(&["--shards", "2", "--drain-ms", "4000"]);
    let trust = hopd.trust();
    // Each thread connects its share, then reads them all round-robin until each has had its
    // GoAway, noting when (a read waits 1 ms, so a pass over 125 clients takes ~0.13 s).
    let (ready, all_ready) = std::sync::mpsc::channel::<()>();
    let start = std::sync::Arc::new(std::sync::Barrier::new(THREADS + 1));
    let drained_at = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (addr, trust, ready, start, drained_at) = (
                hopd.addr.clone(),
                trust.clone(),
                ready.clone(),
                start.clone(),
                drained_at.clone(),
            );
            std::thread::spawn(move || {
                let mut clients: Vec<Client> = (0..CONNECTIONS / THREADS)
                    .map(|_| {
                        let key = StaticKey::generate().unwrap();
                        let mut client = Client::connect(&addr, &key, &trust, PATIENCE).unwrap();
                        ping(&mut client);
                        client
                    })
                    .collect();
                ready.send(()).unwrap();
                start.wait();
                let mut left: Vec<(usize, &mut Client)> = clients.iter_mut().enumerate().collect();
                let mut seen: Vec<(Duration, u32)> = Vec::new();
                let deadline = Instant::now() + WINDOW + PATIENCE;
                while !left.is_empty() {
                    assert!(Instant::now() < deadline, "GoAways missing");
                    left.retain_mut(|(_, client)| match client.recv(Duration::from_millis(1)) {
                        Ok(Some(stanza)) => match stanza.kind {
                            Some(Kind::GoAway(go_away)) => {
                                assert_eq!(go_away.reason, GoAwayReason::Shutdown as i32);
                                let since = drained_at.get().expect("drain started").elapsed();
                                seen.push((since, go_away.retry_after_ms));
                                false
                            }
                            _ => true,
                        },
                        Ok(None) => true,
                        Err(error) => panic!("closed without a GoAway: {error}"),
                    });
                }
                seen
            })
        })
        .collect();
    drop(ready);
    for _ in 0..THREADS {
        all_ready.recv().expect("a client thread failed to connect");
    }
    metrics_until(&hopd, "2,000 connections open", |samples| {
        sum(samples, "hop_connections_open{") == CONNECTIONS as f64
    });
    drained_at.set(Instant::now()).unwrap();
    let (ok, _, stderr) = hop_admin(&hopd.admin, &["drain"]);
    assert!(ok, "{stderr}");
    start.wait();
    let mut closes: Vec<Duration> = Vec::with_capacity(CONNECTIONS);
    for thread in threads {
        for (since, retry_after_ms) in thread.join().expect("client thread") {
            assert_eq!(retry_after_ms, 4000);
            closes.push(since);
        }
    }
    assert_eq!(closes.len(), CONNECTIONS);
    closes.sort();
    let at = |fraction: f64| closes[((CONNECTIONS - 1) as f64 * fraction) as usize];
    // Spread: the middle 90% of the GoAways take at least half the window, and no more than a
    // fifth of them come in its first tenth. (A slow machine only delays them, which widens
    // the spread; neither bound asks for speed.)
    assert!(
        at(0.95) - at(0.05) >= WINDOW / 2,
        "GoAways bunched: 5% at {:?}, 95% at {:?}",
        at(0.05),
        at(0.95)
    );
    assert!(
        at(0.2) >= WINDOW / 10,
        "a fifth of the GoAways within {:?}",
        at(0.2)
    );
    let status = hopd.stop();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let hopd = Hopd::start(&["--shards", "2", "--log-format", "json"]);
    let (_, mut client) = hopd.new_user();
    ping(&mut client);
    let (status, log) = hopd.stop_with_log();
    assert!(status.success());
    let mut lines = 0;
    for line in log.lines().filter(|line| !line.trim().is_empty()) {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        assert!(
            object["level"].is_string() && object["fields"].is_object(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines >= 3, "{log}");
    assert!(log.contains("\"message\":\"shard running\""), "{log}");
}

/// Alice sends `count` messages to bob, one at a time; bob acks each Deliver and alice acks
/// each Delivered receipt, so that nothing is left for the disk but what the wait lets by.
/// Returns how long each ServerAck took.
fn exchange(hopd: &Hopd, count: usize, bob_acks: bool) -> Vec<Duration> {
    let (bob_key, mut bob) = hopd.new_user();
    let (_, mut alice) = hopd.new_user();
    let mut waits = Vec::new();
    for n in 0..count {
        let sent = Instant::now();
        alice
            .send_message(bob_key.user_id(), format!("message {n}").as_bytes())
            .unwrap();
        let deliver = expect_kind(&mut bob, "the Deliver", |kind| match kind {
            Kind::Deliver(deliver) => Some(deliver),
            _ => None,
        });
        if bob_acks {
            bob.ack_deliver(deliver.id).unwrap();
        }
        let (mut acked, mut receipt) = (false, !bob_acks);
        while !(acked && receipt) {
            match alice.recv(PATIENCE).unwrap().and_then(|stanza| stanza.kind) {
                Some(Kind::ServerAck(_)) => {
                    acked = true;
                    waits.push(sent.elapsed());
                }
                Some(Kind::Receipt(delivered)) => {
                    alice.ack_receipt(&delivered).unwrap();
                    receipt = true;
                }
                Some(_) => {}
                None => panic!("alice heard nothing of message {n}"),
            }
        }
    }
    waits
}

/// Store-and-forward keeps a message only until delivery: what a connected recipient's device
/// acks within `ack_wait_ms` is never written (no record, no tombstone). The same exchange
/// with the wait at 0 is written, message and receipt.
#[test]
fn what_a_connected_device_acks_within_the_wait_is_never_written() {
    // A wait no slow machine outlasts between a Deliver and its Ack.
    let hopd = Hopd::start(&["--ack-wait-ms", "1000"]);
    exchange(&hopd, 20, true);
    metrics_until(&hopd, "the 40 items acked while held", |samples| {
        sum(samples, "hop_keeps_skipped_total") >= 40.0
    });
    let (_, text) = get(&hopd, "/metrics");
    let samples = parse_prometheus(&text);
    assert_eq!(sum(&samples, "hop_store_appends_total"), 0.0, "{text}");
    drop(hopd);

    let hopd = Hopd::start(&["--ack-wait-ms", "0"]);
    exchange(&hopd, 20, true);
    metrics_until(
        &hopd,
        "the 20 messages and 20 receipts written",
        |samples| sum(samples, "hop_store_appends_total") >= 40.0,
    );
}

/// A message whose connected recipient does not ack it waits out `ack_wait_ms`, then goes to
/// disk; its sender's ServerAck leaves only then, never before the message is durable.
#[test]
fn what_a_connected_device_does_not_ack_is_written_after_the_wait() {
    let hopd = Hopd::start(&["--ack-wait-ms", "300"]);
    let waits = exchange(&hopd, 3, false);
    for wait in &waits {
        assert!(
            *wait >= Duration::from_millis(300),
            "a ServerAck left after {wait:?}, before the wait was out"
        );
    }
    metrics_until(&hopd, "the 3 messages written", |samples| {
        sum(samples, "hop_store_appends_total") >= 3.0
    });
}
