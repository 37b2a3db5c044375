//! `hop-tune render`: the files a sysadmin installs, from a plan. Output depends on the plan
//! only (no dates, no host names), so golden files pin it.

use std::fmt::Write as _;

use crate::ceiling::group;
use crate::model::{Backend, Os, Place, Plan, Setting};

/// One rendered file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedFile {
    /// Path relative to the output directory.
    pub path: &'static str,
    /// Contents.
    pub contents: String,
}

/// WhatsApp's published FreeBSD loader.conf (2012) also set these; hop leaves them at the
/// defaults, and says why in the rendered file.
const LEFT_AT_DEFAULT_FREEBSD: &[(&str, &str)] = &[
    (
        "kern.maxproc",
        "hopd is one process (one thread per shard); the default, sized from memory, suffices",
    ),
    (
        "kern.timecounter.smp_tsc",
        "current FreeBSD selects the TSC by itself when it is invariant",
    ),
    (
        "kern.hwpmc.nbuffers, kern.hwpmc.nsamples",
        "hwpmc(4) profiling buffers; set them only while profiling",
    ),
];

/// The systemd unit below its header: how hopd is started, stopped and sandboxed. Nothing in
/// it depends on the plan (the derived limits are in the drop-in); `deploy/check` verifies it
/// and rates its sandbox with `systemd-analyze security`.
const LINUX_UNIT_BODY: &str = r"
[Unit]
Description=hop connection gateway
After=network-online.target
Wants=network-online.target

[Service]
# hopd sends READY=1 once every shard serves and STOPPING=1 when a drain starts; only hopd
# itself (not a child) may send them.
Type=notify
NotifyAccess=main
User=hop
Group=hop
# Data folder /var/lib/hopd (server key, accounts, shard logs), created 0700 for hop. It is
# the one writable path: ProtectSystem=strict makes the rest of the file system read-only.
StateDirectory=hopd
StateDirectoryMode=0700
# Both on the command line: without --data hopd would use hop-data relative to /, read-only
# here. --data overrides the file's `data` (flags override the file).
ExecStart=/usr/local/bin/hopd --config /etc/hop/hopd.toml --data /var/lib/hopd
# SIGHUP makes hopd read its settings again and apply `log` and `drain_ms`; it never exits on
# it.
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM starts the drain: hopd stops accepting, sends GoAway to its connections spread over
# drain_ms (30000 by default, `hopd --print-config | grep drain_ms`) and exits 0 once they are
# gone or the window and a short grace for the last closes have passed.
KillSignal=SIGTERM
# Above drain_ms, with room for that grace and the final commit; raise both together. Past it
# systemd sends SIGKILL: acked messages survive it, but clients are cut off without GoAway.
TimeoutStopSec=45s
# A shard that keeps panicking (six times in a minute) stops hopd non-zero: start again. A
# drain exits 0: stay stopped.
Restart=on-failure
RestartSec=1s
# LimitNOFILE lives in hopd.service.d/10-hop-limits.conf (rendered for the target); without
# it systemd's default applies (1024:524288, `systemd-analyze cat-config systemd/system.conf`)
# and hopd raises its soft limit to the hard one, which needs no privilege.
# The drop-in's LimitMEMLOCK (uring targets) is the model's allowance for kernels before 5.12,
# which charge rings to RLIMIT_MEMLOCK. hopd's uring backend needs Linux >= 6.0
# (gateway/src/sys/uring/probe.rs), which charges them to the memory cgroup, and registers no
# fixed buffers: it ran its uring shards under `prlimit --memlock=0:0 hopd --backend uring` on
# Linux 6.18 (`uname -r`), so the value is headroom, not a need.

# Hardening: `systemd-analyze security --offline=true hopd.service` (docs/operations.md).
# Files hopd creates (server key, logs) are for hop alone.
UMask=0077
NoNewPrivileges=yes
# hopd needs no capability: its port is above 1023 and raising the soft RLIMIT_NOFILE to the
# hard one is unprivileged. For a port below 1024 set both lines to CAP_NET_BIND_SERVICE and
# drop PrivateUsers=: a capability held inside the unit's user namespace does not count for
# the host's network.
CapabilityBoundingSet=
AmbientCapabilities=
PrivateUsers=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
# /proc/sys stays readable, not writable: hopd reads fs.nr_open, kernel.io_uring_disabled,
# kernel.osrelease and others there at start (`strace -f -e trace=openat hopd`).
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# Other processes are hidden. ProcSubset=pid is not set: it would hide /proc/meminfo and
# /proc/sys, which hopd reads to size its connection ceiling and probe io_uring.
ProtectProc=invisible
# TCP listeners (IPv4, IPv6); AF_UNIX for sd_notify and the takeover socket.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# hopd generates no code at run time.
MemoryDenyWriteExecute=yes
RemoveIPC=yes
SystemCallArchitectures=native
# @system-service holds hopd's calls, sched_setaffinity (core pinning) and setrlimit among them
# (in @resources, so that set stays allowed). The io_uring calls are in its @aio on systemd 252
# (`systemd-analyze syscall-filter @aio`); named here for versions whose @aio lacks them.
SystemCallFilter=@system-service io_uring_setup io_uring_enter io_uring_register
SystemCallFilter=~@privileged
# A refused call fails with EPERM, which hopd reports, instead of killing it with SIGSYS.
SystemCallErrorNumber=EPERM
# Not set, on purpose: PrivateNetwork= and IPAddressDeny= (hopd serves clients from anywhere).

[Install]
WantedBy=multi-user.target
";

/// The command line that renders `plan` (written into every file's header).
pub fn command_line(plan: &Plan) -> String {
    let target = plan.target;
    let mut line = format!(
        "hop-tune render --os {} --role {} --connections {} --memory {} --shards {}",
        target.os(),
        target.role(),
        target.connections(),
        memory_argument(target.memory_bytes()),
        target.shards()
    );
    if target.backend() != Backend::default_for(target.os()) {
        line.push_str(&format!(" --backend {}", target.backend()));
    }
    line
}

/// Renders the files for the plan's OS.
pub fn render(plan: &Plan) -> Vec<RenderedFile> {
    match plan.target.os() {
        Os::Linux => vec![
            RenderedFile {
                path: "sysctl.d/90-hop.conf",
                contents: linux_sysctl(plan),
            },
            RenderedFile {
                path: "hopd.service",
                contents: linux_unit(plan),
            },
            RenderedFile {
                path: "hopd.service.d/10-hop-limits.conf",
                contents: linux_dropin(plan),
            },
        ],
        Os::FreeBsd => vec![
            RenderedFile {
                path: "loader.conf",
                contents: freebsd_loader(plan),
            },
            RenderedFile {
                path: "sysctl.conf",
                contents: freebsd_sysctl(plan),
            },
            RenderedFile {
                path: "login.conf",
                contents: freebsd_login_class(plan),
            },
            RenderedFile {
                path: "rc.conf",
                contents: freebsd_rc_conf(plan),
            },
        ],
    }
}

fn header(plan: &Plan, what: &str, install: &str) -> String {
    let target = plan.target;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# hop: {what} for {} connections ({}, {} of memory, {} shard(s), backend {}).",
        group(target.connections()),
        target.role(),
        memory_argument(target.memory_bytes()),
        target.shards(),
        target.backend()
    );
    let _ = writeln!(out, "# Rendered by `{}`;", command_line(plan));
    let _ = writeln!(
        out,
        "# re-render rather than edit. Every tuned value is derived by hop's tuning model"
    );
    let _ = writeln!(
        out,
        "# (docs/tuning.md); `hop-tune plan` prints the derivations."
    );
    let _ = writeln!(out, "# Install: {install}");
    out
}

fn comment(out: &mut String, setting: &Setting) {
    let _ = writeln!(out, "\n# {} ({})", setting.reason, setting.source);
}

fn settings(plan: &Plan, place: Place) -> impl Iterator<Item = &Setting> {
    plan.settings.iter().filter(move |s| s.place == place)
}

fn linux_sysctl(plan: &Plan) -> String {
    let mut out = header(
        plan,
        "Linux sysctl profile",
        "/etc/sysctl.d/90-hop.conf, then `sysctl --system`; before raising LimitNOFILE.",
    );
    for setting in settings(plan, Place::SysctlD) {
        comment(&mut out, setting);
        if setting.key.starts_with("net.netfilter.") {
            let _ = writeln!(
                out,
                "# Leading '-': systemd-sysctl skips it while nf_conntrack is not loaded."
            );
            let _ = writeln!(out, "-{} = {}", setting.key, setting.value);
        } else {
            let _ = writeln!(out, "{} = {}", setting.key, setting.value);
        }
    }
    out
}

fn linux_unit(plan: &Plan) -> String {
    let mut out = header(
        plan,
        "systemd unit for hopd",
        "/etc/systemd/system/hopd.service with the drop-in beside it, then \
         `systemctl daemon-reload && systemctl enable --now hopd`.",
    );
    out.push_str(LINUX_UNIT_BODY);
    out
}

fn linux_dropin(plan: &Plan) -> String {
    let mut out = header(
        plan,
        "systemd limits for hopd",
        "/etc/systemd/system/hopd.service.d/10-hop-limits.conf, after the sysctl profile \
         (fs.nr_open first), then `systemctl daemon-reload`.",
    );
    out.push_str("\n[Service]");
    for setting in settings(plan, Place::SystemdUnit) {
        comment(&mut out, setting);
        let _ = writeln!(out, "{}={}", setting.key, setting.value);
    }
    out
}

fn freebsd_loader(plan: &Plan) -> String {
    let mut out = header(
        plan,
        "FreeBSD boot-time tunables",
        "append to /boot/loader.conf and reboot: the kernel reads these at boot only.",
    );
    for setting in settings(plan, Place::LoaderConf) {
        comment(&mut out, setting);
        let _ = writeln!(out, "{}=\"{}\"", setting.key, setting.value);
    }
    let _ = writeln!(
        out,
        "\n# WhatsApp's published loader.conf (2012) also set these; hop leaves them at the defaults:"
    );
    for (keys, why) in LEFT_AT_DEFAULT_FREEBSD {
        let _ = writeln!(out, "#   {keys}: {why}.");
    }
    out
}

fn freebsd_sysctl(plan: &Plan) -> String {
    let mut out = header(
        plan,
        "FreeBSD run-time sysctls",
        "append to /etc/sysctl.conf, then `service sysctl restart` (also applied at every boot).",
    );
    for setting in settings(plan, Place::SysctlConf) {
        comment(&mut out, setting);
        let _ = writeln!(out, "{}={}", setting.key, setting.value);
    }
    out
}

fn freebsd_login_class(plan: &Plan) -> String {
    let mut out = header(
        plan,
        "FreeBSD login class `hop`",
        "append to /etc/login.conf, run `cap_mkdb /etc/login.conf`, give user hop this class \
         (`pw usermod hop -L hop`).",
    );
    for setting in settings(plan, Place::LoginConf) {
        comment(&mut out, setting);
    }
    out.push_str("hop|hop connection gateway:\\\n");
    for setting in settings(plan, Place::LoginConf) {
        let _ = writeln!(out, "\t:{}={}:\\", setting.key, setting.value);
    }
    out.push_str("\t:tc=daemon:\n");
    out
}

fn freebsd_rc_conf(plan: &Plan) -> String {
    let mut out = header(
        plan,
        "FreeBSD rc.conf settings for hopd",
        "`sysrc` each line (or append to /etc/rc.conf), then `service hopd start`.",
    );
    let _ = writeln!(out, "\nhopd_enable=\"YES\"");
    let _ = writeln!(
        out,
        "# rc.subr runs hopd under `limits -C hop`: the class in login.conf."
    );
    let _ = writeln!(out, "hopd_login_class=\"hop\"");
    let _ = writeln!(out, "hopd_flags=\"--shards {}\"", plan.target.shards());
    out
}

/// `64GiB` when the size is a whole number of GiB, else bytes.
pub fn memory_argument(memory_bytes: u64) -> String {
    const GIB: u64 = 1024 * 1024 * 1024;
    if memory_bytes % GIB == 0 {
        format!("{}GiB", memory_bytes / GIB)
    } else {
        memory_bytes.to_string()
    }
}
