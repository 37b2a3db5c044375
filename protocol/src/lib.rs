//! hop wire protocol, version 2.
//!
//! Everything here is sans-IO except [`client`] and [`keys`]' files: the framing ([`frame`]), the Noise
//! handshake and transport ([`noise`]), the stanza codec ([`wire`]) and the connection state
//! machines ([`session`]) take bytes in and give bytes and events out, so they are tested
//! without sockets, clocks or threads.
//!
//! A frame on the wire is a `u16` big-endian length and one Noise transport message; its
//! plaintext is one or more stanzas, each a varint length and a protobuf `Stanza`
//! (`proto/hop.proto`).
#![forbid(unsafe_code)]

pub mod client;
pub mod frame;
pub mod keys;
/// Mails between the nodes of a cluster: the protobuf messages of `proto/node.proto`, which
/// name [`wire`]'s `UserRef`, `Stanza` and enums. Their codec to and from the router's
/// `ShardMessage` is `hop_router::mail`.
#[allow(clippy::all, missing_debug_implementations)]
pub mod node {
    include!(concat!(env!("OUT_DIR"), "/hop.node.rs"));
}
pub mod noise;
pub mod outbox;
pub mod session;
pub mod user;
pub mod wire;

pub use keys::StaticKey;
pub use user::UserId;
