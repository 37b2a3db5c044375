//! The generator end to end on loopback, against a toy MQTT broker in this test: scenarios
//! open their clients, send, receive, count and report. Nothing here asserts a speed; each
//! run is a few hundred milliseconds.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use hop_bench::engine::Target;
use hop_bench::scenario::{self, Common, LatencyOptions, ThroughputOptions};

type Subscribers = Arc<Mutex<HashMap<Vec<u8>, TcpStream>>>;

/// A broker that knows just enough MQTT 3.1.1 for QoS 0: CONNECT, SUBSCRIBE, PUBLISH (routed
/// to the one subscriber of the topic), PINGREQ, DISCONNECT. One thread per client.
fn toy_broker() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let subscribers: Subscribers = Arc::default();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let subscribers = subscribers.clone();
            std::thread::spawn(move || serve(stream, &subscribers));
        }
    });
    addr
}

fn serve(mut stream: TcpStream, subscribers: &Subscribers) {
    stream.set_nodelay(true).unwrap();
    while let Some((first, body)) = read_packet(&mut stream) {
        match first >> 4 {
            1 => stream.write_all(&[0x20, 2, 0, 0]).unwrap(),
            8 => {
                let topic_bytes = usize::from(u16::from_be_bytes([body[2], body[3]]));
                let topic = body[4..4 + topic_bytes].to_vec();
                subscribers
                    .lock()
                    .unwrap()
                    .insert(topic, stream.try_clone().unwrap());
                stream.write_all(&[0x90, 3, body[0], body[1], 0]).unwrap();
            }
            3 => {
                let topic_bytes = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let topic = &body[2..2 + topic_bytes];
                let mut packet = vec![first & 0xF0, body.len() as u8];
                packet.extend_from_slice(&body);
                if let Some(subscriber) = subscribers.lock().unwrap().get_mut(topic) {
                    let _ = subscriber.write_all(&packet);
                }
            }
            12 => stream.write_all(&[0xD0, 0]).unwrap(),
            _ => return,
        }
    }
}

fn read_packet(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).ok()?;
    let first = byte[0];
    let (mut length, mut shift) = (0usize, 0);
    loop {
        stream.read_exact(&mut byte).ok()?;
        length |= usize::from(byte[0] & 0x7F) << shift;
        shift += 7;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).ok()?;
    Some((first, body))
}

fn common(server: SocketAddr) -> Common {
    Common {
        server,
        target: Target::Mqtt { login: false },
        server_pid: Some(std::process::id()),
        source_offset: 0,
    }
}

#[test]
fn throughput_moves_messages_both_ways_and_reports_them() {
    let server = toy_broker();
    let options = ThroughputOptions {
        pairs: 3,
        window: 8,
        warmup_ms: 100,
        duration_ms: 300,
    };
    let report = scenario::throughput(&common(server), &options).unwrap();
    assert!(report.value("messages_per_second").unwrap() > 0.0);
    assert_eq!(report.value("lost"), Some(0.0));
    assert!(report.value("bytes_to_server_per_second").unwrap() > 0.0);
    assert!(report.value("bytes_from_server_per_second").unwrap() > 0.0);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(report.server_cpu.is_some(), "--server-pid was given");
    assert!(report.table().contains("messages_per_second"));
}

#[test]
fn latency_delivers_every_scheduled_message() {
    let server = toy_broker();
    let options = LatencyOptions {
        pairs: 2,
        rate_per_second: 1_000,
        duration_ms: 300,
        drain_ms: 2_000,
    };
    let report = scenario::latency(&common(server), &options).unwrap();
    assert_eq!(report.value("scheduled"), Some(300.0));
    assert_eq!(report.value("delivered"), Some(300.0));
    let latency = report.latency.unwrap();
    assert_eq!(latency.count, 300);
    assert!(latency.p50_us > 0.0 && latency.p50_us <= latency.max_us);
    assert!(!report.latency_curve.is_empty());
}

#[test]
fn a_server_that_is_not_there_fails_the_run_with_the_reason() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    drop(listener);
    let options = ThroughputOptions {
        pairs: 1,
        window: 1,
        warmup_ms: 0,
        duration_ms: 10,
    };
    let error = scenario::throughput(&common(server), &options).unwrap_err();
    assert!(error.contains("refused"), "{error}");
}
