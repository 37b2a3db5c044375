//! hop-bench: see `hop-bench --help` and benches/README.md.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hop_bench::addr::{local_port_range, SourcePlan};
use hop_bench::descriptors::{
    connections_per_process, generator_processes, raise_descriptor_limit, GENERATOR_PROCESSES_MAX,
    GENERATOR_RESERVED_DESCRIPTORS,
};
use hop_bench::engine::{Server, Target};
use hop_bench::plot;
use hop_bench::procfs::{MemoryPerConnection, ServerProbe};
use hop_bench::report::CpuUse;
use hop_bench::report::Report;
use hop_bench::scenario::{self, CeilingOptions, CeilingResult, Common};
use hop_protocol::keys::parse_hex_key;

/// Load generator for hopd and MQTT brokers: ceiling, throughput, latency, offline, group.
#[derive(Debug, Parser)]
#[command(name = "hop-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TargetKind {
    Hop,
    Mqtt,
}

#[derive(Debug, Args)]
struct CommonArgs {
    /// Server address (hopd's listen address, or an MQTT broker's). Several, comma-separated
    /// or with the flag repeated, spread the clients: client i connects first to the
    /// (i mod n)-th, so each server takes its share of the handshakes (every node of a
    /// cluster, or hopds that each hold part of `ceiling`'s connections). A hop client sent
    /// away by a node follows the redirect to its home node as with one server.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "ADDR,...",
        default_value = "127.0.0.1:7788"
    )]
    server: Vec<SocketAddr>,
    /// Protocol to speak.
    #[arg(long, value_enum, default_value = "hop")]
    target: TargetKind,
    /// hopd's static key in hex (printed at its start); the handshake of a client's first
    /// connect checks it. One key for every --server, or one per --server in the same order
    /// (the nodes of a cluster each have their own key). After a redirect the key the redirect
    /// names is checked instead. Without it any key is accepted at the first connect.
    #[arg(long, value_delimiter = ',', value_name = "HEX,...")]
    server_key: Vec<String>,
    /// MQTT: log in with the client id as username (for brokers that require a login, such
    /// as ejabberd's mod_mqtt with anonymous authentication).
    #[arg(long)]
    mqtt_login: bool,
    /// MQTT: the QoS `throughput`, `latency` and `group` publish and subscribe with. 1 makes
    /// the broker PUBACK each publish and the subscriber each delivery, the nearest MQTT has
    /// to hop's ticks; `offline` always uses 1.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    mqtt_qos: u8,
    /// hop: ask for the second tick in the ServerAck when the recipient's device acks a
    /// message before the server's ack leaves (the Outbox's `delivered_in_ack`: one stanza
    /// fewer each way). false: every second tick comes as a Receipt and is acked.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    delivered_in_ack: bool,
    /// The server's pid: its CPU use (and for `ceiling` its memory) is read from /proc.
    /// With several --server, the pid of one of them: its CPU alone is read, and no memory.
    /// Without it neither is read.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Write every number, the command line and the machine as JSON. Without it only the
    /// table is printed.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw the latency percentile curve (or, for `ceiling`, connections over time) as SVG.
    /// Without it nothing is drawn.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Skip this many source addresses (set by `ceiling` for its generator processes).
    #[arg(long, default_value_t = 0, hide = true)]
    source_offset: u32,
    /// The run's index of this process's first client, where the spread over --server goes on
    /// (set by `ceiling` for its generator processes).
    #[arg(long, default_value_t = 0, hide = true)]
    client_offset: u64,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// P sender/recipient pairs with a bounded in-flight window: messages/s and bytes/s.
    Throughput {
        #[command(flatten)]
        common: CommonArgs,
        /// Client pairs; each client sends to its peer.
        #[arg(long, default_value_t = 50)]
        pairs: usize,
        /// Undelivered messages allowed per direction of a pair.
        #[arg(long, default_value_t = 64)]
        window: u64,
        #[arg(long, default_value_t = 2_000)]
        warmup_ms: u64,
        #[arg(long, default_value_t = 10_000)]
        duration_ms: u64,
    },
    /// G groups of M members; one sender per group with a bounded window: delivered
    /// member-messages/s and the time to fan a message out to every member.
    Group {
        #[command(flatten)]
        common: CommonArgs,
        /// Members of each group, its sender included (hop: at most 1,024); each message
        /// reaches the other members - 1.
        #[arg(long, default_value_t = 100)]
        members: usize,
        /// Groups, each with its own sender and members (members x groups clients).
        #[arg(long, default_value_t = 10)]
        groups: usize,
        /// Messages per group sent and not yet delivered to every other member. 1 measures
        /// the fan-out of one message alone.
        #[arg(long, default_value_t = 8)]
        window: u64,
        #[arg(long, default_value_t = 2_000)]
        warmup_ms: u64,
        #[arg(long, default_value_t = 10_000)]
        duration_ms: u64,
    },
    /// Open loop at a fixed offered rate; latency from intended send time to delivery.
    Latency {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long, default_value_t = 50)]
        pairs: usize,
        /// Offered messages per second, all clients together.
        #[arg(long, default_value_t = 100_000)]
        rate: u64,
        #[arg(long, default_value_t = 10_000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 5_000)]
        drain_ms: u64,
        /// How the generator waits between sends. spin refuses to run under a throttled
        /// real-time policy (SCHED_FIFO with kernel.sched_rt_runtime_us other than -1), which
        /// would stop it for 50 ms a second.
        #[arg(long, value_enum, default_value = "spin")]
        wait: scenario::Wait,
        /// Generator processes, each with its share of the pairs and of the rate (one core
        /// each, at most, since a process's clients share one thread): more than one offers
        /// rates one process cannot. The report merges their latencies and sums their CPU.
        #[arg(
            long,
            value_name = "N",
            default_value_t = 1,
            value_parser = clap::value_parser!(u32).range(1..=i64::from(GENERATOR_PROCESSES_MAX))
        )]
        processes: u32,
        /// Run as one generator process of a parent `latency` (reports on stdout).
        #[arg(long, hide = true)]
        child: bool,
    },
    /// Open connections at a set rate up to a target; hold them idle; report what was held.
    Ceiling {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long, default_value_t = 10_000)]
        connections: u64,
        /// New connections per second, all processes together.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        /// Generator processes; each holds connections / processes, and one may hold its
        /// RLIMIT_NOFILE soft limit (raised to the hard limit) less 64 descriptors kept for other
        /// files. Each spreads its connections over every --server. Default: the fewest that hold
        /// --connections. A count that cannot hold --connections is refused before the run.
        #[arg(
            long,
            value_name = "N",
            value_parser = clap::value_parser!(u32).range(1..=i64::from(GENERATOR_PROCESSES_MAX))
        )]
        processes: Option<u32>,
        /// Handshakes in progress at once, per process.
        #[arg(long, default_value_t = 1_000)]
        pending_max: usize,
        #[arg(long, default_value_t = 10_000)]
        handshake_timeout_ms: u64,
        /// How long to hold the connections after the ramp.
        #[arg(long, default_value_t = 5_000)]
        hold_ms: u64,
        /// Each held connection pings once per this period.
        #[arg(long, default_value_t = 30_000)]
        heartbeat_ms: u64,
        /// Stop opening after this many failures.
        #[arg(long, default_value_t = 1_000)]
        failures_max: u64,
        /// Run as one generator process of a parent `ceiling` (reports on stdout).
        #[arg(long, hide = true)]
        child: bool,
    },
    /// Compare saved reports: one row per `--json` file, with each figure's ratio to the first
    /// file's (used by scripts/peers.sh).
    Ratios {
        /// Figures to compare: names from the reports' `figures`, or `latency.p50_us` etc.
        #[arg(long, value_delimiter = ',', default_value = "messages_per_second")]
        figures: Vec<String>,
        /// NAME=FILE pairs; the first is the baseline.
        #[arg(required = true)]
        reports: Vec<String>,
    },
    /// N messages to offline recipients, then they connect and drain.
    Offline {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long, default_value_t = 10)]
        senders: usize,
        #[arg(long, default_value_t = 10)]
        recipients: usize,
        #[arg(long, default_value_t = 50_000)]
        messages: u64,
        /// Messages per sender awaiting the server's ack.
        #[arg(long, default_value_t = 256)]
        window: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hop-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn common(args: &CommonArgs) -> Result<Common, String> {
    let target = match args.target {
        TargetKind::Hop => Target::Hop {
            delivered_in_ack: args.delivered_in_ack,
        },
        TargetKind::Mqtt => Target::Mqtt {
            login: args.mqtt_login,
            qos: args.mqtt_qos,
        },
    };
    Ok(Common {
        servers: servers(&args.server, &args.server_key)?,
        target,
        server_pid: args.server_pid,
        source_offset: args.source_offset,
        client_offset: args.client_offset,
    })
}

/// The servers of `--server`, each with its key from `--server-key`: none, one for all, or one
/// per server in order.
fn servers(addresses: &[SocketAddr], keys_hex: &[String]) -> Result<Vec<Server>, String> {
    if addresses.is_empty() {
        return Err("--server names no server".into());
    }
    let keys = keys_hex
        .iter()
        .map(|hex| {
            parse_hex_key(hex).ok_or_else(|| format!("--server-key {hex} is not 64 hex digits"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pin_of = |index: usize| match keys.len() {
        0 => Ok(None),
        1 => Ok(Some(keys[0])),
        count if count == addresses.len() => Ok(Some(keys[index])),
        count => Err(format!(
            "--server-key gives {count} keys for {} servers: give one key for every server, or \
             one per server in --server's order",
            addresses.len()
        )),
    };
    addresses
        .iter()
        .enumerate()
        .map(|(index, &address)| {
            Ok(Server {
                address,
                pin: pin_of(index)?,
            })
        })
        .collect()
}

fn run(cli: Cli) -> Result<(), String> {
    let (report, args) = match cli.scenario {
        Scenario::Ratios { figures, reports } => {
            print!("{}", ratios(&figures, &reports)?);
            return Ok(());
        }
        Scenario::Throughput {
            common: args,
            pairs,
            window,
            warmup_ms,
            duration_ms,
        } => {
            let options = scenario::ThroughputOptions {
                pairs,
                window,
                warmup_ms,
                duration_ms,
            };
            (scenario::throughput(&common(&args)?, &options)?, args)
        }
        Scenario::Group {
            common: args,
            members,
            groups,
            window,
            warmup_ms,
            duration_ms,
        } => {
            let options = scenario::GroupOptions {
                members,
                groups,
                window,
                warmup_ms,
                duration_ms,
            };
            (scenario::group(&common(&args)?, &options)?, args)
        }
        Scenario::Latency {
            common: args,
            pairs,
            rate,
            duration_ms,
            drain_ms,
            wait,
            processes,
            child,
        } => {
            let options = scenario::LatencyOptions {
                pairs,
                rate_per_second: rate,
                duration_ms,
                drain_ms,
                wait,
            };
            let common = common(&args)?;
            if child {
                let result = scenario::latency_local(&common, &options)?;
                println!(
                    "RESULT {}",
                    serde_json::to_string(&result).map_err(|e| e.to_string())?
                );
                return Ok(());
            }
            (latency_processes(&common, &options, processes)?, args)
        }
        Scenario::Offline {
            common: args,
            senders,
            recipients,
            messages,
            window,
        } => {
            let options = scenario::OfflineOptions {
                senders,
                recipients,
                messages,
                window,
            };
            (scenario::offline(&common(&args)?, &options)?, args)
        }
        Scenario::Ceiling {
            common: args,
            connections,
            rate,
            processes,
            pending_max,
            handshake_timeout_ms,
            hold_ms,
            heartbeat_ms,
            failures_max,
            child,
        } => {
            let options = CeilingOptions {
                connections,
                rate_per_second: rate,
                pending_max,
                handshake_timeout_ms,
                hold_ms,
                heartbeat_ms,
                failures_max,
            };
            let common = common(&args)?;
            if child {
                let result = scenario::ceiling_local(&common, &options, &mut |held| {
                    println!("RAMPED {held}");
                })?;
                println!(
                    "RESULT {}",
                    serde_json::to_string(&result).map_err(|e| e.to_string())?
                );
                return Ok(());
            }
            (ceiling(&common, &options, processes)?, args)
        }
    };
    print!("{}", report.table());
    if let Some(path) = &args.json {
        report
            .write_json(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        plot::draw(&report, path)?;
    }
    Ok(())
}

/// The stdout lines of generator processes, as (process index, line).
type Lines = mpsc::Receiver<(u32, String)>;

/// Starts `processes` generator processes of `scenario`: this binary with `--child`, the
/// servers, the target and the servers' keys, and `args(index)`. Their stdout lines come
/// through the receiver as (index, line).
fn spawn_children(
    scenario: &str,
    common: &Common,
    processes: u32,
    args: impl Fn(u32) -> Vec<String>,
) -> Result<(Lines, Vec<std::process::Child>), String> {
    let (sender, receiver) = mpsc::channel::<(u32, String)>();
    let mut children = Vec::new();
    for index in 0..processes {
        let mut command = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
        command
            .arg(scenario)
            .arg("--child")
            .args(["--server", &common.server_names()])
            .args(args(index))
            .stdout(Stdio::piped());
        match common.target {
            Target::Hop { delivered_in_ack } => {
                command.args(["--target", "hop"]);
                command.args(["--delivered-in-ack", &delivered_in_ack.to_string()]);
                let pins: Vec<String> = common
                    .servers
                    .iter()
                    .filter_map(|server| server.pin.map(hex::encode))
                    .collect();
                if !pins.is_empty() {
                    command.args(["--server-key", &pins.join(",")]);
                }
            }
            Target::Mqtt { login, qos } => {
                command.args(["--mqtt-qos", &qos.to_string()]);
                command.args(["--target", "mqtt"]);
                if login {
                    command.arg("--mqtt-login");
                }
            }
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting a generator process: {e}"))?;
        let stdout = child.stdout.take().ok_or("generator stdout")?;
        let sender = sender.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send((index, line)).is_err() {
                    break;
                }
            }
        });
        children.push(child);
    }
    Ok((receiver, children))
}

/// Waits for every generator process; an error names the first that failed.
fn wait_children(children: Vec<std::process::Child>) -> Result<(), String> {
    for mut child in children {
        let status = child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("a generator process failed: {status}"));
        }
    }
    Ok(())
}

/// `latency` across `processes` generator processes, each with its share of the pairs and of
/// the rate, its own clients and source addresses; the parent merges their histograms.
fn latency_processes(
    common: &Common,
    options: &scenario::LatencyOptions,
    processes: u32,
) -> Result<Report, String> {
    if processes == 1 {
        return scenario::latency(common, options);
    }
    if options.pairs < processes as usize {
        return Err(format!(
            "--processes {processes} needs at least as many pairs (--pairs {})",
            options.pairs
        ));
    }
    let share = |index: u32| {
        let (base, extra) = (
            options.pairs / processes as usize,
            options.pairs % processes as usize,
        );
        base + usize::from((index as usize) < extra)
    };
    let range = local_port_range().map_err(|e| e.to_string())?;
    let sources_each = SourcePlan::new(2 * share(0) as u64, 0, range)
        .map_err(|e| e.to_string())?
        .sources;
    let (receiver, children) = spawn_children("latency", common, processes, |index| {
        let pairs = share(index);
        let before: usize = (0..index).map(share).sum();
        // The rate in proportion to the pairs, the last taking what rounding left.
        let rate_before = options.rate_per_second * before as u64 / options.pairs as u64;
        let rate_through = options.rate_per_second * (before + pairs) as u64 / options.pairs as u64;
        let mut args = vec![
            "--source-offset".into(),
            (common.source_offset + index * sources_each).to_string(),
            "--client-offset".into(),
            (common.client_offset + 2 * before as u64).to_string(),
            "--pairs".into(),
            pairs.to_string(),
            "--rate".into(),
            (rate_through - rate_before).max(1).to_string(),
            "--duration-ms".into(),
            options.duration_ms.to_string(),
            "--drain-ms".into(),
            options.drain_ms.to_string(),
            "--wait".into(),
            options.wait.name().into(),
        ];
        if let Some(pid) = common.server_pid {
            args.extend(["--server-pid".into(), pid.to_string()]);
        }
        args
    })?;
    let mut results = Vec::new();
    for (_, line) in receiver.iter() {
        if let Some(json) = line.strip_prefix("RESULT ") {
            results.push(serde_json::from_str(json).map_err(|e| e.to_string())?);
        }
    }
    wait_children(children)?;
    if results.len() != processes as usize {
        return Err(format!(
            "{} of {processes} generator processes reported",
            results.len()
        ));
    }
    Ok(scenario::latency_report(common, options, &results))
}

/// `ceiling` across generator processes, `requested_processes` or as many as the target needs
/// (`descriptors::generator_processes`): each is this binary with `--child`, its share of the
/// connections, its own source addresses, and its clients' place in the spread over the
/// servers; one process runs here. Memory is sampled once every process has finished its ramp
/// and still holds its connections.
fn ceiling(
    common: &Common,
    options: &CeilingOptions,
    requested_processes: Option<u32>,
) -> Result<Report, String> {
    // Raised here, before any child starts: the children inherit it.
    let descriptor_limit =
        raise_descriptor_limit().map_err(|e| format!("reading RLIMIT_NOFILE: {e}"))?;
    let processes = generator_processes(
        options.connections,
        descriptor_limit,
        GENERATOR_RESERVED_DESCRIPTORS,
        requested_processes,
    )
    .map_err(|e| e.to_string())?;
    // Opened before any connection: a generator holding its limit cannot open a file.
    let probe = ServerProbe::open(common.server_pid);
    let before = probe.memory();
    let server_cpu_before = probe.server_cpu_seconds();
    let started = std::time::Instant::now();
    let mut server_cpu_ramp = None;
    let mut after = None;
    let results: Vec<CeilingResult> = if processes == 1 {
        vec![scenario::ceiling_local(common, options, &mut |_| {
            server_cpu_ramp = probe
                .server_cpu_seconds()
                .map(|cpu| (cpu, started.elapsed()));
            std::thread::sleep(Duration::from_millis(500));
            after = Some(probe.memory());
        })?]
    } else {
        let range = local_port_range().map_err(|e| e.to_string())?;
        let per_process = options.connections.div_ceil(u64::from(processes));
        let sources_each = SourcePlan::new(per_process, 0, range)
            .map_err(|e| e.to_string())?
            .sources;
        let rate = (options.rate_per_second / u64::from(processes)).max(1);
        let (receiver, children) = spawn_children("ceiling", common, processes, |index| {
            vec![
                "--source-offset".into(),
                (common.source_offset + index * sources_each).to_string(),
                "--client-offset".into(),
                (common.client_offset + u64::from(index) * per_process).to_string(),
                "--connections".into(),
                per_process.to_string(),
                "--rate".into(),
                rate.to_string(),
                "--pending-max".into(),
                options.pending_max.to_string(),
                "--handshake-timeout-ms".into(),
                options.handshake_timeout_ms.to_string(),
                "--hold-ms".into(),
                options.hold_ms.to_string(),
                "--heartbeat-ms".into(),
                options.heartbeat_ms.to_string(),
                "--failures-max".into(),
                options.failures_max.to_string(),
            ]
        })?;
        let mut ramped = 0;
        let mut results = Vec::new();
        for (_, line) in receiver.iter() {
            if line.starts_with("RAMPED") {
                ramped += 1;
                if ramped == processes {
                    server_cpu_ramp = probe
                        .server_cpu_seconds()
                        .map(|cpu| (cpu, started.elapsed()));
                    std::thread::sleep(Duration::from_millis(500));
                    after = Some(probe.memory());
                }
            } else if let Some(json) = line.strip_prefix("RESULT ") {
                results.push(serde_json::from_str(json).map_err(|e| e.to_string())?);
            }
        }
        wait_children(children)?;
        results
    };
    let mut report = scenario::ceiling_report(common, options, processes, &results);
    if let (Some(before), Some((after, wall))) = (server_cpu_before, server_cpu_ramp) {
        // Over the ramp, where the server's work is handshakes.
        report.server_cpu = Some(CpuUse::new(1, after - before, wall.as_secs_f64()));
    }
    if requested_processes.is_none() {
        let per_process =
            connections_per_process(descriptor_limit, GENERATOR_RESERVED_DESCRIPTORS).unwrap_or(0);
        report.notes.push(format!(
            "{processes} generator process(es), chosen for the target: one holds at most \
             {per_process} connections (RLIMIT_NOFILE {descriptor_limit} less \
             {GENERATOR_RESERVED_DESCRIPTORS})"
        ));
    }
    // No reading after the ramp (a generator process never finished it) is a missing
    // reading, not a zero.
    let after = after.unwrap_or_default();
    let held = report.value("held").unwrap_or(0.0) as u64;
    report.memory_before = Some(before);
    report.memory_after = Some(after);
    // Over several servers, one server's memory is not the connections'.
    if common.server_pid.is_some() && common.servers.len() == 1 {
        report.memory_per_connection = Some(MemoryPerConnection::between(&before, &after, held));
        report.notes.push("kernel slab growth includes the generator's own sockets (both ends are on this machine)".into());
    }
    Ok(report)
}

/// A table of `figures` from saved reports, each with its ratio to the first report's value.
fn ratios(figures: &[String], reports: &[String]) -> Result<String, String> {
    let mut rows = Vec::new();
    for entry in reports {
        let (name, path) = entry.split_once('=').ok_or("reports are NAME=FILE")?;
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
        let values: Vec<Option<f64>> = figures
            .iter()
            .map(|figure| value_of(&json, figure))
            .collect();
        rows.push((name.to_string(), values));
    }
    let mut text = format!("{:<12}", "server");
    for figure in figures {
        text.push_str(&format!("  {figure:>26}  {:>7}", "ratio"));
    }
    text.push('\n');
    let baseline = rows
        .first()
        .map(|(_, values)| values.clone())
        .unwrap_or_default();
    for (name, values) in &rows {
        text.push_str(&format!("{name:<12}"));
        for (value, base) in values.iter().zip(&baseline) {
            match (value, base) {
                (Some(v), Some(b)) if *v != 0.0 => text.push_str(&format!(
                    "  {:>26}  {:>7.2}",
                    hop_bench::report::human(*v),
                    b / v
                )),
                (Some(v), _) => text.push_str(&format!(
                    "  {:>26}  {:>7}",
                    hop_bench::report::human(*v),
                    "-"
                )),
                (None, _) => text.push_str(&format!("  {:>26}  {:>7}", "not measured", "-")),
            }
        }
        text.push('\n');
    }
    text.push_str("ratio: the first row's value divided by this row's\n");
    Ok(text)
}

fn value_of(json: &serde_json::Value, figure: &str) -> Option<f64> {
    if let Some((object, field)) = figure.split_once('.') {
        return json.get(object)?.get(field)?.as_f64();
    }
    json.get("figures")?
        .as_array()?
        .iter()
        .find(|f| f.get("name").and_then(|n| n.as_str()) == Some(figure))?
        .get("value")?
        .as_f64()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn processes_of(args: &[&str]) -> Result<Option<u32>, clap::Error> {
        let cli = Cli::try_parse_from(["hop-bench", "ceiling"].iter().chain(args))?;
        match cli.scenario {
            Scenario::Ceiling { processes, .. } => Ok(processes),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn ceiling_chooses_its_process_count_unless_given_one() {
        assert_eq!(processes_of(&[]).unwrap(), None);
        assert_eq!(processes_of(&["--processes", "3"]).unwrap(), Some(3));
        assert!(processes_of(&["--processes", "0"]).is_err());
        let too_many = (GENERATOR_PROCESSES_MAX + 1).to_string();
        assert!(processes_of(&["--processes", &too_many]).is_err());
    }

    #[test]
    fn the_help_names_the_descriptors_kept_per_process() {
        let mut command = Cli::command();
        let ceiling = command.find_subcommand_mut("ceiling").unwrap();
        let processes = ceiling
            .get_arguments()
            .find(|arg| arg.get_id() == "processes")
            .unwrap();
        let help = processes.get_help().unwrap().to_string();
        assert!(
            help.contains(&format!(
                "less {GENERATOR_RESERVED_DESCRIPTORS} descriptors"
            )),
            "{help}"
        );
    }

    #[test]
    fn the_server_is_hopds_default_address() {
        let cli = Cli::try_parse_from(["hop-bench", "throughput"]).unwrap();
        let Scenario::Throughput { common, .. } = cli.scenario else {
            panic!("not throughput");
        };
        assert_eq!(common.server, ["127.0.0.1:7788".parse().unwrap()]);
        assert!(common.server_key.is_empty());
    }

    fn common_of(args: &[&str]) -> Result<Common, String> {
        let cli = Cli::try_parse_from(["hop-bench", "latency"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        let Scenario::Latency { common: args, .. } = cli.scenario else {
            panic!("not latency");
        };
        common(&args)
    }

    #[test]
    fn several_servers_are_named_by_a_list_or_by_repeating_the_flag() {
        let expected: Vec<SocketAddr> = ["127.0.0.2:7788", "127.0.0.3:7788", "127.0.0.4:7788"]
            .map(|address| address.parse().unwrap())
            .to_vec();
        for args in [
            &["--server", "127.0.0.2:7788,127.0.0.3:7788,127.0.0.4:7788"][..],
            &[
                "--server",
                "127.0.0.2:7788",
                "--server",
                "127.0.0.3:7788,127.0.0.4:7788",
            ],
        ] {
            let common = common_of(args).unwrap();
            let addresses: Vec<SocketAddr> = common.servers.iter().map(|s| s.address).collect();
            assert_eq!(addresses, expected, "{args:?}");
            assert!(common.servers.iter().all(|server| server.pin.is_none()));
        }
    }

    #[test]
    fn server_keys_are_one_for_all_servers_or_one_per_server() {
        let (a, b) = ("aa".repeat(32), "bb".repeat(32));
        let pins = |args: &[&str]| -> Result<Vec<Option<[u8; 32]>>, String> {
            Ok(common_of(args)?.servers.iter().map(|s| s.pin).collect())
        };
        let two = "127.0.0.2:7788,127.0.0.3:7788";
        assert_eq!(
            pins(&["--server", two, "--server-key", &a]).unwrap(),
            [Some([0xaa; 32]), Some([0xaa; 32])],
            "one key pins every server"
        );
        assert_eq!(
            pins(&["--server", two, "--server-key", &format!("{a},{b}")]).unwrap(),
            [Some([0xaa; 32]), Some([0xbb; 32])],
            "one key per server, in order"
        );
        let three = format!("{a},{b},{a}");
        let error = pins(&["--server", two, "--server-key", &three]).unwrap_err();
        assert!(
            error.contains("3 keys for 2 servers"),
            "a count that matches neither is refused: {error}"
        );
        let error = pins(&["--server-key", "abc"]).unwrap_err();
        assert!(error.contains("not 64 hex digits"), "{error}");
    }
}
