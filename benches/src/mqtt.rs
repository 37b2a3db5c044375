//! A small MQTT 3.1.1 codec: the packets hop-bench sends and the ones it reads back.
//!
//! The generator drives thousands of sockets from one event loop, so it needs the protocol as
//! bytes in and bytes out, like hop's own sans-IO session, not a client library with its own
//! runtime and tasks. Only what the scenarios use is here: CONNECT, SUBSCRIBE, PUBLISH (QoS 0
//! and 1), PUBACK, PINGREQ, DISCONNECT out; CONNACK, SUBACK, PUBLISH, PUBACK, PINGRESP in.

use thiserror::Error;

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// The largest packet hop-bench accepts from a broker: its messages are tiny.
pub const PACKET_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MqttError {
    #[error("remaining length field longer than 4 bytes")]
    BadLength,
    #[error("packet of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed {0} packet")]
    Malformed(&'static str),
}

/// A packet from the broker.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    ConnAck {
        return_code: u8,
    },
    SubAck {
        packet_id: u16,
    },
    Publish {
        qos: u8,
        packet_id: u16,
        topic: &'a [u8],
        payload: &'a [u8],
    },
    PubAck {
        packet_id: u16,
    },
    PingResp,
    /// Any other packet type, ignored by the scenarios.
    Other {
        packet_type: u8,
    },
}

/// A CONNECT; `login` is a username and password, for brokers that require one (ejabberd).
pub fn connect(
    out: &mut Vec<u8>,
    client_id: &str,
    clean_session: bool,
    keep_alive_s: u16,
    login: Option<(&str, &str)>,
) {
    let mut body = Vec::with_capacity(12 + client_id.len());
    put_str(&mut body, b"MQTT");
    body.push(4); // protocol level 3.1.1
    let mut flags = if clean_session { 0x02 } else { 0x00 };
    if login.is_some() {
        flags |= 0xC0; // username and password present
    }
    body.push(flags);
    body.extend_from_slice(&keep_alive_s.to_be_bytes());
    put_str(&mut body, client_id.as_bytes());
    if let Some((username, password)) = login {
        put_str(&mut body, username.as_bytes());
        put_str(&mut body, password.as_bytes());
    }
    packet(out, CONNECT << 4, &body);
}

pub fn subscribe(out: &mut Vec<u8>, packet_id: u16, topic: &str, qos: u8) {
    assert!(qos <= 1, "hop-bench uses QoS 0 and 1");
    let mut body = Vec::with_capacity(5 + topic.len());
    body.extend_from_slice(&packet_id.to_be_bytes());
    put_str(&mut body, topic.as_bytes());
    body.push(qos);
    packet(out, (SUBSCRIBE << 4) | 0x02, &body);
}

/// A PUBLISH; `packet_id` is used only with QoS 1.
pub fn publish(out: &mut Vec<u8>, topic: &str, payload: &[u8], qos: u8, packet_id: u16) {
    assert!(qos <= 1, "hop-bench uses QoS 0 and 1");
    let id_bytes = if qos > 0 { 2 } else { 0 };
    let remaining = 2 + topic.len() + id_bytes + payload.len();
    out.push((PUBLISH << 4) | (qos << 1));
    put_remaining_length(out, remaining);
    put_str(out, topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&packet_id.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

pub fn puback(out: &mut Vec<u8>, packet_id: u16) {
    packet(out, PUBACK << 4, &packet_id.to_be_bytes());
}

pub fn pingreq(out: &mut Vec<u8>) {
    packet(out, PINGREQ << 4, &[]);
}

pub fn disconnect(out: &mut Vec<u8>) {
    packet(out, DISCONNECT << 4, &[]);
}

fn packet(out: &mut Vec<u8>, first_byte: u8, body: &[u8]) {
    out.push(first_byte);
    put_remaining_length(out, body.len());
    out.extend_from_slice(body);
}

fn put_str(out: &mut Vec<u8>, bytes: &[u8]) {
    let length = u16::try_from(bytes.len()).expect("MQTT strings are at most 65535 bytes");
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_remaining_length(out: &mut Vec<u8>, mut length: usize) {
    assert!(length < 268_435_456, "MQTT remaining length limit");
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if length == 0 {
            break;
        }
    }
}

/// Splits a byte stream into packets. Holds only the bytes of one incomplete packet.
#[derive(Debug, Default)]
pub struct MqttDeframer {
    partial: Vec<u8>,
}

impl MqttDeframer {
    /// Feeds `input`, calling `on_packet` for each whole packet in order.
    pub fn handle_input(
        &mut self,
        input: &[u8],
        on_packet: &mut dyn FnMut(Packet<'_>),
    ) -> Result<(), MqttError> {
        let mut joined;
        let mut rest = if self.partial.is_empty() {
            input
        } else {
            joined = std::mem::take(&mut self.partial);
            joined.extend_from_slice(input);
            &joined[..]
        };
        while let Some((header_bytes, body_bytes)) = header(rest)? {
            if rest.len() < header_bytes + body_bytes {
                break;
            }
            let first = rest[0];
            on_packet(parse(
                first,
                &rest[header_bytes..header_bytes + body_bytes],
            )?);
            rest = &rest[header_bytes + body_bytes..];
        }
        self.partial = rest.to_vec();
        Ok(())
    }
}

/// (fixed header bytes, remaining length) once the fixed header is complete.
fn header(bytes: &[u8]) -> Result<Option<(usize, usize)>, MqttError> {
    let mut length = 0usize;
    for at in 1..5 {
        let Some(&byte) = bytes.get(at) else {
            return Ok(None);
        };
        length |= usize::from(byte & 0x7f) << (7 * (at - 1));
        if byte & 0x80 == 0 {
            if length > PACKET_BYTES_MAX {
                return Err(MqttError::TooLarge(length));
            }
            return Ok(Some((at + 1, length)));
        }
    }
    Err(MqttError::BadLength)
}

fn parse(first: u8, body: &[u8]) -> Result<Packet<'_>, MqttError> {
    let id = |name| -> Result<u16, MqttError> {
        Ok(u16::from_be_bytes([
            *body.first().ok_or(MqttError::Malformed(name))?,
            *body.get(1).ok_or(MqttError::Malformed(name))?,
        ]))
    };
    Ok(match first >> 4 {
        CONNACK => Packet::ConnAck {
            return_code: *body.get(1).ok_or(MqttError::Malformed("CONNACK"))?,
        },
        SUBACK => Packet::SubAck {
            packet_id: id("SUBACK")?,
        },
        PUBACK => Packet::PubAck {
            packet_id: id("PUBACK")?,
        },
        PINGRESP => Packet::PingResp,
        PUBLISH => {
            let qos = (first >> 1) & 0x03;
            let topic_bytes = usize::from(id("PUBLISH")?);
            let mut at = 2 + topic_bytes;
            let topic = body.get(2..at).ok_or(MqttError::Malformed("PUBLISH"))?;
            let mut packet_id = 0;
            if qos > 0 {
                let bytes = body
                    .get(at..at + 2)
                    .ok_or(MqttError::Malformed("PUBLISH"))?;
                packet_id = u16::from_be_bytes([bytes[0], bytes[1]]);
                at += 2;
            }
            Packet::Publish {
                qos,
                packet_id,
                topic,
                payload: &body[at..],
            }
        }
        packet_type => Packet::Other { packet_type },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packets(stream: &[u8], split: usize) -> Vec<String> {
        let mut seen = Vec::new();
        let mut deframer = MqttDeframer::default();
        for part in [&stream[..split], &stream[split..]] {
            deframer
                .handle_input(part, &mut |packet| seen.push(format!("{packet:?}")))
                .unwrap();
        }
        seen
    }

    #[test]
    fn connect_matches_the_spec_example() {
        let mut out = Vec::new();
        connect(&mut out, "c1", true, 60, None);
        assert_eq!(
            out,
            [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'c', b'1']
        );
        out.clear();
        connect(&mut out, "c2", true, 60, Some(("user", "pass")));
        let mut expected = vec![0x10, 26, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60];
        expected.extend_from_slice(b"\0\x02c2\0\x04user\0\x04pass");
        assert_eq!(out, expected);
    }

    #[test]
    fn broker_packets_parse_at_every_split() {
        let mut stream = vec![0x20, 2, 0, 0, 0x90, 3, 0, 7, 1, 0x40, 2, 0, 9, 0xd0, 0];
        // A QoS 1 PUBLISH as a broker sends it, with a 200-byte payload (two-byte length).
        let payload = vec![0xAB; 200];
        publish(&mut stream, "u/5", &payload, 1, 42);
        let expected = [
            "ConnAck { return_code: 0 }".to_string(),
            "SubAck { packet_id: 7 }".to_string(),
            "PubAck { packet_id: 9 }".to_string(),
            "PingResp".to_string(),
            format!(
                "{:?}",
                Packet::Publish {
                    qos: 1,
                    packet_id: 42,
                    topic: b"u/5",
                    payload: &payload
                }
            ),
        ];
        for split in 0..=stream.len() {
            assert_eq!(packets(&stream, split), expected, "split at {split}");
        }
    }

    #[test]
    fn qos0_publish_has_no_packet_id() {
        let mut out = Vec::new();
        publish(&mut out, "u/1", b"hi", 0, 99);
        assert_eq!(out, [0x30, 7, 0, 3, b'u', b'/', b'1', b'h', b'i']);
    }

    #[test]
    fn oversized_and_endless_lengths_are_refused() {
        let mut deframer = MqttDeframer::default();
        assert_eq!(
            deframer.handle_input(&[0x30, 0xff, 0xff, 0xff, 0x7f], &mut |_| {}),
            Err(MqttError::TooLarge(268_435_455))
        );
        let mut deframer = MqttDeframer::default();
        assert_eq!(
            deframer.handle_input(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], &mut |_| {}),
            Err(MqttError::BadLength)
        );
    }
}
