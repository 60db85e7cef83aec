//! In-process fan-out: the newest update of each environment, shared with every local
//! subscriber of that environment.
//!
//! Each environment has one `watch` channel holding its newest update, already encoded as
//! an SSE event. A watch channel keeps only the latest value, so a slow subscriber costs no
//! queue and never delays the others: when it next looks, it sees the newest event and
//! skips the ones it missed. Sending wakes every subscriber once; each clones the same
//! `Bytes` (a reference count), so an update is encoded once whatever the audience.
//!
//! Plain HTTP/1.1 stream sockets are not woken at all: they sit in the environment's
//! `Audience` (`fanout`), and an update is written to them by one pass per worker thread
//! (see `fanout` for how a socket that would block goes back to its own task).

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;

use crate::fanout::{Audience, Delivery, Link, Place};
use crate::timestamp::Timestamp;
use crate::wire::Encoded;

/// One stored update, as the broker delivered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Update {
    pub timestamp: Timestamp,
    /// The backend's number for this write, growing with every write to it: JetStream's
    /// stream sequence (the NATS publisher's conditional publish compares with it), the
    /// Redis stream entry's id as one number, the memory broker's counter. 0 where the
    /// backend gave none: an update loaded from the Redis hash, which keeps no id.
    pub sequence: u64,
    /// When the broker stored it; after the retention period it is no longer sent on connect.
    pub stored_at: SystemTime,
}

/// The newest update of one environment and its encoded SSE event.
#[derive(Clone, Debug, Default)]
pub struct Latest {
    pub update: Option<Update>,
    /// The event as an HTTP/1.1 chunk (`<len>\r\n<event>\r\n`), written as is by the
    /// HTTP/1.1 stream path.
    pub chunk: Bytes,
    /// The bare event, a slice of `chunk` (same allocation), for HTTP/2 and TLS bodies.
    pub event: Bytes,
    /// Shutdown has begun: subscribers pick their moment in the drain window and leave.
    /// Carried on the environment's own channel, so draining costs subscribers no extra
    /// registration on a shared channel while they run.
    pub draining: bool,
}

impl Latest {
    fn new(update: Update) -> Self {
        let Encoded { chunk, event } = Encoded::new(update.timestamp);
        Self {
            update: Some(update),
            chunk,
            event,
            draining: false,
        }
    }

    /// The event to send a subscriber that has seen `seen` so far, if it is newer and was
    /// stored within `retention` of `now`.
    pub fn newer_than(
        &self,
        seen: Option<Timestamp>,
        now: SystemTime,
        retention: Duration,
    ) -> Option<Timestamp> {
        let update = self.update?;
        if seen.is_some_and(|s| s >= update.timestamp) {
            return None;
        }
        if !is_fresh(update.stored_at, now, retention) {
            return None;
        }
        Some(update.timestamp)
    }
}

fn is_fresh(stored_at: SystemTime, now: SystemTime, retention: Duration) -> bool {
    // A clock that went backwards makes `stored_at` look like the future: still fresh.
    now.duration_since(stored_at)
        .map_or(true, |age| age <= retention)
}

pub type Subscription = watch::Receiver<Latest>;

#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    retention: Duration,
    /// `Inner::closed`, readable without the lock: hyper's bodies look at it each time
    /// they are woken with nothing new.
    closed: AtomicBool,
}

/// One environment's channel. Shared out of the map so that waking its subscribers (which
/// can be hundreds of thousands) happens without holding the map's lock.
type Slot = Arc<Channel>;

/// One environment: the newest update for subscribers that look when woken, and the
/// sockets written directly.
#[derive(Debug)]
pub struct Channel {
    sender: watch::Sender<Latest>,
    audience: Arc<Audience>,
}

impl Channel {
    fn new(latest: Latest) -> Self {
        Self {
            sender: watch::Sender::new(latest),
            audience: Arc::new(Audience::new(Audience::shards_for_runtime())),
        }
    }

    /// Starts a pass over every shard that holds sockets and has none running.
    fn fan_out(self: &Arc<Self>, retention: Duration) {
        for shard in 0..self.audience.shard_count() {
            if self.audience.request_pass(shard) {
                let channel = self.clone();
                // Sockets exist only inside a runtime, so a shard with sockets has one.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move { channel.pass(shard, retention).await });
                }
            }
        }
    }

    /// Writes the newest update to one shard's sockets, again while newer ones arrive.
    async fn pass(&self, shard: usize, retention: Duration) {
        loop {
            let delivery = {
                let latest = self.sender.borrow();
                latest
                    .update
                    .filter(|u| is_fresh(u.stored_at, SystemTime::now(), retention))
                    .map(|u| Delivery {
                        timestamp: u.timestamp,
                        stored_at: u.stored_at,
                        chunk: latest.chunk.clone(),
                    })
            };
            if let Some(delivery) = delivery {
                let mut from = 0;
                while let Some(next) = self.audience.write_batch(shard, from, &delivery) {
                    from = next;
                    tokio::task::yield_now().await;
                }
            }
            let mut from = 0;
            while let Some(next) = self.audience.wake_batch(shard, from) {
                from = next;
                tokio::task::yield_now().await;
            }
            if !self.audience.finish_pass(shard) {
                return;
            }
        }
    }
}

/// The channel reads as its `watch` sender, as it did before sockets were written directly.
impl Deref for Channel {
    type Target = watch::Sender<Latest>;

    fn deref(&self) -> &Self::Target {
        &self.sender
    }
}

/// A socket's registration in its environment's audience; dropping it removes the socket.
#[derive(Debug)]
pub struct Attached {
    audience: Arc<Audience>,
    place: Place,
}

impl Attached {
    /// For a task attached with `Hub::attach_task`: wake it with `waker` from now on.
    /// Called before the task looks at its subscription, so an update after that look
    /// wakes it.
    pub fn register(&self, waker: &std::task::Waker) {
        self.audience.register(self.place, waker);
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.audience.detach(self.place);
    }
}

#[derive(Debug, Default)]
struct Inner {
    environments: HashMap<Box<str>, Slot>,
    draining: bool,
    closed: bool,
}

impl Hub {
    /// `retention` is how long an update stays "known": sent on connect and kept here.
    pub fn new(retention: Duration) -> Self {
        Self {
            inner: Mutex::default(),
            retention,
            closed: AtomicBool::new(false),
        }
    }

    pub fn retention(&self) -> Duration {
        self.retention
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The map stays consistent under every panic point (insert/remove only), so a
        // poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A subscription to `key`, or `None` once the hub is closed for shutdown.
    pub fn subscribe(&self, key: &str) -> Option<Subscription> {
        let mut inner = self.lock();
        if inner.closed {
            return None;
        }
        if let Some(sender) = inner.environments.get(key) {
            return Some(sender.subscribe());
        }
        let channel = Channel::new(Latest {
            draining: inner.draining,
            ..Latest::default()
        });
        let receiver = channel.subscribe();
        inner.environments.insert(key.into(), Arc::new(channel));
        Some(receiver)
    }

    /// Registers `link` (a subscriber of `key`, which must hold a subscription) with the
    /// direct fan-out; `None` once the hub is closed.
    pub fn attach(&self, key: &str, link: Arc<Link>) -> Option<Attached> {
        let inner = self.lock();
        if inner.closed {
            return None;
        }
        let audience = inner.environments.get(key)?.audience.clone();
        drop(inner);
        let place = audience.attach(link);
        Some(Attached { audience, place })
    }

    /// Registers a task that follows `key` (and holds a subscription to it) to be woken by
    /// the direct fan-out's passes rather than by the subscription: a task waiting on
    /// the `watch` keeps its waiting future, which is memory per subscriber. `None` once the
    /// hub is closed.
    pub fn attach_task(&self, key: &str) -> Option<Attached> {
        let inner = self.lock();
        if inner.closed {
            return None;
        }
        let audience = inner.environments.get(key)?.audience.clone();
        drop(inner);
        let place = audience.attach_task(std::task::Waker::noop().clone());
        Some(Attached { audience, place })
    }

    /// Records `update` for `key` if it is newer than what the hub holds, and wakes that
    /// environment's subscribers. Returns whether it moved the environment forward: an equal
    /// or older timestamp (a retry, or a delivery out of order) never moves it back.
    pub fn apply(&self, key: &str, update: Update) -> bool {
        let slot = {
            let mut inner = self.lock();
            if inner.closed {
                return false;
            }
            match inner.environments.get(key) {
                Some(slot) => slot.clone(),
                None => {
                    let channel = Channel::new(Latest {
                        draining: inner.draining,
                        ..Latest::new(update)
                    });
                    inner.environments.insert(key.into(), Arc::new(channel));
                    return true;
                }
            }
        };
        // `sweep` leaves a slot alone while we hold this clone, so the update cannot land in
        // a channel that was just dropped from the map.
        let newer = slot.send_if_modified(|latest| {
            let newer = latest
                .update
                .is_none_or(|current| update.timestamp > current.timestamp);
            if newer {
                *latest = Latest {
                    draining: latest.draining,
                    ..Latest::new(update)
                };
            }
            newer
        });
        // After the channel holds it: a socket's task that returns to the fan-out checks
        // the channel first, so it either sees this update or a pass writes it.
        if newer {
            slot.fan_out(self.retention);
        }
        newer
    }

    /// The newest update the hub holds for `key`, fresh or not.
    pub fn latest(&self, key: &str) -> Option<Update> {
        self.lock()
            .environments
            .get(key)
            .and_then(|sender| sender.borrow().update)
    }

    /// Forgets environments that have no subscribers and no fresh update, so that the map
    /// does not grow with every key ever seen.
    pub fn sweep(&self, now: SystemTime) -> usize {
        let mut inner = self.lock();
        let before = inner.environments.len();
        let retention = self.retention;
        inner.environments.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || slot.receiver_count() > 0
                || slot
                    .borrow()
                    .update
                    .is_some_and(|u| is_fresh(u.stored_at, now, retention))
        });
        before - inner.environments.len()
    }

    /// Tells every subscriber, present and future, that shutdown has begun.
    pub fn begin_drain(&self) {
        let slots: Vec<Slot> = {
            let mut inner = self.lock();
            inner.draining = true;
            inner.environments.values().cloned().collect()
        };
        for slot in slots {
            slot.send_modify(|latest| latest.draining = true);
            slot.audience.wake_all();
        }
    }

    /// Ends every subscription (their streams see the channel close) and refuses new ones.
    pub fn close(&self) {
        let slots: Vec<Slot> = {
            let mut inner = self.lock();
            inner.closed = true;
            self.closed.store(true, Ordering::Release);
            inner.environments.drain().map(|(_, slot)| slot).collect()
        };
        let audiences: Vec<Arc<Audience>> =
            slots.iter().map(|slot| slot.audience.clone()).collect();
        drop(slots);
        for audience in audiences {
            audience.wake_all();
        }
    }

    /// Whether `close` has run: directly written streams check it when woken.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Environments that have at least one subscriber here.
    pub fn subscribed(&self) -> usize {
        self.lock()
            .environments
            .values()
            .filter(|slot| slot.receiver_count() > 0)
            .count()
    }

    /// Every environment's newest update that is still within the retention at `now`:
    /// what this instance stores back into a broker that lost its data.
    pub fn snapshot(&self, now: SystemTime) -> Vec<(Box<str>, Update)> {
        let slots: Vec<(Box<str>, Slot)> = self
            .lock()
            .environments
            .iter()
            .map(|(key, slot)| (key.clone(), slot.clone()))
            .collect();
        slots
            .into_iter()
            .filter_map(|(key, slot)| {
                let update = slot.borrow().update?;
                is_fresh(update.stored_at, now, self.retention).then_some((key, update))
            })
            .collect()
    }

    /// Environments held (with subscribers or a fresh update), for metrics and logs.
    #[allow(clippy::len_without_is_empty)] // nothing asks whether it is empty
    pub fn len(&self) -> usize {
        self.lock().environments.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(micros: i64, sequence: u64) -> Update {
        Update {
            timestamp: Timestamp::from_micros(micros).expect("in range"),
            sequence,
            stored_at: SystemTime::now(),
        }
    }

    #[test]
    fn snapshot_holds_every_fresh_newest_update() {
        let hub = Hub::new(Duration::from_secs(60));
        let now = SystemTime::now();
        let fresh = Update {
            timestamp: Timestamp::from_micros(2_000_000).expect("valid"),
            sequence: 2,
            stored_at: now,
        };
        hub.apply(
            "a",
            Update {
                timestamp: Timestamp::from_micros(1_000_000).expect("valid"),
                ..fresh
            },
        );
        hub.apply("a", fresh);
        hub.apply(
            "old",
            Update {
                stored_at: now - Duration::from_secs(61),
                ..fresh
            },
        );
        let _subscribed_only = hub.subscribe("empty");
        let snapshot = hub.snapshot(now);
        assert_eq!(snapshot, vec![("a".into(), fresh)]);
    }

    #[test]
    fn never_moves_backwards() {
        let hub = Hub::new(Duration::from_secs(3600));
        let mut sub = hub.subscribe("env").expect("open");
        assert!(hub.apply("env", update(2_000_000, 2)));
        assert!(!hub.apply("env", update(1_000_000, 3)));
        assert!(!hub.apply("env", update(2_000_000, 4)));
        assert_eq!(hub.latest("env").map(|u| u.sequence), Some(2));
        assert!(sub.has_changed().expect("open"));
        let latest = sub.borrow_and_update();
        assert_eq!(
            &latest.event[..],
            b"event: environment_updated\ndata: {\"updated_at\": 2.0}\n\n"
        );
    }

    #[test]
    fn encodes_once_and_shares_the_bytes() {
        let hub = Hub::new(Duration::from_secs(3600));
        let a = hub.subscribe("env").expect("open");
        let b = hub.subscribe("env").expect("open");
        hub.apply("env", update(1_500_000, 1));
        assert_eq!(a.borrow().event.as_ptr(), b.borrow().event.as_ptr());
        let latest = a.borrow();
        assert_eq!(
            &latest.chunk[..],
            b"36\r\nevent: environment_updated\ndata: {\"updated_at\": 1.5}\n\n\r\n"
        );
        assert_eq!(latest.chunk[4..latest.chunk.len() - 2], latest.event[..]);
    }

    #[test]
    fn stale_updates_are_not_sent_on_connect_and_are_swept() {
        let hub = Hub::new(Duration::from_secs(60));
        let mut old = update(1_000_000, 1);
        old.stored_at = SystemTime::now() - Duration::from_secs(120);
        hub.apply("old", old);
        hub.apply("new", update(1_000_000, 2));
        let now = SystemTime::now();
        let sub = hub.subscribe("old").expect("open");
        assert!(
            sub.borrow()
                .newer_than(None, now, hub.retention())
                .is_none()
        );
        drop(sub);
        assert_eq!(hub.sweep(now), 1);
        assert!(hub.latest("old").is_none());
        assert!(hub.latest("new").is_some());
    }

    #[test]
    fn newer_than_skips_what_the_subscriber_has_seen() {
        let latest = Latest::new(update(5_000_000, 1));
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let five = Timestamp::from_micros(5_000_000).expect("in range");
        let four = Timestamp::from_micros(4_000_000).expect("in range");
        assert!(latest.newer_than(Some(five), now, day).is_none());
        assert_eq!(latest.newer_than(Some(four), now, day), Some(five));
        assert_eq!(latest.newer_than(None, now, day), Some(five));
    }

    /// Shutdown's drain reaches every subscriber: of environments known before it began,
    /// of environments first seen after it (by a subscriber or by an update), and it is
    /// not undone by a later update.
    #[test]
    fn draining_holds_for_every_environment_and_survives_updates() {
        let hub = Hub::new(Duration::from_secs(60));
        let before = hub.subscribe("before").expect("open");
        hub.begin_drain();
        assert!(before.borrow().draining);
        hub.apply("before", update(1_000_000, 1));
        assert!(before.borrow().draining, "an update undid the drain");
        let after = hub.subscribe("after").expect("open");
        assert!(after.borrow().draining, "subscribed after the drain began");
        hub.apply("updated", update(1_000_000, 2));
        let updated = hub.subscribe("updated").expect("open");
        assert!(
            updated.borrow().draining,
            "first seen in an update after it"
        );
    }

    /// What `/metrics` shows: environments held, and those with a subscriber here.
    #[test]
    fn counts_environments_held_and_subscribed() {
        let hub = Hub::new(Duration::from_secs(60));
        assert_eq!((hub.len(), hub.subscribed()), (0, 0));
        let a = hub.subscribe("a").expect("open");
        let a2 = hub.subscribe("a").expect("open");
        let _b = hub.subscribe("b").expect("open");
        hub.apply("c", update(1_000_000, 1));
        assert_eq!((hub.len(), hub.subscribed()), (3, 2));
        drop(a);
        assert_eq!(hub.subscribed(), 2, "a still has a subscriber");
        drop(a2);
        assert_eq!((hub.len(), hub.subscribed()), (3, 1));
    }

    /// Sweeping keeps an environment that a subscriber follows, or that someone holds
    /// (an update being applied, a fan-out pass), however stale its update.
    #[test]
    fn sweep_keeps_what_is_subscribed_or_held() {
        let hub = Hub::new(Duration::from_secs(60));
        let mut stale = update(1_000_000, 1);
        stale.stored_at = SystemTime::now() - Duration::from_secs(120);
        hub.apply("subscribed", stale);
        hub.apply("held", stale);
        hub.apply("neither", stale);
        let _sub = hub.subscribe("subscribed").expect("open");
        let held = hub.lock().environments.get("held").cloned();
        assert_eq!(hub.sweep(SystemTime::now()), 1);
        assert!(hub.latest("subscribed").is_some());
        assert!(hub.latest("held").is_some());
        assert!(hub.latest("neither").is_none());
        drop(held);
        assert_eq!(hub.sweep(SystemTime::now()), 1);
        assert!(hub.latest("held").is_none());
    }

    #[test]
    fn close_ends_subscriptions_and_refuses_new_ones() {
        let hub = Hub::new(Duration::from_secs(60));
        let sub = hub.subscribe("env").expect("open");
        assert!(!hub.is_closed());
        hub.close();
        assert!(hub.is_closed(), "direct streams check this when woken");
        assert!(sub.has_changed().is_err());
        assert!(hub.subscribe("env").is_none());
        assert!(!hub.apply("env", update(1, 1)));
    }
}
