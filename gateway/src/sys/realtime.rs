//! The real-time scheduling policy of a thread, for helper threads that must not wait behind
//! their shard's loop.

use std::io;

/// The real-time policy (`SCHED_FIFO`, `SCHED_RR`) of a thread, when it has one.
///
/// Under such a policy a thread never preempts another of the same priority: a helper that
/// needs the core only for a moment (the syncer, after each fsync) would wait until the
/// shard's loop has nothing left to do before it could hand back its result, and the
/// ServerAcks would wait with it. So such a helper takes one priority above its shard's.
/// Under the normal policy the scheduler's wake-up preemption does this.
#[derive(Debug, Clone, Copy)]
pub struct RealTime {
    policy: libc::c_int,
    priority: libc::c_int,
}

/// The one way these raw calls report: -1 and `errno`.
fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

impl RealTime {
    /// The calling thread's real-time policy; `None` under a normal one (or if unreadable).
    pub fn of_this_thread() -> Option<Self> {
        // SAFETY: pid 0 names the calling thread; the call reads no memory of ours.
        let policy = check(unsafe { libc::sched_getscheduler(0) }).ok()?;
        if policy != libc::SCHED_FIFO && policy != libc::SCHED_RR {
            return None;
        }
        // SAFETY: sched_param is plain integers, for which all-zero is a valid value.
        let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
        // SAFETY: pid 0 names the calling thread; `param` is a valid, writable sched_param
        // that lives across the call.
        check(unsafe { libc::sched_getparam(0, &mut param) }).ok()?;
        Some(Self {
            policy,
            priority: param.sched_priority,
        })
    }

    /// Gives the calling thread the same policy, one priority higher (at most the highest).
    pub fn one_above(self) -> io::Result<()> {
        // SAFETY: takes a policy number and reads no memory of ours.
        let highest = check(unsafe { libc::sched_get_priority_max(self.policy) })?;
        // SAFETY: sched_param is plain integers, for which all-zero is a valid value.
        let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
        param.sched_priority = (self.priority + 1).min(highest);
        // SAFETY: pid 0 names the calling thread; `param` is a valid sched_param that lives
        // across the call.
        check(unsafe { libc::sched_setscheduler(0, self.policy, &param) })?;
        Ok(())
    }
}

/// Run first on a shard's helper thread (syncer, reader): under a real-time policy
/// (`shard`'s, read on the shard's thread), takes one priority above it, since a thread of
/// the same priority never preempts a busy real-time loop and would hand back its work only
/// when the loop blocks. A refusal is logged once, and the thread carries on.
pub fn above_shard(realtime: Option<RealTime>, shard: usize, thread: &str) {
    if let Some(realtime) = realtime {
        if let Err(error) = realtime.one_above() {
            tracing::warn!(shard, %error, "cannot raise the {thread} thread above its shard's real-time priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_above_raises_a_thread_to_the_next_priority_of_its_policy() {
        let raised = std::thread::spawn(|| {
            let lowest = RealTime {
                policy: libc::SCHED_FIFO,
                priority: 0,
            };
            lowest.one_above().map(|()| RealTime::of_this_thread())
        })
        .join()
        .expect("thread");
        match raised {
            Ok(now) => {
                let now = now.expect("a real-time policy now");
                assert_eq!((now.policy, now.priority), (libc::SCHED_FIFO, 1));
            }
            // Without CAP_SYS_NICE (or an RLIMIT_RTPRIO) the kernel refuses, and says so.
            Err(error) => assert_eq!(error.raw_os_error(), Some(libc::EPERM), "{error}"),
        }
    }
}
