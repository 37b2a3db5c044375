//! The server-wide directory of companion devices: which account each one belongs to, so that
//! the shard that accepts a companion's connection hands it to the account's home shard, where
//! all of an account's devices live (`docs/decisions.md`, "Multi-device").
//!
//! Shared by the shards behind a read-write lock: it is read once per completed handshake and
//! written when a primary links or removes a device, never on the message path. It holds
//! companions only (a primary, or an account of one device, is its own account), and removed
//! devices, whose next connections are refused.

use std::collections::HashMap;
use std::sync::RwLock;

use hop_protocol::UserId;
use hop_store::devices::DeviceRecord;

/// Where a device's connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Its own account (a primary, or a user of one device).
    Own,
    /// A companion of this account.
    Companion(UserId),
    /// Removed from its account: refused.
    Removed,
}

#[derive(Debug, Default)]
pub struct Directory {
    links: RwLock<HashMap<UserId, Placement>>,
}

impl Directory {
    /// The directory the device records (in the order they were made) leave.
    pub fn replay(records: &[DeviceRecord]) -> Self {
        let mut links = HashMap::new();
        for record in records {
            let placement = if record.linked {
                Placement::Companion(record.account)
            } else {
                Placement::Removed
            };
            links.insert(record.device, placement);
        }
        Self {
            links: RwLock::new(links),
        }
    }

    pub fn placement(&self, device: UserId) -> Placement {
        self.read().get(&device).copied().unwrap_or(Placement::Own)
    }

    /// Claims `device` for `account`: true if it was free (never linked, or removed) or is
    /// already this account's; false if another account has it.
    pub fn claim(&self, account: UserId, device: UserId) -> bool {
        let mut links = self
            .links
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match links.get(&device) {
            Some(Placement::Companion(owner)) if *owner != account => false,
            _ => {
                links.insert(device, Placement::Companion(account));
                true
            }
        }
    }

    /// `device` was removed from its account: its connections are refused from now on.
    pub fn remove(&self, device: UserId) {
        let mut links = self
            .links
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        links.insert(device, Placement::Removed);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<UserId, Placement>> {
        // A shard that panicked while holding the lock left the map whole: every write is
        // one insert.
        self.links
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(n: u64) -> UserId {
        UserId::from_halves(n, n).unwrap()
    }

    #[test]
    fn a_device_is_claimed_once_and_refused_once_removed() {
        let record = |linked, account, device, wall_ms| DeviceRecord {
            linked,
            account: user(account),
            device: user(device),
            wall_ms,
        };
        let directory = Directory::replay(&[
            record(true, 1, 2, 1),
            record(true, 1, 3, 2),
            record(false, 1, 3, 3),
        ]);
        assert_eq!(directory.placement(user(2)), Placement::Companion(user(1)));
        assert_eq!(directory.placement(user(3)), Placement::Removed);
        assert_eq!(directory.placement(user(9)), Placement::Own);
        assert!(!directory.claim(user(5), user(2)), "another account's");
        assert!(directory.claim(user(1), user(2)), "already this account's");
        assert!(
            directory.claim(user(5), user(3)),
            "a removed device is free again"
        );
        directory.remove(user(2));
        assert_eq!(directory.placement(user(2)), Placement::Removed);
    }
}
