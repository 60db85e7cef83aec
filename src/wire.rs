//! The bytes on the wire, written once: the event text, the keep-alive comment, HTTP/1.1
//! chunk framing and the terminator, the stream response's headers and CORS. Whoever writes
//! a stream (the HTTP/1.1 fast path, the direct fan-out, hyper's bodies, the canned error
//! responses) takes its bytes from here, so they cannot drift apart.

use std::fmt::Write as _;
use std::sync::LazyLock;

use bytes::Bytes;

use crate::timestamp::Timestamp;

/// The CORS header every response carries: SDKs run in browsers on customers' domains.
pub const ALLOW_ORIGIN: (&str, &str) = ("access-control-allow-origin", "*");

/// The response headers of every stream, whoever writes them. `text/event-stream` because
/// OkHttp (Android) rejects any other type; `X-Accel-Buffering: no` because nginx buffers
/// responses unless told not to, which would hold events back; every origin may read it.
pub const STREAM_HEADERS: [(&str, &str); 4] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
    ALLOW_ORIGIN,
];

/// A comment line: SSE parsers ignore it, proxies and NAT gateways see traffic. The blank
/// line ends it as its own block, so no parser glues it to the next event.
pub const KEEPALIVE: Bytes = Bytes::from_static(b": keepalive\n\n");
/// The same comment as an HTTP/1.1 chunk.
pub const KEEPALIVE_CHUNK: Bytes = Bytes::from_static(b"d\r\n: keepalive\n\n\r\n");
/// The last chunk of a chunked body: the stream ended cleanly, the client reconnects.
pub const TERMINATOR: &[u8] = b"0\r\n\r\n";

/// The head of a stream the HTTP/1.1 fast path serves to a client that said
/// `Connection: close` (or over TLS): the stream headers, chunked framing, and
/// `connection: close`, as the socket closes when the stream ends.
pub static STREAM_HEAD: LazyLock<Bytes> = LazyLock::new(|| stream_head("connection: close\r\n"));

/// The same for a client that keeps its connection (HTTP/1.1's default): after a clean end
/// at the stream's age the connection serves its next request.
pub static STREAM_HEAD_KEEP_ALIVE: LazyLock<Bytes> = LazyLock::new(|| stream_head(""));

fn stream_head(connection: &str) -> Bytes {
    let mut head = String::from("HTTP/1.1 200 OK\r\n");
    for (name, value) in STREAM_HEADERS {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("transfer-encoding: chunked\r\n");
    head.push_str(connection);
    head.push_str("\r\n");
    Bytes::from(head)
}

/// One `environment_updated` event, encoded once and shared by every subscriber.
#[derive(Clone, Debug, Default)]
pub struct Encoded {
    /// The event as an HTTP/1.1 chunk (`<len>\r\n<event>\r\n`), written as is by the
    /// HTTP/1.1 fast path and the direct fan-out.
    pub chunk: Bytes,
    /// The bare event, a slice of `chunk` (same allocation), for HTTP/2 and TLS bodies.
    pub event: Bytes,
}

impl Encoded {
    pub fn new(timestamp: Timestamp) -> Self {
        let event = event_text(timestamp);
        let mut framed = format!("{:x}\r\n", event.len()).into_bytes();
        let start = framed.len();
        framed.extend_from_slice(event.as_bytes());
        framed.extend_from_slice(b"\r\n");
        let chunk = Bytes::from(framed);
        Self {
            event: chunk.slice(start..chunk.len() - 2),
            chunk,
        }
    }
}

/// The text of one `environment_updated` event, in the exact shape SDKs parse. The
/// timestamp renders through its own `Display`, so its format lives in one place.
pub fn event_text(timestamp: Timestamp) -> String {
    format!("event: environment_updated\ndata: {{\"updated_at\": {timestamp}}}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chunk_frames_the_event_and_shares_its_bytes() {
        let timestamp = Timestamp::from_micros(1_500_000).expect("in range");
        let encoded = Encoded::new(timestamp);
        assert_eq!(
            &encoded.chunk[..],
            b"36\r\nevent: environment_updated\ndata: {\"updated_at\": 1.5}\n\n\r\n"
        );
        assert_eq!(&encoded.event[..], event_text(timestamp).as_bytes());
        assert_eq!(encoded.chunk[4..].as_ptr(), encoded.event.as_ptr());
    }

    #[test]
    fn the_keepalive_chunk_frames_the_keepalive() {
        let framed = format!(
            "{:x}\r\n{}\r\n",
            KEEPALIVE.len(),
            std::str::from_utf8(&KEEPALIVE).expect("ascii")
        );
        assert_eq!(framed.as_bytes(), &KEEPALIVE_CHUNK[..]);
    }

    #[test]
    fn the_stream_head_carries_every_stream_header() {
        let head = std::str::from_utf8(&STREAM_HEAD).expect("ascii");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        for (name, value) in STREAM_HEADERS {
            assert!(head.contains(&format!("\r\n{name}: {value}\r\n")), "{head}");
        }
        assert!(head.ends_with("transfer-encoding: chunked\r\nconnection: close\r\n\r\n"));
        let kept = std::str::from_utf8(&STREAM_HEAD_KEEP_ALIVE).expect("ascii");
        assert_eq!(kept, head.replace("connection: close\r\n", ""));
    }
}
