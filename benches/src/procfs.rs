//! Readings from `/proc`: a server's memory, the kernel's socket memory, the generator's CPU
//! time, and the machine facts every report carries.

use std::collections::BTreeMap;
use std::fs;

use nix::sys::resource::{getrlimit, getrusage, Resource, UsageWho};
use serde::Serialize;

/// Memory of a server process and of the kernel's TCP stack at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemorySample {
    /// Resident set of the server process.
    pub server_rss_bytes: u64,
    /// Pages the kernel charges to TCP (`/proc/net/sockstat`, `TCP: mem`), in bytes.
    pub tcp_mem_bytes: u64,
    /// All kernel slab (`/proc/meminfo`, `Slab`), in bytes: socket structures live there.
    pub slab_bytes: u64,
    /// TCP sockets in use (`/proc/net/sockstat`, `TCP: inuse`).
    pub tcp_inuse: u64,
}

impl MemorySample {
    /// Reads everything for server `pid` (RSS is 0 if the process is gone).
    pub fn read(pid: Option<u32>) -> Self {
        let (tcp_inuse, tcp_mem_pages) = sockstat().unwrap_or_default();
        Self {
            server_rss_bytes: pid.and_then(rss_bytes).unwrap_or(0),
            tcp_mem_bytes: tcp_mem_pages * page_bytes(),
            slab_bytes: meminfo_kib("Slab").unwrap_or(0) * 1024,
            tcp_inuse,
        }
    }
}

/// Growth per connection between two samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MemoryPerConnection {
    pub server_rss_bytes: f64,
    pub tcp_mem_bytes: f64,
    pub slab_bytes: f64,
}

impl MemoryPerConnection {
    pub fn between(before: &MemorySample, after: &MemorySample, connections: u64) -> Self {
        if connections == 0 {
            return Self::default();
        }
        let per = |a: u64, b: u64| (b as f64 - a as f64) / connections as f64;
        Self {
            server_rss_bytes: per(before.server_rss_bytes, after.server_rss_bytes),
            tcp_mem_bytes: per(before.tcp_mem_bytes, after.tcp_mem_bytes),
            slab_bytes: per(before.slab_bytes, after.slab_bytes),
        }
    }
}

/// The resident set of process `pid`, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    field_kib(&status, "VmRSS").map(|kib| kib * 1024)
}

/// CPU seconds (user + system) this process and its waited-for children used so far.
pub fn cpu_seconds_self() -> f64 {
    let seconds = |who| {
        getrusage(who)
            .map(|usage| {
                let user = usage.user_time();
                let system = usage.system_time();
                user.tv_sec() as f64
                    + user.tv_usec() as f64 / 1e6
                    + system.tv_sec() as f64
                    + system.tv_usec() as f64 / 1e6
            })
            .unwrap_or(0.0)
    };
    seconds(UsageWho::RUSAGE_SELF)
}

/// CPU seconds (user + system) process `pid` used so far, from `/proc/PID/stat`.
pub fn cpu_seconds_of(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / CLOCK_TICKS_PER_SECOND)
}

/// `/proc` reports CPU time in USER_HZ, which Linux fixes at 100 for every architecture.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

fn sockstat() -> Option<(u64, u64)> {
    let text = fs::read_to_string("/proc/net/sockstat").ok()?;
    parse_sockstat(&text)
}

fn parse_sockstat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|line| line.starts_with("TCP:"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let value = |name: &str| -> Option<u64> {
        let at = fields.iter().position(|field| *field == name)?;
        fields.get(at + 1)?.parse().ok()
    };
    Some((value("inuse")?, value("mem")?))
}

fn meminfo_kib(name: &str) -> Option<u64> {
    field_kib(&fs::read_to_string("/proc/meminfo").ok()?, name)
}

fn field_kib(text: &str, name: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|line| line.split(':').next() == Some(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn page_bytes() -> u64 {
    // SAFETY: sysconf reads a constant of the running system; it touches no memory of ours.
    let bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if bytes > 0 {
        bytes as u64
    } else {
        4096
    }
}

/// What a reader needs to judge a figure: the machine, the kernel, the limits.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_total_bytes: u64,
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    /// Sysctls that bound a connection benchmark.
    pub sysctls: BTreeMap<String, String>,
}

const SYSCTLS: &[&str] = &[
    "net/ipv4/ip_local_port_range",
    "net/core/somaxconn",
    "net/ipv4/tcp_max_syn_backlog",
    "net/ipv4/tcp_mem",
    "net/ipv4/tcp_rmem",
    "net/ipv4/tcp_wmem",
    "net/ipv4/tcp_tw_reuse",
    "fs/file-max",
    "fs/nr_open",
    "kernel/io_uring_disabled",
];

impl MachineInfo {
    pub fn read() -> Self {
        let read = |path: &str| {
            fs::read_to_string(path)
                .map(|text| text.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|_| "unavailable".to_string())
        };
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split(':').nth(1))
                    .map(|model| model.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let (nofile_soft, nofile_hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((0, 0));
        Self {
            kernel: read("/proc/sys/kernel/osrelease"),
            cpu_model,
            // The machine's CPUs, not this process's affinity (the generator is pinned).
            cpus: fs::read_to_string("/proc/cpuinfo")
                .map(|text| text.lines().filter(|l| l.starts_with("processor")).count())
                .unwrap_or(0),
            memory_total_bytes: meminfo_kib("MemTotal").unwrap_or(0) * 1024,
            nofile_soft,
            nofile_hard,
            sysctls: SYSCTLS
                .iter()
                .map(|name| (name.replace('/', "."), read(&format!("/proc/sys/{name}"))))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_tcp_line_parses() {
        let text =
            "sockets: used 290\nTCP: inuse 12 orphan 0 tw 3 alloc 14 mem 7\nUDP: inuse 1 mem 0\n";
        assert_eq!(parse_sockstat(text), Some((12, 7)));
    }

    #[test]
    fn kib_fields_parse() {
        let text = "Name:\thopd\nVmRSS:\t   5120 kB\nVmSwap:\t0 kB\n";
        assert_eq!(field_kib(text, "VmRSS"), Some(5120));
        assert_eq!(field_kib(text, "VmHWM"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap_or(0) > 0);
        assert!(cpu_seconds_of(pid).is_some());
        assert!(cpu_seconds_self() >= 0.0);
    }

    #[test]
    fn per_connection_growth() {
        let before = MemorySample {
            server_rss_bytes: 1_000,
            ..Default::default()
        };
        let after = MemorySample {
            server_rss_bytes: 101_000,
            slab_bytes: 50,
            ..Default::default()
        };
        let per = MemoryPerConnection::between(&before, &after, 100);
        assert_eq!(per.server_rss_bytes, 1_000.0);
        assert_eq!(per.slab_bytes, 0.5);
        assert_eq!(
            MemoryPerConnection::between(&before, &after, 0).slab_bytes,
            0.0
        );
    }
}
