//! `hop-tune check`: the live host against the plan, as a table, with every limit that caps
//! the target named together with the connection count it allows.

use std::fmt::Write as _;

use crate::ceiling::{connection_ceiling, group, Bound, Ceiling, Factor};
use crate::live::LiveHost;
use crate::model::{
    bytes_per_connection, Backend, Os, Place, Plan, Rule, Setting, Value,
    HOP_USER_BYTES_PER_CONNECTION, MEMORY_RESERVED_PERCENT, SOCKET_BUFFER_BUDGET_PERCENT,
};

/// How a row stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// As recommended.
    Ok,
    /// Not as recommended, but does not cap the target.
    Warn,
    /// Caps the target below the requested connections.
    Cap,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Cap => "CAP",
        }
    }
}

/// One row of the check table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// Setting name.
    pub key: String,
    /// Live value (`absent` if the host does not have it).
    pub current: String,
    /// Recommended value.
    pub recommended: String,
    /// Verdict.
    pub status: Status,
    /// Why the setting matters.
    pub reason: String,
}

/// The result of a check.
#[derive(Clone, Debug)]
pub struct Report {
    /// The plan checked against.
    pub plan: Plan,
    /// The table.
    pub rows: Vec<Row>,
    /// The host's connection ceiling.
    pub ceiling: Ceiling,
    /// Notes printed under the table (backend, estimates).
    pub notes: Vec<String>,
}

impl Report {
    /// True when nothing caps the target.
    pub fn passed(&self) -> bool {
        self.ceiling.connections >= self.plan.target.connections()
    }

    /// Limits that cap the target, tightest first.
    pub fn caps(&self) -> Vec<&Bound> {
        self.ceiling.caps_below(self.plan.target.connections())
    }
}

/// Compares a live host with a plan.
pub fn check(plan: &Plan, live: &LiveHost) -> Report {
    let target = plan.target;
    let n = target.connections();
    let ceiling = connection_ceiling(&live.limits, target.backend(), target.shards());
    let capped = |factor: Factor| ceiling.bound(factor).is_some_and(|b| b.connections < n);
    let mut rows = Vec::new();

    let files = plan.sizes.files_per_process;
    let limits = &live.limits;
    rows.push(Row {
        key: "RLIMIT_NOFILE hard".to_string(),
        current: plain(limits.nofile_hard),
        recommended: files.to_string(),
        status: verdict(limits.nofile_hard >= files, capped(Factor::NofileHard)),
        reason: format!(
            "{}; a process cannot raise its own hard limit (needs CAP_SYS_RESOURCE): set {}",
            match target.backend() {
                Backend::Mio => "backend mio: one descriptor per connection",
                Backend::Uring => "backend uring: caps each shard ring's fixed-file table",
            },
            match target.os() {
                Os::Linux => "LimitNOFILE in hopd's systemd unit",
                Os::FreeBsd => "openfiles in login class hop",
            }
        ),
    });
    rows.push(Row {
        key: "RLIMIT_NOFILE soft".to_string(),
        current: plain(limits.nofile_soft),
        recommended: files.to_string(),
        status: if limits.nofile_soft >= files {
            Status::Ok
        } else {
            Status::Warn
        },
        reason: "hopd raises its soft limit to the hard one at start".to_string(),
    });

    for setting in &plan.settings {
        if matches!(setting.place, Place::SystemdUnit | Place::LoginConf) {
            if setting.key == "LimitMEMLOCK" {
                rows.push(memlock_row(setting, live));
            }
            continue;
        }
        rows.push(setting_row(setting, live, &capped));
    }

    if target.backend() == Backend::Uring && target.os() == Os::Linux {
        if let Some(probe) = &live.io_uring {
            rows.push(Row {
                key: "io_uring setup".to_string(),
                current: match probe {
                    Ok(()) => "works".to_string(),
                    Err(error) => format!("fails: {error}"),
                },
                recommended: "works".to_string(),
                status: if probe.is_ok() {
                    Status::Ok
                } else {
                    Status::Warn
                },
                reason: "io_uring_setup(2) from this process (seccomp and \
                         kernel.io_uring_disabled show here); without it hopd falls back to mio"
                    .to_string(),
            });
        }
    }

    let per_connection = bytes_per_connection(limits.conntrack_max.is_some());
    let usable_percent = 100 - MEMORY_RESERVED_PERCENT - SOCKET_BUFFER_BUDGET_PERCENT;
    let memory_needed = (n * per_connection).div_ceil(usable_percent) * 100;
    rows.push(Row {
        key: "memory".to_string(),
        current: format!("{} bytes", group(limits.memory_bytes)),
        recommended: format!("{} bytes", group(memory_needed)),
        status: verdict(limits.memory_bytes >= memory_needed, capped(Factor::Memory)),
        reason: format!(
            "{per_connection} bytes per idle connection (measured on Linux) over \
             {usable_percent}% of RAM ({MEMORY_RESERVED_PERCENT}% OS reserve, \
             {SOCKET_BUFFER_BUDGET_PERCENT}% socket buffers)"
        ),
    });

    let mut notes = Vec::new();
    if target.os() == Os::Linux {
        notes.push(match target.backend() {
            Backend::Mio => format!(
                "backend mio assumed (the conservative default): every connection is a \
                 descriptor in hopd's fd table, so the hard RLIMIT_NOFILE bounds the process. \
                 hopd's uring backend holds connections as io_uring direct descriptors, one \
                 fixed-file table per shard ring capped by RLIMIT_NOFILE (and 2^20), so S shards \
                 hold about S x the hard limit; with --backend uring --shards {} this host would \
                 allow {}.",
                target.shards().max(2),
                group(
                    connection_ceiling(limits, Backend::Uring, target.shards().max(2)).connections
                )
            ),
            Backend::Uring => format!(
                "backend uring with {} shard(s): assumes hopd registers a fixed-file table of its \
                 full (raised) RLIMIT_NOFILE in each ring; every socket still counts against \
                 fs.file-max.",
                target.shards()
            ),
        });
    }
    notes.push(format!(
        "hop's user-space bytes per connection ({HOP_USER_BYTES_PER_CONNECTION}) and the \
         kernel's 3,600 bytes per idle socket were measured on Linux (docs/BENCHMARKS.md)."
    ));
    if let Some(pid) = live.pid {
        notes.push(format!("limits read from process {pid}"));
    }
    Report {
        plan: plan.clone(),
        rows,
        ceiling,
        notes,
    }
}

/// The report as text: header, table, caps, notes and the verdict.
pub fn render_report(report: &Report) -> String {
    let target = report.plan.target;
    let n = target.connections();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "hop-tune check: {} connections, role {}, os {}, backend {}, {} shard(s)\n",
        group(n),
        target.role(),
        target.os(),
        target.backend(),
        target.shards()
    );
    let headers = ["SETTING", "CURRENT", "RECOMMENDED", "STATUS", "REASON"];
    let width = |column: usize, pick: fn(&Row) -> &str| {
        report
            .rows
            .iter()
            .map(|r| pick(r).len())
            .chain([headers[column].len()])
            .max()
            .unwrap_or(0)
    };
    let widths = [
        width(0, |r| &r.key),
        width(1, |r| &r.current),
        width(2, |r| &r.recommended),
        6,
    ];
    let _ = writeln!(
        out,
        "{:w0$}  {:w1$}  {:w2$}  {:w3$}  {}",
        headers[0],
        headers[1],
        headers[2],
        headers[3],
        headers[4],
        w0 = widths[0],
        w1 = widths[1],
        w2 = widths[2],
        w3 = widths[3]
    );
    for row in &report.rows {
        let _ = writeln!(
            out,
            "{:w0$}  {:w1$}  {:w2$}  {:w3$}  {}",
            row.key,
            row.current,
            row.recommended,
            row.status.label(),
            row.reason,
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    }
    let os = report.ceiling.os;
    let caps = report.caps();
    if !caps.is_empty() {
        let _ = writeln!(
            out,
            "\ncaps (each allows fewer than {} connections):",
            group(n)
        );
        for bound in &caps {
            let _ = writeln!(
                out,
                "  {} = {} allows {} connections: {}",
                bound.factor.name(os),
                show(bound.limit),
                group(bound.connections),
                bound.derivation
            );
        }
    }
    let _ = writeln!(out, "\nnotes:");
    for note in &report.notes {
        let _ = writeln!(out, "  - {note}");
    }
    out.push('\n');
    let limiting = report.ceiling.limiting.name(os);
    if report.passed() {
        let _ = writeln!(
            out,
            "PASS: nothing caps {} connections (ceiling {}, limited by {limiting})",
            group(n),
            group(report.ceiling.connections)
        );
    } else {
        let tightest = caps[0];
        let _ = writeln!(
            out,
            "FAIL: {} limit(s) cap {} connections; the tightest, {limiting} = {}, allows {} \
             connections",
            caps.len(),
            group(n),
            show(tightest.limit),
            group(tightest.connections)
        );
    }
    out
}

fn setting_row(setting: &Setting, live: &LiveHost, capped: &dyn Fn(Factor) -> bool) -> Row {
    let current = live.values.get(setting.key);
    let factor = match setting.key {
        "fs.nr_open" | "kern.maxfilesperproc" => Some(Factor::FilesPerProcessMax),
        "fs.file-max" | "kern.maxfiles" => Some(Factor::FilesSystemMax),
        "kern.ipc.maxsockets" => Some(Factor::SocketsSystemMax),
        "net.netfilter.nf_conntrack_max" => Some(Factor::ConntrackMax),
        _ => None,
    };
    let status = match current {
        None if setting.key.starts_with("net.netfilter.") => Status::Ok,
        None => Status::Warn,
        Some(text) => {
            let meets = meets(setting, text);
            match factor {
                Some(factor) => verdict(meets, capped(factor)),
                None if meets => Status::Ok,
                None => Status::Warn,
            }
        }
    };
    let reason = match current {
        None if setting.key.starts_with("net.netfilter.") => {
            "conntrack not loaded: nothing to size".to_string()
        }
        _ => setting.reason.clone(),
    };
    Row {
        key: setting.key.to_string(),
        current: current.cloned().unwrap_or_else(|| "absent".to_string()),
        recommended: setting.value.to_string(),
        status,
        reason,
    }
}

fn memlock_row(setting: &Setting, live: &LiveHost) -> Row {
    let wanted = setting.value.ints().first().copied().unwrap_or(0);
    let (current, status) = match live.memlock {
        Some((_, hard)) => (
            plain(hard),
            if hard >= wanted {
                Status::Ok
            } else {
                Status::Warn
            },
        ),
        None => ("unknown".to_string(), Status::Warn),
    };
    Row {
        key: "RLIMIT_MEMLOCK hard".to_string(),
        current,
        recommended: wanted.to_string(),
        status,
        reason: setting.reason.clone(),
    }
}

/// Whether the live `text` satisfies the setting's rule.
pub fn meets(setting: &Setting, text: &str) -> bool {
    let live: Option<Vec<u64>> = text.split_whitespace().map(|w| w.parse().ok()).collect();
    let (Some(live), wanted) = (live, setting.value.ints()) else {
        return matches!(setting.value, Value::Text(t) if t == text);
    };
    match setting.rule {
        Rule::AtLeast => {
            live.len() == wanted.len() && live.iter().zip(&wanted).all(|(l, w)| l >= w)
        }
        Rule::AtMost => live.last().zip(wanted.last()).is_some_and(|(l, w)| l <= w),
        Rule::Covers => match (live.as_slice(), wanted.as_slice()) {
            ([low, high], [want_low, want_high]) => low <= want_low && high >= want_high,
            ([first], [want_first]) => first <= want_first,
            _ => false,
        },
        Rule::Equals => live == wanted,
    }
}

fn verdict(meets: bool, caps: bool) -> Status {
    if caps {
        Status::Cap
    } else if meets {
        Status::Ok
    } else {
        Status::Warn
    }
}

fn plain(value: u64) -> String {
    if value == u64::MAX {
        "unlimited".to_string()
    } else {
        value.to_string()
    }
}

fn show(value: u64) -> String {
    if value == u64::MAX {
        "unlimited".to_string()
    } else {
        group(value)
    }
}
