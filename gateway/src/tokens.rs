//! One-time registration tokens (`registration = token`): an operator issues one with
//! `hop admin token` and gives it to a new user, whose first connection redeems it to make its
//! account.
//!
//! Only a token's BLAKE2s hash is kept, in `DATA/accounts/tokens`, a text log of lines
//! `issued HASH UNIX_MS` and `used HASH`, each appended and fsynced before the answer (issuing
//! and redeeming are rare: a lock and an fsync each). A torn last line (a crash while appending)
//! is ignored. Tokens expire `token_ttl_ms` after they were issued; a used one is refused
//! forever, across restarts.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use blake2::{Blake2s256, Digest};

/// Why a token was not redeemed; the text goes to the client in its GoAway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Unknown,
    Used,
    Expired,
    /// The log could not be written: the token is not spent, the client may try again.
    Unwritable,
}

impl Refused {
    pub fn text(self) -> &'static str {
        match self {
            Self::Unknown => "this server makes accounts only with a one-time token from its operator, and this token is not one of them",
            Self::Used => "this registration token was used already; ask the operator for another",
            Self::Expired => "this registration token has expired; ask the operator for another",
            Self::Unwritable => "the server could not record the registration; try again",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Issued { at_ms: u64 },
    Used,
}

/// The tokens issued and used, shared by every shard and the admin listener.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    ttl_ms: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    tokens: HashMap<[u8; 32], State>,
}

fn hash(token: &str) -> [u8; 32] {
    Blake2s256::digest(token.trim().as_bytes()).into()
}

impl Tokens {
    /// Opens (or makes) the token log in `data/accounts`.
    pub fn open(data: &Path, ttl_ms: u64) -> io::Result<Self> {
        let folder = data.join("accounts");
        std::fs::create_dir_all(&folder)?;
        let path = folder.join("tokens");
        let mut tokens = HashMap::new();
        cut_torn_line(&path)?;
        if let Ok(file) = File::open(&path) {
            for line in BufReader::new(file).lines() {
                let line = line?;
                let mut words = line.split(' ');
                let (kind, hex) = (words.next(), words.next());
                let Some(hash) = hex
                    .and_then(|hex| hex::decode(hex).ok())
                    .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                else {
                    continue; // torn or foreign: ignored
                };
                match (kind, words.next().and_then(|ms| ms.parse().ok())) {
                    (Some("issued"), Some(at_ms)) => {
                        tokens.entry(hash).or_insert(State::Issued { at_ms });
                    }
                    (Some("used"), _) => {
                        tokens.insert(hash, State::Used);
                    }
                    _ => {}
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        Ok(Self {
            path,
            ttl_ms,
            inner: Mutex::new(Inner { file, tokens }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Issues a new token (128 random bits, hex): kept before it is returned.
    pub fn issue(&self, now_ms: u64) -> io::Result<String> {
        let mut bytes = [0u8; 16];
        for half in bytes.chunks_mut(8) {
            let random = hop_protocol::outbox::random_nonzero()
                .map_err(|_| io::Error::other("no randomness for a token"))?;
            half.copy_from_slice(&random.to_le_bytes());
        }
        let token = hex::encode(bytes);
        let hash = hash(&token);
        let mut inner = self.lock();
        append(
            &mut inner.file,
            &format!("issued {} {now_ms}\n", hex::encode(hash)),
        )?;
        inner.tokens.insert(hash, State::Issued { at_ms: now_ms });
        Ok(token)
    }

    /// Spends `token`: true once, for an issued token within its time.
    pub fn redeem(&self, token: &str, now_ms: u64) -> Result<(), Refused> {
        let hash = hash(token);
        let mut inner = self.lock();
        match inner.tokens.get(&hash) {
            None => Err(Refused::Unknown),
            Some(State::Used) => Err(Refused::Used),
            Some(State::Issued { at_ms }) if now_ms.saturating_sub(*at_ms) > self.ttl_ms => {
                Err(Refused::Expired)
            }
            Some(State::Issued { .. }) => {
                append(&mut inner.file, &format!("used {}\n", hex::encode(hash)))
                    .map_err(|_| Refused::Unwritable)?;
                inner.tokens.insert(hash, State::Used);
                Ok(())
            }
        }
    }

    /// Tokens issued and not yet used (expired ones included).
    pub fn unused(&self) -> usize {
        self.lock()
            .tokens
            .values()
            .filter(|state| matches!(state, State::Issued { .. }))
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Cuts a torn last line (a crash while appending) off the log, so that the next line starts
/// on a line of its own instead of being glued to it, and lost.
fn cut_torn_line(path: &Path) -> io::Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes
        .iter()
        .rposition(|byte| *byte == b'\n')
        .map_or(0, |at| at + 1);
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(keep as u64)?;
    file.sync_data()
}

fn append(file: &mut File, line: &str) -> io::Result<()> {
    file.write_all(line.as_bytes())?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: u64 = 86_400_000;

    #[test]
    fn a_token_is_redeemed_once_across_restarts_and_not_after_its_time() {
        let folder = tempfile::tempdir().unwrap();
        let tokens = Tokens::open(folder.path(), DAY_MS).unwrap();
        let first = tokens.issue(1_000).unwrap();
        let second = tokens.issue(1_000).unwrap();
        let late = tokens.issue(1_000).unwrap();
        assert_eq!(first.len(), 32);
        assert_ne!(first, second);
        assert_eq!(tokens.redeem("0123", 2_000), Err(Refused::Unknown));
        assert_eq!(tokens.redeem(&first, 2_000), Ok(()));
        assert_eq!(tokens.redeem(&first, 2_000), Err(Refused::Used));
        assert_eq!(tokens.unused(), 2);
        drop(tokens);
        // The token itself is not on disk, only its hash.
        let log = std::fs::read_to_string(folder.path().join("accounts/tokens")).unwrap();
        assert!(!log.contains(&first), "{log}");
        // A torn last line is ignored.
        let mut file = OpenOptions::new()
            .append(true)
            .open(folder.path().join("accounts/tokens"))
            .unwrap();
        file.write_all(b"used 12ab").unwrap();
        let tokens = Tokens::open(folder.path(), DAY_MS).unwrap();
        assert_eq!(tokens.redeem(&first, 3_000), Err(Refused::Used));
        assert_eq!(tokens.redeem(&second, 3_000), Ok(()));
        // What is written after the torn line is read back after the next restart.
        drop(tokens);
        let tokens = Tokens::open(folder.path(), DAY_MS).unwrap();
        assert_eq!(tokens.redeem(&second, 3_000), Err(Refused::Used));
        assert_eq!(
            tokens.redeem(&late, 1_000 + DAY_MS + 1),
            Err(Refused::Expired)
        );
    }
}
