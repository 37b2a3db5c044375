//! Readings from `/proc`: a server's memory, the kernel's socket memory, the generator's CPU
//! time, and the machine facts every report carries.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::sys::resource::{getrlimit, getrusage, Resource, UsageWho};
use serde::Serialize;

/// Memory of a server process and of the kernel's TCP stack at one moment. A reading that
/// failed is `None` (`null` in JSON), never 0: a 0 would be taken for a measurement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemorySample {
    /// Resident set of the server process.
    pub server_rss_bytes: Option<u64>,
    /// Pages the kernel charges to TCP (`/proc/net/sockstat`, `TCP: mem`), in bytes.
    pub tcp_mem_bytes: Option<u64>,
    /// All kernel slab (`/proc/meminfo`, `Slab`), in bytes: socket structures live there.
    pub slab_bytes: Option<u64>,
    /// TCP sockets in use (`/proc/net/sockstat`, `TCP: inuse`).
    pub tcp_inuse: Option<u64>,
}

/// The /proc files `ceiling` reads about its server and the kernel, opened once before the
/// run and read again at every reading.
///
/// Why opened up front: a generator process holding as many connections as its descriptor
/// limit allows cannot open a file, so a reading that opened `/proc/PID/status` anew once the
/// ramp was done got nothing, which was counted as 0 (and gave a negative RSS per
/// connection). A procfs file generates its text afresh when read from offset 0, so a
/// descriptor opened before the run gives fresh readings for the whole run without needing a
/// free slot then: its [`Self::DESCRIPTORS`] are taken while slots are still free, and
/// counted in [`crate::descriptors::GENERATOR_RESERVED_DESCRIPTORS`]. (Holding
/// spare descriptors and closing them just before a reading would also work, but it is more
/// code and leaves a moment in which another open may take the freed slot.) A descriptor of
/// `/proc/PID/...` also keeps naming that process: if the server exits, its readings fail
/// instead of reading another process that was given the same pid.
#[derive(Debug)]
pub struct ServerProbe {
    /// `/proc/PID/status` of the server, for its RSS.
    server_status: Option<ProcFile>,
    /// `/proc/PID/stat` of the server, for its CPU time.
    server_stat: Option<ProcFile>,
    sockstat: Option<ProcFile>,
    meminfo: Option<ProcFile>,
}

impl ServerProbe {
    /// The descriptors a probe holds open for the whole run.
    pub const DESCRIPTORS: u64 = 4;

    /// Opens the files for server `pid` (none without a pid) and the kernel's. A file that
    /// cannot be opened makes its readings `None`.
    pub fn open(pid: Option<u32>) -> Self {
        let open = |path: String| ProcFile::open(path).ok();
        Self {
            server_status: pid.and_then(|pid| open(format!("/proc/{pid}/status"))),
            server_stat: pid.and_then(|pid| open(format!("/proc/{pid}/stat"))),
            sockstat: open("/proc/net/sockstat".into()),
            meminfo: open("/proc/meminfo".into()),
        }
    }

    /// The files this probe holds open (at most [`Self::DESCRIPTORS`]).
    pub fn open_files(&self) -> u64 {
        let files = [
            &self.server_status,
            &self.server_stat,
            &self.sockstat,
            &self.meminfo,
        ];
        files.iter().filter(|file| file.is_some()).count() as u64
    }

    /// The server's and the kernel's memory now.
    pub fn memory(&self) -> MemorySample {
        let text = |file: &Option<ProcFile>| file.as_ref().and_then(|file| file.read().ok());
        let sockstat = text(&self.sockstat).and_then(|text| parse_sockstat(&text));
        MemorySample {
            server_rss_bytes: text(&self.server_status)
                .and_then(|status| field_kib(&status, "VmRSS"))
                .map(|kib| kib * 1024),
            tcp_mem_bytes: sockstat.map(|(_, pages)| pages * page_bytes()),
            slab_bytes: text(&self.meminfo)
                .and_then(|meminfo| field_kib(&meminfo, "Slab"))
                .map(|kib| kib * 1024),
            tcp_inuse: sockstat.map(|(inuse, _)| inuse),
        }
    }

    /// CPU seconds (user + system) the server used so far.
    pub fn server_cpu_seconds(&self) -> Option<f64> {
        parse_cpu_seconds(&self.server_stat.as_ref()?.read().ok()?)
    }
}

/// A procfs file opened once and read from offset 0 (`pread`) at every reading, which makes
/// procfs generate its text afresh; no descriptor is opened for a reading.
#[derive(Debug)]
pub struct ProcFile {
    file: File,
}

/// Bytes read from a procfs file in one `pread`. procfs answers a read from offset 0 of a
/// one-record file (status, stat, meminfo, sockstat) with the whole text if it fits, so with a
/// buffer larger than the text a reading is one consistent snapshot; the files read here are
/// a few KiB.
const PROC_READ_BYTES: usize = 64 * 1024;
/// The most bytes a reading takes from a procfs file before it is refused as not procfs.
const PROC_FILE_BYTES_MAX: usize = 1024 * 1024;
const _: () = assert!(PROC_READ_BYTES <= PROC_FILE_BYTES_MAX);

impl ProcFile {
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Ok(Self {
            file: File::open(path)?,
        })
    }

    /// The file's whole text as procfs generates it now.
    pub fn read(&self) -> io::Result<String> {
        let mut text = Vec::new();
        let mut buffer = vec![0; PROC_READ_BYTES];
        loop {
            let read = self.file.read_at(&mut buffer, text.len() as u64)?;
            if read == 0 {
                break;
            }
            text.extend_from_slice(&buffer[..read]);
            if text.len() > PROC_FILE_BYTES_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("more than {PROC_FILE_BYTES_MAX} bytes: not a procfs file"),
                ));
            }
        }
        String::from_utf8(text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Growth per connection between two samples, in bytes. A figure is `None` where it was not
/// measured, and `not_measured` then says why under the figure's name: a reading missing on
/// either side, no connection held, or a growth below zero (something else freed more memory
/// than the connections took, so the difference is not what a connection costs).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPerConnection {
    pub server_rss_bytes: Option<f64>,
    pub tcp_mem_bytes: Option<f64>,
    pub slab_bytes: Option<f64>,
    /// Why a figure above is `None`, by its name.
    pub not_measured: BTreeMap<&'static str, String>,
}

impl MemoryPerConnection {
    pub fn between(before: &MemorySample, after: &MemorySample, connections: u64) -> Self {
        let mut not_measured = BTreeMap::new();
        let mut per = |name: &'static str, before: Option<u64>, after: Option<u64>| {
            match growth_per_connection(before, after, connections) {
                Ok(bytes) => Some(bytes),
                Err(why) => {
                    not_measured.insert(name, why.to_string());
                    None
                }
            }
        };
        let server_rss_bytes = per(
            "server_rss_bytes",
            before.server_rss_bytes,
            after.server_rss_bytes,
        );
        let tcp_mem_bytes = per("tcp_mem_bytes", before.tcp_mem_bytes, after.tcp_mem_bytes);
        let slab_bytes = per("slab_bytes", before.slab_bytes, after.slab_bytes);
        Self {
            server_rss_bytes,
            tcp_mem_bytes,
            slab_bytes,
            not_measured,
        }
    }

    /// The figures with their table labels: bytes per connection, or why not measured.
    pub fn figures(&self) -> [(&'static str, Result<f64, &str>); 3] {
        let figure = |name: &str, value: Option<f64>| {
            value.ok_or_else(|| {
                self.not_measured
                    .get(name)
                    .map_or("no reason recorded", String::as_str)
            })
        };
        [
            (
                "server RSS per connection",
                figure("server_rss_bytes", self.server_rss_bytes),
            ),
            (
                "kernel slab per connection",
                figure("slab_bytes", self.slab_bytes),
            ),
            (
                "kernel TCP mem per connection",
                figure("tcp_mem_bytes", self.tcp_mem_bytes),
            ),
        ]
    }
}

/// Why a per-connection figure was not measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NotMeasured {
    NoReadingBefore,
    NoReadingAfter,
    NoConnectionHeld,
    /// The reading fell by this many bytes per connection.
    Fell(f64),
}

impl std::fmt::Display for NotMeasured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoReadingBefore => write!(f, "no reading before the run"),
            Self::NoReadingAfter => write!(f, "no reading once the connections were held"),
            Self::NoConnectionHeld => write!(f, "no connection held"),
            Self::Fell(bytes) => write!(
                f,
                "it fell by {bytes:.0} bytes per connection: something else freed more than \
                 the connections took"
            ),
        }
    }
}

/// `(after - before) / connections`, if both readings are there, a connection was held and
/// the growth is not below zero.
pub fn growth_per_connection(
    before: Option<u64>,
    after: Option<u64>,
    connections: u64,
) -> Result<f64, NotMeasured> {
    let before = before.ok_or(NotMeasured::NoReadingBefore)?;
    let after = after.ok_or(NotMeasured::NoReadingAfter)?;
    if connections == 0 {
        return Err(NotMeasured::NoConnectionHeld);
    }
    let per = (after as f64 - before as f64) / connections as f64;
    if per < 0.0 {
        return Err(NotMeasured::Fell(-per));
    }
    Ok(per)
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
    parse_cpu_seconds(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / CLOCK_TICKS_PER_SECOND)
}

/// Whether this process runs under a real-time policy (SCHED_FIFO or SCHED_RR) that the
/// kernel throttles: the `policy` field of `/proc/self/stat` and
/// `/proc/sys/kernel/sched_rt_runtime_us` (-1 lifts the throttling). `None` when either
/// cannot be read.
pub fn real_time_throttled() -> Option<RealTimeThrottle> {
    let policy = parse_policy(&fs::read_to_string("/proc/self/stat").ok()?)?;
    if !matches!(policy, SCHED_FIFO | SCHED_RR) {
        return Some(RealTimeThrottle::NotRealTime);
    }
    let sysctl = |name: &str| -> Option<i64> {
        fs::read_to_string(format!("/proc/sys/kernel/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let runtime = sysctl("sched_rt_runtime_us")?;
    let period = sysctl("sched_rt_period_us")?;
    Some(if runtime < 0 {
        RealTimeThrottle::Lifted
    } else {
        RealTimeThrottle::Throttled {
            runtime_us: runtime,
            period_us: period,
        }
    })
}

/// What [`real_time_throttled`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealTimeThrottle {
    NotRealTime,
    /// Real-time, and `kernel.sched_rt_runtime_us` is -1.
    Lifted,
    /// Real-time threads may run `runtime_us` of every `period_us` and are stopped for the
    /// rest once they have.
    Throttled {
        runtime_us: i64,
        period_us: i64,
    },
}

const SCHED_FIFO: u32 = 1;
const SCHED_RR: u32 = 2;

fn parse_policy(stat: &str) -> Option<u32> {
    // `policy` is field 41 of the whole line, 39 after the name (in parentheses, may hold
    // spaces): index 38.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(38)?.parse().ok()
}

/// `/proc` reports CPU time in USER_HZ, which Linux fixes at 100 for every architecture.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

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
    fn the_scheduling_policy_is_read_after_the_name() {
        // A name with spaces and a parenthesis; policy 1 (SCHED_FIFO) in field 41.
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[38] = "1".into();
        let stat = format!("4242 (hop (bench) x) {}", fields.join(" "));
        assert_eq!(parse_policy(&stat), Some(1));
        assert_eq!(parse_policy("4242 (short) S 1 2"), None);
        let own = fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_policy(&own).is_some(), "this process's policy reads");
    }

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
            server_rss_bytes: Some(1_000),
            tcp_mem_bytes: Some(4_096),
            slab_bytes: Some(0),
            tcp_inuse: Some(2),
        };
        let after = MemorySample {
            server_rss_bytes: Some(101_000),
            tcp_mem_bytes: Some(4_096),
            slab_bytes: Some(50),
            tcp_inuse: Some(202),
        };
        let per = MemoryPerConnection::between(&before, &after, 100);
        assert_eq!(per.server_rss_bytes, Some(1_000.0));
        assert_eq!(per.slab_bytes, Some(0.5));
        assert_eq!(per.tcp_mem_bytes, Some(0.0), "no growth is a measurement");
        assert!(per.not_measured.is_empty());
        let none_held = MemoryPerConnection::between(&before, &after, 0);
        assert_eq!(none_held.slab_bytes, None);
        assert_eq!(none_held.not_measured["slab_bytes"], "no connection held");
    }

    /// `ceiling --connections 30000` in one process held 19,994 connections, ran out of
    /// descriptors, could not read /proc after the ramp, counted the readings as 0 and
    /// reported -1,136 bytes of hopd RSS per connection. These are its readings before.
    #[test]
    fn a_missing_reading_gives_no_figure_never_a_negative_one() {
        let before = MemorySample {
            server_rss_bytes: Some(22_704_128),
            tcp_mem_bytes: Some(1_966_080),
            slab_bytes: Some(485_199_872),
            tcp_inuse: Some(4),
        };
        let after = MemorySample::default();
        let per = MemoryPerConnection::between(&before, &after, 19_994);
        assert_eq!(per.server_rss_bytes, None);
        assert_eq!(per.tcp_mem_bytes, None);
        assert_eq!(per.slab_bytes, None);
        assert_eq!(
            per.not_measured["server_rss_bytes"],
            "no reading once the connections were held"
        );
        let per = MemoryPerConnection::between(&MemorySample::default(), &before, 19_994);
        assert_eq!(per.server_rss_bytes, None);
        assert_eq!(
            per.not_measured["server_rss_bytes"],
            "no reading before the run"
        );
        // One missing figure leaves the others measured.
        let partial = MemorySample {
            server_rss_bytes: None,
            slab_bytes: Some(485_199_872 + 19_994 * 9_000),
            ..before
        };
        let per = MemoryPerConnection::between(&before, &partial, 19_994);
        assert_eq!(per.server_rss_bytes, None);
        assert_eq!(per.slab_bytes, Some(9_000.0));
        assert_eq!(per.tcp_mem_bytes, Some(0.0));
        let [(_, rss), (_, slab), _] = per.figures();
        assert_eq!(rss, Err("no reading once the connections were held"));
        assert_eq!(slab, Ok(9_000.0));
    }

    #[test]
    fn a_reading_that_fell_is_not_a_figure() {
        assert_eq!(
            growth_per_connection(Some(2_000), Some(1_000), 10),
            Err(NotMeasured::Fell(100.0))
        );
        assert_eq!(
            growth_per_connection(Some(1_000), Some(2_000), 10),
            Ok(100.0)
        );
        assert_eq!(
            growth_per_connection(None, Some(2_000), 10),
            Err(NotMeasured::NoReadingBefore)
        );
        assert_eq!(
            growth_per_connection(Some(1_000), None, 10),
            Err(NotMeasured::NoReadingAfter)
        );
    }

    #[test]
    fn an_open_proc_file_read_again_gives_fresh_text() {
        let status = ProcFile::open("/proc/self/status").unwrap();
        let rss = |file: &ProcFile| field_kib(&file.read().unwrap(), "VmRSS").unwrap() * 1024;
        let before = rss(&status);
        const BLOCK_BYTES: usize = 64 << 20;
        let mut block = vec![0u8; BLOCK_BYTES];
        // Touch every page so that it is resident (a fresh allocation maps zero pages lazily).
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&mut block);
        let after = rss(&status);
        // Other tests of this process allocate and free meanwhile: ask for half the block.
        assert!(
            after >= before + BLOCK_BYTES as u64 / 2,
            "VmRSS {before} -> {after} bytes after touching {BLOCK_BYTES}"
        );
        drop(block);
    }

    #[test]
    fn a_probe_reads_a_live_server_and_gives_none_for_one_that_is_not_there() {
        let probe = ServerProbe::open(Some(std::process::id()));
        let memory = probe.memory();
        assert!(memory.server_rss_bytes.unwrap() > 0);
        assert!(memory.slab_bytes.unwrap() > 0);
        assert!(memory.tcp_inuse.is_some());
        assert!(probe.server_cpu_seconds().is_some());
        assert_eq!(probe.open_files(), ServerProbe::DESCRIPTORS);
        // Read twice from the same descriptors.
        assert!(probe.memory().server_rss_bytes.unwrap() > 0);
        // pid_max is at most 2^22: this pid is never a process.
        let gone = ServerProbe::open(Some(u32::MAX));
        assert_eq!(gone.memory().server_rss_bytes, None);
        assert_eq!(gone.server_cpu_seconds(), None);
        assert_eq!(ServerProbe::open(None).memory().server_rss_bytes, None);
    }

    #[test]
    fn cpu_time_parses_past_a_name_with_spaces() {
        let stat = "42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 1 0 0";
        assert_eq!(parse_cpu_seconds(stat), Some(3.0));
        assert_eq!(parse_cpu_seconds("42 (cut"), None);
    }
}
