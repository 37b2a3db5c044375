//! The admin listener: Prometheus metrics, health and readiness, and a small JSON API that
//! `hop admin` speaks. It runs on a thread of its own, never on a shard: a scrape reads the
//! shards' atomic counters, and a request about a user goes to the user's home shard as a
//! [`Command`] that the shard answers between two turns of its loop.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 once every shard serves; 503 while starting or draining |
//! | `GET /metrics` | Prometheus text format, names prefixed `hop_` |
//! | `GET /stats` | JSON: every counter, per shard and in total |
//! | `GET /users/ID` | JSON: the user's home shard, whether online, its queue |
//! | `POST /users/ID/kick` | JSON: closes the user's connection (GoAway `KICKED`) |
//! | `PUT /log` (body: a filter) | JSON: sets the log filter |
//! | `POST /drain` | JSON: starts a lame-duck drain |
//! | `GET /cluster` | JSON: this node's view of its cluster (members, lease, counters) |
//!
//! There is no authentication: the listener belongs on a loopback or private address.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use hop_protocol::UserId;
use hop_router::{home_shard, ShardId, UserReport};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::cluster::membership::Cluster;
use crate::control::{Command, Controls, Refused};
use crate::directory::{Directory, Placement};
use crate::server::MailboxDepth;
use crate::stats::{ShardStats, Times, COMMIT_BUCKETS_US, TIME_BUCKETS, TURN_BUCKETS_US};

/// How long a request about a user waits for its shard's answer.
const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request body read (a log filter).
const REQUEST_BODY_BYTES_MAX: u64 = 4096;

/// Sets the log filter (tracing `EnvFilter` syntax); the error says why a filter is invalid.
pub type SetLogFilter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the admin listener reads and acts on.
#[derive(Clone)]
pub struct AdminState {
    pub controls: Arc<Controls>,
    /// The shards' counters and mailboxes, once the shards have started (the listener
    /// starts before them, to answer `/readyz` while the queues recover).
    pub shards: Arc<OnceLock<ShardViews>>,
    pub set_log_filter: SetLogFilter,
    /// The drain window a drain started here uses (reloaded on SIGHUP).
    pub drain_ms: Arc<AtomicU64>,
}

/// What the admin listener reads of the running shards.
#[derive(Clone)]
pub struct ShardViews {
    pub stats: Vec<Arc<ShardStats>>,
    pub mailbox_depth: MailboxDepth,
    /// Where companion devices live: on their account's home shard.
    pub directory: Arc<Directory>,
    /// This node's membership in its cluster; `None` for a single hopd.
    pub cluster: Option<Arc<Cluster>>,
    /// Registration tokens (`registration = token`).
    pub tokens: Arc<crate::tokens::Tokens>,
}

/// A running admin listener; stops when dropped.
pub struct Admin {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    pub local_addr: SocketAddr,
}

impl Admin {
    /// Binds `addr` and serves on a thread of its own.
    pub fn start(addr: SocketAddr, state: AdminState) -> std::io::Result<Self> {
        let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
        let local_addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| std::io::Error::other("the admin listener has no IP address"))?;
        let server = Arc::new(server);
        let serving = server.clone();
        let registry = registry(&state);
        let thread = std::thread::Builder::new()
            .name("hop-admin".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    respond(&state, &registry, request);
                }
            })?;
        info!(%local_addr, "admin listener: /metrics /healthz /readyz and the admin API");
        Ok(Self {
            server,
            thread: Some(thread),
            local_addr,
        })
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One answer: status, content type, body.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Answer {
    fn json(status: u16, value: &Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: format!("{value}\n"),
        }
    }

    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(status, &json!({ "error": message.into() }))
    }
}

fn respond(state: &AdminState, registry: &Registry, mut request: tiny_http::Request) {
    let method = request.method().clone();
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let mut body = String::new();
    let read = request
        .as_reader()
        .take(REQUEST_BODY_BYTES_MAX)
        .read_to_string(&mut body);
    let answer = match read {
        Ok(_) => route(state, registry, &method, &path, body.trim()),
        Err(error) => Answer::error(400, format!("cannot read the request body: {error}")),
    };
    let header = tiny_http::Header::from_bytes("Content-Type", answer.content_type)
        .expect("a static header is valid");
    let response = tiny_http::Response::from_string(answer.body)
        .with_status_code(answer.status)
        .with_header(header);
    if let Err(error) = request.respond(response) {
        warn!(%error, "admin listener: cannot answer a request");
    }
}

fn route(
    state: &AdminState,
    registry: &Registry,
    method: &tiny_http::Method,
    path: &str,
    body: &str,
) -> Answer {
    use tiny_http::Method::{Get, Post, Put};
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (Get, ["healthz"]) => Answer::text(200, "ok\n"),
        (Get, ["readyz"]) => {
            let cluster = state.shards.get().and_then(|views| views.cluster.as_ref());
            if state.controls.is_draining() {
                Answer::text(503, "draining\n")
            } else if cluster.is_some_and(|cluster| !cluster.is_member()) {
                Answer::text(503, "not a member of the cluster\n")
            } else if state.controls.is_ready() {
                Answer::text(200, "ready\n")
            } else {
                Answer::text(503, "starting\n")
            }
        }
        (Get, ["metrics"]) => {
            let mut text = String::new();
            match prometheus_client::encoding::prometheus_text::encode(&mut text, registry) {
                Ok(()) => Answer {
                    status: 200,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: text,
                },
                Err(_) => Answer::error(500, "cannot encode the metrics"),
            }
        }
        (Get, ["stats"]) => Answer::json(200, &stats_json(state)),
        (Get, ["cluster"]) => match state.shards.get().and_then(|views| views.cluster.as_ref()) {
            Some(cluster) => Answer::json(200, &cluster_json(cluster)),
            None => Answer::json(200, &json!({ "cluster": false })),
        },
        (Get, ["users", user]) => match ask_about(state, user, false) {
            Ok(value) => Answer::json(200, &value),
            Err(answer) => answer,
        },
        (Post, ["users", user, "kick"]) => match ask_about(state, user, true) {
            Ok(value) => Answer::json(200, &value),
            Err(answer) => answer,
        },
        (Put | Post, ["log"]) => {
            if body.is_empty() {
                return Answer::error(
                    400,
                    "the body must be a log filter, such as info or hop_gateway=debug",
                );
            }
            match (state.set_log_filter)(body) {
                Ok(()) => {
                    info!(filter = body, "log filter set by the operator");
                    Answer::json(200, &json!({ "log": body }))
                }
                Err(reason) => Answer::error(400, format!("invalid log filter {body:?}: {reason}")),
            }
        }
        (Post, ["tokens"]) => match state.shards.get() {
            None => Answer::error(503, "starting: try again once hopd is ready"),
            Some(views) => match views.tokens.issue(crate::shard::wall_clock_ms()) {
                Ok(token) => {
                    info!("a registration token was issued by the operator");
                    Answer::json(
                        200,
                        &json!({ "token": token, "unused": views.tokens.unused() }),
                    )
                }
                Err(error) => Answer::error(500, format!("cannot keep a new token: {error}")),
            },
        },
        (Post, ["drain"]) => {
            let window_ms = state.drain_ms.load(Ordering::Relaxed);
            let started = state.controls.start_drain(window_ms);
            if started {
                info!(window_ms, "drain requested by the operator");
            }
            Answer::json(
                200,
                &json!({ "draining": true, "started": started, "drain_ms": window_ms }),
            )
        }
        #[cfg(feature = "fault-injection")]
        (Post, ["fault", "panic", shard]) => match shard.parse::<ShardId>() {
            Ok(shard) if usize::from(shard) < state.controls.shards() => {
                match send(state, shard, Command::Panic) {
                    Ok(()) => Answer::json(200, &json!({ "panicking": shard })),
                    Err(answer) => answer,
                }
            }
            _ => Answer::error(400, format!("no shard {shard}")),
        },
        (
            _,
            ["healthz" | "readyz" | "metrics" | "stats" | "log" | "drain" | "cluster" | "tokens"],
        )
        | (_, ["users", _] | ["users", _, "kick"]) => Answer::error(405, "method not allowed"),
        _ => Answer::error(404, format!("no such admin resource: {path}")),
    }
}

/// This node's view of its cluster, for `hop admin cluster`.
/// User ids `hop admin cluster` places to show how the members share the users.
const PLACEMENT_SAMPLE: u64 = 16_384;

fn cluster_json(cluster: &Cluster) -> Value {
    let view = cluster.view();
    let this = view.this_node;
    let placed = view.placement_counts(PLACEMENT_SAMPLE);
    let members: Vec<Value> = view
        .members
        .iter()
        .zip(placed)
        .enumerate()
        .map(|(index, (member, (home, replica)))| {
            json!({
                "node_id": member.node_id,
                "advertise": member.advertise,
                "shards": member.shards,
                "server_key": hex::encode(member.server_key),
                "this_node": Some(index) == this,
                "home_of_sample": home,
                "replica_of_sample": replica,
            })
        })
        .collect();
    let stats = &cluster.stats;
    json!({
        "cluster": true,
        "node_id": cluster.settings.node_id,
        "member": this.is_some(),
        "revision": view.revision,
        "placement_sample": PLACEMENT_SAMPLE,
        "lease_ms": cluster.settings.lease_ms,
        "etcd": cluster.settings.etcd,
        "members": members,
        "joins": stats.joins.load(Ordering::Relaxed),
        "lease_renewals": stats.renewals.load(Ordering::Relaxed),
        "leases_lost": stats.leases_lost.load(Ordering::Relaxed),
        "etcd_failures": stats.etcd_failures.load(Ordering::Relaxed),
        "view_changes": stats.view_changes.load(Ordering::Relaxed),
        "links": cluster.links.as_ref().map_or_else(Vec::new, |links| {
            links
                .reports()
                .into_iter()
                .map(|link| {
                    json!({
                        "node_id": link.node_id,
                        "up": link.up,
                        "queued": link.queued,
                        "unacked": link.unacked,
                        "mails_sent": link.mails_sent,
                        "mails_resent": link.mails_resent,
                        "connects": link.connects,
                    })
                })
                .collect()
        }),
        "link_mails_sent": cluster.links.as_ref().map_or(0, |l| l.mails_sent.load(Ordering::Relaxed)),
        "link_mails_resent": cluster.links.as_ref().map_or(0, |l| l.mails_resent.load(Ordering::Relaxed)),
        "link_connects": cluster.links.as_ref().map_or(0, |l| l.reconnects.load(Ordering::Relaxed)),
    })
}

/// Asks `user`'s home shard for its report, or to kick it.
fn ask_about(state: &AdminState, user_text: &str, kick: bool) -> Result<Value, Answer> {
    let user: UserId = user_text.parse().map_err(|_| {
        Answer::error(
            400,
            format!("{user_text:?} is not a user id (32 hex digits, as `hop id` prints)"),
        )
    })?;
    let shards = state.controls.shards() as u16;
    let account = match state
        .shards
        .get()
        .map(|views| views.directory.placement(user))
    {
        Some(Placement::Companion(account)) => account,
        _ => user,
    };
    let shard = home_shard(account, shards);
    if kick {
        let (reply, answer) = sync_channel(1);
        send(state, shard, Command::Kick { user, reply })?;
        let kicked = wait(answer)?;
        Ok(json!({ "user": user.to_string(), "shard": shard, "kicked": kicked }))
    } else {
        let (reply, answer) = sync_channel(1);
        send(state, shard, Command::User { user, reply })?;
        let report: UserReport = wait(answer)?;
        Ok(json!({
            "user": user.to_string(),
            "account": account.to_string(),
            "shard": shard,
            "known": report.known,
            "online": report.online,
            "connections": u8::from(report.online),
            "last_seen_ms": report.last_seen_ms,
            "queued_messages": report.queued_messages,
            "queued_receipts": report.queued_receipts,
            "queued_bytes": report.queued_bytes,
            "inflight": report.inflight,
            "watchers": report.watchers,
        }))
    }
}

fn send(state: &AdminState, shard: ShardId, command: Command) -> Result<(), Answer> {
    state
        .controls
        .send(shard, command)
        .map_err(|refused| match refused {
            Refused::Busy => Answer::error(503, format!("shard {shard} is busy; try again")),
            Refused::NotServing => Answer::error(503, format!("shard {shard} is not serving")),
        })
}

fn wait<T>(answer: Receiver<T>) -> Result<T, Answer> {
    answer
        .recv_timeout(SHARD_ANSWER_TIMEOUT)
        .map_err(|_| Answer::error(504, "the shard did not answer in time"))
}

fn stats_json(state: &AdminState) -> Value {
    let mut totals: Vec<(&'static str, u64)> = Vec::new();
    let no_stats = Vec::new();
    let stats = state.shards.get().map_or(&no_stats, |views| &views.stats);
    let shards: Vec<Value> = stats
        .iter()
        .enumerate()
        .map(|(index, stats)| {
            let snapshot = stats.snapshot();
            if totals.is_empty() {
                totals = snapshot.iter().map(|(name, _)| (*name, 0)).collect();
            }
            for ((_, total), (_, value)) in totals.iter_mut().zip(&snapshot) {
                *total += value;
            }
            let mut object = serde_json::Map::new();
            object.insert("shard".into(), json!(index));
            for (name, value) in snapshot {
                object.insert(name.into(), json!(value));
            }
            Value::Object(object)
        })
        .collect();
    let totals: serde_json::Map<String, Value> = totals
        .into_iter()
        .map(|(name, value)| (name.to_string(), json!(value)))
        .collect();
    json!({
        "ready": state.controls.is_ready(),
        "draining": state.controls.is_draining(),
        "resident_bytes": resident_bytes(),
        "total": totals,
        "shards": shards,
    })
}

fn registry(state: &AdminState) -> Registry {
    let mut registry = Registry::with_prefix("hop");
    registry.register_collector(Box::new(Metrics {
        shards: state.shards.clone(),
        controls: state.controls.clone(),
    }));
    registry
}

/// Reads every shard's counters at each scrape.
struct Metrics {
    shards: Arc<OnceLock<ShardViews>>,
    controls: Arc<Controls>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Reads one counter of a shard.
type Field = fn(&ShardStats) -> &AtomicU64;

/// Counters labelled by shard alone: name (without `hop_` and `_total`), help, field.
const COUNTERS: &[(&str, &str, Field)] = &[
    ("connections_accepted", "Connections accepted.", |s| {
        &s.connections_accepted
    }),
    (
        "connections_refused",
        "Connections closed at once because the shard was full.",
        |s| &s.connections_refused,
    ),
    ("handshakes_completed", "Noise handshakes completed.", |s| {
        &s.handshakes_completed
    }),
    ("stanzas_in", "Stanzas received from clients.", |s| {
        &s.stanzas_in
    }),
    ("stanzas_out", "Stanzas sent to clients.", |s| {
        &s.stanzas_out
    }),
    ("received_bytes", "Bytes read from clients.", |s| {
        &s.bytes_in
    }),
    (
        "sent_bytes",
        "Bytes sealed for clients and handed to the backend.",
        |s| &s.bytes_out,
    ),
    (
        "handoffs_out",
        "Connections handed to their home shard.",
        |s| &s.handoffs_out,
    ),
    (
        "handoffs_in",
        "Connections adopted from another shard.",
        |s| &s.handoffs_in,
    ),
    ("messages_accepted", "Messages taken for delivery.", |s| {
        &s.messages_accepted
    }),
    (
        "messages_rejected",
        "Messages refused (quota, unknown user, disk).",
        |s| &s.messages_rejected,
    ),
    (
        "messages_acked",
        "Messages acked by the recipient's device (delivered).",
        |s| &s.messages_acked,
    ),
    (
        "messages_deduplicated",
        "Resent messages answered with the original's ServerAck.",
        |s| &s.messages_deduplicated,
    ),
    ("receipts_queued", "Receipts queued for senders.", |s| {
        &s.receipts_queued
    }),
    (
        "reads_refused",
        "Read receipts refused for a wrong proof.",
        |s| &s.reads_refused,
    ),
    (
        "rate_limited",
        "Sends and Reads refused because their device was over its rate.",
        |s| &s.rate_limited,
    ),
    (
        "mails_to_nodes",
        "Mails for users of another node of the cluster.",
        |s| &s.mails_to_nodes,
    ),
    (
        "mails_unroutable",
        "Mails for another node that could not reach it (refused to their sender, or dropped).",
        |s| &s.mails_unroutable,
    ),
    (
        "replicas_kept",
        "Copies of other nodes' messages kept here, as their users' replica node.",
        |s| &s.replicas_kept,
    ),
    (
        "replicas_refused",
        "Copies of other nodes' messages refused here (the user's queue was full).",
        |s| &s.replicas_refused,
    ),
    (
        "replicas_missing",
        "Messages refused to their senders because the replica node did not keep a copy (refused, unreachable, or not confirmed in time).",
        |s| &s.replicas_missing,
    ),
    (
        "handed_back",
        "Messages other nodes handed back to this one, their users' new home node, and queued.",
        |s| &s.handed_back,
    ),
    (
        "handed_back_dropped",
        "Messages handed back by other nodes and not queued (the user's queue was full).",
        |s| &s.handed_back_dropped,
    ),
    (
        "group_messages",
        "Messages sent to groups homed on this shard.",
        |s| &s.group_messages,
    ),
    (
        "group_changes",
        "Group membership changes made on this shard.",
        |s| &s.group_changes,
    ),
    (
        "group_copies_refused",
        "Members' copies of group messages and events their shards refused.",
        |s| &s.group_copies_refused,
    ),
    (
        "accounts_expired",
        "Accounts that expired, with their queues: no device of theirs was seen within account_expiry_ms.",
        |s| &s.accounts_expired,
    ),
    (
        "store_appends",
        "Records appended to the offline queue.",
        |s| &s.store_appends,
    ),
    (
        "store_deliveries",
        "Delivered records tombstoned in the offline queue.",
        |s| &s.store_deliveries,
    ),
    ("store_commits", "Offline-queue commits.", |s| {
        &s.store_commits
    }),
    ("store_fsyncs", "Offline-queue fsyncs.", |s| &s.store_fsyncs),
    (
        "store_segments_created",
        "Offline-queue segments begun: one at start, one per roll.",
        |s| &s.store_segments_created,
    ),
    (
        "store_segments_begun_on_spares",
        "Segments begun on a spare file the syncer made ahead, not created by the shard's loop.",
        |s| &s.store_segments_begun_on_spares,
    ),
    (
        "store_segment_removals_failed",
        "Compacted segments the syncer could not remove (the next start compacts them again).",
        |s| &s.store_segment_removals_failed,
    ),
    (
        "store_commit_failures",
        "Offline-queue commits that failed (disk full, IO error).",
        |s| &s.store_commit_failures,
    ),
    (
        "store_refusals",
        "Items the offline queue refused (over quota).",
        |s| &s.store_refusals,
    ),
    (
        "store_waits",
        "Times the shard's loop waited for its syncer: the disk was behind the traffic.",
        |s| &s.store_waits,
    ),
    (
        "store_reads_off_loop",
        "Reads of the offline queue that needed the disk, made on the shard's reader thread.",
        |s| &s.store_reads_off_loop,
    ),
    (
        "shard_restarts",
        "Times the shard panicked and its supervisor restarted it.",
        |s| &s.shard_restarts,
    ),
    (
        "cluster_redirects",
        "Connections sent to their home node of the cluster (GoAway REDIRECT).",
        |s| &s.cluster_redirects,
    ),
    (
        "cluster_unavailable",
        "Connections sent away while this node was no member of its cluster.",
        |s| &s.cluster_unavailable,
    ),
    (
        "links_in",
        "Node links from other members of the cluster accepted.",
        |s| &s.links_in,
    ),
    (
        "link_mails_in",
        "Mails taken from other nodes' links (each once).",
        |s| &s.link_mails_in,
    ),
    (
        "keeps_skipped",
        "Items acked before their batch reached the disk (never written).",
        |s| &s.keeps_skipped,
    ),
    (
        "idle_polls_woken",
        "Polls before sleeping (idle_poll_us) that found work: wake-ups the shard did not pay.",
        |s| &s.idle_polls_woken,
    ),
    (
        "idle_polls_slept",
        "Polls before sleeping (idle_poll_us) that found nothing, after which the shard blocked.",
        |s| &s.idle_polls_slept,
    ),
    (
        "binding_write_errors",
        "Account or presence records that could not be written.",
        |s| &s.binding_write_errors,
    ),
    (
        "mailbox_backpressure",
        "Times a full mailbox paused a connection.",
        |s| &s.mail_backpressure,
    ),
    (
        "link_backpressure",
        "Mails for another node that waited in the shard because its link's queue was full.",
        |s| &s.link_backpressure,
    ),
];

/// A histogram of every shard: name, help, bucket bounds (µs) and where its counts are.
type Histogram = (
    &'static str,
    &'static str,
    &'static [u64; TIME_BUCKETS],
    fn(&ShardStats) -> &Times,
);

/// Gauges labelled by shard alone.
const GAUGES: &[(&str, &str, Field)] = &[
    (
        "connections_open",
        "Connections held, closing ones included.",
        |s| &s.connections_open,
    ),
    (
        "connections_handshaking",
        "Connections in their handshake.",
        |s| &s.connections_handshaking,
    ),
    (
        "handshakes_waiting",
        "Connections whose handshake input waits: for the handshaker thread (handshake_thread), or for a turn's cap (handshakes_per_turn).",
        |s| &s.handshakes_waiting,
    ),
    (
        "send_buffered_bytes",
        "Bytes the shard's connections hold for writing: what send_buffers_bytes_max bounds.",
        |s| &s.send_buffered_bytes,
    ),
    (
        "queue_items",
        "Messages and receipts queued for their devices.",
        |s| &s.queue_items,
    ),
    ("queue_bytes", "Body bytes queued for their devices.", |s| {
        &s.queue_bytes
    }),
    (
        "store_disk_bytes",
        "Bytes of the offline queue's segment files.",
        |s| &s.store_disk_bytes,
    ),
];

/// Handshakes that failed, by reason.
const HANDSHAKE_FAILURES: &[(&str, Field)] = &[
    ("bad_message", |s| &s.handshakes_failed),
    ("timeout", |s| &s.handshake_timeouts),
    ("outdated_client", |s| &s.clients_outdated),
    ("abandoned", |s| &s.handshakes_abandoned),
];

/// Connections refused at accept by admission, by reason (`RefusalReason::name`).
const ADMISSION_REFUSALS: &[(&str, Field)] = &[
    ("busy", |s| &s.admission_busy),
    ("address_rate", |s| &s.admission_address_rate),
    ("address_handshakes", |s| &s.admission_address_handshakes),
    ("address_connections", |s| &s.admission_address_connections),
];

/// Connections the server closed, by reason.
const CLOSES: &[(&str, Field)] = &[
    ("idle", |s| &s.idle_timeouts),
    ("protocol_error", |s| &s.protocol_errors),
    ("not_reading", |s| &s.send_overflows),
    ("send_budget", |s| &s.send_budget_closes),
    ("not_registered", |s| &s.registrations_refused),
    ("kicked", |s| &s.kicks),
    ("drain", |s| &s.drain_closes),
];

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_process(&mut encoder)?;
        match self.shards.get() {
            Some(views) => Self::encode_shards(views, &mut encoder),
            None => Ok(()), // still starting: no shard to tell of yet
        }
    }
}

impl Metrics {
    fn encode_process(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in [
            (
                "ready",
                "1 once every shard serves and no drain has started.",
                i64::from(self.controls.is_ready()),
            ),
            (
                "draining",
                "1 while a lame-duck drain runs.",
                i64::from(self.controls.is_draining()),
            ),
            (
                "process_resident_bytes",
                "Resident memory of the hopd process.",
                resident_bytes().map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            ),
        ] {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(metric)?;
        }
        Ok(())
    }

    /// Each node link's counters, labelled by the peer's node id.
    fn encode_links(
        views: &ShardViews,
        encoder: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let Some(links) = views.cluster.as_ref().and_then(|c| c.links.as_ref()) else {
            return Ok(());
        };
        let reports = links.reports();
        type Pick = fn(&crate::cluster::links::LinkReport) -> u64;
        let counters: [(&str, &str, Pick); 3] = [
            (
                "link_mails_sent",
                "Mails sent on the link to a node of the cluster.",
                |l| l.mails_sent,
            ),
            (
                "link_mails_resent",
                "Mails sent again on the link after it connected again.",
                |l| l.mails_resent,
            ),
            (
                "link_connects",
                "Times the link to a node connected.",
                |l| l.connects,
            ),
        ];
        for (name, help, pick) in counters {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for link in &reports {
                let labels = [("node", link.node_id.clone())];
                ConstCounter::new(pick(link)).encode(metric.encode_family(&labels)?)?;
            }
        }
        let gauges: [(&str, &str, Pick); 3] = [
            ("link_up", "1 while the link to a node is connected.", |l| {
                u64::from(l.up)
            }),
            (
                "link_queued",
                "Mails waiting for the link to a node (at most 16,384; past it work is refused).",
                |l| l.queued,
            ),
            (
                "link_unacked",
                "Mails sent to a node and not acked yet.",
                |l| l.unacked,
            ),
        ];
        for (name, help, pick) in gauges {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for link in &reports {
                let labels = [("node", link.node_id.clone())];
                let value = i64::try_from(pick(link)).unwrap_or(i64::MAX);
                ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn encode_shards(
        views: &ShardViews,
        encoder: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        Self::encode_links(views, encoder)?;
        let load = |field: Field, stats: &ShardStats| field(stats).load(Ordering::Relaxed);
        for (name, help, field) in COUNTERS {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (shard, stats) in views.stats.iter().enumerate() {
                let labels = [("shard", shard.to_string())];
                ConstCounter::new(load(*field, stats)).encode(metric.encode_family(&labels)?)?;
            }
        }
        for (name, help, field) in GAUGES {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (shard, stats) in views.stats.iter().enumerate() {
                let labels = [("shard", shard.to_string())];
                let value = i64::try_from(load(*field, stats)).unwrap_or(i64::MAX);
                ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
            }
        }
        for (name, help, reasons) in [
            (
                "handshakes_failed",
                "Handshakes that failed, by reason.",
                HANDSHAKE_FAILURES,
            ),
            (
                "closes",
                "Connections the server closed, by reason.",
                CLOSES,
            ),
            (
                "admission_refused",
                "New connections refused before their handshake, by reason.",
                ADMISSION_REFUSALS,
            ),
        ] {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (shard, stats) in views.stats.iter().enumerate() {
                for (reason, field) in reasons {
                    let labels = [
                        ("shard", shard.to_string()),
                        ("reason", (*reason).to_string()),
                    ];
                    ConstCounter::new(load(*field, stats))
                        .encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        let histograms: [Histogram; 2] = [
            (
                "store_commit_seconds",
                "Time of the offline-queue commits that fsynced (write and fsync).",
                &COMMIT_BUCKETS_US,
                |stats| &stats.commit_times,
            ),
            (
                "loop_turn_seconds",
                "Time each turn of a shard's loop worked, waiting excluded: what every message the turn carried waited for.",
                &TURN_BUCKETS_US,
                |stats| &stats.turn_times,
            ),
        ];
        for (name, help, bounds, field) in histograms {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (shard, stats) in views.stats.iter().enumerate() {
                let times = field(stats);
                let buckets: Vec<(f64, u64)> = times
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(index, count)| {
                        let bound = bounds
                            .get(index)
                            .map_or(f64::INFINITY, |micros| *micros as f64 / 1e6);
                        (bound, count.load(Ordering::Relaxed))
                    })
                    .collect();
                let count = buckets.iter().map(|(_, count)| count).sum();
                let sum = times.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
                let labels = [("shard", shard.to_string())];
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum, count, &buckets, None,
                    )?;
            }
        }
        let shards = views.stats.len() as ShardId;
        let mut metric = encoder.encode_descriptor(
            "mailbox_depth",
            "Mails waiting in the mailbox from one shard to another.",
            None,
            MetricType::Gauge,
        )?;
        for from in 0..shards {
            for to in (0..shards).filter(|to| *to != from) {
                let labels = [("from", from.to_string()), ("to", to.to_string())];
                let depth = i64::try_from((views.mailbox_depth)(from, to)).unwrap_or(i64::MAX);
                ConstGauge::new(depth).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The process's resident memory, where the OS tells it (Linux `/proc`).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
