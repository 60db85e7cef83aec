//! One subscriber's event stream: the latest update on connect, every newer one after,
//! keep-alive comments in the silences, and a clean end at the stream's age. `Subscriber`
//! decides what to send; the HTTP/1.1 fast path (`h1_stream`) and hyper bodies
//! (`EventBody`, for HTTP/2 and HTTP/1.1 that the fast path does not take) write it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::time::{Instant, Sleep};

use thiserror::Error;

use crate::hub::{Attached, Hub, Subscription};
use crate::metrics::{LastWrite, Metrics, WriteKind};
use crate::spread::scatter;
use crate::timestamp::Timestamp;
use crate::wire::KEEPALIVE;

/// How subscribers behave, from `Config`.
#[derive(Clone, Copy, Debug)]
pub struct StreamSettings {
    pub keepalive: Duration,
    /// End each stream cleanly after about this long (spread by ±10 %), as Flagsmith's own
    /// service does; `None`: never.
    pub max_age: Option<Duration>,
    /// At shutdown, streams end at moments spread evenly over this window.
    pub drain_window: Duration,
    /// Refuse subscribers beyond this many in all.
    pub max_subscribers: usize,
    /// Refuse HTTP/1.1 subscribers, each of which holds a socket, beyond this many.
    pub max_socket_subscribers: usize,
}

/// What a subscriber needs besides its subscription: shared by all of them.
pub struct StreamContext {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub settings: StreamSettings,
}

/// The instance holds its maximum of subscribers.
#[derive(Debug, Error)]
#[error("this instance holds its maximum of subscribers")]
pub struct AtCapacity;

/// How a subscriber's bytes reach its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The HTTP/1.1 fast path: this code writes the chunked framing itself.
    Http1Raw,
    /// An HTTP/1.1 response body written by hyper (which frames the chunks).
    Http1,
    /// An HTTP/2 stream, sharing its connection's socket.
    Http2,
}

impl Transport {
    /// Whether the subscriber holds a socket of its own (what the open-file limit bounds).
    pub fn holds_socket(self) -> bool {
        self != Transport::Http2
    }
}

/// What to write next.
pub enum Outgoing {
    /// An event, already framed for the subscriber's transport (shared, not copied), and
    /// how long after being stored it is sent, for the delivery-latency histogram (`None`
    /// for the event sent on connect, which is not a delivery of something new).
    Event {
        bytes: Bytes,
        latency: Option<Duration>,
    },
    Keepalive,
}

impl Outgoing {
    pub fn message(&self) -> WriteKind {
        match self {
            Outgoing::Event { .. } => WriteKind::Data,
            Outgoing::Keepalive => WriteKind::Keepalive,
        }
    }
}

pub struct Subscriber {
    subscription: Subscription,
    /// The newest timestamp this stream has sent; nothing older or equal is sent again.
    seen: Option<Timestamp>,
    /// When the stream last wrote anything.
    wrote_at: Instant,
    /// Updates stored before this were not delivered as news (they are the on-connect one).
    connected_at: SystemTime,
    /// Fires at or before the next keep-alive, the stream's end of age, or the moment to
    /// leave when draining.
    /// Re-armed only when it fires, not on every write: moving a timer costs two
    /// timer-wheel operations, per subscriber per update.
    timer: Pin<Box<Sleep>>,
    /// Shutdown: when this stream ends, somewhere in the drain window.
    leave_at: Option<Instant>,
    /// When this stream has reached its age and ends (`MAX_STREAM_AGE`, spread).
    old_at: Option<Instant>,
    /// This subscriber's number, which places its end within the drain window.
    serial: u64,
    transport: Transport,
    context: Arc<StreamContext>,
    /// What this stream last wrote, to label a failure that shows up later.
    last_message: Option<WriteKind>,
    /// The same, kept by a hyper connection, which sees the failure instead of us.
    last_write: Option<Arc<LastWrite>>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.context
            .metrics
            .subscriber_disconnected(self.transport.holds_socket());
    }
}

impl Subscriber {
    /// A new subscriber, or `AtCapacity` when the instance is at its cap.
    pub fn try_new(
        context: Arc<StreamContext>,
        subscription: Subscription,
        last_write: Option<Arc<LastWrite>>,
        transport: Transport,
    ) -> Result<Self, AtCapacity> {
        let settings = &context.settings;
        let serial = context
            .metrics
            .try_subscriber_connected(
                settings.max_subscribers,
                transport.holds_socket(),
                settings.max_socket_subscribers,
            )
            .ok_or(AtCapacity)?;
        let now = Instant::now();
        let old_at = settings.max_age.map(|age| now + spread_age(age, serial));
        let first_keepalive = now + settings.keepalive;
        let first_wake = old_at.map_or(first_keepalive, |old| old.min(first_keepalive));
        Ok(Self {
            subscription,
            seen: None,
            wrote_at: now,
            connected_at: SystemTime::now(),
            timer: Box::pin(tokio::time::sleep_until(first_wake)),
            leave_at: None,
            old_at,
            serial,
            transport,
            context,
            last_message: None,
            last_write,
        })
    }

    /// Where in the drain window this stream ends, so neighbours (often one client's
    /// reconnects) leave apart.
    fn drain_delay(&self) -> std::time::Duration {
        self.context
            .settings
            .drain_window
            .mul_f64(scatter(self.serial, 0))
    }

    /// Counts a write of `outgoing` (and remembers it for labelling a later failure).
    pub fn wrote(&mut self, outgoing: &Outgoing) {
        let message = outgoing.message();
        if let Outgoing::Event {
            latency: Some(latency),
            ..
        } = outgoing
        {
            self.context.metrics.delivered(*latency);
        }
        self.context.metrics.http_write(message);
        self.last_message = Some(message);
        if let Some(last) = &self.last_write {
            last.record(message);
        }
    }

    /// What this stream wrote last, if anything.
    pub fn last_message(&self) -> Option<WriteKind> {
        self.last_message
    }

    pub fn write_failed(&self, message: WriteKind) {
        self.context.metrics.http_error(message);
    }

    /// The next thing to send: a newer event as soon as there is one, or a keep-alive once
    /// the stream has been silent for the keep-alive interval. `None` when the stream
    /// should end: it reached its age, its moment in the drain window came, or the hub
    /// closed. Events are whole `Bytes`, so a stream that ends never ends mid-event.
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Option<Outgoing> {
        loop {
            if let Some(event) = self.newer() {
                return Some(event);
            }
            tokio::select! {
                changed = self.subscription.changed() => {
                    changed.ok()?;
                }
                () = self.timer.as_mut() => {
                    match self.timer_fired() {
                        Timed::End => return None,
                        Timed::Keepalive => return Some(Outgoing::Keepalive),
                        Timed::Nothing => {}
                    }
                }
            }
        }
    }

    /// The newest event if this stream has not sent it (marking it sent), and notes a drain
    /// that began. Looks without waiting.
    pub fn newer(&mut self) -> Option<Outgoing> {
        let (newer, draining) = {
            let now = SystemTime::now();
            let latest = self.subscription.borrow_and_update();
            let newer = latest
                .newer_than(self.seen, now, self.context.hub.retention())
                .map(|timestamp| {
                    let latency = latest
                        .update
                        .map(|u| u.stored_at)
                        .filter(|at| *at >= self.connected_at)
                        .map(|at| now.duration_since(at).unwrap_or_default());
                    // One reference-count increment: only the framing this
                    // transport writes.
                    let bytes = match self.transport {
                        Transport::Http1Raw => latest.chunk.clone(),
                        Transport::Http1 | Transport::Http2 => latest.event.clone(),
                    };
                    (timestamp, bytes, latency)
                });
            (newer, latest.draining)
        };
        if draining && self.leave_at.is_none() {
            let leave_at = Instant::now() + self.drain_delay();
            self.leave_at = Some(leave_at);
            if leave_at < self.timer.deadline() {
                self.timer.as_mut().reset(leave_at);
            }
        }
        let (timestamp, bytes, latency) = newer?;
        self.seen = Some(timestamp);
        self.wrote_at = Instant::now();
        Some(Outgoing::Event { bytes, latency })
    }

    /// The stream's timer: keep-alive, age, or its moment in the drain window.
    pub fn timer(&mut self) -> Pin<&mut Sleep> {
        self.timer.as_mut()
    }

    /// What the timer firing means; re-arms it.
    pub fn timer_fired(&mut self) -> Timed {
        let now = Instant::now();
        if self.leave_at.is_some_and(|at| now >= at) {
            return Timed::End;
        }
        if self.old_at.is_some_and(|at| now >= at) {
            self.context.metrics.stream_reached_max_age();
            return Timed::End;
        }
        let keepalive = self.context.settings.keepalive;
        let due = self.wrote_at + keepalive;
        let next = if now >= due {
            self.wrote_at = now;
            now + keepalive
        } else {
            due
        };
        let next = [self.leave_at, self.old_at]
            .into_iter()
            .flatten()
            .fold(next, Instant::min);
        self.timer.as_mut().reset(next);
        if now >= due {
            Timed::Keepalive
        } else {
            Timed::Nothing
        }
    }

    /// The newest timestamp this stream sent, and the same set by another writer of its
    /// socket (the direct fan-out), which also moves the keep-alive's silence.
    pub fn seen(&self) -> Option<Timestamp> {
        self.seen
    }

    pub fn sent_elsewhere(&mut self, seen: Option<Timestamp>, wrote_at: Instant) {
        self.seen = seen;
        self.wrote_at = self.wrote_at.max(wrote_at);
    }

    /// When this stream connected, wall clock.
    pub fn connected_at(&self) -> SystemTime {
        self.connected_at
    }

    /// Shutdown began and this stream has its moment to leave.
    pub fn leaving(&self) -> bool {
        self.leave_at.is_some()
    }

    /// The hub closed for shutdown: the stream ends.
    pub fn hub_closed(&self) -> bool {
        self.subscription.has_changed().is_err() || self.context.hub.is_closed()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.context.metrics
    }
}

/// What a stream's timer firing means.
#[derive(Debug, PartialEq, Eq)]
pub enum Timed {
    /// Its age or its moment in the drain window: end it.
    End,
    /// It has been silent for the keep-alive interval.
    Keepalive,
    /// Neither yet (the timer fired early, as it is re-armed only when it fires).
    Nothing,
}

/// `age` give or take 10 %, so that clients that connected together (a deploy, a network
/// blip) do not all reconnect together one age later.
fn spread_age(age: Duration, serial: u64) -> Duration {
    age.mul_f64(0.9 + 0.2 * scatter(serial, 0xA6E))
}

/// The body of a `/stream` response served by hyper (HTTP/2, and HTTP/1.1 that the fast
/// path does not take). It ends at the stream's age or when the hub closes (shutdown); a
/// client going away drops it.
///
/// hyper keeps it for the whole life of an HTTP/2 stream, so it is memory per subscriber,
/// and it holds only the subscriber and its place in the fan-out: it is polled in place
/// (woken by the fan-out's passes, see `Hub::attach_task`) rather than through a future
/// waiting on the subscription, which would be kept beside it.
pub struct EventBody {
    subscriber: Subscriber,
    /// `None`: the hub closed before the stream could be registered; it ends at once.
    attached: Option<Attached>,
}

impl EventBody {
    /// The body of `subscriber`, a subscriber of `key`.
    pub fn new(subscriber: Subscriber, key: &str) -> Self {
        let attached = subscriber.context.hub.attach_task(key);
        Self {
            subscriber,
            attached,
        }
    }

    fn send(&mut self, outgoing: Outgoing) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.subscriber.wrote(&outgoing);
        let bytes = match outgoing {
            Outgoing::Event { bytes, .. } => bytes,
            Outgoing::Keepalive => KEEPALIVE,
        };
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    /// What `Subscriber::next` decides, polled in place.
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let Some(attached) = &this.attached else {
            return Poll::Ready(None);
        };
        // Only when there is nothing to send, and before the last look: an update stored
        // after that look wakes this task.
        let mut registered = false;
        loop {
            if let Some(event) = this.subscriber.newer() {
                return this.send(event);
            }
            if !registered {
                attached.register(cx.waker());
                registered = true;
                continue;
            }
            if this.subscriber.hub_closed() {
                return Poll::Ready(None);
            }
            if this.subscriber.timer().poll(cx).is_pending() {
                return Poll::Pending;
            }
            match this.subscriber.timer_fired() {
                Timed::End => return Poll::Ready(None),
                Timed::Keepalive => return this.send(Outgoing::Keepalive),
                // Re-armed: polled again above, which registers its new deadline.
                Timed::Nothing => {}
            }
        }
    }
}
