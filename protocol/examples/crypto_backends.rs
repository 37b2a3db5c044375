//! Times the crypto backends `snow` can use for hop's Noise pattern, to choose one:
//! `cargo run --release -p hop-protocol --example crypto_backends`.
//!
//! Prints, for the pure-Rust default resolver and the ring-backed one hop uses, the time to
//! seal and open a 24-byte message, and the time of a full XX handshake (both sides); then the
//! same seal and open through hop's own `Transport` (ring, keys from the raw split).

use std::time::Instant;

use snow::resolvers::{BoxedCryptoResolver, DefaultResolver, FallbackResolver, RingResolver};
use snow::{Builder, HandshakeState, TransportState};

const PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
const MESSAGES: u32 = 200_000;
const HANDSHAKES: u32 = 2_000;

/// A named way to build a resolver.
type Backend = (&'static str, fn() -> BoxedCryptoResolver);

fn main() {
    let backends: [Backend; 2] = [
        ("default (pure Rust)", || Box::new(DefaultResolver)),
        ("ring + default fallback (hop)", || {
            Box::new(FallbackResolver::new(
                Box::new(RingResolver),
                Box::new(DefaultResolver),
            ))
        }),
    ];
    for (name, resolver) in backends {
        let (mut client, mut server) = pair(resolver);
        let payload = [7u8; 24];
        let mut sealed = [0u8; 64];
        let mut opened = [0u8; 64];
        let start = Instant::now();
        for _ in 0..MESSAGES {
            let length = client.write_message(&payload, &mut sealed).expect("seal");
            server
                .read_message(&sealed[..length], &mut opened)
                .expect("open");
        }
        let per_message = start.elapsed() / MESSAGES;
        let start = Instant::now();
        for _ in 0..HANDSHAKES {
            pair(resolver);
        }
        let per_handshake = start.elapsed() / HANDSHAKES;
        println!("{name:32} seal+open 24 B: {per_message:>9.2?}   XX handshake, both sides: {per_handshake:>9.2?}");
    }
    hop_transport();
    println!(
        "memory of an open session: snow TransportState {} B + 2 boxed ring keys of {} B; hop Transport {} B",
        std::mem::size_of::<TransportState>(),
        std::mem::size_of::<ring::aead::LessSafeKey>(),
        std::mem::size_of::<hop_protocol::noise::Transport>(),
    );
}

/// Seal + open through hop's `Transport`, after a handshake through hop's state machines.
fn hop_transport() {
    use hop_protocol::frame::{Deframer, FrameError};
    use hop_protocol::noise::{
        ClientHandshake, ServerHandshake, ServerStep, HANDSHAKE_FRAME_LIMITS,
    };
    use hop_protocol::StaticKey;

    let body = |stream: &[u8]| {
        let mut frame = Vec::new();
        Deframer::new()
            .handle_input::<FrameError>(stream, &mut || HANDSHAKE_FRAME_LIMITS, &mut |f| {
                frame = f.to_vec();
                Ok(())
            })
            .expect("frame");
        frame
    };
    let server_key = StaticKey::generate().expect("key");
    let client_key = StaticKey::generate().expect("key");
    let mut wire = Vec::new();
    let mut client = ClientHandshake::start(&client_key, &mut wire);
    let mut reply = Vec::new();
    let ServerStep::Continue(server) = Box::new(ServerHandshake::new(&server_key))
        .handle_frame(&body(&wire), &mut reply)
        .expect("message 1")
    else {
        panic!("finished early")
    };
    client.handle_response(&body(&reply)).expect("message 2");
    wire.clear();
    let mut client = client.finish(&mut wire).expect("message 3");
    let ServerStep::Finished {
        transport: mut server,
        ..
    } = server
        .handle_frame(&body(&wire), &mut reply)
        .expect("message 3")
    else {
        panic!("not finished")
    };
    let payload = [7u8; 24];
    let mut sealed = Vec::with_capacity(64);
    let mut scratch = vec![0u8; 65_536];
    let start = Instant::now();
    for _ in 0..MESSAGES {
        sealed.clear();
        client.seal_frame(&payload, &mut sealed);
        server.open_frame(&sealed[2..], &mut scratch).expect("open");
    }
    let per_message = start.elapsed() / MESSAGES;
    println!(
        "{:32} seal+open 24 B: {per_message:>9.2?}",
        "hop Transport (ring, raw split)"
    );
}

fn pair(resolver: fn() -> BoxedCryptoResolver) -> (TransportState, TransportState) {
    let params = PARAMS.parse().expect("params");
    let keys = Builder::with_resolver(PARAMS.parse().expect("params"), resolver());
    let client_key = keys.generate_keypair().expect("key");
    let server_key = keys.generate_keypair().expect("key");
    let mut client = Builder::with_resolver(params, resolver())
        .local_private_key(&client_key.private)
        .expect("key")
        .build_initiator()
        .expect("initiator");
    let mut server = Builder::with_resolver(PARAMS.parse().expect("params"), resolver())
        .local_private_key(&server_key.private)
        .expect("key")
        .build_responder()
        .expect("responder");
    let mut buffer = [0u8; 256];
    let mut scratch = [0u8; 256];
    let mut step = |from: &mut HandshakeState, to: &mut HandshakeState| {
        let length = from.write_message(&[], &mut buffer).expect("write");
        to.read_message(&buffer[..length], &mut scratch)
            .expect("read");
    };
    step(&mut client, &mut server);
    step(&mut server, &mut client);
    step(&mut client, &mut server);
    (
        client.into_transport_mode().expect("transport"),
        server.into_transport_mode().expect("transport"),
    )
}
