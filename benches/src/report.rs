//! What a run reports: a table on stdout and, with `--json FILE`, every number with the
//! command line and the machine it was measured on.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::Serialize;

use crate::engine::ServerSpread;
use crate::latency::LatencySummary;
use crate::procfs::{MachineInfo, MemoryPerConnection, MemorySample};

/// One measured number, its unit in the name's suffix and in `unit`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
}

/// CPU time a process used over the measured interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuUse {
    pub processes: u32,
    pub cpu_seconds: f64,
    pub wall_seconds: f64,
    /// `cpu_seconds / wall_seconds`: 1.0 is one core busy all the time.
    pub cores_busy: f64,
}

impl CpuUse {
    pub fn new(processes: u32, cpu_seconds: f64, wall_seconds: f64) -> Self {
        Self {
            processes,
            cpu_seconds,
            wall_seconds,
            cores_busy: if wall_seconds > 0.0 {
                cpu_seconds / wall_seconds
            } else {
                0.0
            },
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    /// `hop` or `mqtt`.
    pub target: String,
    pub server: String,
    pub command_line: Vec<String>,
    pub started_unix_s: u64,
    pub machine: MachineInfo,
    pub figures: Vec<Figure>,
    pub latency: Option<LatencySummary>,
    /// (percentile, µs) points of the latency curve.
    pub latency_curve: Vec<(f64, f64)>,
    /// Connections that failed or ended, by kind.
    pub failures: BTreeMap<String, u64>,
    /// hop: connections a node of a cluster sent to the user's home node (GoAway REDIRECT)
    /// that the generator followed; a client redirected twice counts twice. 0 against a single
    /// server.
    pub redirects: u64,
    /// Per server named by `--server`, in order: the connections opened to it first (client
    /// i's to server i mod n), and how many of those were redirected to another node.
    pub spread: Vec<ServerSpread>,
    /// hop: refusals at admission (a refusal frame in place of handshake message 2) that the
    /// generator waited out, by reason; each client connected again after the wait, and one
    /// refused twice counts twice. Not failures: the server was limiting.
    pub admission_refused: BTreeMap<String, u64>,
    /// hop: Sends refused for the sender's rate (Error `RATE_LIMITED`), each sent again once
    /// the wait it named had passed; a message refused twice counts twice. Not failures.
    pub rate_limited: u64,
    pub generator_cpu: CpuUse,
    /// Present when `--server-pid` was given.
    pub server_cpu: Option<CpuUse>,
    pub memory_before: Option<MemorySample>,
    pub memory_after: Option<MemorySample>,
    pub memory_per_connection: Option<MemoryPerConnection>,
    /// (seconds since start, connections open) samples, for `ceiling`.
    pub connections_over_time: Vec<(f64, u64)>,
    /// Things the reader must know to trust the figures (a saturated generator, a limit hit).
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str, target: &str, server: &str) -> Self {
        Self {
            scenario: scenario.to_string(),
            target: target.to_string(),
            server: server.to_string(),
            command_line: std::env::args().collect(),
            started_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            machine: MachineInfo::read(),
            figures: Vec::new(),
            latency: None,
            latency_curve: Vec::new(),
            failures: BTreeMap::new(),
            redirects: 0,
            spread: Vec::new(),
            admission_refused: BTreeMap::new(),
            rate_limited: 0,
            generator_cpu: CpuUse::default(),
            server_cpu: None,
            memory_before: None,
            memory_after: None,
            memory_per_connection: None,
            connections_over_time: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn figure(&mut self, name: &str, value: f64, unit: &str) {
        self.figures.push(Figure {
            name: name.to_string(),
            value,
            unit: unit.to_string(),
        });
    }

    /// The value of figure `name`, if measured.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    }

    /// The human summary.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        for figure in &self.figures {
            rows.push((
                figure.name.clone(),
                format!("{} {}", human(figure.value), figure.unit),
            ));
        }
        if let Some(latency) = &self.latency {
            for (name, value) in [
                ("latency p50", latency.p50_us),
                ("latency p90", latency.p90_us),
                ("latency p99", latency.p99_us),
                ("latency p99.9", latency.p999_us),
                ("latency max", latency.max_us),
            ] {
                rows.push((name.to_string(), format!("{} µs", human(value))));
            }
        }
        if self.spread.len() > 1 {
            for spread in &self.spread {
                rows.push((
                    format!("first connects: {}", spread.server),
                    format!(
                        "{} connections, {} redirected",
                        spread.first_connects, spread.redirected
                    ),
                ));
            }
        }
        if self.target == "hop" {
            rows.push((
                "redirects".into(),
                format!("{} connections", self.redirects),
            ));
            if self.admission_refused.is_empty() {
                rows.push(("admission refused".into(), "0 connections".into()));
            }
            for (reason, count) in &self.admission_refused {
                rows.push((
                    format!("admission refused: {reason}"),
                    format!("{count} connections (waited out)"),
                ));
            }
            rows.push((
                "rate limited".into(),
                format!("{} sends (sent again)", self.rate_limited),
            ));
        }
        for (kind, count) in &self.failures {
            rows.push((format!("failed: {kind}"), count.to_string()));
        }
        if let Some(per) = &self.memory_per_connection {
            for (label, figure) in per.figures() {
                let value = match figure {
                    Ok(bytes) => format!("{bytes:.0} bytes"),
                    Err(why) => format!("not measured ({why})"),
                };
                rows.push((label.into(), value));
            }
        }
        rows.push((
            "generator CPU".into(),
            format!(
                "{:.2} cores ({} process(es), {:.1} s CPU in {:.1} s)",
                self.generator_cpu.cores_busy,
                self.generator_cpu.processes,
                self.generator_cpu.cpu_seconds,
                self.generator_cpu.wall_seconds
            ),
        ));
        if let Some(server) = &self.server_cpu {
            rows.push((
                "server CPU".into(),
                format!("{:.2} cores", server.cores_busy),
            ));
        }
        let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
        let mut text = format!(
            "hop-bench {} against {} at {}\n",
            self.scenario, self.target, self.server
        );
        for (name, value) in rows {
            text.push_str(&format!("  {name:<width$}  {value}\n"));
        }
        for note in &self.notes {
            text.push_str(&format!("  note: {note}\n"));
        }
        if self.is_limited() {
            text.push_str(
                "  note: the server was limiting (refusals at admission, or sends over the \
                 sender's rate): these figures measure its limits, not its capacity\n",
            );
        }
        text
    }

    /// True if the server refused the generator at admission or for a sender's rate.
    pub fn is_limited(&self) -> bool {
        !self.admission_refused.is_empty() || self.rate_limited > 0
    }

    pub fn write_json(&self, path: &Path) -> io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        std::fs::write(path, text + "\n")
    }
}

/// A number with thousands separators, one decimal below 100.
pub fn human(value: f64) -> String {
    if value.abs() < 100.0 {
        return format!("{value:.1}");
    }
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 {
        format!("-{grouped}")
    } else {
        grouped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::LatencyRecorder;

    #[test]
    fn json_carries_every_number_and_the_machine() {
        let mut report = Report::new("latency", "hop", "127.0.0.1:7000");
        report.figure("messages_per_second", 300_000.0, "msg/s");
        let mut recorder = LatencyRecorder::new();
        recorder.record_intended(0, 1_500_000);
        report.latency = Some(recorder.summary());
        report.latency_curve = recorder.percentile_curve();
        report.failures.insert("refused".into(), 3);
        report.generator_cpu = CpuUse::new(1, 5.0, 10.0);
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        for key in [
            "scenario",
            "target",
            "server",
            "command_line",
            "started_unix_s",
            "machine",
            "figures",
            "latency",
            "latency_curve",
            "failures",
            "redirects",
            "spread",
            "generator_cpu",
            "server_cpu",
            "memory_per_connection",
            "connections_over_time",
            "notes",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["figures"][0]["name"], "messages_per_second");
        assert_eq!(json["figures"][0]["value"], 300_000.0);
        assert_eq!(json["latency"]["count"], 1);
        assert_eq!(json["failures"]["refused"], 3);
        assert_eq!(json["generator_cpu"]["cores_busy"], 0.5);
        for key in ["kernel", "cpus", "nofile_hard", "sysctls"] {
            assert!(json["machine"].get(key).is_some(), "machine lacks {key}");
        }
        assert!(json["machine"]["sysctls"]
            .get("net.ipv4.ip_local_port_range")
            .is_some());
    }

    #[test]
    fn table_lists_figures_and_generator_cpu() {
        let mut report = Report::new("throughput", "hop", "x");
        report.figure("messages_per_second", 1_234_567.0, "msg/s");
        report.redirects = 25;
        let table = report.table();
        assert!(table.contains("1,234,567 msg/s"), "{table}");
        assert!(table.contains("redirects"), "{table}");
        assert!(table.contains("25 connections"), "{table}");
        assert!(table.contains("generator CPU"));
        assert_eq!(human(12.345), "12.3");
        assert!(!table.contains("per connection"), "{table}");
        assert!(
            !table.contains("first connects"),
            "one server: no spread rows"
        );
    }

    #[test]
    fn table_shows_the_spread_over_several_servers() {
        let mut report = Report::new("throughput", "hop", "127.0.0.2:7788,127.0.0.3:7788");
        for (server, first_connects, redirected) in
            [("127.0.0.2:7788", 50, 24), ("127.0.0.3:7788", 50, 27)]
        {
            report.spread.push(ServerSpread {
                server: server.into(),
                first_connects,
                redirected,
            });
        }
        report.redirects = 51;
        let table = report.table();
        assert!(
            table.contains("first connects: 127.0.0.2:7788  50 connections, 24 redirected"),
            "{table}"
        );
        assert!(
            table.contains("first connects: 127.0.0.3:7788  50 connections, 27 redirected"),
            "{table}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        assert_eq!(json["spread"][1]["server"], "127.0.0.3:7788");
        assert_eq!(json["spread"][1]["first_connects"], 50);
        assert_eq!(json["spread"][1]["redirected"], 27);
    }

    #[test]
    fn memory_not_measured_is_said_in_the_table_and_null_in_json() {
        let before = MemorySample {
            server_rss_bytes: Some(17_000_000),
            tcp_mem_bytes: Some(0),
            slab_bytes: Some(300_000_000),
            tcp_inuse: Some(10),
        };
        // The generator could not read the server's RSS once its connections were held.
        let after = MemorySample {
            server_rss_bytes: None,
            slab_bytes: Some(300_000_000 + 1_000 * 9_000),
            ..before
        };
        let mut report = Report::new("ceiling", "hop", "x");
        report.memory_before = Some(before);
        report.memory_after = Some(after);
        report.memory_per_connection = Some(MemoryPerConnection::between(&before, &after, 1_000));
        let table = report.table();
        assert!(
            table.contains(
                "server RSS per connection      not measured (no reading once the connections \
                 were held)"
            ),
            "{table}"
        );
        assert!(
            table.contains("kernel slab per connection     9000 bytes"),
            "{table}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        let per = &json["memory_per_connection"];
        assert!(per["server_rss_bytes"].is_null(), "{per}");
        assert_eq!(per["slab_bytes"], 9_000.0);
        assert_eq!(
            per["not_measured"]["server_rss_bytes"],
            "no reading once the connections were held"
        );
        assert!(json["memory_after"]["server_rss_bytes"].is_null());
        assert_eq!(json["memory_before"]["server_rss_bytes"], 17_000_000);
        assert_eq!(human(-1000.0), "-1,000");
    }
}
