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
    if target.backend() == Backend::Uring {
        line.push_str(" --backend uring");
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
        "# re-render rather than edit. Every value is derived by hop's tuning model"
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
    out.push_str(
        "\n[Unit]\n\
         Description=hop connection gateway\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=exec\n\
         User=hop\n\
         Group=hop\n\
         # Data folder /var/lib/hop (server key, accounts, shard logs), created 0700 for hop.\n\
         StateDirectory=hop\n\
         StateDirectoryMode=0700\n\
         ExecStart=/usr/local/bin/hopd --config /etc/hop/hopd.toml\n\
         Restart=on-failure\n\
         RestartSec=1s\n\
         # Give established connections time to be closed cleanly on stop.\n\
         TimeoutStopSec=30s\n\
         # Limits (LimitNOFILE, LimitMEMLOCK) live in hopd.service.d/10-hop-limits.conf.\n\
         NoNewPrivileges=yes\n\
         ProtectSystem=strict\n\
         ProtectHome=yes\n\
         PrivateTmp=yes\n\
         PrivateDevices=yes\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
    );
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
