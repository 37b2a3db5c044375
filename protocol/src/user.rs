//! User ids: compact numbers bound to a client's static key.
//!
//! A user id is derived from the public key (BLAKE2s, 48 bits), so `hop keygen` can print it
//! without asking a server, and it costs at most 7 bytes as a varint. Two keys can collide on
//! 48 bits; the server binds each id to the first key that claims it and refuses any other key
//! with `ERROR_CODE_ID_TAKEN` (the holder of that key must generate another).

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;

use blake2::{Blake2s256, Digest};

/// Bits of a user id: 48 bits encode in at most 7 varint bytes.
pub const USER_ID_BITS: u32 = 48;
/// The largest valid user id. Zero is never valid.
pub const USER_ID_MAX: u64 = (1 << USER_ID_BITS) - 1;

const DERIVATION_CONTEXT: &[u8] = b"hop user id v1";
const FINGERPRINT_CONTEXT: &[u8] = b"hop key fingerprint v1";

/// 64 bits of BLAKE2s of a public key, under another context than the user id: what a server
/// keeps in memory to recognise the key a user id is bound to. A key that takes another's
/// binding must match the id's 48 bits and these 64 independent bits at once, a search of
/// 2^112 for one chosen victim.
pub fn key_fingerprint(public_key: &[u8; 32]) -> u64 {
    hash_64(FINGERPRINT_CONTEXT, public_key)
}

/// The first 64 bits (little-endian) of BLAKE2s of `context` then `public_key`.
fn hash_64(context: &[u8], public_key: &[u8; 32]) -> u64 {
    let mut hasher = Blake2s256::new();
    hasher.update(context);
    hasher.update(public_key);
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// A user, as named on the wire. Never zero, so `Option<UserId>` is 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(NonZeroU64);

const _: () = assert!(std::mem::size_of::<Option<UserId>>() == 8);

impl UserId {
    /// The id bound to this public key.
    pub fn from_public_key(public_key: &[u8; 32]) -> Self {
        let id = hash_64(DERIVATION_CONTEXT, public_key) & USER_ID_MAX;
        // Zero is reserved for "no user"; a key that hashes to it takes 1 (and, as with any
        // collision, only the first such key can bind it).
        Self(NonZeroU64::new(id).unwrap_or(NonZeroU64::MIN))
    }

    /// A user id read from the wire or from a person; `None` when out of range.
    pub fn new(raw: u64) -> Option<Self> {
        if raw > USER_ID_MAX {
            return None;
        }
        NonZeroU64::new(raw).map(Self)
    }

    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for UserId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let raw: u64 = text
            .trim()
            .parse()
            .map_err(|_| format!("user id {text:?} is not a decimal number"))?;
        Self::new(raw).ok_or_else(|| format!("user id {raw} is outside 1..={USER_ID_MAX}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_in_range_and_stable() {
        let a = UserId::from_public_key(&[1u8; 32]);
        assert_eq!(a, UserId::from_public_key(&[1u8; 32]));
        assert_ne!(a, UserId::from_public_key(&[2u8; 32]));
        assert!(a.get() >= 1 && a.get() <= USER_ID_MAX);
    }

    #[test]
    fn fingerprints_are_stable_and_independent_of_the_id() {
        let key = [7u8; 32];
        assert_eq!(key_fingerprint(&key), key_fingerprint(&key));
        assert_ne!(key_fingerprint(&key), key_fingerprint(&[8u8; 32]));
        assert_ne!(
            key_fingerprint(&key) & USER_ID_MAX,
            UserId::from_public_key(&key).get()
        );
    }

    #[test]
    fn range_is_enforced() {
        assert!(UserId::new(0).is_none());
        assert!(UserId::new(USER_ID_MAX + 1).is_none());
        assert_eq!(UserId::new(USER_ID_MAX).map(UserId::get), Some(USER_ID_MAX));
        assert!("0".parse::<UserId>().is_err());
        assert!("abc".parse::<UserId>().is_err());
        assert_eq!("42".parse::<UserId>().map(UserId::get), Ok(42));
    }
}
