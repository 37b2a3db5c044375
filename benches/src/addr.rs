//! Source addresses and the port budget.
//!
//! A TCP connection is named by its 4-tuple. Against one server address, one source address
//! offers at most the ephemeral port range (`net.ipv4.ip_local_port_range`, about 28,000 ports
//! by default), so a generator that binds nothing stops there. Binding each socket to one of
//! many loopback addresses before `connect` (with `IP_BIND_ADDRESS_NO_PORT`, so the kernel picks
//! the port at `connect` time, per 4-tuple) multiplies the budget by the number of addresses.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

/// Connections placed on one source address before moving to the next. Well under any
/// ephemeral range, so TIME_WAIT sockets from an earlier run leave room.
pub const CONNECTIONS_PER_SOURCE_MAX: u32 = 10_000;
/// Source addresses are taken from 127.1.0.1 upwards (127.0.0.1 is left to the servers).
const FIRST_SOURCE: u32 = u32::from_be_bytes([127, 1, 0, 1]);
/// The last usable address of 127.0.0.0/8.
const LAST_SOURCE: u32 = u32::from_be_bytes([127, 255, 255, 254]);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BudgetError {
    #[error(
        "{wanted} connections need {sources_needed} source addresses of {per_source} ports each, \
         but 127.0.0.0/8 offers only {sources_available} from this generator"
    )]
    NotEnoughSources {
        wanted: u64,
        per_source: u32,
        sources_needed: u64,
        sources_available: u64,
    },
    #[error("the ephemeral port range {low}..={high} is empty")]
    EmptyPortRange { low: u32, high: u32 },
}

/// How the connections of a run are spread over source addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePlan {
    /// The first source address this plan uses, as a big-endian u32.
    first: u32,
    /// Connections per source address.
    pub per_source: u32,
    /// Source addresses in use.
    pub sources: u32,
}

impl SourcePlan {
    /// Plans `connections` from source addresses starting `offset` addresses past the first,
    /// given the ephemeral port range (inclusive). Fails plainly when the target cannot be
    /// reached from this generator.
    pub fn new(connections: u64, offset: u32, port_range: (u32, u32)) -> Result<Self, BudgetError> {
        let (low, high) = port_range;
        if high < low {
            return Err(BudgetError::EmptyPortRange { low, high });
        }
        let ports = high - low + 1;
        let per_source = ports.min(CONNECTIONS_PER_SOURCE_MAX);
        let first = FIRST_SOURCE + offset;
        let sources_available = u64::from(LAST_SOURCE.saturating_sub(first) + 1);
        let sources_needed = connections.div_ceil(u64::from(per_source)).max(1);
        if sources_needed > sources_available {
            return Err(BudgetError::NotEnoughSources {
                wanted: connections,
                per_source,
                sources_needed,
                sources_available,
            });
        }
        let plan = Self {
            first,
            per_source,
            sources: sources_needed as u32,
        };
        debug_assert!(plan.budget() >= connections);
        Ok(plan)
    }

    /// The most connections this plan can open.
    pub fn budget(&self) -> u64 {
        u64::from(self.per_source) * u64::from(self.sources)
    }

    /// The source address of connection `index`.
    pub fn source(&self, index: u64) -> Ipv4Addr {
        assert!(index < self.budget(), "connection index past the budget");
        let address = self.first + (index / u64::from(self.per_source)) as u32;
        debug_assert!(address <= LAST_SOURCE);
        Ipv4Addr::from(address)
    }
}

/// Reads the ephemeral port range of this machine.
pub fn local_port_range() -> io::Result<(u32, u32)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    parse_port_range(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "ip_local_port_range"))
}

fn parse_port_range(text: &str) -> Option<(u32, u32)> {
    let mut fields = text.split_whitespace().map(str::parse::<u32>);
    Some((fields.next()?.ok()?, fields.next()?.ok()?))
}

/// A non-blocking TCP socket bound to `source` (port chosen at connect time) and connecting
/// to `server`.
pub fn connect_from(source: Ipv4Addr, server: SocketAddr) -> io::Result<mio::net::TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    bind_address_no_port(&socket)?;
    socket.bind(&SocketAddrV4::new(source, 0).into())?;
    match socket.connect(&server.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(error) => return Err(error),
    }
    Ok(mio::net::TcpStream::from_std(socket.into()))
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`: `bind` takes the address only and the port is picked at
/// `connect`, per 4-tuple, instead of reserving a port for all destinations at `bind`.
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let enable: libc::c_int = 1;
    // SAFETY: the descriptor is open for the lifetime of `socket`; the option value is a
    // c_int that lives on this stack frame for the duration of the call, and its size is
    // passed alongside.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::addr_of!(enable).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_when_the_range_suffices() {
        let plan = SourcePlan::new(5_000, 0, (32768, 60999)).unwrap();
        assert_eq!(plan.sources, 1);
        assert_eq!(plan.source(0), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(plan.source(4_999), Ipv4Addr::new(127, 1, 0, 1));
    }

    #[test]
    fn connections_spread_past_one_source() {
        let plan = SourcePlan::new(250_000, 0, (32768, 60999)).unwrap();
        assert_eq!(plan.per_source, CONNECTIONS_PER_SOURCE_MAX);
        assert_eq!(plan.sources, 25);
        assert_eq!(plan.source(9_999), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(plan.source(10_000), Ipv4Addr::new(127, 1, 0, 2));
        assert_eq!(plan.source(249_999), Ipv4Addr::new(127, 1, 0, 25));
        assert!(plan.budget() >= 250_000);
    }

    #[test]
    fn a_narrow_port_range_needs_more_sources() {
        let plan = SourcePlan::new(1_000, 0, (40000, 40099)).unwrap();
        assert_eq!(plan.per_source, 100);
        assert_eq!(plan.sources, 10);
        assert_eq!(plan.source(100), Ipv4Addr::new(127, 1, 0, 2));
    }

    #[test]
    fn offsets_keep_processes_apart() {
        let first = SourcePlan::new(20_000, 0, (32768, 60999)).unwrap();
        let second = SourcePlan::new(20_000, first.sources, (32768, 60999)).unwrap();
        assert_eq!(second.source(0), Ipv4Addr::new(127, 1, 0, 3));
    }

    #[test]
    fn an_unreachable_target_is_refused_plainly() {
        let error = SourcePlan::new(u64::MAX / 2, 0, (40000, 40000)).unwrap_err();
        assert!(matches!(error, BudgetError::NotEnoughSources { .. }));
        assert!(error.to_string().contains("source addresses"));
        assert_eq!(
            SourcePlan::new(1, 0, (5, 4)).unwrap_err(),
            BudgetError::EmptyPortRange { low: 5, high: 4 }
        );
    }

    #[test]
    fn port_range_parses() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("junk"), None);
    }
}
