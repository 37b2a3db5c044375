//! The `hop` command-line client: keys, sending, listening, presence.
//!
//! Every event is one JSON object per line on stdout; errors go to stderr as `hop: ...` with
//! exit status 1 (2 for bad arguments).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::client::{body_text, Client, ClientError, ServerTrust};
use crate::keys::{parse_hex_key, StaticKey};
use crate::user::UserId;
use crate::wire::{ErrorCode, GoAwayReason, Kind, ReceiptKind, Stanza};

/// hop: the command-line client of the hop messaging gateway.
#[derive(Debug, Parser)]
#[command(name = "hop", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a key (mode 0600) and print its user id.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the user id of a key.
    Id {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Send one message and wait for its ticks.
    Send(SendArgs),
    /// Print incoming messages, receipts and presence; ack every message.
    Listen(ListenArgs),
    /// Watch a user's presence.
    Presence(PresenceArgs),
}

#[derive(Debug, Args)]
struct ConnectArgs {
    /// Server address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7788")]
    server: String,
    /// Your key file (from `hop keygen`).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The server's public key in hex (printed by hopd at start). Without it, the key is
    /// checked against the known-servers file, and recorded there on first use.
    #[arg(long, value_name = "HEX")]
    server_key: Option<String>,
    /// Known-servers file [default: $HOME/.config/hop/known_servers].
    #[arg(long, value_name = "FILE")]
    known_servers: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Tick {
    /// One tick: the server took the message.
    Sent,
    /// Two ticks: the recipient's device received it.
    Delivered,
    /// Blue ticks: the recipient read it.
    Read,
}

#[derive(Debug, Args)]
struct SendArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Recipient user id.
    #[arg(long, value_name = "ID")]
    to: UserId,
    /// Exit once this tick arrives.
    #[arg(long, value_enum, default_value = "sent")]
    wait: Tick,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    timeout: f64,
    /// The message text.
    text: String,
}

#[derive(Debug, Args)]
struct ListenArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Exit after this many messages [default: run until stopped].
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Also send a read receipt for every message.
    #[arg(long)]
    read: bool,
    /// Give up (exit 1) after this many seconds [default: no limit].
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
}

#[derive(Debug, Args)]
struct PresenceArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The user to watch.
    #[arg(long, value_name = "ID")]
    watch: UserId,
    /// Exit after this many presence events [default: run until stopped].
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Give up (exit 1) after this many seconds [default: no limit].
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
}

/// How long the connection and handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest single wait when no deadline is set.
const WAIT_SLICE: Duration = Duration::from_secs(3600);

/// `hop`'s main.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("hop: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Keygen { out } => {
            let key = StaticKey::generate().map_err(|e| e.to_string())?;
            key.save_new(&out).map_err(|e| e.to_string())?;
            println!("{}", key.user_id());
            Ok(())
        }
        Command::Id { key } => {
            let key = StaticKey::load(&key).map_err(|e| e.to_string())?;
            println!("{}", key.user_id());
            Ok(())
        }
        Command::Send(args) => send(args),
        Command::Listen(args) => listen(args),
        Command::Presence(args) => presence(args),
    }
}

fn connect(args: &ConnectArgs) -> Result<Client, String> {
    let key = StaticKey::load(&args.key).map_err(|e| e.to_string())?;
    let trust = match (&args.server_key, &args.known_servers) {
        (Some(hex), _) => ServerTrust::Pinned(
            parse_hex_key(hex.trim())
                .ok_or("--server-key must be 64 hex digits (the key hopd prints at start)")?,
        ),
        (None, Some(path)) => ServerTrust::KnownServers(path.clone()),
        (None, None) => {
            let home = std::env::var_os("HOME")
                .ok_or("HOME is not set: pass --server-key or --known-servers")?;
            ServerTrust::KnownServers(PathBuf::from(home).join(".config/hop/known_servers"))
        }
    };
    Client::connect(&args.server, &key, &trust, CONNECT_TIMEOUT).map_err(|e| e.to_string())
}

fn emit(value: serde_json::Value) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{value}");
    let _ = stdout.flush();
}

fn deadline_after(seconds: Option<f64>) -> Result<Option<Instant>, String> {
    match seconds {
        None => Ok(None),
        Some(seconds) if seconds.is_finite() && seconds > 0.0 => {
            Ok(Some(Instant::now() + Duration::from_secs_f64(seconds)))
        }
        Some(seconds) => Err(format!(
            "--timeout must be a positive number of seconds, not {seconds}"
        )),
    }
}

/// Waits for the next stanza until `deadline`; `Ok(None)` when it passed.
fn next(client: &mut Client, deadline: Option<Instant>) -> Result<Option<Stanza>, String> {
    loop {
        let wait = match deadline {
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => left,
                _ => return Ok(None),
            },
            None => WAIT_SLICE,
        };
        match client.recv(wait) {
            Ok(Some(stanza)) => return Ok(Some(stanza)),
            Ok(None) if deadline.is_none() => continue,
            Ok(None) => return Ok(None),
            Err(ClientError::Closed) => return Err("the server closed the connection".into()),
            Err(error) => return Err(error.to_string()),
        }
    }
}

fn code_name(code: i32) -> String {
    ErrorCode::try_from(code).map_or_else(
        |_| format!("code {code}"),
        |code| code.as_str_name().to_string(),
    )
}

fn go_away_message(reason: i32, text: &str) -> String {
    let reason = GoAwayReason::try_from(reason)
        .map_or_else(|_| format!("{reason}"), |r| r.as_str_name().to_string());
    format!("the server closed the connection ({reason}: {text})")
}

fn receipt_event(kind: i32) -> &'static str {
    match ReceiptKind::try_from(kind) {
        Ok(ReceiptKind::Read) => "read",
        Ok(ReceiptKind::Delivered) => "delivered",
        _ => "receipt",
    }
}

fn send(args: SendArgs) -> Result<(), String> {
    let deadline = deadline_after(Some(args.timeout))?;
    let mut client = connect(&args.connect)?;
    let seq = client
        .send_message(args.to, args.text.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut id = None;
    let mut reached: Option<Tick> = None;
    while reached.is_none_or(|tick| tick < args.wait) {
        let Some(stanza) = next(&mut client, deadline)? else {
            let waiting = match id {
                None => "the server's ack",
                Some(_) if reached.is_none_or(|tick| tick < Tick::Delivered) => {
                    "the delivered receipt"
                }
                Some(_) => "the read receipt",
            };
            return Err(format!(
                "timed out after {} s waiting for {waiting}",
                args.timeout
            ));
        };
        match stanza.kind {
            Some(Kind::ServerAck(ack)) if ack.seq == seq => {
                id = Some(ack.id);
                reached = reached.max(Some(Tick::Sent));
                emit(
                    json!({"event": "sent", "to": args.to.get(), "id": ack.id, "seq": seq, "timestamp_ms": ack.timestamp_ms}),
                );
            }
            Some(Kind::Error(error)) if error.seq == seq || error.seq == 0 => {
                emit(
                    json!({"event": "error", "code": code_name(error.code), "reason": error.reason, "seq": error.seq}),
                );
                return Err(format!(
                    "message not sent: {} ({})",
                    error.reason,
                    code_name(error.code)
                ));
            }
            Some(Kind::Receipt(receipt)) => {
                // Receipts are for this user: show them all and ack them, so none is left
                // queued on the server. Only ours decide when to stop.
                let event = receipt_event(receipt.kind);
                emit(
                    json!({"event": event, "id": receipt.id, "by": receipt.by, "timestamp_ms": receipt.timestamp_ms}),
                );
                let kind = ReceiptKind::try_from(receipt.kind).unwrap_or(ReceiptKind::Unspecified);
                client.ack(receipt.id, kind).map_err(|e| e.to_string())?;
                if Some(receipt.id) == id {
                    let tick = if kind == ReceiptKind::Read {
                        Tick::Read
                    } else {
                        Tick::Delivered
                    };
                    reached = reached.max(Some(tick));
                }
            }
            Some(Kind::GoAway(go_away)) => {
                return Err(go_away_message(go_away.reason, &go_away.text))
            }
            // Incoming messages stay queued for `hop listen`.
            _ => {}
        }
    }
    client.close();
    Ok(())
}

fn listen(args: ListenArgs) -> Result<(), String> {
    let deadline = deadline_after(args.timeout)?;
    let mut client = connect(&args.connect)?;
    let mut messages = 0u64;
    while args.count.is_none_or(|count| messages < count) {
        let Some(stanza) = next(&mut client, deadline)? else {
            return Err(format!(
                "timed out after {} s with {messages} message(s)",
                args.timeout.unwrap_or_default()
            ));
        };
        match stanza.kind {
            Some(Kind::Deliver(deliver)) => {
                emit(json!({
                    "event": "message",
                    "from": deliver.from,
                    "id": deliver.id,
                    "timestamp_ms": deliver.timestamp_ms,
                    "text": body_text(&deliver.body),
                }));
                client
                    .ack(deliver.id, ReceiptKind::Unspecified)
                    .map_err(|e| e.to_string())?;
                if args.read {
                    if let Some(from) = UserId::new(deliver.from) {
                        client.read(from, deliver.id).map_err(|e| e.to_string())?;
                    }
                }
                messages += 1;
            }
            Some(Kind::Receipt(receipt)) => {
                let event = receipt_event(receipt.kind);
                emit(
                    json!({"event": event, "id": receipt.id, "by": receipt.by, "timestamp_ms": receipt.timestamp_ms}),
                );
                let kind = ReceiptKind::try_from(receipt.kind).unwrap_or(ReceiptKind::Unspecified);
                client.ack(receipt.id, kind).map_err(|e| e.to_string())?;
            }
            Some(Kind::Presence(presence)) => {
                emit(
                    json!({"event": "presence", "user": presence.user, "online": presence.online, "last_seen_ms": presence.last_seen_ms}),
                );
            }
            Some(Kind::Error(error)) => {
                emit(
                    json!({"event": "error", "code": code_name(error.code), "reason": error.reason, "seq": error.seq}),
                );
            }
            Some(Kind::GoAway(go_away)) => {
                return Err(go_away_message(go_away.reason, &go_away.text))
            }
            _ => {}
        }
    }
    client.close();
    Ok(())
}

fn presence(args: PresenceArgs) -> Result<(), String> {
    let deadline = deadline_after(args.timeout)?;
    let mut client = connect(&args.connect)?;
    client.subscribe(args.watch).map_err(|e| e.to_string())?;
    let mut events = 0u64;
    while args.count.is_none_or(|count| events < count) {
        let Some(stanza) = next(&mut client, deadline)? else {
            return Err(format!(
                "timed out after {} s with {events} presence event(s)",
                args.timeout.unwrap_or_default()
            ));
        };
        match stanza.kind {
            Some(Kind::Presence(presence)) if presence.user == args.watch.get() => {
                emit(
                    json!({"event": "presence", "user": presence.user, "online": presence.online, "last_seen_ms": presence.last_seen_ms}),
                );
                events += 1;
            }
            Some(Kind::Error(error)) => {
                return Err(format!(
                    "cannot watch {}: {} ({})",
                    args.watch,
                    error.reason,
                    code_name(error.code)
                ));
            }
            Some(Kind::GoAway(go_away)) => {
                return Err(go_away_message(go_away.reason, &go_away.text))
            }
            _ => {}
        }
    }
    client.close();
    Ok(())
}
