//! hopd: the hop connection gateway.
//!
//! Thread-per-core and shard-nothing: `--shards N` threads, each pinned to a CPU, each with its
//! own listener (`SO_REUSEPORT`), IO backend ([`sys`]), connections, router and counters. A
//! connection is accepted by whichever shard the kernel picks, runs the Noise handshake there,
//! and then moves to its user's home shard, where the user's routing state lives. Shards talk
//! only through bounded mailboxes ([`mailbox`]).

pub mod admin;
pub mod admission;
pub mod cluster;
pub mod config;
pub mod control;
pub mod directory;
pub mod handshaker;
pub mod mailbox;
pub mod reader;
pub mod server;
pub mod shard;
pub mod stats;
pub mod syncer;
pub mod sys;
pub mod takeover;
pub mod tokens;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// hopd's `main`: parses flags, starts the server, runs until stopped (see [`server::serve`]).
/// Exit status: 0 after a clean stop, 1 if the server failed, 2 for bad configuration.
pub fn main() -> std::process::ExitCode {
    let args = config::Args::parse_with_defaults();
    match &args.command {
        Some(config::Command::Admin(config::AdminCommand::Queues { data, largest })) => {
            return admin_queues(data, *largest);
        }
        Some(config::Command::Admin(config::AdminCommand::RepairAccounts { data })) => {
            return admin_repair_accounts(data);
        }
        None => {}
    }
    let config = match config::Config::from_args(&args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("hopd: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.print_config {
        print!(
            "{}",
            toml::to_string(&config).expect("the configuration serialises")
        );
        return std::process::ExitCode::SUCCESS;
    }
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|error| {
        eprintln!(
            "hopd: invalid log filter {:?} ({error}); using info",
            config.log
        );
        EnvFilter::new("info")
    });
    // The filter can be set again while hopd runs (SIGHUP, `hop admin log-level`).
    let (filter, filter_handle) = tracing_subscriber::reload::Layer::new(filter);
    let json = config.log_format == config::LogFormat::Json;
    tracing_subscriber::registry()
        .with(filter)
        .with((!json).then(|| {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        }))
        .with(json.then(|| {
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
        }))
        .init();
    let set_log_filter: admin::SetLogFilter = std::sync::Arc::new(move |text: &str| {
        let filter = EnvFilter::try_new(text).map_err(|error| error.to_string())?;
        filter_handle
            .reload(filter)
            .map_err(|error| error.to_string())
    });
    let reload = || config::Config::from_args(&args).map_err(|error| error.to_string());
    match server::serve(&config, &reload, set_log_filter, args.takeover) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(error) => {
            eprintln!("hopd: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `hopd admin repair-accounts --data DIR`: rewrites damaged account files with their valid
/// records, for a hopd that refuses to start over a damaged one. Run it with hopd stopped.
fn admin_repair_accounts(data: &std::path::Path) -> std::process::ExitCode {
    if !data.is_dir() {
        eprintln!("hopd: {} is not a data folder", data.display());
        return std::process::ExitCode::from(2);
    }
    match hop_store::accounts::repair(&hop_store::io::FsIo, data) {
        Ok(report) => {
            print!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "hopd: cannot repair the accounts in {}: {error}",
                data.display()
            );
            std::process::ExitCode::FAILURE
        }
    }
}

/// `hopd admin queues --data DIR`: reads the offline queues without starting the server.
fn admin_queues(data: &std::path::Path, largest: usize) -> std::process::ExitCode {
    if !data.is_dir() {
        eprintln!("hopd: {} is not a data folder", data.display());
        return std::process::ExitCode::from(2);
    }
    match hop_store::report(&hop_store::io::FsIo, data, shard::wall_clock_ms(), largest) {
        Ok(report) => {
            print!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "hopd: cannot read the queues in {}: {error}",
                data.display()
            );
            std::process::ExitCode::FAILURE
        }
    }
}
