//! hop-bench: a load generator for hopd and for MQTT peers, done the way benchmarkers trust.
//!
//! - Client sockets are spread over many source addresses in 127.0.0.0/8 (bind before connect
//!   with `IP_BIND_ADDRESS_NO_PORT`), and the port budget is checked before a run starts
//!   ([`addr`]).
//! - Latency is measured open loop: every message has an intended send time from a fixed-rate
//!   schedule ([`schedule`]) and its latency counts from that time, so a stall in the server
//!   (or the generator) shows up in the percentiles instead of hiding (coordinated omission,
//!   [`latency`]).
//! - The generator reports its own CPU use, so a saturated generator is never mistaken for the
//!   server's limit ([`procfs`]).
//!
//! The network driver ([`engine`]) is one mio event loop per process driving many non-blocking
//! sockets through hop's sans-IO handshake and session ([`conn`]) or a small MQTT 3.1.1 codec
//! ([`mqtt`]). Past one process's descriptor limit, `ceiling` runs several generator processes,
//! as many as its target needs ([`descriptors`]), and sums their reports.

// Tests may unwrap: a panic there is a failed test with its cause.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod addr;
pub mod conn;
pub mod descriptors;
pub mod engine;
pub mod latency;
pub mod mqtt;
pub mod plot;
pub mod procfs;
pub mod report;
pub mod scenario;
pub mod schedule;
