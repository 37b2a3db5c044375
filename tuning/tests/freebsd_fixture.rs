//! FreeBSD parsing and checking, run on any OS, against sysctl output in tests/fixtures.

use std::fs;
use std::path::PathBuf;

use hop_tune::check::{check, render_report};
use hop_tune::live::{freebsd_limits, parse_sysctl_output, LiveHost};
use hop_tune::model::{plan, Backend, Os, Role, Target};
use hop_tune::Factor;

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn live() -> LiveHost {
    let values = parse_sysctl_output(&fixture("freebsd-sysctl.txt"));
    let limits = freebsd_limits(&values, &fixture("freebsd-procstat-l.txt")).expect("limits");
    LiveHost {
        limits,
        values,
        memlock: None,
        io_uring: None,
        pid: None,
    }
}

#[test]
fn parses_the_fixture() {
    let live = live();
    assert_eq!(live.limits.os, Os::FreeBsd);
    assert_eq!(live.limits.files_system_max, Some(1_048_576));
    assert_eq!(live.limits.files_per_process_max, Some(943_718));
    assert_eq!(live.limits.sockets_system_max, Some(1_048_576));
    assert_eq!(live.limits.nofile_hard, 943_718);
    assert_eq!(live.limits.memory_bytes, 68_601_286_656);
    assert!(live.values["kern.version"].contains("GENERIC"));
}

#[test]
fn an_untuned_host_is_capped_for_two_million() {
    let target = Target::new(
        2_000_000,
        64 << 30,
        Role::Server,
        Os::FreeBsd,
        16,
        Backend::Mio,
    )
    .expect("valid");
    let report = check(&plan(target), &live());
    assert!(!report.passed());
    let caps: Vec<Factor> = report.caps().iter().map(|b| b.factor).collect();
    assert!(caps.contains(&Factor::NofileHard));
    assert!(caps.contains(&Factor::FilesSystemMax));
    assert!(caps.contains(&Factor::SocketsSystemMax));
    let text = render_report(&report);
    assert!(text.contains("kern.maxfiles = 1,048,576 allows"), "{text}");
    assert!(text.contains("net.inet.tcp.tcbhashsize"), "{text}");
    assert!(
        !text.contains("backend mio assumed"),
        "the uring note is Linux-only: {text}"
    );
}

#[test]
fn an_untuned_host_holds_half_a_million() {
    let target = Target::new(
        500_000,
        64 << 30,
        Role::Server,
        Os::FreeBsd,
        16,
        Backend::Mio,
    )
    .expect("valid");
    let report = check(&plan(target), &live());
    assert!(report.passed(), "{}", render_report(&report));
}
