//! The `hop-tune` binary end to end, against a stand-in `/proc` tree (never the real one).

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use common::{fake_proc, sysctl, THIS_MACHINE};

fn hop_tune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hop-tune"))
        .args(args)
        .output()
        .expect("runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `hop-tune check` for hopd on `mio` (every connection a descriptor of the process) unless
/// `extra` names a backend: the figures these tests expect are mio's.
fn check(root: &Path, connections: &str, extra: &[&str]) -> Output {
    let root = root.to_str().expect("utf-8");
    let mut args = vec!["check", "--connections", connections, "--proc-root", root];
    if !extra.contains(&"--backend") {
        args.extend_from_slice(&["--backend", "mio"]);
    }
    args.extend_from_slice(extra);
    hop_tune(&args)
}

#[test]
fn a_million_is_capped_by_the_hard_descriptor_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_proc(dir.path(), THIS_MACHINE, 20_000, 20_000);
    let output = check(dir.path(), "1000000", &[]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("RLIMIT_NOFILE hard limit = 20,000 allows 15,936 connections"),
        "{text}"
    );
    assert!(
        text.contains("FAIL: 3 limit(s) cap 1,000,000 connections"),
        "{text}"
    );
    // The other limits that would stop it next are named too.
    assert!(
        text.contains("fs.nr_open = 1,048,576 allows 838,796"),
        "{text}"
    );
    assert!(
        text.contains("net.netfilter.nf_conntrack_max = 262,144 allows 209,715"),
        "{text}"
    );
    assert!(text.contains("backend mio assumed"), "{text}");
}

#[test]
fn fifteen_thousand_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_proc(dir.path(), THIS_MACHINE, 20_000, 20_000);
    let output = check(dir.path(), "15000", &[]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(
        text.contains("PASS: nothing caps 15,000 connections (ceiling 15,936"),
        "{text}"
    );
}

#[test]
fn uring_shards_multiply_the_descriptor_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_proc(dir.path(), THIS_MACHINE, 20_000, 20_000);
    let output = check(
        dir.path(),
        "100000",
        &["--backend", "uring", "--shards", "8"],
    );
    let text = stdout(&output);
    // 8 rings x 20,000 slots / 1.25 = 128,000 >= 100,000; conntrack allows 209,715.
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("backend uring with 8 shard(s)"), "{text}");
}

#[test]
fn check_reads_another_process_with_pid() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_proc(dir.path(), THIS_MACHINE, 20_000, 20_000);
    fs::create_dir_all(dir.path().join("4242")).expect("mkdir");
    fs::write(
        dir.path().join("4242/limits"),
        "Limit                     Soft Limit           Hard Limit           Units     \n\
         Max open files            1024                 3000000              files     \n",
    )
    .expect("write");
    let output = check(dir.path(), "1000000", &["--pid", "4242"]);
    let text = stdout(&output);
    assert!(text.contains("limits read from process 4242"), "{text}");
    assert!(!text.contains("RLIMIT_NOFILE hard limit = "), "{text}");
    // nr_open and conntrack still cap it.
    assert_eq!(output.status.code(), Some(1), "{text}");
}

#[test]
fn bad_input_exits_2_with_a_clear_error() {
    let cases: &[&[&str]] = &[
        &["check", "--connections", "0"],
        &["check", "--connections", "lots"],
        &[
            "render",
            "--os",
            "windows",
            "--connections",
            "10",
            "--memory",
            "1GiB",
        ],
        &["render", "--os", "linux", "--connections", "10"],
        &[
            "render",
            "--os",
            "freebsd",
            "--connections",
            "10",
            "--memory",
            "1GiB",
            "--backend",
            "uring",
        ],
        &[
            "plan",
            "--os",
            "linux",
            "--connections",
            "10",
            "--memory",
            "12 parsecs",
        ],
        &[
            "render",
            "--os",
            "linux",
            "--connections",
            "10",
            "--memory",
            "1GiB",
            "--shards",
            "0",
        ],
    ];
    for args in cases {
        let output = hop_tune(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(!stderr(&output).is_empty(), "{args:?}");
    }
    let zero = stderr(&hop_tune(&["check", "--connections", "0"]));
    assert!(zero.contains("--connections must be at least 1"), "{zero}");
    let os = stderr(&hop_tune(&[
        "render",
        "--os",
        "windows",
        "--connections",
        "1",
        "--memory",
        "1G",
    ]));
    assert!(os.contains("windows"), "{os}");
}

#[test]
fn apply_is_a_dry_run_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_proc(dir.path(), THIS_MACHINE, 20_000, 20_000);
    let rollback = dir.path().join("rollback.conf");
    let output = hop_tune(&[
        "apply",
        "--connections",
        "1000000",
        "--backend",
        "mio",
        "--proc-root",
        dir.path().to_str().expect("utf-8"),
        "--rollback-file",
        rollback.to_str().expect("utf-8"),
    ]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}{}", stderr(&output));
    assert!(
        text.contains("-fs.nr_open = 1048576\n+fs.nr_open = 1250304"),
        "{text}"
    );
    assert!(text.contains("dry run"), "{text}");
    assert_eq!(sysctl(dir.path(), "fs.nr_open"), "1048576");
    assert!(!rollback.exists());
}

#[test]
fn apply_yes_raises_never_lowers_and_writes_a_rollback_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sysctls = THIS_MACHINE.to_vec();
    // Already higher than the profile: must stay.
    sysctls.retain(|(key, _)| *key != "fs.file-max");
    sysctls.push(("fs.file-max", "9223372036854775807"));
    fake_proc(dir.path(), &sysctls, 20_000, 20_000);
    let rollback = dir.path().join("rollback.conf");
    let args = [
        "apply",
        "--connections",
        "1000000",
        "--backend",
        "mio",
        "--yes",
        "--proc-root",
        dir.path().to_str().expect("utf-8"),
        "--rollback-file",
        rollback.to_str().expect("utf-8"),
    ];
    let output = hop_tune(&args);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );

    assert_eq!(sysctl(dir.path(), "fs.nr_open"), "1250304");
    assert_eq!(sysctl(dir.path(), "net.core.somaxconn"), "65535");
    assert_eq!(
        sysctl(dir.path(), "net.netfilter.nf_conntrack_max"),
        "1250304"
    );
    assert_eq!(sysctl(dir.path(), "fs.file-max"), "9223372036854775807");
    // Buffer caps are never lowered by apply.
    assert_eq!(
        sysctl(dir.path(), "net.ipv4.tcp_rmem"),
        "4096 131072 33554432"
    );
    // tcp_mem raised element by element.
    assert_eq!(
        sysctl(dir.path(), "net.ipv4.tcp_mem"),
        "629145 943716 1258291"
    );

    let saved = fs::read_to_string(&rollback).expect("rollback written");
    assert!(saved.contains("fs.nr_open = 1048576\n"), "{saved}");
    assert!(saved.contains("net.core.somaxconn = 4096\n"), "{saved}");
    assert!(!saved.contains("fs.file-max"), "{saved}");

    // A second apply must not overwrite the first rollback file.
    fs::write(dir.path().join("sys/fs/nr_open"), "1048576\n").expect("reset");
    let again = hop_tune(&args);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("exists"), "{}", stderr(&again));
    assert_eq!(fs::read_to_string(&rollback).expect("kept"), saved);
}

#[test]
fn render_writes_files_into_a_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("profile");
    let output = hop_tune(&[
        "render",
        "--os",
        "freebsd",
        "--connections",
        "2000000",
        "--memory",
        "64GiB",
        "--shards",
        "16",
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    for file in ["loader.conf", "sysctl.conf", "login.conf", "rc.conf"] {
        assert!(out.join(file).is_file(), "{file}");
    }
}
