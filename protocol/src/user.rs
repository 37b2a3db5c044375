//! User ids: 128-bit names derived from a client's static key.
//!
//! A user id is the first 128 bits of BLAKE2s("hop user id v2" ‖ public key), so `hop keygen`
//! prints it without asking a server and no registry hands ids out. Two keys share an id only
//! by a 128-bit collision: with N accounts the expected number of colliding pairs is about
//! N²/2¹²⁹ (≈ 1.5·10⁻¹⁹ at ten billion accounts), so the server treats the id as the key's
//! fingerprint. The arithmetic and the alternatives are in `docs/decisions.md`.
//!
//! Text form: 32 lowercase hex digits, the id's 16 bytes in order; `FromStr` takes it back (any
//! case). On the wire an id is a `UserRef` message of two `fixed64` halves (`proto/hop.proto`):
//! 20 bytes, and no allocation to encode or decode it.

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;

use blake2::{Blake2s256, Digest};

/// Bytes of a user id.
pub const USER_ID_BYTES: usize = 16;
/// Hex digits of a user id's text form.
pub const USER_ID_HEX_DIGITS: usize = 2 * USER_ID_BYTES;

const DERIVATION_CONTEXT: &[u8] = b"hop user id v2";
/// Hashed in front of a group's creator and nonce ([`UserId::of_group`]).
const GROUP_DERIVATION_CONTEXT: &[u8] = b"hop group id v1";

/// A user, as named on the wire, on disk and to people. The first 8 bytes are never all zero
/// (the derivation maps that one value in 2⁶⁴ away), so `Option<UserId>` costs no more than
/// a `UserId`, and the 8-byte alignment keeps the structs holding one compact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId {
    high: NonZeroU64,
    low: u64,
}

const _: () = assert!(std::mem::size_of::<UserId>() == USER_ID_BYTES);
const _: () = assert!(std::mem::size_of::<Option<UserId>>() == USER_ID_BYTES);
const _: () = assert!(std::mem::align_of::<UserId>() == 8);

impl UserId {
    /// The id of the user whose static key this is.
    pub fn from_public_key(public_key: &[u8; 32]) -> Self {
        let mut hasher = Blake2s256::new();
        hasher.update(DERIVATION_CONTEXT);
        hasher.update(public_key);
        Self::from_digest(&hasher.finalize())
    }

    /// The id of the group that account `creator` creates with `nonce` (its client's random
    /// number): the same for a retried create, never a user's (another derivation context),
    /// and no one can make a group take a chosen id.
    pub fn of_group(creator: UserId, nonce: u64) -> Self {
        let mut hasher = Blake2s256::new();
        hasher.update(GROUP_DERIVATION_CONTEXT);
        hasher.update(creator.to_bytes());
        hasher.update(nonce.to_le_bytes());
        Self::from_digest(&hasher.finalize())
    }

    fn from_digest(digest: &[u8]) -> Self {
        let mut bytes = [0u8; USER_ID_BYTES];
        bytes.copy_from_slice(&digest[..USER_ID_BYTES]);
        let high = u64::from_be_bytes(first_half(&bytes));
        let low = u64::from_be_bytes(second_half(&bytes));
        // A zero high half (one key in 2^64) takes 1: the id stays a function of the key.
        Self {
            high: NonZeroU64::new(high).unwrap_or(NonZeroU64::MIN),
            low,
        }
    }

    /// An id from its two halves, as they travel on the wire; `None` when the high half is 0
    /// (no derived id has it).
    pub fn from_halves(high: u64, low: u64) -> Option<Self> {
        NonZeroU64::new(high).map(|high| Self { high, low })
    }

    /// An id from its 16 bytes (on disk); `None` when it is not a valid id.
    pub fn from_bytes(bytes: &[u8; USER_ID_BYTES]) -> Option<Self> {
        Self::from_halves(
            u64::from_be_bytes(first_half(bytes)),
            u64::from_be_bytes(second_half(bytes)),
        )
    }

    pub fn to_bytes(self) -> [u8; USER_ID_BYTES] {
        let mut bytes = [0u8; USER_ID_BYTES];
        bytes[..8].copy_from_slice(&self.high.get().to_be_bytes());
        bytes[8..].copy_from_slice(&self.low.to_be_bytes());
        bytes
    }

    /// The first 8 bytes as a big-endian number: hash-derived, so also a good hash of the id.
    pub fn high(self) -> u64 {
        self.high.get()
    }

    /// The last 8 bytes as a big-endian number.
    pub fn low(self) -> u64 {
        self.low
    }
}

fn first_half(bytes: &[u8; USER_ID_BYTES]) -> [u8; 8] {
    let mut half = [0u8; 8];
    half.copy_from_slice(&bytes[..8]);
    half
}

fn second_half(bytes: &[u8; USER_ID_BYTES]) -> [u8; 8] {
    let mut half = [0u8; 8];
    half.copy_from_slice(&bytes[8..]);
    half
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.high, self.low)
    }
}

impl FromStr for UserId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let mut bytes = [0u8; USER_ID_BYTES];
        if text.len() != USER_ID_HEX_DIGITS || hex::decode_to_slice(text, &mut bytes).is_err() {
            return Err(format!(
                "user id {text:?} is not {USER_ID_HEX_DIGITS} hex digits (as `hop keygen` and `hop id` print it)"
            ));
        }
        Self::from_bytes(&bytes)
            .ok_or_else(|| format!("user id {text:?} is not a valid id: its first 16 digits are 0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let a = UserId::from_public_key(&[1u8; 32]);
        assert_eq!(a, UserId::from_public_key(&[1u8; 32]));
        assert_ne!(a, UserId::from_public_key(&[2u8; 32]));
    }

    #[test]
    fn text_bytes_and_halves_round_trip() {
        let id = UserId::from_public_key(&[9u8; 32]);
        let text = id.to_string();
        assert_eq!(text.len(), USER_ID_HEX_DIGITS);
        assert_eq!(
            text,
            hex::encode(id.to_bytes()),
            "the text is the bytes in order"
        );
        assert_eq!(text.parse::<UserId>(), Ok(id));
        assert_eq!(text.to_uppercase().parse::<UserId>(), Ok(id));
        assert_eq!(UserId::from_bytes(&id.to_bytes()), Some(id));
        assert_eq!(UserId::from_halves(id.high(), id.low()), Some(id));
    }

    #[test]
    fn malformed_text_and_the_zero_high_half_are_refused() {
        assert!("".parse::<UserId>().is_err());
        assert!(
            "42".parse::<UserId>().is_err(),
            "v1 decimal ids are refused"
        );
        assert!("zz".repeat(16).parse::<UserId>().is_err());
        assert!("0".repeat(32).parse::<UserId>().is_err());
        assert!(format!("{}{}", "0".repeat(16), "1".repeat(16))
            .parse::<UserId>()
            .is_err());
        assert!(UserId::from_halves(0, 5).is_none());
        assert!(UserId::from_bytes(&[0; 16]).is_none());
        let ok = format!("{}{}", "0".repeat(15), "1".repeat(17));
        assert!(ok.parse::<UserId>().is_ok());
    }
}
