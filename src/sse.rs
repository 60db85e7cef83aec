//! One subscriber's event stream: the latest update on connect, every newer one after, and
//! keep-alive comments in the silences.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::Stream;
use hyper::body::Frame;
use tokio::time::Instant;

use crate::http::AppState;
use crate::hub::Subscription;
use crate::metrics::{LastWrite, Message};
use crate::timestamp::Timestamp;

/// A comment line: SSE parsers ignore it, proxies and NAT gateways see traffic. The blank
/// line ends it as its own block, so no parser glues it to the next event.
const KEEPALIVE: Bytes = Bytes::from_static(b": keepalive\n\n");

struct Subscriber {
    subscription: Subscription,
    /// The newest timestamp this stream has sent; nothing older or equal is sent again.
    seen: Option<Timestamp>,
    state: Arc<AppState>,
    /// The connection's record of what it last wrote, to label a failed write.
    last_write: Option<Arc<LastWrite>>,
}

impl Subscriber {
    fn wrote(&self, message: Message) {
        self.state.metrics.http_write(message);
        if let Some(last) = &self.last_write {
            last.record(message);
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.state.metrics.subscriber_disconnected();
    }
}

/// The body of a `/stream` response. It ends when the hub closes (shutdown); a client
/// going away drops it.
pub fn event_stream(
    state: Arc<AppState>,
    subscription: Subscription,
    last_write: Option<Arc<LastWrite>>,
) -> impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static {
    state.metrics.subscriber_connected();
    let subscriber = Subscriber {
        subscription,
        seen: None,
        state,
        last_write,
    };
    futures_util::stream::unfold(subscriber, |mut sub| async move {
        // Every call follows a write (or the connect), so the silence starts now.
        let keepalive_at = Instant::now() + sub.state.keepalive;
        loop {
            let newer = {
                let latest = sub.subscription.borrow_and_update();
                latest
                    .newer_than(sub.seen, SystemTime::now(), sub.state.hub.retention())
                    .map(|(timestamp, event)| (timestamp, event.clone()))
            };
            if let Some((timestamp, event)) = newer {
                sub.seen = Some(timestamp);
                sub.wrote(Message::Data);
                return Some((Ok(Frame::data(event)), sub));
            }
            tokio::select! {
                changed = sub.subscription.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = tokio::time::sleep_until(keepalive_at) => {
                    sub.wrote(Message::Keepalive);
                    return Some((Ok(Frame::data(KEEPALIVE)), sub));
                }
            }
        }
    })
}
