//! Opens N authenticated idle connections to a hopd and holds them: the load for measuring
//! memory per idle connection and the connection ceiling (docs/uring.md).
//!
//! `idle_clients ADDR SERVER_KEY_HEX COUNT SOURCE_IP [THREADS]`
//!
//! Each connection is a new user: it binds to `SOURCE_IP` (a 127.0.0.x address, so several
//! processes together can pass one address's ephemeral ports), runs the Noise handshake,
//! checks the server's key, sends message 3 and then stays silent. Only the socket is kept (no
//! buffers), so one process holds up to its descriptor limit. It prints `ready N` once all are
//! open (or `stopped N: why` at the first failure) and holds them until its standard input
//! closes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use hop_protocol::noise::ClientHandshake;
use hop_protocol::StaticKey;
use socket2::{Domain, Protocol, Socket, Type};

/// The longest one connection's handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

fn open(addr: SocketAddr, source: SocketAddr, server_key: &[u8; 32]) -> Result<TcpStream, String> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(&source.into())
        .map_err(|e| format!("bind {source}: {e}"))?;
    socket
        .connect_timeout(&addr.into(), HANDSHAKE_TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let key = StaticKey::generate().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut handshake = ClientHandshake::start(&key, &mut out);
    stream.write_all(&out).map_err(|e| format!("write: {e}"))?;
    let mut header = [0u8; 2];
    stream
        .read_exact(&mut header)
        .map_err(|e| format!("read: {e}"))?;
    let mut frame = vec![0u8; usize::from(u16::from_be_bytes(header))];
    stream
        .read_exact(&mut frame)
        .map_err(|e| format!("read: {e}"))?;
    let got = handshake
        .handle_response(&frame)
        .map_err(|e| format!("handshake: {e}"))?;
    if &got != server_key {
        return Err("the server's key is not the one given".into());
    }
    out.clear();
    handshake
        .finish(&mut out)
        .map_err(|e| format!("handshake: {e}"))?;
    stream.write_all(&out).map_err(|e| format!("write: {e}"))?;
    Ok(stream)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: idle_clients ADDR SERVER_KEY_HEX COUNT SOURCE_IP [THREADS]");
        std::process::exit(2);
    }
    let addr: SocketAddr = args[1].parse().expect("ADDR is host:port");
    let mut server_key = [0u8; 32];
    hex::decode_to_slice(&args[2], &mut server_key).expect("SERVER_KEY_HEX is 64 hex digits");
    let count: usize = args[3].parse().expect("COUNT is a number");
    let source: SocketAddr = format!("{}:0", args[4])
        .parse()
        .expect("SOURCE_IP is an IPv4");
    let threads: usize = args.get(5).map_or(4, |t| t.parse().expect("THREADS"));
    let per_thread = count.div_ceil(threads);
    let workers: Vec<_> = (0..threads)
        .map(|index| {
            let want = per_thread.min(count.saturating_sub(index * per_thread));
            std::thread::spawn(move || {
                let mut held = Vec::with_capacity(want);
                for _ in 0..want {
                    match open(addr, source, &server_key) {
                        Ok(stream) => held.push(stream),
                        Err(why) => return (held, Some(why)),
                    }
                }
                (held, None)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut failure = None;
    for worker in workers {
        let (streams, why) = worker.join().expect("worker");
        held.extend(streams);
        failure = failure.or(why);
    }
    match failure {
        None => println!("ready {}", held.len()),
        Some(why) => println!("stopped {}: {why}", held.len()),
    }
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(held);
}
