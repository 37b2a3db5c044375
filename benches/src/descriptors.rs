//! How many connections one generator process may hold, and so how many processes `ceiling`
//! needs for its target.
//!
//! Every connection the generator holds is a socket, one descriptor, and a process may hold at
//! most its `RLIMIT_NOFILE` soft limit, which it may raise to the hard limit without privilege.
//! Past that, `ceiling` runs several generator processes. The count is chosen from the target
//! before the run, and a count that cannot hold the target is refused before the run: a run
//! that stops at its own descriptor limit part way measures the generator, not the server.

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use thiserror::Error;

use crate::procfs::ServerProbe;

/// Descriptors a generator process keeps for everything but its connections: those named in
/// [`NAMED_DESCRIPTORS`] and slack for what the runtime, the allocator or the dynamic loader
/// may open. 64 is 0.3% of a 20,000 limit: nothing worth saving.
pub const GENERATOR_RESERVED_DESCRIPTORS: u64 = 64;
/// What a generator process is known to hold besides its connections: stdin, stdout and
/// stderr (3), the epoll instance (1), the /proc files read while the connections are held
/// ([`ServerProbe::DESCRIPTORS`]), and a redirected connection's new socket, opened before its
/// old one is closed (1).
pub const NAMED_DESCRIPTORS: u64 = 3 + 1 + ServerProbe::DESCRIPTORS + 1;
const _: () = assert!(GENERATOR_RESERVED_DESCRIPTORS >= NAMED_DESCRIPTORS);

/// The most generator processes `ceiling` starts. Each is a whole process with its own event
/// loop; a target that needs more (20 million connections at 20,000 descriptors each) is a
/// typing error in `--connections`, not a plan.
pub const GENERATOR_PROCESSES_MAX: u32 = 1_024;

/// Why `ceiling` refuses to start: its processes could not reach the target.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProcessCountError {
    #[error(
        "--processes {requested} cannot hold {connections} connections: a generator process may \
         hold {per_process} (RLIMIT_NOFILE {descriptor_limit} less {reserved} descriptors kept \
         for other files), so {needed} processes are needed; give --processes {needed} or more, \
         or leave it out to have it chosen"
    )]
    TooFewForTarget {
        requested: u32,
        connections: u64,
        descriptor_limit: u64,
        reserved: u64,
        per_process: u64,
        needed: u64,
    },
    #[error(
        "{connections} connections need {needed} generator processes (RLIMIT_NOFILE \
         {descriptor_limit} less {reserved} each), more than the {max} hop-bench starts"
    )]
    TooMany {
        connections: u64,
        descriptor_limit: u64,
        reserved: u64,
        needed: u64,
        max: u32,
    },
    #[error(
        "RLIMIT_NOFILE {descriptor_limit} leaves no descriptor for connections after the \
         {reserved} a generator process keeps for other files"
    )]
    LimitBelowReserve {
        descriptor_limit: u64,
        reserved: u64,
    },
}

/// Connections one generator process may hold with `descriptor_limit` descriptors, `reserved`
/// of them kept for other files; `None` if the limit leaves none.
pub fn connections_per_process(descriptor_limit: u64, reserved: u64) -> Option<u64> {
    descriptor_limit
        .checked_sub(reserved)
        .filter(|connections| *connections > 0)
}

/// The generator processes for `connections`, each process holding
/// `ceil(connections / processes)` with `descriptor_limit` descriptors of which `reserved` are
/// kept for other files. (Every process spreads its connections over every server, so the
/// number of servers does not count.)
///
/// Without `requested`: the fewest processes that hold the target. With it: `requested`, if
/// that holds the target; otherwise the error names the limit and the count needed.
pub fn generator_processes(
    connections: u64,
    descriptor_limit: u64,
    reserved: u64,
    requested: Option<u32>,
) -> Result<u32, ProcessCountError> {
    assert!(
        requested.is_none_or(|n| (1..=GENERATOR_PROCESSES_MAX).contains(&n)),
        "clap keeps --processes within 1..={GENERATOR_PROCESSES_MAX}"
    );
    let per_process = connections_per_process(descriptor_limit, reserved).ok_or(
        ProcessCountError::LimitBelowReserve {
            descriptor_limit,
            reserved,
        },
    )?;
    let needed = connections.div_ceil(per_process).max(1);
    let processes = match requested {
        Some(requested) => {
            if u64::from(requested) < needed {
                return Err(ProcessCountError::TooFewForTarget {
                    requested,
                    connections,
                    descriptor_limit,
                    reserved,
                    per_process,
                    needed,
                });
            }
            requested
        }
        None => {
            let processes = u32::try_from(needed).unwrap_or(u32::MAX);
            if processes > GENERATOR_PROCESSES_MAX {
                return Err(ProcessCountError::TooMany {
                    connections,
                    descriptor_limit,
                    reserved,
                    needed,
                    max: GENERATOR_PROCESSES_MAX,
                });
            }
            processes
        }
    };
    debug_assert!(connections.div_ceil(u64::from(processes)) <= per_process);
    Ok(processes)
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to its hard limit (no privilege needed;
/// child processes inherit it) and returns the soft limit in force afterwards. If the kernel
/// refuses the raise (a hard limit above `fs.nr_open`), the soft limit stays as it was and is
/// what is returned.
pub fn raise_descriptor_limit() -> Result<u64, nix::Error> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        // A refusal leaves the old limit, which the getrlimit below reports.
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machine of the report: hard limit 20,000, which cannot be raised.
    const LIMIT: u64 = 20_000;
    const RESERVED: u64 = GENERATOR_RESERVED_DESCRIPTORS;

    #[test]
    fn without_a_count_the_fewest_processes_that_hold_the_target_are_chosen() {
        assert_eq!(connections_per_process(LIMIT, RESERVED), Some(19_936));
        // The benchmarker's run: 30,000 stopped at ~19,994 in one process.
        assert_eq!(generator_processes(30_000, LIMIT, RESERVED, None), Ok(2));
        assert_eq!(generator_processes(19_936, LIMIT, RESERVED, None), Ok(1));
        assert_eq!(generator_processes(19_937, LIMIT, RESERVED, None), Ok(2));
        assert_eq!(generator_processes(10_000, LIMIT, RESERVED, None), Ok(1));
        assert_eq!(generator_processes(0, LIMIT, RESERVED, None), Ok(1));
        assert_eq!(generator_processes(60_000, LIMIT, RESERVED, None), Ok(4));
        // An unlimited soft limit (RLIM_INFINITY) holds any target in one process.
        assert_eq!(
            generator_processes(1_000_000, u64::MAX, RESERVED, None),
            Ok(1)
        );
    }

    #[test]
    fn a_count_that_holds_the_target_is_kept() {
        assert_eq!(generator_processes(30_000, LIMIT, RESERVED, Some(2)), Ok(2));
        assert_eq!(generator_processes(30_000, LIMIT, RESERVED, Some(5)), Ok(5));
        assert_eq!(generator_processes(1_000, LIMIT, RESERVED, Some(1)), Ok(1));
    }

    #[test]
    fn a_count_too_small_for_the_target_is_refused_with_the_limit_and_the_count_needed() {
        let refused = generator_processes(30_000, LIMIT, RESERVED, Some(1));
        assert_eq!(
            refused,
            Err(ProcessCountError::TooFewForTarget {
                requested: 1,
                connections: 30_000,
                descriptor_limit: LIMIT,
                reserved: RESERVED,
                per_process: 19_936,
                needed: 2,
            })
        );
        let message = refused.unwrap_err().to_string();
        assert!(message.contains("RLIMIT_NOFILE 20000"), "{message}");
        assert!(message.contains("2 processes are needed"), "{message}");
        assert!(matches!(
            generator_processes(60_000, LIMIT, RESERVED, Some(3)),
            Err(ProcessCountError::TooFewForTarget { needed: 4, .. })
        ));
    }

    #[test]
    fn a_limit_without_room_for_connections_is_refused() {
        assert_eq!(connections_per_process(RESERVED, RESERVED), None);
        assert_eq!(
            generator_processes(10, RESERVED, RESERVED, None),
            Err(ProcessCountError::LimitBelowReserve {
                descriptor_limit: RESERVED,
                reserved: RESERVED
            })
        );
        assert!(matches!(
            generator_processes(u64::MAX, LIMIT, RESERVED, None),
            Err(ProcessCountError::TooMany { .. })
        ));
    }

    #[test]
    fn the_raised_soft_limit_is_the_hard_limit_or_what_was_kept() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let soft = raise_descriptor_limit().unwrap();
        assert!(soft <= hard);
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap().0, soft);
    }
}
