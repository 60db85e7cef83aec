//! The HTTP/1.1 fast path for event streams.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for every HTTP/1.1
//! connection, about 18 KB of memory per idle subscriber; a stream needs neither. So each
//! new connection's request head is read here first: a plain `GET` of an event stream is
//! answered directly on the socket, writing each update's pre-encoded chunk (shared `Bytes`,
//! one write call, nothing allocated per subscriber). Everything else, HTTP/2 prior
//! knowledge included, is handed to hyper together with the bytes already read.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::error::ApiError;
use crate::fanout::{self, Link, Mode};
use crate::hub::Attached;
use crate::metrics::WriteKind;
use crate::routes::{Route, route};
use crate::sse::{Outgoing, Subscriber, Timed, Transport};
use crate::state::AppState;
use crate::wire::{ALLOW_ORIGIN, KEEPALIVE_CHUNK, STREAM_HEAD, STREAM_HEAD_KEEP_ALIVE, TERMINATOR};

/// Heads longer than this are hyper's to judge (it has its own limits and errors).
const MAX_SNIFF: usize = 8 * 1024;

/// What the first bytes of a connection turned out to be.
pub enum Sniffed {
    /// `GET /sse/environments/{key}/stream` over HTTP/1.1, nothing else to serve.
    Stream(StreamRequest),
    /// Anything else: hyper serves it, starting with these bytes.
    Other(Bytes),
    /// Closed, failed or too slow before a request head arrived.
    Gone,
}

/// Reads the request head (within `timeout`) and decides who serves the connection.
pub async fn sniff<I: AsyncRead + Unpin>(io: &mut I, timeout: Duration) -> Sniffed {
    let mut buffer = Vec::with_capacity(1024);
    let read_head = async {
        loop {
            match io.read_buf(&mut buffer).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            match decide(&buffer) {
                Decision::ReadMore => {}
                decision => return Some(decision),
            }
        }
    };
    match tokio::time::timeout(timeout, read_head).await {
        Ok(Some(Decision::Stream(request))) => Sniffed::Stream(request),
        Ok(Some(Decision::Hyper)) => Sniffed::Other(Bytes::from(buffer)),
        Ok(Some(Decision::ReadMore) | None) | Err(_) => Sniffed::Gone,
    }
}

/// A plain HTTP/1.1 stream request.
#[derive(Debug, PartialEq, Eq)]
pub struct StreamRequest {
    /// The environment key, not yet validated.
    pub key: Box<str>,
    /// The client did not say `Connection: close`: after a clean end at the stream's age
    /// the connection stays open for its next request (HTTP/1.1's default).
    pub keep_alive: bool,
}

/// What the bytes read so far make of a connection.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// The request head is not complete yet.
    ReadMore,
    /// A plain HTTP/1.1 `GET` of a stream.
    Stream(StreamRequest),
    /// Anything else, for hyper to serve.
    Hyper,
}

fn decide(buffer: &[u8]) -> Decision {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buffer) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if buffer.len() < MAX_SNIFF => return Decision::ReadMore,
        Ok(httparse::Status::Partial) | Err(_) => return Decision::Hyper,
    }
    if request.method != Some("GET") || request.version != Some(1) {
        return Decision::Hyper;
    }
    // A body, an upgrade or an expectation is not a plain stream request: let hyper judge.
    // An empty body is plain: Flutter's dart:io `HttpClient` says `content-length: 0` on
    // every GET (flagsmith-flutter-client through flutter_client_sse's `http.Client`).
    let plain = request.headers.iter().all(|h| {
        let body = h.name.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() != b"0";
        !(body
            || h.name.eq_ignore_ascii_case("transfer-encoding")
            || h.name.eq_ignore_ascii_case("upgrade")
            || h.name.eq_ignore_ascii_case("expect"))
    });
    let keep_alive = !request.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("connection")
            && h.value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
    });
    match route(request.path.unwrap_or("")) {
        Some(Route::Stream(key)) if plain => Decision::Stream(StreamRequest {
            key: Box::from(key),
            keep_alive,
        }),
        _ => Decision::Hyper,
    }
}

/// Serves one event stream on `io` until the client leaves, a write fails or times out,
/// or the hub closes for shutdown (then the chunked body is ended properly). The task
/// writes every event itself: the path of sockets the fan-out cannot write directly (TLS).
pub async fn serve_stream<I>(mut io: I, state: Arc<AppState>, key: &str, write_timeout: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut subscriber = match state.open_stream(key, Transport::Http1Raw, None) {
        Ok(subscriber) => subscriber,
        Err(err) => {
            state.delay_refusal().await;
            return refuse(io, err).await;
        }
    };
    drop(state);
    if !matches!(
        tokio::time::timeout(write_timeout, io.write_all(&STREAM_HEAD)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    // Clients send nothing more; reading only tells us when they leave.
    let mut probe = [0u8; 32];
    loop {
        let outgoing = tokio::select! {
            outgoing = subscriber.next() => outgoing,
            read = io.read(&mut probe) => match read {
                Ok(0) => return,
                Ok(_) => continue,
                Err(_) => {
                    // A reset, not a clean close: whatever was in flight was lost.
                    if let Some(message) = subscriber.last_message() {
                        subscriber.write_failed(message);
                    }
                    return;
                }
            },
        };
        let Some(outgoing) = outgoing else {
            // Its age, or shutdown: end the chunked body after the last whole event, so the
            // client sees a clean end and reconnects.
            let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(TERMINATOR)).await;
            let _ = io.shutdown().await;
            return;
        };
        let message = outgoing.message();
        let bytes = match &outgoing {
            Outgoing::Event { bytes, .. } => bytes.clone(),
            Outgoing::Keepalive => KEEPALIVE_CHUNK,
        };
        match tokio::time::timeout(write_timeout, io.write_all(&bytes)).await {
            Ok(Ok(())) => subscriber.wrote(&outgoing),
            // A failed write, or a client that stopped reading for the whole timeout.
            _ => {
                subscriber.write_failed(message);
                return;
            }
        }
    }
}

/// An event stream on a plain TCP socket, written directly by the fan-out (see `fanout`):
/// its task writes the head and the event sent on connect, then only what the fan-out
/// hands back (a socket that would block), keep-alives, and the end. It wakes for those,
/// for its timer and for the client leaving, never for an ordinary delivery.
///
/// What an idle subscriber's task holds, so kept small: the task is as large as its
/// largest state and lives as long as the subscriber, so callers box the rare steps
/// (`open_direct`, `end`) and keep only this and `run` in the task.
pub struct DirectStream {
    subscriber: Subscriber,
    link: Arc<Link>,
    /// Registered with the fan-out while this lives.
    _attached: Attached,
    keep_alive: bool,
}

/// Opens a stream on `tcp` (or refuses it, answering the client): the head, then the
/// socket registered for the fan-out. `None` when the connection is done.
pub async fn open_direct(
    mut tcp: TcpStream,
    state: &Arc<AppState>,
    request: &StreamRequest,
    write_timeout: Duration,
) -> Option<DirectStream> {
    let mut subscriber = match state.open_stream(&request.key, Transport::Http1Raw, None) {
        Ok(subscriber) => subscriber,
        Err(err) => {
            state.delay_refusal().await;
            refuse(tcp, err).await;
            return None;
        }
    };
    let head = if request.keep_alive {
        &STREAM_HEAD_KEEP_ALIVE
    } else {
        &STREAM_HEAD
    };
    // The head and the event sent on connect leave in one write: one segment, one wake-up
    // of the client, one system call (part of what a reopen costs).
    let first = subscriber.newer();
    let event = match &first {
        Some(Outgoing::Event { bytes, .. }) => &bytes[..],
        Some(Outgoing::Keepalive) | None => &[],
    };
    let written = tokio::time::timeout(write_timeout, write_both(&mut tcp, head, event)).await;
    if !matches!(written, Ok(Ok(()))) {
        if let Some(first) = &first {
            subscriber.write_failed(first.message());
        }
        return None;
    }
    if let Some(first) = &first {
        subscriber.wrote(first);
    }
    let link = Arc::new(Link::new(
        tcp,
        subscriber.connected_at(),
        subscriber.metrics().clone(),
    ));
    {
        // What the task sent, before the fan-out can see the link.
        let mut sent = link.lock();
        sent.seen = subscriber.seen();
        sent.last_message = first.as_ref().map(Outgoing::message);
    }
    let Some(attached) = state.hub().attach(&request.key, link.clone()) else {
        // The hub closed (shutdown) meanwhile: end at once, cleanly.
        end_direct(&link, true, false).await;
        return None;
    };
    Some(DirectStream {
        subscriber,
        link,
        _attached: attached,
        keep_alive: request.keep_alive,
    })
}

impl DirectStream {
    /// Streams until the end: its age, shutdown, or the client gone.
    pub fn run(&mut self, write_timeout: Duration) -> impl Future<Output = Ended> + '_ {
        stream_direct(&mut self.subscriber, &self.link, write_timeout)
    }

    /// Ends the stream as `ended` calls for. Returns the socket when the stream ended
    /// cleanly at its age and the client asked to keep the connection: its next request is
    /// read from it (clients that reuse connections skip a TCP handshake per reopen).
    pub async fn end(self, ended: Ended) -> Option<TcpStream> {
        let DirectStream {
            subscriber,
            link,
            _attached,
            keep_alive,
        } = self;
        drop(_attached);
        let reusable = ended == Ended::Age && keep_alive;
        let kept = end_direct(&link, ended != Ended::Gone, reusable).await;
        drop(subscriber);
        if !kept {
            return None;
        }
        // Detached above: this holds the only reference.
        Arc::try_unwrap(link).ok().map(|link| link.socket)
    }
}

/// Writes `head` then `event` with one system call when the socket takes both.
async fn write_both(tcp: &mut TcpStream, head: &[u8], event: &[u8]) -> io::Result<()> {
    let written = tcp
        .write_vectored(&[io::IoSlice::new(head), io::IoSlice::new(event)])
        .await?;
    match written.checked_sub(head.len()) {
        Some(of_event) => tcp.write_all(&event[of_event..]).await,
        None => {
            tcp.write_all(&head[written..]).await?;
            tcp.write_all(event).await
        }
    }
}

/// How a directly written stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// At its age: cleanly, and the connection may serve another request.
    Age,
    /// Shutdown (drain or close): cleanly, and the connection closes.
    Stop,
    /// The client left or a write failed: nothing more to write.
    Gone,
}

async fn stream_direct(subscriber: &mut Subscriber, link: &Link, write_timeout: Duration) -> Ended {
    loop {
        match Box::pin(catch_up(subscriber, link, write_timeout)).await {
            CaughtUp::Direct => {}
            CaughtUp::End => return Ended::Stop,
            CaughtUp::Failed(message) => {
                subscriber.write_failed(message);
                return Ended::Gone;
            }
        }
        // Polled in place rather than through `select!` over futures: this is where an idle
        // subscriber waits, and every future kept here would be memory per subscriber.
        let woke = std::future::poll_fn(|cx| {
            if link.poll_woken(cx).is_ready() {
                return Poll::Ready(Wake::Handed);
            }
            if let Poll::Ready(ready) = link.socket.poll_read_ready(cx) {
                return Poll::Ready(Wake::Readable(ready));
            }
            if subscriber.timer().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
            Poll::Pending
        })
        .await;
        match woke {
            Wake::Handed => {}
            Wake::Readable(ready) => {
                // Clients send nothing more; reading only tells us when they leave.
                let mut probe = [0u8; 32];
                match ready.and_then(|()| link.socket.try_read(&mut probe)) {
                    Ok(0) => return Ended::Gone,
                    Ok(_) => {}
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        // A reset, not a clean close: whatever was in flight was lost.
                        if let Some(message) = link.lock().last_message {
                            subscriber.write_failed(message);
                        }
                        return Ended::Gone;
                    }
                }
            }
            Wake::Timer => {
                let wrote_at = link.lock().wrote_at;
                let seen = subscriber.seen();
                subscriber.sent_elsewhere(seen, wrote_at);
                match subscriber.timer_fired() {
                    Timed::End if subscriber.leaving() => return Ended::Stop,
                    Timed::End => return Ended::Age,
                    Timed::Keepalive => keepalive(subscriber, link),
                    Timed::Nothing => {}
                }
            }
        }
    }
}

/// What woke a waiting direct stream.
enum Wake {
    /// The fan-out handed it the socket, or the hub began draining or closed.
    Handed,
    /// The client sent something or left.
    Readable(io::Result<()>),
    /// Its timer: keep-alive, age, or its moment in the drain window.
    Timer,
}

/// How a catch-up ended.
enum CaughtUp {
    /// Nothing newer to send: the fan-out writes the socket again.
    Direct,
    /// The stream ends (its moment in the drain window, or the hub closed).
    End,
    /// A write failed or timed out; it was this kind.
    Failed(WriteKind),
}

/// Writes, as this socket's only writer, what the fan-out left (the rest of a partial
/// write) and then the newest event not yet sent, until nothing is left; then gives the
/// socket back to the fan-out, deciding under its lock (see `fanout`).
async fn catch_up(subscriber: &mut Subscriber, link: &Link, write_timeout: Duration) -> CaughtUp {
    loop {
        let (bytes, outgoing) = {
            let mut state = link.lock();
            if state.mode == Mode::Closed {
                return CaughtUp::End;
            }
            if !state.pending.is_empty() {
                let kind = state.last_message.unwrap_or(WriteKind::Data);
                (std::mem::take(&mut state.pending), Err(kind))
            } else {
                subscriber.sent_elsewhere(state.seen, state.wrote_at);
                match subscriber.newer() {
                    Some(outgoing) => {
                        state.mode = Mode::Task;
                        state.seen = subscriber.seen();
                        let bytes = match &outgoing {
                            Outgoing::Event { bytes, .. } => bytes.clone(),
                            Outgoing::Keepalive => KEEPALIVE_CHUNK,
                        };
                        (bytes, Ok(outgoing))
                    }
                    None if subscriber.hub_closed() => {
                        state.mode = Mode::Closed;
                        return CaughtUp::End;
                    }
                    None => {
                        state.mode = Mode::Direct;
                        return CaughtUp::Direct;
                    }
                }
            }
        };
        let kind = match &outgoing {
            Ok(outgoing) => outgoing.message(),
            Err(kind) => *kind,
        };
        if !fanout::write_all_within(&link.socket, &bytes, write_timeout).await {
            // A failed write, or a client that stopped reading for the whole timeout.
            return CaughtUp::Failed(kind);
        }
        let mut state = link.lock();
        state.wrote_at = tokio::time::Instant::now();
        state.last_message = Some(kind);
        drop(state);
        if let Ok(outgoing) = outgoing {
            subscriber.wrote(&outgoing);
        }
    }
}

/// A keep-alive on a socket the fan-out may write: under its lock, whole or handed to the
/// task (which then writes the rest, or times out on a client that stopped reading).
fn keepalive(subscriber: &Subscriber, link: &Link) {
    let mut state = link.lock();
    if state.mode != Mode::Direct {
        return;
    }
    let written = match link.socket.try_write(&KEEPALIVE_CHUNK) {
        Ok(written) => written,
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
        Err(_) => {
            // Its task finds the failure when it writes.
            state.mode = Mode::Task;
            drop(state);
            return link.wake();
        }
    };
    state.last_message = Some(WriteKind::Keepalive);
    if written > 0 {
        state.wrote_at = tokio::time::Instant::now();
        subscriber.metrics().http_write(WriteKind::Keepalive);
    }
    if written < KEEPALIVE_CHUNK.len() {
        state.pending = KEEPALIVE_CHUNK.slice(written..);
        state.mode = Mode::Task;
        drop(state);
        link.wake();
    }
}

/// Ends a directly written stream after its last whole event: nobody writes after the
/// terminator (when `clean`), so the client sees a clean end and reconnects. Returns
/// whether the connection stays open for another request (`keep`, and all was written).
async fn end_direct(link: &Link, clean: bool, keep: bool) -> bool {
    let pending = {
        let mut state = link.lock();
        state.mode = Mode::Closed;
        std::mem::take(&mut state.pending)
    };
    let budget = Duration::from_secs(1);
    let ended = clean
        && fanout::write_all_within(&link.socket, &pending, budget).await
        && fanout::write_all_within(&link.socket, TERMINATOR, budget).await;
    if ended && keep {
        return true;
    }
    let _ = socket2::SockRef::from(&link.socket).shutdown(std::net::Shutdown::Write);
    false
}

/// Answers with `err`'s response (the same status, headers and JSON body hyper would
/// send) and closes the connection.
async fn refuse<I: AsyncWrite + Unpin>(mut io: I, err: ApiError) {
    let _ = io.write_all(&error_response_bytes(err)).await;
    let _ = io.shutdown().await;
}

fn error_response_bytes(err: ApiError) -> Vec<u8> {
    let body = err.body_text();
    let response = err.into_response();
    let mut out = format!("HTTP/1.1 {}\r\n", response.status()).into_bytes();
    for (name, value) in response.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let length = body.len();
    let (cors, origin) = ALLOW_ORIGIN;
    let tail =
        format!("{cors}: {origin}\r\nconnection: close\r\ncontent-length: {length}\r\n\r\n{body}");
    out.extend_from_slice(tail.as_bytes());
    out
}

/// An I/O object that first yields bytes already read from it.
pub struct Prefixed<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Prefixed<I> {
    pub fn new(prefix: Bytes, inner: I) -> Self {
        Self { prefix, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if !self.prefix.has_remaining() {
                // Free the sniffing buffer now rather than with the connection.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decided(head: &str) -> Decision {
        decide(head.as_bytes())
    }

    #[test]
    fn takes_only_plain_stream_requests() {
        for stream in [
            "GET /sse/environments/abc/stream HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /sse/environments/abc/stream/?x=1 HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET //sse/environments/abc/stream HTTP/1.1\r\nHost: x\r\n\r\n",
            // What Flutter's dart:io sends (see `decide`).
            "GET /sse/environments/abc/stream HTTP/1.1\r\nuser-agent: Dart/3.5 (dart:io)\r\n\
             accept: application/json , text/event-stream\r\naccept-encoding: gzip\r\n\
             content-length: 0\r\nhost: x\r\n\r\n",
        ] {
            assert_eq!(
                decided(stream),
                Decision::Stream(StreamRequest {
                    key: "abc".into(),
                    keep_alive: true
                }),
                "{stream:?}"
            );
        }
        for closing in [
            "GET /sse/environments/abc/stream HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /sse/environments/abc/stream HTTP/1.1\r\nconnection: TE, Close\r\n\r\n",
        ] {
            assert_eq!(
                decided(closing),
                Decision::Stream(StreamRequest {
                    key: "abc".into(),
                    keep_alive: false
                }),
                "{closing:?}"
            );
        }
        assert_eq!(
            decided("GET /sse/environments/abc/stream HTTP/1.1\r\nHost"),
            Decision::ReadMore
        );
        for other in [
            "GET /sse/environments/abc/stream HTTP/1.0\r\n\r\n",
            "HEAD /sse/environments/abc/stream HTTP/1.1\r\n\r\n",
            "POST /sse/environments/abc/queue-change HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            "GET /livez HTTP/1.1\r\n\r\n",
            "GET /sse/environments/abc/stream HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            "GET /sse/environments/abc/stream HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            "GET /sse/environments/abc/stream HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "\u{1}\u{2}garbage\r\n\r\n",
        ] {
            assert_eq!(decided(other), Decision::Hyper, "{other:?}");
        }
        let huge = format!("GET /x HTTP/1.1\r\nX: {}", "a".repeat(MAX_SNIFF));
        assert_eq!(decided(&huge), Decision::Hyper);
    }

    #[test]
    fn canned_responses_are_well_formed() {
        for err in [ApiError::ShuttingDown, ApiError::TooManySubscribers] {
            let response = error_response_bytes(err);
            let text = std::str::from_utf8(&response).expect("ascii");
            assert!(
                text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
                "{text}"
            );
            assert!(text.contains("retry-after: 1\r\n"), "{text}");
            let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.parse().ok())
                .expect("content-length");
            assert_eq!(length, body.len(), "{head}");
            let json: serde_json::Value = serde_json::from_str(body).expect("JSON body");
            assert!(json["message"].is_string());
        }
    }

    proptest::proptest! {
        #[test]
        fn sniffing_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decide(&bytes);
        }
    }

    #[tokio::test]
    async fn prefixed_replays_what_was_read() {
        let mut io = Prefixed::new(Bytes::from_static(b"hello "), &b"world"[..]);
        let mut out = String::new();
        io.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "hello world");
    }
}

#[cfg(test)]
mod direct_tests;
