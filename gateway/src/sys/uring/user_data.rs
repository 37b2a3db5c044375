//! What a completion is about, packed into the 64-bit `user_data` of its submission.
//!
//! `kind` (8 bits) | `slot` (24 bits) | `generation` (32 bits). The slot is the connection's
//! index in the fixed file table (its `ConnId`); the generation tells a late completion of an
//! old connection from the current one when the kernel has reused the slot. Completions that
//! are not about one connection (accept, wake-ups, handed-over descriptors) use `slot` 0 and
//! carry their own payload in the low 56 bits.

/// The largest slot the encoding carries (the kernel caps fixed file tables at 2^20).
pub const SLOT_MAX: u32 = (1 << 24) - 1;
const PAYLOAD_MASK: u64 = (1 << 56) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The multishot accept on the listener.
    Accept = 1,
    /// A connection's multishot receive from the buffer ring.
    Recv = 2,
    /// A connection's multishot readiness poll (receive mode `poll`).
    Poll = 3,
    /// A single receive with buffer select after a poll said readable.
    RecvOnce = 4,
    Send = 5,
    Shutdown = 6,
    Cancel = 7,
    Close = 8,
    /// A wake-up another shard posted with `MSG_RING`.
    Wake = 9,
    /// The multishot poll on the eventfd that threads without a ring write to.
    Eventfd = 10,
    /// The sending side's completion of handing a descriptor to another ring.
    SendFd = 11,
    /// A descriptor another ring handed to this one; the payload is the transfer id.
    Transfer = 12,
    /// A new connection's peer address (`SO_PEERNAME`).
    PeerName = 13,
    /// A connection's direct descriptor installed as a regular one, for another process.
    InstallFd = 14,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Accept,
            2 => Self::Recv,
            3 => Self::Poll,
            4 => Self::RecvOnce,
            5 => Self::Send,
            6 => Self::Shutdown,
            7 => Self::Cancel,
            8 => Self::Close,
            9 => Self::Wake,
            10 => Self::Eventfd,
            11 => Self::SendFd,
            12 => Self::Transfer,
            13 => Self::PeerName,
            14 => Self::InstallFd,
            _ => return None,
        })
    }
}

/// A decoded `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserData {
    pub kind: Kind,
    pub slot: u32,
    pub generation: u32,
}

impl UserData {
    pub fn new(kind: Kind, slot: u32, generation: u32) -> Self {
        debug_assert!(slot <= SLOT_MAX);
        Self {
            kind,
            slot,
            generation,
        }
    }

    pub fn encode(self) -> u64 {
        (u64::from(self.kind as u8) << 56)
            | (u64::from(self.slot & SLOT_MAX) << 32)
            | u64::from(self.generation)
    }

    /// `None` for a value this backend never submitted.
    pub fn decode(value: u64) -> Option<Self> {
        Some(Self {
            kind: Kind::from_u8((value >> 56) as u8)?,
            slot: ((value >> 32) as u32) & SLOT_MAX,
            generation: value as u32,
        })
    }
}

/// The `user_data` of a handed-over descriptor's completion on the receiving ring.
pub fn transfer(id: u64) -> u64 {
    (u64::from(Kind::Transfer as u8) << 56) | (id & PAYLOAD_MASK)
}

/// The transfer id in a `user_data` of kind `Transfer`.
pub fn transfer_id(value: u64) -> u64 {
    value & PAYLOAD_MASK
}

/// Transfer ids wrap within the payload bits.
pub fn next_transfer_id(counter: u64) -> u64 {
    counter & PAYLOAD_MASK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_kind_and_extreme_fields() {
        for kind in 1..=13u8 {
            let kind = Kind::from_u8(kind).unwrap();
            for (slot, generation) in [(0, 0), (SLOT_MAX, u32::MAX), (19_999, 7)] {
                let data = UserData::new(kind, slot, generation);
                assert_eq!(UserData::decode(data.encode()), Some(data));
            }
        }
    }

    #[test]
    fn the_generation_tells_a_reused_slot_apart() {
        let old = UserData::new(Kind::Recv, 5, 1).encode();
        let new = UserData::new(Kind::Recv, 5, 2).encode();
        assert_ne!(old, new);
        assert_eq!(UserData::decode(old).unwrap().slot, 5);
    }

    #[test]
    fn unknown_kinds_and_transfers_decode_as_such() {
        assert_eq!(UserData::decode(0), None);
        assert_eq!(UserData::decode(0xFF << 56), None);
        let value = transfer(u64::MAX);
        assert_eq!(UserData::decode(value).unwrap().kind, Kind::Transfer);
        assert_eq!(transfer_id(value), PAYLOAD_MASK);
        assert_eq!(transfer_id(transfer(42)), 42);
        assert_eq!(next_transfer_id(PAYLOAD_MASK + 1), 0);
    }
}
