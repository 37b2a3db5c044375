//! The byte layout of segment files (see `store/DESIGN.md`, which this module follows exactly).
//!
//! A segment is a 32-byte header followed by records. Every integer is little-endian. A record
//! is `crc32c u32 | len u32 | payload[len]`; the checksum covers the four `len` bytes and the
//! payload, so a flipped bit in the length is caught like one in the body. User ids are their
//! 16 bytes in [`UserId::to_bytes`] order.

use hop_protocol::user::USER_ID_BYTES;
use hop_protocol::UserId;

/// First eight bytes of every segment file (format v2: 128-bit user ids).
pub const SEGMENT_MAGIC: [u8; 8] = *b"HOPQLOG2";
/// First eight bytes of a segment written by hop wire protocol v1 (48-bit user ids, 8 bytes
/// on disk). Such a folder is refused, never scanned: its records would checksum as v2 ones.
pub const SEGMENT_MAGIC_V1: [u8; 8] = *b"HOPQLOG1";
/// Segment header: magic, segment number, shard, shard count, next sequence number, reserved,
/// CRC32C of the 28 bytes before it.
pub const SEGMENT_HEADER_BYTES: usize = 32;
/// `crc32c u32 | len u32` in front of every payload.
pub const RECORD_HEADER_BYTES: usize = 8;

/// Payload kinds (first payload byte).
pub const KIND_MESSAGE: u8 = 1;
pub const KIND_RECEIPT: u8 = 2;
pub const KIND_DELIVERED: u8 = 3;
pub const KIND_EXPIRED: u8 = 4;
/// A copy, for its account's other devices, of a message one of its devices sent: laid out as
/// a message, its peer the recipient (the sender is the queue's own account).
pub const KIND_SENT: u8 = 5;
/// A member's copy of a group message: laid out as a message with the group's id after the
/// sender's, then the body.
pub const KIND_GROUP: u8 = 6;
/// A member's copy of a group membership change (the body is the encoded `GroupEvent`, the
/// sender the member who made it), laid out as [`KIND_GROUP`].
pub const KIND_GROUP_EVENT: u8 = 7;

/// Bytes of a user id in a record.
pub const USER_BYTES: usize = USER_ID_BYTES;
/// kind u8 | user 16 | seq u64
const COMMON_BYTES: usize = 1 + USER_BYTES + 8;
/// common | id u64 | timestamp_ms u64 | from 16, then the body.
pub const MESSAGE_FIXED_BYTES: usize = COMMON_BYTES + 8 + 8 + USER_BYTES;
/// A message's fixed bytes | group 16, then the body.
pub const GROUP_FIXED_BYTES: usize = MESSAGE_FIXED_BYTES + USER_BYTES;
/// common | id u64 | timestamp_ms u64 | by 16 | receipt kind u8
pub const RECEIPT_PAYLOAD_BYTES: usize = MESSAGE_FIXED_BYTES + 1;
/// kind u8 | seq u64: the record with sequence number `seq` is gone (sequence numbers are
/// unique in a shard folder, so the user is not needed, and a drain writes one per record).
pub const TOMBSTONE_PAYLOAD_BYTES: usize = 1 + 8;
/// Largest message body the store keeps, in bytes (a wire body is smaller: 63 KiB).
pub const BODY_BYTES_MAX: usize = 64 * 1024;
/// Largest payload a valid record has; a length above it is damage.
pub const PAYLOAD_BYTES_MAX: usize = GROUP_FIXED_BYTES + BODY_BYTES_MAX;
/// Largest whole record, in bytes.
pub const RECORD_BYTES_MAX: usize = RECORD_HEADER_BYTES + PAYLOAD_BYTES_MAX;

const _: () = assert!(TOMBSTONE_PAYLOAD_BYTES < MESSAGE_FIXED_BYTES);
// The byte counts store/DESIGN.md gives.
const _: () = assert!(TOMBSTONE_PAYLOAD_BYTES == 9);
const _: () = assert!(MESSAGE_FIXED_BYTES == 57);
const _: () = assert!(GROUP_FIXED_BYTES == 73);
const _: () = assert!(RECEIPT_PAYLOAD_BYTES == 58);
const _: () = assert!(RECEIPT_PAYLOAD_BYTES <= PAYLOAD_BYTES_MAX);
const _: () = assert!(hop_protocol::wire::BODY_BYTES_MAX <= BODY_BYTES_MAX);

/// The group of a member's copy of a group message or event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupTag {
    pub group: UserId,
    /// A membership change (the body is the encoded event), not a member's message.
    pub event: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub segment: u32,
    pub shard: u16,
    pub shards: u16,
    /// The shard's next sequence number when the segment was created: sequence numbers never
    /// go back, even when every record before them is gone.
    pub next_seq: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut bytes = [0u8; SEGMENT_HEADER_BYTES];
        bytes[..8].copy_from_slice(&SEGMENT_MAGIC);
        bytes[8..12].copy_from_slice(&self.segment.to_le_bytes());
        bytes[12..14].copy_from_slice(&self.shard.to_le_bytes());
        bytes[14..16].copy_from_slice(&self.shards.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.next_seq.to_le_bytes());
        // 24..28 reserved, zero.
        let checksum = crc32c::crc32c(&bytes[..28]);
        bytes[28..32].copy_from_slice(&checksum.to_le_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes = bytes.get(..SEGMENT_HEADER_BYTES)?;
        if bytes[..8] != SEGMENT_MAGIC || crc32c::crc32c(&bytes[..28]) != le_u32(bytes, 28) {
            return None;
        }
        Some(Self {
            segment: le_u32(bytes, 8),
            shard: u16::from_le_bytes([bytes[12], bytes[13]]),
            shards: u16::from_le_bytes([bytes[14], bytes[15]]),
            next_seq: le_u64(bytes, 16),
        })
    }
}

/// Whether `bytes` start like a segment of format v1 (hop wire protocol v1). The magic alone
/// decides: a v2 header damaged into exactly this magic is not a case worth serving around,
/// and refusing is the safe side (nothing is read or changed).
pub fn is_v1_segment(bytes: &[u8]) -> bool {
    bytes.get(..SEGMENT_MAGIC_V1.len()) == Some(&SEGMENT_MAGIC_V1[..])
}

/// One decoded record, borrowing its body from the segment bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<'a> {
    Message {
        user: UserId,
        seq: u64,
        id: u64,
        timestamp_ms: u64,
        /// The sender; for a sent copy (`sent`), the recipient.
        from: UserId,
        body: &'a [u8],
        sent: bool,
        /// A member's copy of a group message or event.
        group: Option<GroupTag>,
    },
    Receipt {
        user: UserId,
        seq: u64,
        id: u64,
        timestamp_ms: u64,
        by: UserId,
        kind: u8,
    },
    /// The record `seq` was delivered (`expired == false`) or expired.
    Tombstone { seq: u64, expired: bool },
}

#[allow(clippy::too_many_arguments)] // one per field of the record, in layout order
pub fn encode_message(
    out: &mut Vec<u8>,
    user: UserId,
    seq: u64,
    id: u64,
    timestamp_ms: u64,
    from: UserId,
    body: &[u8],
    sent: bool,
    group: Option<GroupTag>,
) {
    assert!(body.len() <= BODY_BYTES_MAX, "body checked by the caller");
    let kind = match group {
        Some(GroupTag { event: true, .. }) => KIND_GROUP_EVENT,
        Some(GroupTag { event: false, .. }) => KIND_GROUP,
        None if sent => KIND_SENT,
        None => KIND_MESSAGE,
    };
    let start = begin(out, kind, user, seq);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    out.extend_from_slice(&from.to_bytes());
    if let Some(tag) = group {
        out.extend_from_slice(&tag.group.to_bytes());
    }
    out.extend_from_slice(body);
    finish(out, start);
}

pub fn encode_receipt(
    out: &mut Vec<u8>,
    user: UserId,
    seq: u64,
    id: u64,
    timestamp_ms: u64,
    by: UserId,
    kind: u8,
) {
    let start = begin(out, KIND_RECEIPT, user, seq);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    out.extend_from_slice(&by.to_bytes());
    out.push(kind);
    finish(out, start);
}

/// Bytes of a tombstone record.
pub const TOMBSTONE_RECORD_BYTES: usize = RECORD_HEADER_BYTES + TOMBSTONE_PAYLOAD_BYTES;

pub fn encode_tombstone(out: &mut Vec<u8>, seq: u64, expired: bool) {
    let kind = if expired {
        KIND_EXPIRED
    } else {
        KIND_DELIVERED
    };
    // Built whole on the stack and appended once: a drain writes one per delivered record,
    // and the piecewise appends of `begin`/`finish` cost more than the checksum.
    let mut record = [0u8; TOMBSTONE_RECORD_BYTES];
    record[4..8].copy_from_slice(&(TOMBSTONE_PAYLOAD_BYTES as u32).to_le_bytes());
    record[8] = kind;
    record[9..17].copy_from_slice(&seq.to_le_bytes());
    let checksum = crc32c::crc32c(&record[4..]);
    record[..4].copy_from_slice(&checksum.to_le_bytes());
    out.extend_from_slice(&record);
}

/// Bytes a message record with a body of `body_bytes` takes.
pub const fn message_record_bytes(body_bytes: usize) -> usize {
    RECORD_HEADER_BYTES + MESSAGE_FIXED_BYTES + body_bytes
}

/// Decodes the record at the start of `bytes`: the payload and the record's whole length, or
/// `None` when the bytes there are not a whole, valid record.
pub fn decode(bytes: &[u8]) -> Option<(Payload<'_>, usize)> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return None;
    }
    let len = le_u32(bytes, 4) as usize;
    if !(TOMBSTONE_PAYLOAD_BYTES..=PAYLOAD_BYTES_MAX).contains(&len) {
        return None;
    }
    let total = RECORD_HEADER_BYTES + len;
    let record = bytes.get(..total)?;
    let payload = &record[RECORD_HEADER_BYTES..];
    // Cheap plausibility first: resynchronisation tries this at every byte offset.
    if !(KIND_MESSAGE..=KIND_GROUP_EVENT).contains(&payload[0]) {
        return None;
    }
    if crc32c::crc32c(&record[4..]) != le_u32(record, 0) {
        return None;
    }
    if matches!(payload[0], KIND_DELIVERED | KIND_EXPIRED) {
        return (len == TOMBSTONE_PAYLOAD_BYTES).then(|| {
            let tombstone = Payload::Tombstone {
                seq: le_u64(payload, 1),
                expired: payload[0] == KIND_EXPIRED,
            };
            (tombstone, total)
        });
    }
    let user = user_at(payload, PAYLOAD_USER_AT)?;
    let seq = le_u64(payload, PAYLOAD_SEQ_AT);
    let decoded = match payload[0] {
        kind @ (KIND_MESSAGE | KIND_SENT | KIND_GROUP | KIND_GROUP_EVENT) => {
            let grouped = matches!(kind, KIND_GROUP | KIND_GROUP_EVENT);
            let fixed = if grouped {
                GROUP_FIXED_BYTES
            } else {
                MESSAGE_FIXED_BYTES
            };
            if len < fixed {
                return None;
            }
            let group = if grouped {
                Some(GroupTag {
                    group: user_at(payload, PAYLOAD_GROUP_AT)?,
                    event: kind == KIND_GROUP_EVENT,
                })
            } else {
                None
            };
            Payload::Message {
                user,
                seq,
                id: le_u64(payload, PAYLOAD_ID_AT),
                timestamp_ms: le_u64(payload, PAYLOAD_TIMESTAMP_AT),
                from: user_at(payload, PAYLOAD_PEER_AT)?,
                body: &payload[fixed..],
                sent: kind == KIND_SENT,
                group,
            }
        }
        KIND_RECEIPT if len == RECEIPT_PAYLOAD_BYTES => Payload::Receipt {
            user,
            seq,
            id: le_u64(payload, PAYLOAD_ID_AT),
            timestamp_ms: le_u64(payload, PAYLOAD_TIMESTAMP_AT),
            by: user_at(payload, PAYLOAD_PEER_AT)?,
            kind: payload[MESSAGE_FIXED_BYTES],
        },
        _ => return None,
    };
    Some((decoded, total))
}

/// What a scan of a segment's records found besides the records.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanOutcome {
    /// Offset just past the last valid record (or `start` when there is none).
    pub valid_end: usize,
    /// Damaged regions that a valid record follows: skipped, each counted once.
    pub corrupt_records: usize,
    pub corrupt_bytes: usize,
    /// Bytes after the last valid record that no valid record follows: a torn tail.
    pub torn_bytes: usize,
}

/// Walks the records of `bytes` from `start`, calling `on_record(offset, payload, length)` for
/// each valid one. A region that does not decode is skipped up to the next offset where a valid
/// record starts (resynchronisation); when none follows, the rest is a torn tail. Never panics
/// on any input.
pub fn scan(
    bytes: &[u8],
    start: usize,
    mut on_record: impl FnMut(usize, Payload<'_>, usize),
) -> ScanOutcome {
    let mut outcome = ScanOutcome {
        valid_end: start,
        ..ScanOutcome::default()
    };
    let mut position = start;
    while position < bytes.len() {
        if let Some((payload, length)) = decode(&bytes[position..]) {
            on_record(position, payload, length);
            position += length;
            outcome.valid_end = position;
            continue;
        }
        match (position + 1..bytes.len()).find(|&next| decode(&bytes[next..]).is_some()) {
            Some(next) => {
                outcome.corrupt_records += 1;
                outcome.corrupt_bytes += next - position;
                position = next;
            }
            None => {
                outcome.torn_bytes = bytes.len() - position;
                break;
            }
        }
    }
    debug_assert!(outcome.valid_end <= bytes.len());
    outcome
}

pub fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

pub fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn begin(out: &mut Vec<u8>, kind: u8, user: UserId, seq: u64) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    out.push(kind);
    out.extend_from_slice(&user.to_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    start
}

/// Where the fields sit in a payload (store/DESIGN.md, Record).
const PAYLOAD_USER_AT: usize = 1;
const PAYLOAD_SEQ_AT: usize = PAYLOAD_USER_AT + USER_BYTES;
const PAYLOAD_ID_AT: usize = PAYLOAD_SEQ_AT + 8;
const PAYLOAD_TIMESTAMP_AT: usize = PAYLOAD_ID_AT + 8;
/// `from` of a message, `by` of a receipt.
const PAYLOAD_PEER_AT: usize = PAYLOAD_TIMESTAMP_AT + 8;
/// The group of a group copy.
const PAYLOAD_GROUP_AT: usize = PAYLOAD_PEER_AT + USER_BYTES;

const _: () = assert!(PAYLOAD_SEQ_AT + 8 == COMMON_BYTES);
const _: () = assert!(PAYLOAD_PEER_AT + USER_BYTES == MESSAGE_FIXED_BYTES);

/// The user id at `at`; `None` for an invalid id (damage).
fn user_at(payload: &[u8], at: usize) -> Option<UserId> {
    let mut bytes = [0u8; USER_BYTES];
    bytes.copy_from_slice(&payload[at..at + USER_BYTES]);
    UserId::from_bytes(&bytes)
}

fn finish(out: &mut [u8], start: usize) {
    let len = out.len() - start - RECORD_HEADER_BYTES;
    debug_assert!(len <= PAYLOAD_BYTES_MAX);
    out[start + 4..start + 8].copy_from_slice(&(len as u32).to_le_bytes());
    let checksum = crc32c::crc32c(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&checksum.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(raw: u64) -> UserId {
        UserId::from_halves(raw, !raw).expect("valid id")
    }

    #[test]
    fn each_kind_round_trips() {
        let mut bytes = Vec::new();
        encode_message(
            &mut bytes,
            user(7),
            1,
            99,
            1_000,
            user(8),
            b"hello",
            false,
            None,
        );
        encode_receipt(&mut bytes, user(8), 2, 99, 1_001, user(7), 2);
        encode_tombstone(&mut bytes, 1, false);
        encode_tombstone(&mut bytes, 2, true);
        assert_eq!(
            bytes.len(),
            message_record_bytes(5) + 8 + RECEIPT_PAYLOAD_BYTES + 2 * (8 + 9)
        );
        let mut seen = Vec::new();
        // Payloads borrow the scanned bytes for one call only: compare their Debug text.
        let outcome = scan(&bytes, 0, |_, payload, _| seen.push(format!("{payload:?}")));
        assert_eq!(outcome.valid_end, bytes.len());
        assert_eq!((outcome.corrupt_records, outcome.torn_bytes), (0, 0));
        let expected = [
            Payload::Message {
                user: user(7),
                seq: 1,
                id: 99,
                timestamp_ms: 1_000,
                from: user(8),
                body: b"hello",
                sent: false,
                group: None,
            },
            Payload::Receipt {
                user: user(8),
                seq: 2,
                id: 99,
                timestamp_ms: 1_001,
                by: user(7),
                kind: 2,
            },
            Payload::Tombstone {
                seq: 1,
                expired: false,
            },
            Payload::Tombstone {
                seq: 2,
                expired: true,
            },
        ];
        let expected: Vec<String> = expected.iter().map(|p| format!("{p:?}")).collect();
        assert_eq!(seen, expected);
    }

    /// The 16 bytes of the id 0x0102..0f10, in `to_bytes` order.
    const USER_BYTES_IN_ORDER: [u8; 16] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

    fn documented_user() -> UserId {
        UserId::from_bytes(&USER_BYTES_IN_ORDER).expect("valid id")
    }

    fn with_checksum(mut record: Vec<u8>) -> Vec<u8> {
        let checksum = crc32c::crc32c(&record[4..]);
        record[..4].copy_from_slice(&checksum.to_le_bytes());
        record
    }

    #[test]
    fn a_tombstone_has_the_documented_bytes() {
        let mut bytes = Vec::new();
        encode_tombstone(&mut bytes, 0x1122_3344_5566_7788, true);
        let mut expected = vec![0, 0, 0, 0, 9, 0, 0, 0, KIND_EXPIRED];
        expected.extend_from_slice(&[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(bytes, with_checksum(expected));
        assert_eq!(bytes.len(), TOMBSTONE_RECORD_BYTES);
        assert_eq!(TOMBSTONE_RECORD_BYTES, 17);
    }

    #[test]
    fn a_message_and_a_receipt_have_the_documented_bytes() {
        let peer = UserId::from_halves(0xA1, 0xB2).expect("valid id");
        let mut peer_bytes = [0u8; 16];
        peer_bytes[7] = 0xA1;
        peer_bytes[15] = 0xB2;
        let fixed = |kind: u8, len: u8| {
            let mut record = vec![0, 0, 0, 0, len, 0, 0, 0, kind];
            record.extend_from_slice(&USER_BYTES_IN_ORDER);
            record.extend_from_slice(&5u64.to_le_bytes()); // seq
            record.extend_from_slice(&6u64.to_le_bytes()); // id
            record.extend_from_slice(&7u64.to_le_bytes()); // timestamp_ms
            record.extend_from_slice(&peer_bytes); // from / by
            record
        };
        let mut bytes = Vec::new();
        encode_message(
            &mut bytes,
            documented_user(),
            5,
            6,
            7,
            peer,
            b"hi",
            false,
            None,
        );
        let mut expected = fixed(KIND_MESSAGE, 57 + 2);
        expected.extend_from_slice(b"hi");
        assert_eq!(bytes, with_checksum(expected));
        assert_eq!(message_record_bytes(100), 165, "the figure DESIGN.md gives");

        bytes.clear();
        encode_receipt(&mut bytes, documented_user(), 5, 6, 7, peer, 3);
        let mut expected = fixed(KIND_RECEIPT, 58);
        expected.push(3);
        assert_eq!(bytes, with_checksum(expected));
    }

    #[test]
    fn an_invalid_user_id_makes_a_record_corrupt() {
        let mut bytes = Vec::new();
        encode_receipt(&mut bytes, user(7), 1, 1, 1, user(8), 1);
        // Zero the id's first eight bytes and checksum the record again: only the id is wrong.
        bytes[9..17].fill(0);
        let bytes = with_checksum(bytes);
        assert_eq!(decode(&bytes), None);
        let mut message = Vec::new();
        encode_message(&mut message, user(7), 1, 1, 1, user(8), b"x", false, None);
        message[8 + 41..8 + 49].fill(0); // `from`
        assert_eq!(decode(&with_checksum(message)), None);
    }

    #[test]
    fn a_flipped_length_bit_is_skipped_and_the_next_record_found() {
        let mut bytes = Vec::new();
        for seq in 1..=3 {
            encode_message(
                &mut bytes,
                user(7),
                seq,
                seq,
                0,
                user(8),
                b"abc",
                false,
                None,
            );
        }
        bytes[message_record_bytes(3) + 5] ^= 0x01; // second record's length
        let mut seqs = Vec::new();
        let outcome = scan(&bytes, 0, |_, payload, _| {
            if let Payload::Message { seq, .. } = payload {
                seqs.push(seq);
            }
        });
        assert_eq!(seqs, [1, 3]);
        assert_eq!(outcome.corrupt_records, 1);
        assert_eq!(outcome.corrupt_bytes, message_record_bytes(3));
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let header = SegmentHeader {
            segment: 3,
            shard: 1,
            shards: 4,
            next_seq: 77,
        };
        let mut bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Some(header));
        bytes[20] ^= 0x10;
        assert_eq!(SegmentHeader::decode(&bytes), None);
    }

    #[test]
    fn a_v1_segment_header_is_recognised_and_not_decoded() {
        let mut bytes = SegmentHeader {
            segment: 1,
            shard: 0,
            shards: 1,
            next_seq: 1,
        }
        .encode();
        assert!(!is_v1_segment(&bytes));
        bytes[..8].copy_from_slice(&SEGMENT_MAGIC_V1);
        let checksum = crc32c::crc32c(&bytes[..28]);
        bytes[28..].copy_from_slice(&checksum.to_le_bytes());
        assert!(is_v1_segment(&bytes));
        assert_eq!(SegmentHeader::decode(&bytes), None);
        assert!(!is_v1_segment(b"HOPQ"), "too short to tell");
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x1234_5678_u64;
        let bytes: Vec<u8> = (0..4096)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                (state >> 56) as u8
            })
            .collect();
        let outcome = scan(&bytes, 0, |_, _, _| {});
        assert_eq!(outcome.torn_bytes + outcome.corrupt_bytes, bytes.len());
    }
}
