//! hop: the command-line client of the hop messaging gateway. See `hop --help` and README.md.
//!
//! Every event is one JSON object per line on stdout; errors go to stderr as `hop: ...` with
//! exit status 1 (2 for bad arguments). User ids are 32 hex digits, message ids 16.

#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use hop_protocol::client::{body_text, Client, ClientError, ServerTrust};
use hop_protocol::keys::{parse_hex_key, StaticKey};
use hop_protocol::outbox::Outbox;
use hop_protocol::wire::{
    ErrorCode, GoAwayReason, GroupEvent, Kind, MessageRef, Receipt, ReceiptKind, Stanza, UserRef,
    Visibility, CONTACTS_MAX, GROUP_NAME_BYTES_MAX,
};
use hop_protocol::UserId;
use serde_json::json;

/// hop: the command-line client of the hop messaging gateway.
#[derive(Debug, Parser)]
#[command(
    name = "hop",
    version,
    about = "hop, the command-line client of the hop messaging gateway: make a key, send and \
             receive messages with their ticks, watch presence, and operate a running hopd \
             (hop admin). Events print as JSON lines."
)]
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
    /// Send one message and wait for its ticks. A lost connection is retried, and the message
    /// sent again under the same id, until it is acked or the timeout passes.
    Send(SendArgs),
    /// Print incoming messages, receipts and presence; ack every message.
    Listen(ListenArgs),
    /// Watch a user's presence.
    Presence(PresenceArgs),
    /// Set who may see your presence (online, last seen). Who hides it from someone does not
    /// see their last-seen time either.
    Privacy(PrivacyArgs),
    /// Link, list and remove the devices of your account: the primary device (whose key made
    /// the account) adds a companion by the device id its `hop keygen` printed; any device
    /// lists them. Prints the account's devices as JSON.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Create a group, change its members and admins, leave it, or show it. Prints the group
    /// (id, name, members, admins) as JSON. Send to a group with `hop send --to GROUP`.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Operate a running hopd through its admin listener (hopd's `admin` setting); prints
    /// the answer as JSON.
    Admin(AdminArgs),
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Link a companion device to your account (run with the primary's key).
    Add {
        #[command(flatten)]
        connect: ConnectArgs,
        /// The companion's device id (32 hex digits, from `hop keygen` on it).
        device: UserId,
    },
    /// Your account's devices (run with any of its devices' keys).
    List {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Remove a companion device: its connection is closed, its queue deleted, and it is
    /// refused from then on (run with the primary's key).
    Remove {
        #[command(flatten)]
        connect: ConnectArgs,
        /// The companion's device id.
        device: UserId,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Create a group of your account (its first admin) and the MEMBER_IDs (account ids, 32
    /// hex digits each); prints the group's id (as `hop keygen` prints a user's), for
    /// `GROUP=$(hop group create ...)`.
    Create {
        #[command(flatten)]
        connect: ConnectArgs,
        /// The group's name (at most 100 bytes).
        #[arg(long, default_value = "")]
        name: String,
        members: Vec<UserId>,
    },
    /// Add members (admins only). With --admin: add them as admins, or make members admins.
    Add(GroupMembersArgs),
    /// Remove members (admins only). With --admin: only take their admin role.
    Remove(GroupMembersArgs),
    /// Leave a group. The last admin to leave makes the oldest member an admin; the last
    /// member to leave ends the group.
    Leave(GroupArgs),
    /// The group's name, members and admins (members only).
    Info(GroupArgs),
}

#[derive(Debug, Args)]
struct GroupArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The group's id (32 hex digits, as `hop group create` printed it).
    #[arg(long, value_name = "GROUP_ID")]
    group: UserId,
}

#[derive(Debug, Args)]
struct GroupMembersArgs {
    #[command(flatten)]
    group: GroupArgs,
    /// The admin role: given (add) or taken (remove).
    #[arg(long)]
    admin: bool,
    /// Account ids (32 hex digits each).
    #[arg(required = true)]
    members: Vec<UserId>,
}

#[derive(Debug, Args)]
struct AdminArgs {
    /// hopd's admin listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7789")]
    admin: String,
    #[command(subcommand)]
    request: AdminRequest,
}

#[derive(Debug, Subcommand)]
enum AdminRequest {
    /// Every counter, per shard and in total.
    Stats,
    /// One user: its home shard, whether it is online, its queue.
    User {
        /// The user id (32 hex digits).
        id: UserId,
    },
    /// Close a user's connection (GoAway KICKED); the client may connect again.
    Kick {
        /// The user id (32 hex digits).
        id: UserId,
    },
    /// Set hopd's log filter until the next restart or SIGHUP, e.g. `debug` or
    /// `info,hop_gateway=debug`.
    LogLevel {
        /// A tracing filter.
        filter: String,
    },
    /// Start a lame-duck drain: hopd accepts no more connections, sends the held ones away
    /// spread over its drain_ms, and exits.
    Drain,
    /// This node's view of its cluster: the members (address, key, shards), whether this
    /// node is one, its lease and etcd counters.
    Cluster,
    /// Issue a one-time registration token (`registration = token`): a new user passes it
    /// with `--token` on its first connection. Printed as `{"token": ..., "unused": N}`.
    Token,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Shown {
    /// Anyone may watch (the default).
    Everyone,
    /// Only the users named with --contact.
    Contacts,
    /// No one.
    Nobody,
}

#[derive(Debug, Args)]
struct PrivacyArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Who may see your presence.
    #[arg(value_enum)]
    shown_to: Shown,
    /// A contact (32 hex digits), with `contacts`; repeat it, at most 1,024. The list replaces
    /// the one set before.
    #[arg(long = "contact", value_name = "ID")]
    contacts: Vec<UserId>,
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
    /// A one-time registration token from the server's operator (`hop admin token`), for a
    /// key's first connection to a server whose registration is `token`.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
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
    /// Recipient: a user id, or the id of a group you are a member of (32 hex digits).
    #[arg(long, value_name = "ID")]
    to: UserId,
    /// Exit once this tick arrives. For a group, delivered and read mean by everyone: every
    /// device of every other member acked it, every other member read it.
    #[arg(long, value_enum, default_value = "sent")]
    wait: Tick,
    /// Give up after this many seconds, retries included.
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
    /// The user to watch (32 hex digits).
    #[arg(long, value_name = "ID")]
    watch: UserId,
    /// Exit after this many presence events [default: run until stopped].
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Give up (exit 1) after this many seconds [default: no limit].
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
}

/// How long one connection and handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest single wait when no deadline is set.
const WAIT_SLICE: Duration = Duration::from_secs(3600);
/// `hop send`'s first wait before it connects again; doubled per failure up to the maximum.
const RETRY_DELAY_FIRST: Duration = Duration::from_millis(50);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
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
        Command::Privacy(args) => privacy(args),
        Command::Admin(args) => admin(args),
        Command::Device(command) => device(command),
        Command::Group(command) => group(command),
    }
}

/// `hop group`: one GroupChange, and the group it is answered with.
fn group(command: GroupCommand) -> Result<(), String> {
    use hop_protocol::wire::{group_change::Op, GroupChange};
    let change = |op: Op, group: Option<UserId>, members: Vec<UserId>, admin| GroupChange {
        op: op as i32,
        group: group.map(Into::into),
        members: members.into_iter().map(Into::into).collect(),
        admin,
        ..GroupChange::default()
    };
    let creating = matches!(command, GroupCommand::Create { .. });
    let (connect_args, change) = match command {
        GroupCommand::Create {
            connect,
            name,
            members,
        } => {
            if name.len() > GROUP_NAME_BYTES_MAX {
                return Err(format!(
                    "--name is at most {GROUP_NAME_BYTES_MAX} bytes, not {}",
                    name.len()
                ));
            }
            // A retry of this create (the same nonce) would find the same group.
            let nonce = hop_protocol::outbox::random_nonzero()
                .map_err(|_| "the system's random source failed")?;
            let create = GroupChange {
                name,
                nonce,
                ..change(Op::Create, None, members, false)
            };
            (connect, create)
        }
        GroupCommand::Add(GroupMembersArgs {
            group,
            admin,
            members,
        }) => (
            group.connect,
            change(Op::Add, Some(group.group), members, admin),
        ),
        GroupCommand::Remove(GroupMembersArgs {
            group,
            admin,
            members,
        }) => (
            group.connect,
            change(Op::Remove, Some(group.group), members, admin),
        ),
        GroupCommand::Leave(group) => {
            let leave = change(Op::Leave, Some(group.group), Vec::new(), false);
            (group.connect, leave)
        }
        GroupCommand::Info(group) => {
            let info = change(Op::Info, Some(group.group), Vec::new(), false);
            (group.connect, info)
        }
    };
    let mut client = connect(&connect_args)?;
    client
        .send(&Stanza::of(Kind::GroupChange(change)))
        .map_err(described)?;
    let info = answer(&mut client, "group change", |kind| match kind {
        Kind::GroupInfo(info) => Some(info),
        _ => None,
    })?;
    client.close();
    if creating {
        println!("{}", user_text(info.group.as_ref()));
        return Ok(());
    }
    let ids =
        |list: &[UserRef]| -> Vec<String> { list.iter().map(|u| user_text(Some(u))).collect() };
    emit(json!({
        "event": "group",
        "group": user_text(info.group.as_ref()),
        "name": info.name,
        "members": ids(&info.members),
        "admins": ids(&info.admins),
    }));
    Ok(())
}

/// `hop device`: one DeviceChange, and the account's devices it is answered with.
fn device(command: DeviceCommand) -> Result<(), String> {
    use hop_protocol::wire::{device_change::Op, DeviceChange};
    let (connect_args, op, device) = match &command {
        DeviceCommand::Add { connect, device } => (connect, Op::Add, Some(*device)),
        DeviceCommand::List { connect } => (connect, Op::List, None),
        DeviceCommand::Remove { connect, device } => (connect, Op::Remove, Some(*device)),
    };
    let mut client = connect(connect_args)?;
    client
        .send(&Stanza::of(Kind::DeviceChange(DeviceChange {
            op: op as i32,
            device: device.map(Into::into),
        })))
        .map_err(described)?;
    let devices = answer(&mut client, "device change", |kind| match kind {
        Kind::Devices(devices) => Some(devices),
        _ => None,
    })?;
    let companions: Vec<String> = devices
        .companions
        .iter()
        .map(|d| user_text(Some(d)))
        .collect();
    emit(json!({
        "event": "devices",
        "account": user_text(devices.account.as_ref()),
        "companions": companions,
    }));
    client.close();
    Ok(())
}

/// Waits for the stanza `pick` takes: the server's answer to a request (`what`). An Error or
/// a GoAway before it, or silence, is the request's failure.
fn answer<T>(
    client: &mut Client,
    what: &str,
    pick: impl Fn(Kind) -> Option<T>,
) -> Result<T, String> {
    loop {
        let Some(stanza) =
            next(client, Some(Instant::now() + CONNECT_TIMEOUT)).map_err(described)?
        else {
            return Err("the server did not answer".into());
        };
        match stanza.kind {
            Some(Kind::Error(error)) => {
                return Err(format!(
                    "{what} refused: {} ({})",
                    error.reason,
                    code_name(error.code)
                ))
            }
            Some(Kind::GoAway(go_away)) => {
                return Err(go_away_message(go_away.reason, &go_away.text))
            }
            Some(kind) => {
                if let Some(found) = pick(kind) {
                    return Ok(found);
                }
            }
            None => {}
        }
    }
}

/// Admin requests wait at most this long for hopd.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// `hop admin`: one request to hopd's admin listener; its JSON answer goes to stdout. An
/// error answer is printed too, and the exit status is 1.
fn admin(args: AdminArgs) -> Result<(), String> {
    let base = format!("http://{}", args.admin);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(ADMIN_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let response = match &args.request {
        AdminRequest::Stats => agent.get(format!("{base}/stats")).call(),
        AdminRequest::User { id } => agent.get(format!("{base}/users/{id}")).call(),
        AdminRequest::Kick { id } => agent.post(format!("{base}/users/{id}/kick")).send_empty(),
        AdminRequest::LogLevel { filter } => agent.put(format!("{base}/log")).send(filter.as_str()),
        AdminRequest::Drain => agent.post(format!("{base}/drain")).send_empty(),
        AdminRequest::Cluster => agent.get(format!("{base}/cluster")).call(),
        AdminRequest::Token => agent.post(format!("{base}/tokens")).send_empty(),
    };
    let mut response = response.map_err(|error| {
        format!(
            "cannot reach hopd's admin listener at {}: {error}",
            args.admin
        )
    })?;
    let status = response.status();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|error| format!("cannot read hopd's answer: {error}"))?;
    print!("{body}");
    if status.is_success() {
        Ok(())
    } else {
        let reason = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|value| value.get("error")?.as_str().map(str::to_string))
            .unwrap_or_else(|| body.trim().to_string());
        Err(format!("hopd answered {}: {reason}", status.as_u16()))
    }
}

/// What `connect` needs, loaded once.
struct Endpoint {
    server: String,
    key: StaticKey,
    trust: ServerTrust,
    token: Option<String>,
}

impl Endpoint {
    fn load(args: &ConnectArgs) -> Result<Self, String> {
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
        Ok(Self {
            server: args.server.clone(),
            key,
            trust,
            token: args.token.clone(),
        })
    }

    /// Connects, following a cluster's redirect to the user's home node.
    fn connect(&self) -> Result<Client, ClientError> {
        Client::connect_home_registering(
            &self.server,
            &self.key,
            &self.trust,
            CONNECT_TIMEOUT,
            self.token.as_deref(),
        )
    }
}

fn connect(args: &ConnectArgs) -> Result<Client, String> {
    Endpoint::load(args)?.connect().map_err(|e| e.to_string())
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

/// A server message id as text: 16 hex digits.
fn message_id(id: u64) -> String {
    format!("{id:016x}")
}

fn user_text(user: Option<&UserRef>) -> String {
    UserRef::user(user).map_or_else(|| "invalid".to_string(), |user| user.to_string())
}

/// Waits for the next stanza until `deadline`; `Ok(None)` when it passed.
fn next(client: &mut Client, deadline: Option<Instant>) -> Result<Option<Stanza>, ClientError> {
    loop {
        let wait = match deadline {
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => left,
                _ => return Ok(None),
            },
            None => WAIT_SLICE,
        };
        match client.recv(wait)? {
            Some(stanza) => return Ok(Some(stanza)),
            None if deadline.is_none() => continue,
            None => return Ok(None),
        }
    }
}

fn described(error: ClientError) -> String {
    match error {
        ClientError::Closed => "the server closed the connection".into(),
        error => error.to_string(),
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

/// Prints a receipt as a JSON line and acks it, so the server forgets it; returns its kind.
fn show_and_ack(client: &mut Client, receipt: &Receipt) -> Result<ReceiptKind, ClientError> {
    emit(json!({
        "event": receipt_event(receipt.kind),
        "id": message_id(receipt.id),
        "by": user_text(receipt.by.as_ref()),
        "timestamp_ms": receipt.timestamp_ms,
    }));
    let kind = ReceiptKind::try_from(receipt.kind).unwrap_or(ReceiptKind::Unspecified);
    client.ack_receipt(receipt)?;
    Ok(kind)
}

fn receipt_event(kind: i32) -> &'static str {
    match ReceiptKind::try_from(kind) {
        Ok(ReceiptKind::Read) => "read",
        Ok(ReceiptKind::Delivered) => "delivered",
        _ => "receipt",
    }
}

/// Errors worth a new connection: the connection went, or the server asked the client to
/// come back. Key mismatches, bad files and protocol version errors are final.
fn retryable(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Connect { .. }
            | ClientError::Io(_)
            | ClientError::Closed
            | ClientError::Redirects { .. }
    )
}

fn go_away_retryable(reason: i32) -> bool {
    matches!(
        GoAwayReason::try_from(reason),
        Ok(GoAwayReason::Shutdown
            | GoAwayReason::Replaced
            | GoAwayReason::Idle
            | GoAwayReason::Full
            | GoAwayReason::Redirect
            | GoAwayReason::Unavailable)
    )
}

/// `hop send`'s progress, across connections.
struct Sending {
    to: UserId,
    wait: Tick,
    /// The message's client id, once it was first sent.
    message: Option<MessageRef>,
    /// The server id, once the ServerAck came.
    id: Option<u64>,
    reached: Option<Tick>,
    /// For a group message, from its ServerAck: the other members and their devices' copies.
    members: u32,
    copies: u32,
    /// Who has sent a delivered (devices) and a read (accounts) receipt of a group message.
    delivered_by: BTreeSet<String>,
    read_by: BTreeSet<String>,
    /// Receipts that came before the ServerAck named the message's id: a group message's
    /// receipts can overtake its ServerAck, which waits for every member's shard.
    early: Vec<(u64, ReceiptKind, String)>,
}

/// Receipts `hop send` keeps while it waits for its ServerAck: a group's every device copy
/// and member read, with room to spare.
const EARLY_RECEIPTS_MAX: usize = 16 * 1024;

/// How one connection of `hop send` ended.
enum Ended {
    Done,
    /// The connection went or the server sent the client away: connect again.
    Retry(String),
}

fn send(args: SendArgs) -> Result<(), String> {
    let deadline = deadline_after(Some(args.timeout))?.unwrap_or_else(Instant::now);
    let endpoint = Endpoint::load(&args.connect)?;
    let body = args.text.as_bytes();
    let mut sending = Sending {
        to: args.to,
        wait: args.wait,
        message: None,
        id: None,
        reached: None,
        members: 0,
        copies: 0,
        delivered_by: BTreeSet::new(),
        read_by: BTreeSet::new(),
        early: Vec::new(),
    };
    let mut outbox: Option<Outbox> = None;
    let mut delay = RETRY_DELAY_FIRST;
    let mut told = false;
    loop {
        let why = match endpoint.connect() {
            Ok(mut client) => {
                if let Some(kept) = outbox.take() {
                    client.set_outbox(kept);
                }
                // The second tick in the ServerAck when the recipient acks in time.
                client.set_delivered_in_ack(true);
                let ended = send_on(&mut client, &mut sending, body, deadline)?;
                match ended {
                    Ended::Done => {
                        client.close();
                        return Ok(());
                    }
                    Ended::Retry(why) => {
                        outbox = Some(client.into_outbox());
                        why
                    }
                }
            }
            Err(error) if retryable(&error) => described(error),
            Err(error) => return Err(described(error)),
        };
        if Instant::now() + delay >= deadline {
            return Err(format!(
                "timed out after {} s waiting for {} (last: {why})",
                args.timeout,
                sending.awaited()
            ));
        }
        if !told {
            eprintln!("hop: {why}; connecting again");
            told = true;
        }
        std::thread::sleep(jittered(delay, sending.message));
        delay = (delay * 2).min(RETRY_DELAY_MAX);
    }
}

impl Sending {
    fn awaited(&self) -> &'static str {
        match (self.id, self.reached) {
            (None, _) => "the server's ack",
            (Some(_), reached) if reached.is_none_or(|tick| tick < Tick::Delivered) => {
                "the delivered receipt"
            }
            _ => "the read receipt",
        }
    }

    fn done(&self) -> bool {
        self.reached.is_some_and(|tick| tick >= self.wait)
    }

    /// A receipt of this message: a tick for a user; for a group, one more device or member
    /// towards "by everyone".
    fn count(&mut self, kind: ReceiptKind, by: String) {
        let read = kind == ReceiptKind::Read;
        let tick = if self.members == 0 {
            Some(if read { Tick::Read } else { Tick::Delivered })
        } else if read {
            self.read_by.insert(by);
            (self.read_by.len() >= self.members as usize).then_some(Tick::Read)
        } else {
            self.delivered_by.insert(by);
            (self.delivered_by.len() >= self.copies as usize).then_some(Tick::Delivered)
        };
        self.reached = self.reached.max(tick);
    }
}

/// Sends (or sends again) the message on one connection and waits there for its ticks.
fn send_on(
    client: &mut Client,
    sending: &mut Sending,
    body: &[u8],
    deadline: Instant,
) -> Result<Ended, String> {
    if sending.id.is_none() {
        let sent = match sending.message {
            None => client.send_message(sending.to, body),
            Some(message) => client.resend_message(sending.to, message.seq, body),
        };
        match sent {
            Ok(message) => sending.message = Some(message),
            Err(error) if retryable(&error) => return Ok(Ended::Retry(described(error))),
            Err(error) => return Err(described(error)),
        }
    }
    let message = sending.message.expect("sent above or before");
    while !sending.done() {
        let stanza = match next(client, Some(deadline)) {
            Ok(Some(stanza)) => stanza,
            Ok(None) => return Err(format!("timed out waiting for {}", sending.awaited())),
            Err(error) if retryable(&error) => return Ok(Ended::Retry(described(error))),
            Err(error) => return Err(described(error)),
        };
        match stanza.kind {
            Some(Kind::ServerAck(ack))
                if ack.outbox == message.outbox && ack.seq == message.seq =>
            {
                sending.id = Some(ack.id);
                sending.reached = sending.reached.max(Some(Tick::Sent));
                // Members whose copy was refused will not tick: "everyone" is the others.
                sending.members = ack.members.saturating_sub(ack.missed.len() as u32);
                sending.copies = ack.copies;
                let mut sent = json!({
                    "event": "sent",
                    "to": sending.to.to_string(),
                    "id": message_id(ack.id),
                    "outbox": message_id(message.outbox),
                    "seq": message.seq,
                    "timestamp_ms": ack.timestamp_ms,
                });
                if ack.members > 0 {
                    sent["members"] = json!(ack.members);
                    sent["copies"] = json!(ack.copies);
                    let missed: Vec<String> =
                        ack.missed.iter().map(|m| user_text(Some(m))).collect();
                    if !missed.is_empty() {
                        sent["missed"] = json!(missed);
                    }
                }
                emit(sent);
                for (id, kind, by) in std::mem::take(&mut sending.early) {
                    if id == ack.id {
                        sending.count(kind, by);
                    }
                }
                // The recipient's device acked it first: the second tick came with the ack
                // and no DELIVERED receipt follows. Shown as a receipt would be.
                if ack.delivered_ms != 0 {
                    let by = sending.to.to_string();
                    emit(json!({
                        "event": "delivered",
                        "id": message_id(ack.id),
                        "by": by,
                        "timestamp_ms": ack.delivered_ms,
                    }));
                    sending.count(ReceiptKind::Delivered, by);
                }
            }
            Some(Kind::Error(error))
                if (error.outbox == message.outbox && error.seq == message.seq)
                    || error.seq == 0 =>
            {
                emit(json!({
                    "event": "error",
                    "code": code_name(error.code),
                    "reason": error.reason,
                    "outbox": message_id(error.outbox),
                    "seq": error.seq,
                }));
                if error.code == ErrorCode::Overloaded as i32 {
                    return Ok(Ended::Retry(format!("server overloaded: {}", error.reason)));
                }
                return Err(format!(
                    "message not sent: {} ({})",
                    error.reason,
                    code_name(error.code)
                ));
            }
            Some(Kind::Receipt(receipt)) => {
                // Receipts are for this user: show them all and ack them, so none is left
                // queued on the server. Only ours decide when to stop.
                let kind = match show_and_ack(client, &receipt) {
                    Ok(kind) => kind,
                    Err(error) => return Ok(Ended::Retry(described(error))),
                };
                let by = user_text(receipt.by.as_ref());
                match sending.id {
                    Some(id) if id == receipt.id => sending.count(kind, by),
                    Some(_) => {}
                    None if sending.early.len() < EARLY_RECEIPTS_MAX => {
                        sending.early.push((receipt.id, kind, by));
                    }
                    None => {}
                }
            }
            Some(Kind::GoAway(go_away)) if go_away_retryable(go_away.reason) => {
                return Ok(Ended::Retry(go_away_message(go_away.reason, &go_away.text)))
            }
            Some(Kind::GoAway(go_away)) => {
                return Err(go_away_message(go_away.reason, &go_away.text))
            }
            // Incoming messages stay queued for `hop listen`.
            _ => {}
        }
    }
    Ok(Ended::Done)
}

/// `delay` give or take a quarter, varied by the message id so that clients that failed
/// together do not all come back in the same instant.
fn jittered(delay: Duration, message: Option<MessageRef>) -> Duration {
    let seed =
        message.map_or(0, |m| m.outbox ^ m.seq.rotate_left(17)) ^ u64::from(std::process::id());
    let spread = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as u32; // 0..1024
    delay * 3 / 4 + delay / 2 * spread / 1024
}

fn listen(args: ListenArgs) -> Result<(), String> {
    let deadline = deadline_after(args.timeout)?;
    let mut client = connect(&args.connect)?;
    let mut messages = 0u64;
    while args.count.is_none_or(|count| messages < count) {
        let Some(stanza) = next(&mut client, deadline).map_err(described)? else {
            return Err(format!(
                "timed out after {} s with {messages} message(s)",
                args.timeout.unwrap_or_default()
            ));
        };
        match stanza.kind {
            Some(Kind::Deliver(deliver)) if deliver.to.is_some() => {
                // Another device of this account sent it: shown, acked, not counted or read.
                emit(json!({
                    "event": "sent",
                    "to": user_text(deliver.to.as_deref()),
                    "id": message_id(deliver.id),
                    "timestamp_ms": deliver.timestamp_ms,
                    "text": body_text(&deliver.body),
                }));
                client.ack_deliver(deliver.id).map_err(described)?;
            }
            Some(Kind::Deliver(deliver)) if deliver.event.is_some() => {
                // A change of a group's members: shown and acked, not counted or read.
                emit(group_event(&deliver));
                client.ack_deliver(deliver.id).map_err(described)?;
            }
            Some(Kind::Deliver(deliver)) => {
                let mut message = json!({
                    "event": "message",
                    "from": user_text(deliver.from.as_ref()),
                    "id": message_id(deliver.id),
                    "timestamp_ms": deliver.timestamp_ms,
                    "text": body_text(&deliver.body),
                });
                if deliver.group.is_some() {
                    message["group"] = json!(user_text(deliver.group.as_deref()));
                }
                emit(message);
                client.ack_deliver(deliver.id).map_err(described)?;
                if args.read {
                    if let Some(from) = UserRef::user(deliver.from.as_ref()) {
                        client
                            .read(from, deliver.id, deliver.proof)
                            .map_err(described)?;
                    }
                }
                messages += 1;
            }
            Some(Kind::Receipt(receipt)) => {
                show_and_ack(&mut client, &receipt).map_err(described)?;
            }
            Some(Kind::Presence(presence)) => {
                emit(json!({
                    "event": "presence",
                    "user": user_text(presence.user.as_ref()),
                    "online": presence.online,
                    "last_seen_ms": presence.last_seen_ms,
                }));
            }
            Some(Kind::Error(error)) => {
                emit(json!({
                    "event": "error",
                    "code": code_name(error.code),
                    "reason": error.reason,
                    "seq": error.seq,
                }));
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

/// A group event as `hop listen` prints it: who changed what.
fn group_event(deliver: &hop_protocol::wire::Deliver) -> serde_json::Value {
    let event: GroupEvent = deliver.event.as_deref().cloned().unwrap_or_default();
    let op =
        hop_protocol::wire::group_change::Op::try_from(event.op).map_or("unknown", |op| match op {
            hop_protocol::wire::group_change::Op::Create => "create",
            hop_protocol::wire::group_change::Op::Add => "add",
            hop_protocol::wire::group_change::Op::Remove => "remove",
            hop_protocol::wire::group_change::Op::Leave => "leave",
            _ => "unknown",
        });
    let members: Vec<String> = event.members.iter().map(|m| user_text(Some(m))).collect();
    let mut shown = json!({
        "event": "group_change",
        "group": user_text(deliver.group.as_deref()),
        "op": op,
        "by": user_text(deliver.from.as_ref()),
        "members": members,
        "id": message_id(deliver.id),
        "timestamp_ms": deliver.timestamp_ms,
    });
    if event.admin {
        shown["admin"] = json!(true);
    }
    if !event.name.is_empty() {
        shown["name"] = json!(event.name);
    }
    shown
}

fn privacy(args: PrivacyArgs) -> Result<(), String> {
    let visibility = match args.shown_to {
        Shown::Everyone => Visibility::Everyone,
        Shown::Contacts => Visibility::Contacts,
        Shown::Nobody => Visibility::Nobody,
    };
    if args.contacts.len() > CONTACTS_MAX {
        return Err(format!("at most {CONTACTS_MAX} contacts"));
    }
    let mut client = connect(&args.connect)?;
    client
        .set_presence_privacy(visibility, &args.contacts)
        .map_err(described)?;
    // The Pong comes after the settings were taken; an Error before it names what was wrong.
    client
        .send(&Stanza::of(Kind::Ping(hop_protocol::wire::Ping {
            nonce: 1,
        })))
        .map_err(described)?;
    answer(&mut client, "settings", |kind| match kind {
        Kind::Pong(_) => Some(()),
        _ => None,
    })?;
    emit(
        json!({"event": "privacy", "shown_to": visibility.as_str_name(), "contacts": args.contacts.len()}),
    );
    client.close();
    Ok(())
}

fn presence(args: PresenceArgs) -> Result<(), String> {
    let deadline = deadline_after(args.timeout)?;
    let mut client = connect(&args.connect)?;
    client.subscribe(args.watch).map_err(described)?;
    let mut events = 0u64;
    while args.count.is_none_or(|count| events < count) {
        let Some(stanza) = next(&mut client, deadline).map_err(described)? else {
            return Err(format!(
                "timed out after {} s with {events} presence event(s)",
                args.timeout.unwrap_or_default()
            ));
        };
        match stanza.kind {
            Some(Kind::Presence(presence))
                if UserRef::user(presence.user.as_ref()) == Some(args.watch) =>
            {
                emit(json!({
                    "event": "presence",
                    "user": args.watch.to_string(),
                    "online": presence.online,
                    "last_seen_ms": presence.last_seen_ms,
                }));
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
