//! hop-tune: OS tuning for hop hosts that hold millions of connections.
//!
//! The [`model`] turns a target (connections, memory, role, OS, shards, IO backend) into every
//! setting that matters, each with its value, place, order, reason and source. [`ceiling`]
//! turns the live limits of a host into the connection count they allow and names the binding
//! limit; hopd calls [`connection_ceiling`] at start. [`live`] reads a host, [`check`] compares
//! it with a plan, [`render`] writes the files a sysadmin installs, and [`apply`] raises
//! run-time settings (dry run unless told otherwise, never lowering, with a rollback file).
//!
//! Everything except reading and writing the host is pure and OS-independent, so the
//! FreeBSD logic is tested on Linux too.

#![forbid(unsafe_code)]

pub mod apply;
pub mod ceiling;
pub mod check;
pub mod error;
pub mod live;
pub mod model;
pub mod render;

pub use ceiling::{connection_ceiling, Bound, Ceiling, Factor, LiveLimits};
pub use error::{HostError, InputError};
pub use model::{plan, Backend, Os, Plan, Role, Target};

/// Parses a memory size: a number of bytes with an optional binary unit (`K`/`KiB`, `M`/`MiB`,
/// `G`/`GiB`, `T`/`TiB`, `B`); `_` may group digits.
pub fn parse_memory(text: &str) -> Result<u64, InputError> {
    let bad = || InputError::MemorySize {
        text: text.to_string(),
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let digits: String = digits.chars().filter(|c| *c != '_').collect();
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(bad()),
    };
    number.checked_mul(1 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memory_sizes() {
        assert_eq!(parse_memory("64GiB"), Ok(64 << 30));
        assert_eq!(parse_memory("64G"), Ok(64 << 30));
        assert_eq!(parse_memory("1_000"), Ok(1_000));
        assert_eq!(parse_memory("512 MiB"), Ok(512 << 20));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("64GB").is_err());
        assert!(parse_memory("99999999999T").is_err());
    }
}
