//! Errors, split by who is at fault: the user's input (exit code 2) or the host (exit code 1).

use std::io;
use std::path::PathBuf;

/// The command line or target is wrong: the user must change the input. Exit code 2.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    /// `--connections 0`.
    #[error("--connections must be at least 1")]
    ConnectionsZero,
    /// More connections than the model accepts.
    #[error("--connections {connections} is above the model's maximum of {max}")]
    ConnectionsTooMany {
        /// Requested.
        connections: u64,
        /// Accepted maximum.
        max: u64,
    },
    /// Memory below what a hop host needs at all.
    #[error("--memory {memory_bytes} bytes is below 64 MiB")]
    MemoryTooSmall {
        /// Requested.
        memory_bytes: u64,
    },
    /// Shard count out of range.
    #[error("--shards {shards} is outside 1..={max}")]
    Shards {
        /// Requested.
        shards: u32,
        /// Accepted maximum.
        max: u32,
    },
    /// io_uring exists on Linux only.
    #[error("--backend uring needs --os linux (got {os}); FreeBSD uses mio (kqueue)")]
    UringNeedsLinux {
        /// Requested OS.
        os: String,
    },
    /// One ring's fixed-file table (2^20 slots) cannot hold its share of the connections.
    #[error("--connections {connections} over {shards} uring shard(s) exceeds 2^20 fixed-file slots per ring; use at least {shards_needed} shards")]
    RingTooSmall {
        /// Requested.
        connections: u64,
        /// Requested.
        shards: u32,
        /// Fewest shards that fit.
        shards_needed: u64,
    },
    /// A memory size that does not parse.
    #[error("memory size {text:?} is not a number with an optional unit (B, K, KiB, M, MiB, G, GiB, T, TiB)")]
    MemorySize {
        /// What was given.
        text: String,
    },
    /// render and plan describe another host, so they need its memory.
    #[error("--memory is required for render and plan (e.g. --memory 64GiB)")]
    MemoryRequired,
    /// This host's OS is neither Linux nor FreeBSD and `--os` was not given.
    #[error("cannot tell the OS of this host ({os}); pass --os linux or --os freebsd")]
    UnknownHostOs {
        /// `std::env::consts::OS`.
        os: &'static str,
    },
    /// Reading live values of another OS than this host's.
    #[error("check and apply read this host, which runs {host}; --os {requested} only applies to render and plan")]
    OsMismatch {
        /// This host.
        host: String,
        /// Requested.
        requested: String,
    },
}

/// Reading or changing the host failed. Exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A file or command output did not have the expected shape.
    #[error("{what}: cannot parse {text:?}")]
    Parse {
        /// What was parsed.
        what: String,
        /// The offending text.
        text: String,
    },
    /// A command failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status or stderr.
        detail: String,
    },
    /// The rollback file exists: overwriting it would lose the original values.
    #[error("rollback file {0} exists; move it away first (it holds the values before an earlier apply)")]
    RollbackExists(PathBuf),
}

impl HostError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        HostError::Io {
            path: path.into(),
            source,
        }
    }
}
