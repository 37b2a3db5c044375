//! Static X25519 keys: the server's identity and each client's identity.
//!
//! A key file holds the private key as 64 hex digits and a newline, mode 0600. The public key
//! is derived from it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use curve25519_dalek::montgomery::MontgomeryPoint;
use thiserror::Error;

use crate::user::UserId;

pub const KEY_BYTES: usize = 32;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is malformed: expected 64 hex digits")]
    Malformed { path: String },
    #[error("key file {path} is readable by others (mode {mode:o}); run chmod 600 {path}")]
    Permissions { path: String, mode: u32 },
    #[error("no randomness available: {0}")]
    Random(String),
}

/// A static key pair.
#[derive(Clone)]
pub struct StaticKey {
    private: [u8; KEY_BYTES],
    public: [u8; KEY_BYTES],
}

impl std::fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKey")
            .field("public", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

impl StaticKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let keypair = crate::noise::builder()
            .generate_keypair()
            .map_err(|error| KeyError::Random(error.to_string()))?;
        let mut private = [0u8; KEY_BYTES];
        private.copy_from_slice(&keypair.private);
        Ok(Self::from_private(private))
    }

    pub fn from_private(private: [u8; KEY_BYTES]) -> Self {
        let public = MontgomeryPoint::mul_base_clamped(private).to_bytes();
        Self { private, public }
    }

    pub fn private(&self) -> &[u8; KEY_BYTES] {
        &self.private
    }

    pub fn public(&self) -> &[u8; KEY_BYTES] {
        &self.public
    }

    pub fn user_id(&self) -> UserId {
        UserId::from_public_key(&self.public)
    }

    /// Reads a key file; refuses one that others may read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let metadata = fs::metadata(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: shown, mode });
        }
        let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        let private = parse_hex_key(text.trim()).ok_or(KeyError::Malformed { path: shown })?;
        Ok(Self::from_private(private))
    }

    /// Writes a new key file with mode 0600; refuses to overwrite an existing file.
    pub fn save_new(&self, path: &Path) -> Result<(), KeyError> {
        let error = |source| KeyError::Write {
            path: path.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(error)?;
        writeln!(file, "{}", hex::encode(self.private)).map_err(error)?;
        file.sync_all().map_err(error)
    }

    /// Loads the key at `path`, or creates one there if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyError> {
        if path.exists() {
            return Ok((Self::load(path)?, false));
        }
        let key = Self::generate()?;
        key.save_new(path)?;
        Ok((key, true))
    }
}

/// Parses 64 hex digits into a 32-byte key.
pub fn parse_hex_key(text: &str) -> Option<[u8; KEY_BYTES]> {
    let bytes = hex::decode(text).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_matches_the_noise_library() {
        let keypair = crate::noise::builder().generate_keypair().unwrap();
        let mut private = [0u8; KEY_BYTES];
        private.copy_from_slice(&keypair.private);
        assert_eq!(
            StaticKey::from_private(private).public().as_slice(),
            keypair.public.as_slice()
        );
    }

    #[test]
    fn save_and_load_round_trip_with_private_mode() {
        let dir = std::env::temp_dir().join(format!("hop-keys-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        let _ = fs::remove_file(&path);
        let key = StaticKey::generate().unwrap();
        key.save_new(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(StaticKey::load(&path).unwrap().public(), key.public());
        assert!(key.save_new(&path).is_err(), "must not overwrite");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            StaticKey::load(&path),
            Err(KeyError::Permissions { .. })
        ));
        fs::write(&path, "nothex\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            StaticKey::load(&path),
            Err(KeyError::Malformed { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
