//! The connection ceiling: how many connections the live limits of a host allow, and which
//! limit is the binding one. Pure: hopd calls [`connection_ceiling`] at start with the limits
//! it read, `hop-tune check` with the limits of the host it inspects.

use std::fmt;

use crate::model::{
    bytes_per_connection, fds_reserved, memory_for_connections, without_headroom, Backend, Os,
    CHURN_HEADROOM_PERCENT, IORING_MAX_FIXED_FILES, SYSTEM_FILES_RESERVE, SYSTEM_SOCKETS_RESERVE,
};

/// The limits of a live host (or process) that bound connections. `None` is "not present on
/// this OS / not loaded", never "unknown and therefore fine": callers read what exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveLimits {
    /// The OS, which names the limits.
    pub os: Os,
    /// RLIMIT_NOFILE soft limit of the process.
    pub nofile_soft: u64,
    /// RLIMIT_NOFILE hard limit of the process; an unprivileged process cannot raise it.
    pub nofile_hard: u64,
    /// Ceiling of any process's RLIMIT_NOFILE: Linux `fs.nr_open`, FreeBSD
    /// `kern.maxfilesperproc`.
    pub files_per_process_max: Option<u64>,
    /// System-wide open files: Linux `fs.file-max`, FreeBSD `kern.maxfiles`.
    pub files_system_max: Option<u64>,
    /// System-wide sockets: FreeBSD `kern.ipc.maxsockets` (Linux has no such limit).
    pub sockets_system_max: Option<u64>,
    /// Linux `net.netfilter.nf_conntrack_max`, when conntrack is loaded.
    pub conntrack_max: Option<u64>,
    /// Physical memory, bytes.
    pub memory_bytes: u64,
}

/// A limit that bounds connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Factor {
    /// The process's RLIMIT_NOFILE hard limit (per process with mio, per ring with uring).
    NofileHard,
    /// `fs.nr_open` / `kern.maxfilesperproc`.
    FilesPerProcessMax,
    /// `fs.file-max` / `kern.maxfiles`.
    FilesSystemMax,
    /// `kern.ipc.maxsockets`.
    SocketsSystemMax,
    /// `nf_conntrack_max`.
    ConntrackMax,
    /// Physical memory.
    Memory,
}

impl Factor {
    /// The limit's name on `os`.
    pub fn name(self, os: Os) -> &'static str {
        match (self, os) {
            (Factor::NofileHard, _) => "RLIMIT_NOFILE hard limit",
            (Factor::FilesPerProcessMax, Os::Linux) => "fs.nr_open",
            (Factor::FilesPerProcessMax, Os::FreeBsd) => "kern.maxfilesperproc",
            (Factor::FilesSystemMax, Os::Linux) => "fs.file-max",
            (Factor::FilesSystemMax, Os::FreeBsd) => "kern.maxfiles",
            (Factor::SocketsSystemMax, _) => "kern.ipc.maxsockets",
            (Factor::ConntrackMax, _) => "net.netfilter.nf_conntrack_max",
            (Factor::Memory, _) => "memory",
        }
    }
}

/// What one limit allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    /// The limit.
    pub factor: Factor,
    /// Its live value (bytes for memory, a count otherwise).
    pub limit: u64,
    /// Connections it allows, churn headroom kept.
    pub connections: u64,
    /// How `connections` follows from `limit`.
    pub derivation: String,
}

/// The connection ceiling of a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ceiling {
    /// OS of the host, which names the limits.
    pub os: Os,
    /// Connections the host can hold with churn headroom: the smallest bound.
    pub connections: u64,
    /// The binding limit.
    pub limiting: Factor,
    /// Every bound, in a fixed order (descriptors, files, sockets, conntrack, memory).
    pub bounds: Vec<Bound>,
}

impl Ceiling {
    /// The bound for `factor`, if the host has that limit.
    pub fn bound(&self, factor: Factor) -> Option<&Bound> {
        self.bounds.iter().find(|b| b.factor == factor)
    }

    /// Bounds that allow fewer than `connections`, tightest first.
    pub fn caps_below(&self, connections: u64) -> Vec<&Bound> {
        let mut caps: Vec<&Bound> = self
            .bounds
            .iter()
            .filter(|b| b.connections < connections)
            .collect();
        caps.sort_by_key(|b| b.connections);
        caps
    }
}

impl fmt::Display for Ceiling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bound = self
            .bound(self.limiting)
            .expect("the limiting factor has a bound");
        write!(
            f,
            "connection ceiling {} (limited by {} = {}; run `hop-tune check` for the full table)",
            group(self.connections),
            self.limiting.name(self.os),
            group(bound.limit),
        )
    }
}

/// Computes the connection ceiling from live limits, for hopd with `backend` and `shards`.
///
/// With [`Backend::Mio`] every connection is a descriptor in the process's fd table, so the
/// hard RLIMIT_NOFILE (which hopd raises its soft limit to) bounds the process. With
/// [`Backend::Uring`] connections are io_uring direct descriptors: each shard's ring has its
/// own fixed-file table, capped at registration by RLIMIT_NOFILE and by 2^20, so `shards`
/// rings hold about `shards` x that. Every socket is still a kernel file, so the system-wide
/// file limit applies to both.
pub fn connection_ceiling(limits: &LiveLimits, backend: Backend, shards: u32) -> Ceiling {
    assert!(shards > 0, "hopd runs at least one shard");
    let os = limits.os;
    let reserved = fds_reserved(shards);
    let headroom = CHURN_HEADROOM_PERCENT;
    let mut bounds = Vec::new();

    match backend {
        Backend::Mio => bounds.push(Bound {
            factor: Factor::NofileHard,
            limit: limits.nofile_hard,
            connections: without_headroom(limits.nofile_hard.saturating_sub(reserved)),
            derivation: format!(
                "backend mio: one descriptor per connection: ({} - {reserved} reserved) / \
                 (1 + {headroom}% churn headroom)",
                group(limits.nofile_hard)
            ),
        }),
        Backend::Uring => {
            let per_ring = limits.nofile_hard.min(IORING_MAX_FIXED_FILES);
            let slots = per_ring.saturating_mul(u64::from(shards));
            bounds.push(Bound {
                factor: Factor::NofileHard,
                limit: limits.nofile_hard,
                connections: without_headroom(slots),
                derivation: format!(
                    "backend uring: {shards} ring(s) x min({}, 2^20) fixed-file slots / \
                     (1 + {headroom}% churn headroom)",
                    group(limits.nofile_hard)
                ),
            });
        }
    }
    if backend == Backend::Mio {
        if let Some(max) = limits.files_per_process_max {
            bounds.push(Bound {
                factor: Factor::FilesPerProcessMax,
                limit: max,
                connections: without_headroom(max.saturating_sub(reserved)),
                derivation: format!(
                    "caps any RLIMIT_NOFILE a service can be given: ({} - {reserved} reserved) / \
                     (1 + {headroom}%)",
                    group(max)
                ),
            });
        }
    }
    if let Some(max) = limits.files_system_max {
        bounds.push(Bound {
            factor: Factor::FilesSystemMax,
            limit: max,
            connections: without_headroom(
                max.saturating_sub(SYSTEM_FILES_RESERVE).saturating_sub(reserved),
            ),
            derivation: format!(
                "every socket is a file: ({} - {} for the OS - {reserved} reserved) / (1 + {headroom}%)",
                group(max),
                group(SYSTEM_FILES_RESERVE)
            ),
        });
    }
    if let Some(max) = limits.sockets_system_max {
        bounds.push(Bound {
            factor: Factor::SocketsSystemMax,
            limit: max,
            connections: without_headroom(
                max.saturating_sub(SYSTEM_SOCKETS_RESERVE)
                    .saturating_sub(reserved),
            ),
            derivation: format!(
                "({} - {} for the OS - {reserved} reserved) / (1 + {headroom}%)",
                group(max),
                group(SYSTEM_SOCKETS_RESERVE)
            ),
        });
    }
    if let Some(max) = limits.conntrack_max {
        bounds.push(Bound {
            factor: Factor::ConntrackMax,
            limit: max,
            connections: without_headroom(max),
            derivation: format!(
                "conntrack is loaded: one entry per connection: {} / (1 + {headroom}%)",
                group(max)
            ),
        });
    }
    let per_connection = bytes_per_connection(limits.conntrack_max.is_some());
    bounds.push(Bound {
        factor: Factor::Memory,
        limit: limits.memory_bytes,
        connections: memory_for_connections(limits.memory_bytes) / per_connection,
        derivation: format!(
            "{} bytes after the OS reserve and the socket-buffer budget / {per_connection} bytes \
             per idle connection (measured on Linux)",
            group(memory_for_connections(limits.memory_bytes))
        ),
    });

    let tightest = bounds
        .iter()
        .min_by_key(|b| b.connections)
        .expect("memory is always a bound");
    let ceiling = Ceiling {
        os,
        connections: tightest.connections,
        limiting: tightest.factor,
        bounds,
    };
    debug_assert!(ceiling
        .bounds
        .iter()
        .all(|b| b.connections >= ceiling.connections));
    ceiling
}

/// `1234567` as `1,234,567`.
pub fn group(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * 1024 * 1024;

    /// The project's development machine: hard limit 20,000 that cannot be raised.
    fn this_machine() -> LiveLimits {
        LiveLimits {
            os: Os::Linux,
            nofile_soft: 20_000,
            nofile_hard: 20_000,
            files_per_process_max: Some(1_048_576),
            files_system_max: Some(2_466_170),
            sockets_system_max: None,
            conntrack_max: Some(262_144),
            memory_bytes: 24 * GIB,
        }
    }

    #[test]
    fn hard_limit_binds_on_the_development_machine() {
        let ceiling = connection_ceiling(&this_machine(), Backend::Mio, 1);
        assert_eq!(ceiling.limiting, Factor::NofileHard);
        // (20,000 - 80) / 1.25
        assert_eq!(ceiling.connections, 15_936);
        assert!(ceiling.connections >= 15_000);
        let caps: Vec<Factor> = ceiling
            .caps_below(1_000_000)
            .iter()
            .map(|b| b.factor)
            .collect();
        assert_eq!(
            caps,
            [
                Factor::NofileHard,
                Factor::ConntrackMax,
                Factor::FilesPerProcessMax
            ]
        );
        assert!(ceiling
            .to_string()
            .contains("RLIMIT_NOFILE hard limit = 20,000"));
    }

    #[test]
    fn uring_multiplies_by_rings() {
        let ceiling = connection_ceiling(&this_machine(), Backend::Uring, 8);
        assert_eq!(
            ceiling
                .bound(Factor::NofileHard)
                .expect("bound")
                .connections,
            128_000
        );
        assert!(ceiling.bound(Factor::FilesPerProcessMax).is_none());
    }

    #[test]
    fn uring_ring_is_capped_at_two_to_the_twenty() {
        let mut limits = this_machine();
        limits.nofile_hard = 10_000_000;
        let ceiling = connection_ceiling(&limits, Backend::Uring, 1);
        assert_eq!(
            ceiling
                .bound(Factor::NofileHard)
                .expect("bound")
                .connections,
            without_headroom(IORING_MAX_FIXED_FILES)
        );
    }

    #[test]
    fn groups_digits() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1_000), "1,000");
        assert_eq!(group(1_234_567), "1,234,567");
    }
}
