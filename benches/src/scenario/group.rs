//! `group`: fan-out. G groups of M members; one member of each group (its sender) sends to
//! the group with a bounded window, and every other member receives each message.
//!
//! hop: a real group. The sender creates it (`GroupChange` CREATE naming the others), the run
//! waits for the `GroupInfo` answer and every member's create event, then the sender Sends to
//! the group's id. MQTT: a topic per group, its M − 1 members subscribed at QoS 0 and the
//! sender publishing to it at QoS 0, as `throughput` does.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hop_protocol::outbox::random_nonzero;
use hop_protocol::wire::{group_change, GroupChange, GROUP_MEMBERS_MAX};
use hop_protocol::UserId;

use super::{
    clients, cpu_report, encode_body, engine_report, open_all, send, server_cpu, Client, Common,
    Counters, BODY_BYTES, SETUP_TIMEOUT, STREAM_STALL_MS,
};
use crate::conn::Event;
use crate::engine::{Engine, Outcome, Target};
use crate::latency::LatencyRecorder;
use crate::procfs::cpu_seconds_self;
use crate::report::Report;

#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// Members of each group, its sender included: a message reaches `members - 1`.
    pub members: usize,
    pub groups: usize,
    /// Messages per group in flight: sent, not yet delivered to every other member.
    pub window: u64,
    pub warmup_ms: u64,
    pub duration_ms: u64,
}

/// G groups of M members, each group's sender sending while its window allows. Measures
/// delivered member-messages per second (each Deliver to a member once), sends per second,
/// and the fan-out time of each message sent after the warm-up: from its send to the Deliver
/// to its last member.
pub fn group(common: &Common, options: &GroupOptions) -> Result<Report, String> {
    let members = options.members;
    if members < 2 || options.groups == 0 || options.window == 0 {
        return Err("--members must be at least 2, --groups and --window at least 1".into());
    }
    let hop = matches!(common.target, Target::Hop { .. });
    if hop && members > GROUP_MEMBERS_MAX {
        return Err(format!(
            "a hop group has at most {GROUP_MEMBERS_MAX} members, its sender included"
        ));
    }
    let count = members * options.groups;
    let mut clients = clients(common, count)?;
    if !hop {
        // Each group's members subscribe to its topic; the sender keeps its own.
        for g in 0..options.groups {
            let topic = group_topic(&clients[g * members]);
            for member in &mut clients[g * members + 1..(g + 1) * members] {
                member.topic.clone_from(&topic);
            }
        }
    }
    let mut engine = common.engine(count as u64)?;
    let conns = open_all(&mut engine, &clients, true, Some(common.qos()))?;
    let roles = Roles::new(&conns, members);
    let addressees: Vec<Client> = if hop {
        create_groups(&mut engine, &clients, &conns, &roles, members)?
            .into_iter()
            .map(|id| Client {
                key: None,
                user: Some(id),
                client_id: String::new(),
                topic: String::new(),
            })
            .collect()
    } else {
        (0..options.groups)
            .map(|g| Client {
                key: None,
                user: None,
                client_id: String::new(),
                topic: group_topic(&clients[g * members]),
            })
            .collect()
    };
    let mut windows: Vec<FanOutWindow> = (0..options.groups)
        .map(|_| FanOutWindow::new(members - 1, options.window))
        .collect();
    let mut recorder = LatencyRecorder::new();
    let mut counters = Counters::default();
    let mut outcomes = Vec::new();
    let (mut sent, mut delivered, mut lost, mut late) = (0u64, 0u64, 0u64, 0u64);
    let stall_ns = STREAM_STALL_MS * 1_000_000;
    let start = Instant::now();
    let warmup_ns = options.warmup_ms * 1_000_000;
    let end_ns = warmup_ns + options.duration_ms * 1_000_000;
    let mut last_stall_check_ns = 0;
    let mut measured: Option<Snapshot> = None;
    loop {
        let now_ns = start.elapsed().as_nanos() as u64;
        if measured.is_none() && now_ns >= warmup_ns {
            measured = Some(Snapshot {
                sent,
                delivered,
                bytes_written: engine.bytes_written,
                bytes_read: engine.bytes_read,
                generator_cpu: cpu_seconds_self(),
                server_cpu: server_cpu(common),
                at: Instant::now(),
            });
        }
        if now_ns >= end_ns {
            break;
        }
        if now_ns - last_stall_check_ns >= stall_ns {
            last_stall_check_ns = now_ns;
            for window in &mut windows {
                lost += window.give_up_if_stalled(now_ns, stall_ns);
            }
        }
        for (g, window) in windows.iter_mut().enumerate() {
            while window.may_send() {
                let k = window.sent(now_ns);
                let body = encode_body(k, now_ns, g as u32);
                send(
                    &mut engine,
                    conns[g * members],
                    &addressees[g],
                    body,
                    common.qos(),
                );
                sent += 1;
            }
        }
        engine
            .turn(Some(Duration::from_millis(10)), &mut outcomes)
            .map_err(|e| e.to_string())?;
        let received_ns = start.elapsed().as_nanos() as u64;
        for (conn, outcome) in outcomes.drain(..) {
            let Some(role) = roles.of(conn) else {
                continue;
            };
            let Some((k, _, stream)) = counters.count(&outcome) else {
                continue;
            };
            if role.member == 0 || stream as usize != role.group {
                *counters
                    .failures
                    .entry("deliver_to_non_member")
                    .or_default() += 1;
                continue;
            }
            match windows[role.group].delivered(k, role.member - 1, received_ns) {
                Delivery::Counted => delivered += 1,
                Delivery::Completed { sent_ns } => {
                    delivered += 1;
                    if sent_ns >= warmup_ns {
                        recorder.record_intended(sent_ns, received_ns);
                    }
                }
                Delivery::Late => late += 1,
                Delivery::Duplicate => {
                    *counters.failures.entry("duplicate_deliver").or_default() += 1
                }
                Delivery::Unknown => *counters.failures.entry("unknown_message").or_default() += 1,
            }
        }
    }
    let before = measured.ok_or("the run ended before its warm-up")?;
    let wall = before.at.elapsed().as_secs_f64();
    let mut report = common.report("group");
    engine_report(&mut report, &engine);
    report.figure("members", members as f64, "members per group");
    report.figure("groups", options.groups as f64, "groups");
    report.figure(
        "recipients_per_message",
        (members - 1) as f64,
        "members (the sender's own account gets no copy)",
    );
    report.figure("window", options.window as f64, "messages per group");
    report.figure("body_bytes", BODY_BYTES as f64, "bytes");
    report.figure("measured_seconds", wall, "s");
    report.figure(
        "member_messages_per_second",
        (delivered - before.delivered) as f64 / wall,
        "deliveries/s",
    );
    report.figure(
        "sends_per_second",
        (sent - before.sent) as f64 / wall,
        "msg/s",
    );
    report.figure("fanouts_measured", recorder.len() as f64, "messages");
    report.figure(
        "bytes_to_server_per_second",
        (engine.bytes_written - before.bytes_written) as f64 / wall,
        "B/s",
    );
    report.figure(
        "bytes_from_server_per_second",
        (engine.bytes_read - before.bytes_read) as f64 / wall,
        "B/s",
    );
    report.figure(
        "sent",
        sent as f64,
        "messages (the whole run, as send_acks)",
    );
    report.figure("lost", lost as f64, "deliveries");
    report.figure("late", late as f64, "deliveries");
    counters.into_report(&mut report);
    report.latency = Some(recorder.summary());
    report.latency_curve = recorder.percentile_curve();
    report.notes.push(
        "latency rows: fan-out time, from a message's send to the Deliver to its last member, of the messages sent after the warm-up (closed loop: counted from the actual send)".into(),
    );
    if !hop {
        report
            .notes
            .push("mqtt: QoS 0 publish and subscriptions, one topic per group".into());
    }
    cpu_report(
        &mut report,
        common,
        before.generator_cpu,
        before.server_cpu,
        wall,
    );
    Ok(report)
}

/// The counters at the end of the warm-up.
struct Snapshot {
    sent: u64,
    delivered: u64,
    bytes_written: u64,
    bytes_read: u64,
    generator_cpu: f64,
    server_cpu: Option<f64>,
    at: Instant,
}

/// MQTT: the topic of the group whose sender is `sender`.
fn group_topic(sender: &Client) -> String {
    format!("g/{}", sender.client_id)
}

/// Which group and member each connection is: clients are laid out group by group, member 0
/// of each being its sender.
#[derive(Debug, Clone, Copy)]
struct Role {
    group: usize,
    member: usize,
}

struct Roles {
    by_conn: Vec<Option<Role>>,
}

impl Roles {
    fn new(conns: &[usize], members: usize) -> Self {
        let mut by_conn = vec![None; conns.iter().max().map_or(0, |c| c + 1)];
        for (client, conn) in conns.iter().enumerate() {
            by_conn[*conn] = Some(Role {
                group: client / members,
                member: client % members,
            });
        }
        Self { by_conn }
    }

    fn of(&self, conn: usize) -> Option<Role> {
        self.by_conn.get(conn).copied().flatten()
    }
}

/// hop: each group's sender creates it with the other members as members; waits for every
/// `GroupInfo` answer and every member's create event (each acked as it arrives). Returns the
/// groups' ids.
fn create_groups(
    engine: &mut Engine,
    clients: &[Client],
    conns: &[usize],
    roles: &Roles,
    members: usize,
) -> Result<Vec<UserId>, String> {
    let groups = clients.len() / members;
    let mut ids = Vec::with_capacity(groups);
    for g in 0..groups {
        let sender = clients[g * members]
            .user
            .expect("hop clients have user ids");
        let nonce = random_nonzero().map_err(|_| "no randomness for a group's nonce")?;
        let others = clients[g * members + 1..(g + 1) * members]
            .iter()
            .filter_map(|member| member.user)
            .map(Into::into)
            .collect();
        engine.change_group(
            conns[g * members],
            GroupChange {
                op: group_change::Op::Create as i32,
                members: others,
                name: format!("hop-bench {g}"),
                nonce,
                ..GroupChange::default()
            },
        );
        ids.push(UserId::of_group(sender, nonce));
    }
    let mut answered = vec![false; groups];
    let (mut answers, mut events) = (0, 0);
    let mut outcomes = Vec::new();
    let deadline = Instant::now() + SETUP_TIMEOUT;
    // Every member, the sender included, is told of the create.
    while answers < groups || events < clients.len() {
        if Instant::now() > deadline {
            return Err(format!(
                "in {SETUP_TIMEOUT:?}, {answers} of {groups} groups were created and \
                 {events} of {} members told",
                clients.len()
            ));
        }
        engine
            .turn(Some(Duration::from_millis(10)), &mut outcomes)
            .map_err(|e| e.to_string())?;
        for (conn, outcome) in outcomes.drain(..) {
            let Some(role) = roles.of(conn) else {
                continue;
            };
            match outcome {
                Outcome::Event(Event::GroupInfo { group }) => {
                    if role.member != 0 || group != Some(ids[role.group]) || answered[role.group] {
                        return Err(format!(
                            "group {}'s create was answered with another group",
                            role.group
                        ));
                    }
                    answered[role.group] = true;
                    answers += 1;
                }
                Outcome::Event(Event::GroupEvent) => events += 1,
                Outcome::Event(Event::ServerError { code, .. }) => {
                    return Err(format!(
                        "the server refused group {}'s create with error code {code}",
                        role.group
                    ));
                }
                Outcome::Failed(failure) => {
                    return Err(format!(
                        "a client failed while the groups were created: {}",
                        failure.name()
                    ));
                }
                Outcome::Event(_) => {}
            }
        }
    }
    Ok(ids)
}

/// What a Deliver was to its group's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// The message's first copy to this member; others are still due.
    Counted,
    /// The first copy to this member, and the last member the message had not reached.
    Completed { sent_ns: u64 },
    /// This member already had this message.
    Duplicate,
    /// A message already complete or given up as stalled: not counted.
    Late,
    /// A message number the sender has not sent: the server's error.
    Unknown,
}

/// One group's messages in flight, numbered from 0 in send order, and which members each has
/// reached (a bit per member, so a copy counts once whatever the order of arrival).
///
/// The window rule, the same on every target: the sender may send while fewer than `window`
/// of its messages have not reached every other member. Server answers hold no slot (hop's
/// ServerAck waits until every member's copy is durable; MQTT QoS 0 has none), as in
/// `throughput`. A window that makes no progress for the stall time gives up its messages:
/// their missing copies count as lost and they leave the window (a QoS 0 broker may drop
/// messages; a lost one must not hold its slot for ever).
#[derive(Debug)]
struct FanOutWindow {
    recipients: usize,
    window: u64,
    /// The number of `in_flight[0]`.
    first: u64,
    in_flight: VecDeque<InFlight>,
    /// Messages in `in_flight` not yet done.
    pending: u64,
    sent: u64,
    /// The last delivery, first send after an idle spell, or give-up.
    progress_ns: u64,
    /// Member sets of retired messages, for reuse: sending allocates nothing once warm.
    spare: Vec<Vec<u64>>,
}

#[derive(Debug)]
struct InFlight {
    sent_ns: u64,
    reached: Vec<u64>,
    reached_count: usize,
    done: bool,
}

impl FanOutWindow {
    fn new(recipients: usize, window: u64) -> Self {
        assert!(recipients > 0 && window > 0, "recipients and window");
        Self {
            recipients,
            window,
            first: 0,
            in_flight: VecDeque::new(),
            pending: 0,
            sent: 0,
            progress_ns: 0,
            spare: Vec::new(),
        }
    }

    fn may_send(&self) -> bool {
        self.pending < self.window
    }

    /// A message leaves at `now_ns`; returns its number.
    fn sent(&mut self, now_ns: u64) -> u64 {
        debug_assert!(self.may_send());
        if self.pending == 0 {
            // Nothing was outstanding: the stall clock starts now.
            self.progress_ns = now_ns;
        }
        let mut reached = self
            .spare
            .pop()
            .unwrap_or_else(|| vec![0; self.recipients.div_ceil(64)]);
        reached.fill(0);
        self.in_flight.push_back(InFlight {
            sent_ns: now_ns,
            reached,
            reached_count: 0,
            done: false,
        });
        self.pending += 1;
        self.sent += 1;
        self.sent - 1
    }

    /// Message `k` reached `recipient` (0 ..= members − 2) at `now_ns`.
    fn delivered(&mut self, k: u64, recipient: usize, now_ns: u64) -> Delivery {
        assert!(recipient < self.recipients, "a recipient of this group");
        if k >= self.sent {
            return Delivery::Unknown;
        }
        let Some(message) = k
            .checked_sub(self.first)
            .and_then(|at| self.in_flight.get_mut(at as usize))
            .filter(|message| !message.done)
        else {
            return Delivery::Late;
        };
        let (word, bit) = (recipient / 64, 1u64 << (recipient % 64));
        if message.reached[word] & bit != 0 {
            return Delivery::Duplicate;
        }
        message.reached[word] |= bit;
        message.reached_count += 1;
        self.progress_ns = now_ns;
        if message.reached_count < self.recipients {
            return Delivery::Counted;
        }
        message.done = true;
        let sent_ns = message.sent_ns;
        self.pending -= 1;
        self.retire_done();
        Delivery::Completed { sent_ns }
    }

    /// Gives up every message in flight if nothing progressed for `stall_ns`; returns the
    /// copies that never arrived.
    fn give_up_if_stalled(&mut self, now_ns: u64, stall_ns: u64) -> u64 {
        if self.pending == 0 || now_ns.saturating_sub(self.progress_ns) < stall_ns {
            return 0;
        }
        let mut lost = 0;
        for message in self.in_flight.iter_mut().filter(|m| !m.done) {
            lost += (self.recipients - message.reached_count) as u64;
            message.done = true;
        }
        self.pending = 0;
        self.progress_ns = now_ns;
        self.retire_done();
        lost
    }

    fn retire_done(&mut self) {
        while self.in_flight.front().is_some_and(|message| message.done) {
            if let Some(message) = self.in_flight.pop_front() {
                self.spare.push(message.reached);
            }
            self.first += 1;
        }
        debug_assert!(self.pending <= self.in_flight.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 70 recipients (two words of bits): copies counted once each in any order; a message
    /// completes at its last recipient, and the window reopens then.
    #[test]
    fn fan_out_counts_each_member_once_and_completes_at_the_last() {
        let mut window = FanOutWindow::new(70, 2);
        assert_eq!(window.sent(100), 0);
        assert_eq!(window.sent(200), 1);
        assert!(!window.may_send(), "two messages fill a window of 2");
        for recipient in (0..70).rev() {
            let expected = if recipient == 0 {
                Delivery::Completed { sent_ns: 200 }
            } else {
                Delivery::Counted
            };
            assert_eq!(window.delivered(1, recipient, 1_000), expected);
        }
        assert_eq!(window.delivered(1, 5, 1_001), Delivery::Late, "complete");
        assert!(window.may_send(), "message 1 left the window");
        assert_eq!(window.delivered(0, 69, 1_002), Delivery::Counted);
        assert_eq!(window.delivered(0, 69, 1_003), Delivery::Duplicate);
        assert_eq!(window.delivered(7, 0, 1_004), Delivery::Unknown);
        for recipient in 0..69 {
            window.delivered(0, recipient, 2_000);
        }
        assert_eq!(window.in_flight.len(), 0, "both retired");
        assert_eq!(window.sent(3_000), 2);
        assert_eq!(window.spare.len(), 1, "a retired member set was reused");
    }

    /// Nothing arrives for the stall time: the missing copies are lost, the window reopens,
    /// and copies that come later are late, not counted.
    #[test]
    fn fan_out_gives_up_a_stalled_window() {
        let stall_ns = 1_000;
        let mut window = FanOutWindow::new(3, 2);
        window.sent(0);
        window.sent(0);
        assert!(!window.may_send());
        window.delivered(0, 0, 600);
        assert_eq!(
            window.give_up_if_stalled(1_500, stall_ns),
            0,
            "progress at 600"
        );
        assert_eq!(window.give_up_if_stalled(1_600, stall_ns), 2 + 3);
        assert!(window.may_send());
        assert_eq!(window.delivered(1, 2, 1_700), Delivery::Late);
        assert_eq!(
            window.give_up_if_stalled(10_000, stall_ns),
            0,
            "nothing in flight"
        );
        // An idle window's stall clock starts at its next send.
        window.sent(20_000);
        assert_eq!(window.give_up_if_stalled(20_500, stall_ns), 0);
        assert_eq!(window.give_up_if_stalled(21_000, stall_ns), 3);
    }
}
