//! One subscriber's event stream: the latest update on connect, every newer one after, and
//! keep-alive comments in the silences. `Subscriber` decides what to send; the HTTP/1.1
//! fast path (`h1_stream`) and hyper bodies (`event_stream`, for HTTP/2 and TLS) write it.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::Stream;
use hyper::body::Frame;
use tokio::time::{Instant, Sleep};

use crate::http::AppState;
use crate::hub::Subscription;
use crate::metrics::{LastWrite, Message};
use crate::timestamp::Timestamp;

/// A comment line: SSE parsers ignore it, proxies and NAT gateways see traffic. The blank
/// line ends it as its own block, so no parser glues it to the next event.
pub const KEEPALIVE: Bytes = Bytes::from_static(b": keepalive\n\n");
/// The same comment as an HTTP/1.1 chunk.
pub const KEEPALIVE_CHUNK: Bytes = Bytes::from_static(b"d\r\n: keepalive\n\n\r\n");

/// What to write next.
pub enum Outgoing {
    /// An event: the bare bytes and the same as an HTTP/1.1 chunk (shared, not copied).
    Event {
        event: Bytes,
        chunk: Bytes,
    },
    Keepalive,
}

impl Outgoing {
    pub fn message(&self) -> Message {
        match self {
            Outgoing::Event { .. } => Message::Data,
            Outgoing::Keepalive => Message::Keepalive,
        }
    }
}

pub struct Subscriber {
    subscription: Subscription,
    /// The newest timestamp this stream has sent; nothing older or equal is sent again.
    seen: Option<Timestamp>,
    /// When the stream last wrote anything.
    wrote_at: Instant,
    /// Fires at or before the next keep-alive. Re-armed only when it fires, not on every
    /// write: moving a timer costs two timer-wheel operations, per subscriber per update.
    keepalive: Pin<Box<Sleep>>,
    state: Arc<AppState>,
    /// The connection's record of what it last wrote, to label a failed write.
    last_write: Option<Arc<LastWrite>>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.state.metrics.subscriber_disconnected();
    }
}

impl Subscriber {
    pub fn new(
        state: Arc<AppState>,
        subscription: Subscription,
        last_write: Option<Arc<LastWrite>>,
    ) -> Self {
        state.metrics.subscriber_connected();
        let now = Instant::now();
        Self {
            subscription,
            seen: None,
            wrote_at: now,
            keepalive: Box::pin(tokio::time::sleep_until(now + state.keepalive)),
            state,
            last_write,
        }
    }

    /// Counts a write of `message` (and remembers it for labelling a later failure).
    pub fn wrote(&self, message: Message) {
        self.state.metrics.http_write(message);
        if let Some(last) = &self.last_write {
            last.record(message);
        }
    }

    pub fn write_failed(&self, message: Message) {
        self.state.metrics.http_error(message);
    }

    /// The next thing to send: a newer event as soon as there is one, or a keep-alive once
    /// the stream has been silent for the keep-alive interval. `None` when the hub closed
    /// (shutdown). Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Option<Outgoing> {
        loop {
            let newer = {
                let latest = self.subscription.borrow_and_update();
                latest
                    .newer_than(self.seen, SystemTime::now(), self.state.hub.retention())
                    .map(|timestamp| (timestamp, latest.event.clone(), latest.chunk.clone()))
            };
            if let Some((timestamp, event, chunk)) = newer {
                self.seen = Some(timestamp);
                self.wrote_at = Instant::now();
                return Some(Outgoing::Event { event, chunk });
            }
            tokio::select! {
                changed = self.subscription.changed() => {
                    changed.ok()?;
                }
                () = self.keepalive.as_mut() => {
                    let now = Instant::now();
                    let due = self.wrote_at + self.state.keepalive;
                    if now >= due {
                        self.wrote_at = now;
                        self.keepalive.as_mut().reset(now + self.state.keepalive);
                        return Some(Outgoing::Keepalive);
                    }
                    self.keepalive.as_mut().reset(due);
                }
            }
        }
    }
}

/// The body of a `/stream` response served by hyper. It ends when the hub closes
/// (shutdown); a client going away drops it.
pub fn event_stream(
    subscriber: Subscriber,
) -> impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static {
    futures_util::stream::unfold(subscriber, |mut sub| async move {
        let outgoing = sub.next().await?;
        sub.wrote(outgoing.message());
        let bytes = match outgoing {
            Outgoing::Event { event, .. } => event,
            Outgoing::Keepalive => KEEPALIVE,
        };
        Some((Ok(Frame::data(bytes)), sub))
    })
}
