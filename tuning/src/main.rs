//! The `hop-tune` command: check, plan, render, apply.

#![forbid(unsafe_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use hop_tune::apply::{apply_changes, plan_changes, render_diff, Action, SysctlStore};
use hop_tune::ceiling::group;
use hop_tune::check::{check, render_report};
use hop_tune::live::{LiveHost, ProcRoot};
use hop_tune::model::{Plan, CONNECTIONS_MAX};
use hop_tune::render::render;
use hop_tune::{parse_memory, plan, Backend, HostError, InputError, Os, Role, Target};

/// OS tuning for hop hosts that hold millions of connections.
#[derive(Debug, Parser)]
#[command(name = "hop-tune", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compare this host's live limits with what the target needs; exit 1 if something caps it.
    Check {
        #[command(flatten)]
        target: TargetArgs,
        /// Read the rlimits of this running process (e.g. hopd) instead of hop-tune's own.
        #[arg(long)]
        pid: Option<u32>,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Print the model for a target: every setting with value, place, order, reason, source.
    Plan {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Write the files a sysadmin installs (deterministic; to stdout without --out).
    Render {
        #[command(flatten)]
        target: TargetArgs,
        /// Directory to write the files into (created if missing).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Raise this host's run-time sysctls to the profile: a dry run showing the diff unless
    /// --yes; never lowers a value; writes a rollback file first.
    Apply {
        #[command(flatten)]
        target: TargetArgs,
        /// Change the host (without it nothing is written).
        #[arg(long)]
        yes: bool,
        /// Where to save the old values (refuses to overwrite an existing file).
        #[arg(long, default_value = "/var/backups/hop-tune-rollback.conf")]
        rollback_file: PathBuf,
        #[command(flatten)]
        host: HostArgs,
    },
}

#[derive(Debug, Args)]
struct TargetArgs {
    /// Connections to hold (server) or open (loadgen).
    #[arg(long, value_parser = parse_connections)]
    connections: u64,
    /// What the host is for.
    #[arg(long, value_enum, default_value_t = RoleArg::Server)]
    role: RoleArg,
    /// OS to plan for (default: this host's; check and apply only read this host).
    #[arg(long, value_enum)]
    os: Option<OsArg>,
    /// Physical memory, e.g. 64GiB (default: this host's; required for render and plan).
    #[arg(long, value_parser = parse_memory_arg)]
    memory: Option<u64>,
    /// hopd shards (threads, listeners, rings).
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// hopd's IO backend [default: the one hopd runs on that OS: uring on Linux, mio on
    /// FreeBSD]. mio: every connection is a descriptor in the process fd table. uring (Linux)
    /// holds connections as io_uring direct descriptors, one fixed-file table per shard ring,
    /// each capped by RLIMIT_NOFILE.
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
}

#[derive(Debug, Args)]
struct HostArgs {
    /// Root of the /proc tree to read and write (Linux; tests point it at a stand-in).
    #[arg(long, default_value = "/proc", hide = true)]
    proc_root: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoleArg {
    Server,
    Loadgen,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OsArg {
    Linux,
    Freebsd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendArg {
    Mio,
    Uring,
}

/// Failures, by who must act: the user (exit 2) or the host (exit 1).
#[derive(Debug)]
enum Failure {
    Input(InputError),
    Host(HostError),
}

impl From<InputError> for Failure {
    fn from(error: InputError) -> Self {
        Failure::Input(error)
    }
}

impl From<HostError> for Failure {
    fn from(error: HostError) -> Self {
        Failure::Host(error)
    }
}

const EXIT_CAPPED: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(Failure::Input(error)) => {
            eprintln!("hop-tune: error: {error}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
        Err(Failure::Host(error)) => {
            eprintln!("hop-tune: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Check { target, pid, host } => {
            let os = host_os(target.os)?;
            let proc_root = ProcRoot::new(&host.proc_root);
            let live_memory = || read_live(os, &proc_root, &[], pid).map(|l| l.limits.memory_bytes);
            let plan = plan_for(&target, os, live_memory)?;
            let mut live = read_live(os, &proc_root, &keys(&plan), pid)?;
            if os == Os::Linux && host.proc_root == Path::new("/proc") {
                live.io_uring = Some(probe_io_uring());
            }
            let report = check(&plan, &live);
            print!("{}", render_report(&report));
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_CAPPED)
            })
        }
        Command::Plan { target } => {
            let os = target.os.map(Os::from).map_or_else(this_os, Ok)?;
            let plan = plan_for(&target, os, || {
                Err(InputError::MemorySize {
                    text: String::new(),
                }
                .into())
            })?;
            print!("{}", describe(&plan));
            Ok(ExitCode::SUCCESS)
        }
        Command::Render { target, out } => {
            let os = target.os.map(Os::from).map_or_else(this_os, Ok)?;
            let plan = plan_for(&target, os, || {
                Err(InputError::MemorySize {
                    text: String::new(),
                }
                .into())
            })?;
            let files = render(&plan);
            match out {
                None => {
                    for file in &files {
                        println!("==> {} <==\n{}", file.path, file.contents);
                    }
                }
                Some(dir) => {
                    for file in &files {
                        let path = dir.join(file.path);
                        if let Some(parent) = path.parent() {
                            fs::create_dir_all(parent).map_err(|e| HostError::Io {
                                path: parent.to_path_buf(),
                                source: e,
                            })?;
                        }
                        fs::write(&path, &file.contents).map_err(|e| HostError::Io {
                            path: path.clone(),
                            source: e,
                        })?;
                        println!("wrote {}", path.display());
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply {
            target,
            yes,
            rollback_file,
            host,
        } => {
            let os = host_os(target.os)?;
            let proc_root = ProcRoot::new(&host.proc_root);
            let live_memory =
                || read_live(os, &proc_root, &[], None).map(|l| l.limits.memory_bytes);
            let plan = plan_for(&target, os, live_memory)?;
            let mut store = store_for(os, proc_root.clone());
            let changes = plan_changes(&plan, store.as_ref())?;
            print!("{}", render_diff(&changes));
            let raises = changes
                .iter()
                .filter(|c| matches!(c.action, Action::Raise { .. }))
                .count();
            if !yes {
                println!(
                    "\ndry run: {raises} setting(s) would be raised; run again with --yes to apply"
                );
                return Ok(ExitCode::SUCCESS);
            }
            let applied = apply_changes(&plan, &changes, store.as_mut(), &rollback_file)?;
            if applied == 0 {
                println!("\nnothing to raise; no rollback file written");
            } else {
                let restore = match os {
                    Os::Linux => "sysctl -p",
                    Os::FreeBsd => "sysctl -f",
                };
                println!(
                    "\nraised {applied} setting(s); old values in {} (restore: {restore} {})",
                    rollback_file.display(),
                    rollback_file.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn plan_for(
    args: &TargetArgs,
    os: Os,
    live_memory: impl FnOnce() -> Result<u64, Failure>,
) -> Result<Plan, Failure> {
    let memory_bytes = match args.memory {
        Some(bytes) => bytes,
        None => live_memory().map_err(|failure| match failure {
            Failure::Input(_) => Failure::Input(InputError::MemoryRequired),
            host => host,
        })?,
    };
    let target = Target::new(
        args.connections,
        memory_bytes,
        args.role.into(),
        os,
        args.shards,
        args.backend
            .map_or_else(|| Backend::default_for(os), Into::into),
    )?;
    Ok(plan(target))
}

/// Sysctl names the plan reads on a live host.
fn keys(plan: &Plan) -> Vec<&'static str> {
    use hop_tune::model::Place;
    plan.settings
        .iter()
        .filter(|s| {
            matches!(
                s.place,
                Place::SysctlD | Place::LoaderConf | Place::SysctlConf | Place::CheckOnly
            )
        })
        .map(|s| s.key)
        .collect()
}

fn read_live(
    os: Os,
    proc_root: &ProcRoot,
    keys: &[&str],
    pid: Option<u32>,
) -> Result<LiveHost, Failure> {
    Ok(match os {
        Os::Linux => proc_root.read_live(keys, pid)?,
        Os::FreeBsd => hop_tune::live::read_freebsd(keys, pid)?,
    })
}

fn store_for(os: Os, proc_root: ProcRoot) -> Box<dyn SysctlStore> {
    match os {
        Os::Linux => Box::new(proc_root),
        Os::FreeBsd => Box::new(hop_tune::apply::FreeBsdSysctl),
    }
}

#[cfg(target_os = "linux")]
fn probe_io_uring() -> Result<(), String> {
    hop_tune::live::probe_io_uring()
}

#[cfg(not(target_os = "linux"))]
fn probe_io_uring() -> Result<(), String> {
    Err("io_uring exists on Linux only".to_string())
}

fn this_os() -> Result<Os, Failure> {
    match std::env::consts::OS {
        "linux" => Ok(Os::Linux),
        "freebsd" => Ok(Os::FreeBsd),
        other => Err(InputError::UnknownHostOs { os: other }.into()),
    }
}

/// The OS of this host; `requested` must match it (check and apply read this host).
fn host_os(requested: Option<OsArg>) -> Result<Os, Failure> {
    let host = this_os()?;
    match requested.map(Os::from) {
        Some(os) if os != host => Err(InputError::OsMismatch {
            host: host.to_string(),
            requested: os.to_string(),
        }
        .into()),
        _ => Ok(host),
    }
}

fn describe(plan: &Plan) -> String {
    use std::fmt::Write as _;
    let target = plan.target;
    let memory = &plan.memory;
    let mut out = String::new();
    let _ = writeln!(out, "hop-tune plan: {} connections, role {}, os {}, {} bytes of memory, {} shard(s), backend {}\n",
        group(target.connections()), target.role(), target.os(), group(target.memory_bytes()), target.shards(), target.backend());
    for (index, setting) in plan.settings.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:>2}. {} = {}   [{}]",
            index + 1,
            setting.key,
            setting.value,
            setting.place
        );
        if !setting.after.is_empty() {
            let _ = writeln!(out, "    after: {}", setting.after.join(", "));
        }
        let _ = writeln!(out, "    why: {}", setting.reason);
        let _ = writeln!(out, "    source: {}", setting.source);
    }
    let _ = writeln!(out, "\nmemory budget (derived by the model):");
    let _ = writeln!(
        out,
        "  kernel bytes per idle connection    {:>15}  (measured on Linux: the socket's slab + hop's poll)",
        group(memory.kernel_bytes_per_connection)
    );
    let _ = writeln!(
        out,
        "  hop user-space bytes per connection {:>15}  (measured: docs/BENCHMARKS.md)",
        group(memory.user_bytes_per_connection)
    );
    let _ = writeln!(
        out,
        "  conntrack bytes per connection      {:>15}",
        group(memory.conntrack_bytes_per_connection)
    );
    let _ = writeln!(
        out,
        "  socket-buffer budget                {:>15}  bytes",
        group(memory.socket_buffer_budget_bytes)
    );
    let _ = writeln!(
        out,
        "  per-socket buffer cap               {:>15}  bytes each way",
        group(memory.socket_buffer_cap_bytes)
    );
    let _ = writeln!(
        out,
        "  idle connections need               {:>15}  bytes",
        group(memory.connections_bytes)
    );
    let _ = writeln!(
        out,
        "  memory for connections              {:>15}  bytes",
        group(memory.available_bytes)
    );
    let _ = writeln!(
        out,
        "  connections that fit                {:>15}",
        group(memory.connections_fit)
    );
    if target.role() == Role::Loadgen {
        let _ = writeln!(
            out,
            "  source addresses needed             {:>15}",
            plan.sizes.source_addresses
        );
    }
    out
}

fn parse_connections(text: &str) -> Result<u64, String> {
    let digits: String = text.chars().filter(|c| *c != '_' && *c != ',').collect();
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))?;
    if value == 0 {
        return Err(InputError::ConnectionsZero.to_string());
    }
    if value > CONNECTIONS_MAX {
        return Err(InputError::ConnectionsTooMany {
            connections: value,
            max: CONNECTIONS_MAX,
        }
        .to_string());
    }
    Ok(value)
}

fn parse_memory_arg(text: &str) -> Result<u64, String> {
    parse_memory(text).map_err(|error| error.to_string())
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Server => Role::Server,
            RoleArg::Loadgen => Role::Loadgen,
        }
    }
}

impl From<OsArg> for Os {
    fn from(os: OsArg) -> Self {
        match os {
            OsArg::Linux => Os::Linux,
            OsArg::Freebsd => Os::FreeBsd,
        }
    }
}

impl From<BackendArg> for Backend {
    fn from(backend: BackendArg) -> Self {
        match backend {
            BackendArg::Mio => Backend::Mio,
            BackendArg::Uring => Backend::Uring,
        }
    }
}
