//! Whether this kernel runs the uring backend: io_uring present and allowed, the opcodes and
//! setup flags it uses supported.

use io_uring::{opcode, IoUring, Probe};

use super::buf_ring::BufRing;

/// The ring setup flags this kernel takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskRun {
    /// `SINGLE_ISSUER` + `DEFER_TASKRUN` (6.1+): completions run only when the shard enters.
    SingleIssuerDeferred,
    /// `SINGLE_ISSUER` + `COOP_TASKRUN` (6.0).
    SingleIssuerCoop,
    /// Neither.
    Plain,
}

/// Kernels before this lack multishot receive.
const KERNEL_MIN: (u32, u32) = (6, 0);

/// Creates a ring with the best setup flags this kernel takes.
pub fn build_ring(entries: u32, cq_entries: u32) -> std::io::Result<(IoUring, TaskRun)> {
    let deferred = IoUring::builder()
        .setup_cqsize(cq_entries)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries);
    if let Ok(ring) = deferred {
        return Ok((ring, TaskRun::SingleIssuerDeferred));
    }
    let coop = IoUring::builder()
        .setup_cqsize(cq_entries)
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(entries);
    if let Ok(ring) = coop {
        return Ok((ring, TaskRun::SingleIssuerCoop));
    }
    let ring = IoUring::builder().setup_cqsize(cq_entries).build(entries)?;
    Ok((ring, TaskRun::Plain))
}

/// Checks everything the backend needs; the error says why not, in one line.
pub fn probe() -> Result<TaskRun, String> {
    match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(text) if text.trim() == "2" => {
            return Err("io_uring is disabled (kernel.io_uring_disabled = 2)".into())
        }
        _ => {}
    }
    if let Some(version) = kernel_version() {
        if version < KERNEL_MIN {
            return Err(format!(
                "kernel {}.{} lacks multishot receive (needs {}.{})",
                version.0, version.1, KERNEL_MIN.0, KERNEL_MIN.1
            ));
        }
    }
    let (ring, task_run) = build_ring(8, 16).map_err(|error| match error.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring is not in this kernel (ENOSYS)".to_string(),
        Some(libc::EPERM) => {
            "io_uring is not allowed here (EPERM: kernel.io_uring_disabled = 1 or a seccomp policy)"
                .to_string()
        }
        _ => format!("cannot create an io_uring: {error}"),
    })?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|error| format!("cannot probe io_uring opcodes: {error}"))?;
    let needed = [
        (opcode::AcceptMulti::CODE, "ACCEPT"),
        (opcode::RecvMulti::CODE, "RECV"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::Send::CODE, "SEND"),
        (opcode::Shutdown::CODE, "SHUTDOWN"),
        (opcode::AsyncCancel2::CODE, "ASYNC_CANCEL"),
        (opcode::Close::CODE, "CLOSE"),
        (opcode::MsgRingData::CODE, "MSG_RING"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(format!("io_uring lacks opcodes {}", missing.join(", ")));
    }
    ring.submitter()
        .register_files_sparse(4)
        .map_err(|error| format!("io_uring cannot register a sparse file table: {error}"))?;
    let mut buffers = BufRing::register(&ring, 2, 64, 0)
        .map_err(|error| format!("io_uring cannot register a provided buffer ring: {error}"))?;
    buffers.unregister(&ring);
    Ok(task_run)
}

/// The running kernel's major and minor version.
fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}
