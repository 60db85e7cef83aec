//! `floor`: this machine's physical floor for fan-out, served to the same `subscribe`
//! scenario as the real service. One thread accepts; each update is written by one thread,
//! one blocking `write` of one pre-encoded chunk per subscriber socket: no runtime, no
//! timers, no keep-alives, no per-subscriber state beyond the socket. The service's CPU per
//! delivery and latency are reported as ratios to this.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};

const STREAM_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";

#[derive(clap::Args)]
pub struct FloorArgs {
    /// Where to listen (port 0: any; the address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

type Subscribers = Arc<Mutex<Vec<TcpStream>>>;

pub fn run(args: FloorArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)?;
    // The same line the service prints, so scripts find the port the same way.
    eprintln!("flagsmith-sse listening on {}", listener.local_addr()?);
    let subscribers: Subscribers = Arc::default();
    for connection in listener.incoming() {
        let Ok(mut connection) = connection else {
            continue;
        };
        let _ = connection.set_nodelay(true);
        let Some((head, rest)) = read_head(&mut connection, Vec::new()) else {
            continue;
        };
        if head.starts_with("GET ") && head.contains("/stream") {
            if connection.write_all(STREAM_HEAD).is_ok() {
                subscribers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(connection);
            }
        } else if head.starts_with("POST ") {
            let subscribers = subscribers.clone();
            std::thread::spawn(move || publisher(connection, head, rest, &subscribers));
        } else {
            let _ = connection
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    }
    Ok(())
}

/// Serves one keep-alive connection of queue-change POSTs: answers each, then writes its
/// event to every subscriber in turn.
fn publisher(
    mut connection: TcpStream,
    mut head: String,
    mut rest: Vec<u8>,
    subscribers: &Subscribers,
) {
    loop {
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut buf = [0u8; 4096];
        while rest.len() < length {
            match connection.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
            }
        }
        let body: Vec<u8> = rest.drain(..length).collect();
        let body = String::from_utf8_lossy(&body);
        let number = body
            .split_once(':')
            .map_or("0", |(_, v)| v.trim().trim_end_matches('}').trim());
        let event = format!("event: environment_updated\ndata: {{\"updated_at\": {number}}}\n\n");
        let chunk = format!("{:x}\r\n{event}\r\n", event.len()).into_bytes();
        if connection
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            .is_err()
        {
            return;
        }
        for subscriber in subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter_mut()
        {
            let _ = subscriber.write_all(&chunk);
        }
        match read_head(&mut connection, rest) {
            Some((next, more)) => (head, rest) = (next, more),
            None => return,
        }
    }
}

/// Reads up to the end of a request head; returns it and whatever followed.
fn read_head(connection: &mut TcpStream, mut buffer: Vec<u8>) -> Option<(String, Vec<u8>)> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buffer.split_off(end + 4);
            return Some((String::from_utf8_lossy(&buffer).into_owned(), rest));
        }
        match connection.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&buf[..n]),
        }
        if buffer.len() > 64 * 1024 {
            return None;
        }
    }
}
