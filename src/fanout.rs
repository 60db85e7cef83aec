//! Direct fan-out to HTTP/1.1 stream sockets.
//!
//! Waking one task per subscriber per update costs a scheduler round trip each; the least a
//! server can do is one `write` per socket from a loop. So the sockets of plain HTTP/1.1
//! streams are registered here, split into one shard per runtime worker thread, and the
//! task that learns of an update writes the shared pre-encoded chunk to each of them itself
//! with a non-blocking `try_write`: one system call per delivery, no wake-up, nothing
//! allocated per subscriber.
//!
//! A socket is written by exactly one side at a time, chosen under its own lock (`Mode`):
//! - `Direct`: the fan-out writes whole chunks to it, or leaves it alone;
//! - `Task`: the subscriber's own task writes (the rest of a partial write first, then the
//!   newest event it has not sent); the fan-out skips it. A socket that would block is
//!   handed to its task this way, so a slow client delays nobody and, when it drains, gets
//!   the newest event only (the latest-value rule), never a torn one;
//! - `Closed`: the stream is ending; nobody adds anything after its terminator.
//!
//! The task returns a socket to `Direct` only after checking, under the same lock, that the
//! hub holds nothing newer than what it sent. The hub publishes an update before any pass
//! locks a socket, so an update is either seen by that check or written by the pass.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::metrics::{DeliveryTally, Metrics, WriteKind};
use crate::timestamp::Timestamp;

/// Sockets written under one lock before the pass lets other tasks run: long enough to
/// amortise the lock, short enough that accepts and keep-alives are not held up.
const BATCH: usize = 64;

/// Who writes a socket now (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Task,
    Closed,
}

/// What one socket's writers share, under its lock.
#[derive(Debug)]
pub struct LinkState {
    pub mode: Mode,
    /// The newest timestamp this stream has sent (or committed to, with `pending`).
    pub seen: Option<Timestamp>,
    /// The rest of a write the fan-out began: the task writes it before anything else.
    pub pending: Bytes,
    /// When anything was last written, for the keep-alive timer.
    pub wrote_at: Instant,
    /// What was last written, to label a failure that shows up later.
    pub last_message: Option<WriteKind>,
}

/// One HTTP/1.1 stream socket, shared by its task and the fan-out.
#[derive(Debug)]
pub struct Link {
    pub socket: TcpStream,
    state: Mutex<LinkState>,
    /// The fan-out handed the socket to the task, or the hub began draining or closed.
    /// A flag and a waker rather than a `Notify`: the task polls it without keeping a
    /// future, which would be memory per subscriber.
    woken: AtomicBool,
    waker: AtomicWaker,
    /// Updates stored before this are not news to this stream (no latency observed).
    connected_at: SystemTime,
    metrics: Arc<Metrics>,
}

impl Link {
    /// A link whose task writes first (the event sent on connect), then hands over.
    pub fn new(socket: TcpStream, connected_at: SystemTime, metrics: Arc<Metrics>) -> Self {
        Self {
            socket,
            state: Mutex::new(LinkState {
                mode: Mode::Task,
                seen: None,
                pending: Bytes::new(),
                wrote_at: Instant::now(),
                last_message: None,
            }),
            woken: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            connected_at,
            metrics,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, LinkState> {
        // Every field is valid after any panic point: a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ready when the fan-out or the hub has something for the task (the flag is kept if
    /// nobody waits, so nothing is missed between two waits).
    pub fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.woken.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    pub async fn woken(&self) {
        std::future::poll_fn(|cx| self.poll_woken(cx)).await;
    }

    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Writes `delivery` if this socket is the fan-out's and has not sent it; hands the
    /// socket to its task when it would block or took part of the chunk. `now` is the
    /// batch's clock, for the keep-alive (which counts in seconds).
    fn offer(&self, delivery: &Delivery, now: Instant, tally: &mut DeliveryTally) {
        let mut state = self.lock();
        if state.mode != Mode::Direct || state.seen >= Some(delivery.timestamp) {
            return;
        }
        let chunk = &delivery.chunk;
        match self.socket.try_write(chunk) {
            Ok(written) => {
                state.seen = Some(delivery.timestamp);
                state.wrote_at = now;
                state.last_message = Some(WriteKind::Data);
                tally.wrote();
                if delivery.stored_at >= self.connected_at {
                    let latency = SystemTime::now()
                        .duration_since(delivery.stored_at)
                        .unwrap_or_default();
                    tally.delivered(latency);
                }
                if written < chunk.len() {
                    // A slice of the shared chunk: a reference count, not a copy.
                    state.pending = chunk.slice(written..);
                    state.mode = Mode::Task;
                    drop(state);
                    self.wake();
                }
            }
            // Full (a slow reader), or failed: its task writes, waits or counts the
            // failure, with the write timeout, while the fan-out moves on.
            Err(_) => {
                state.mode = Mode::Task;
                drop(state);
                self.wake();
            }
        }
    }
}

/// The update a fan-out pass writes.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub timestamp: Timestamp,
    pub stored_at: SystemTime,
    /// The event as an HTTP/1.1 chunk, shared by every socket.
    pub chunk: Bytes,
}

/// One environment's directly written sockets, in shards.
#[derive(Debug)]
pub struct Audience {
    shards: Box<[Shard]>,
    /// Where the next link goes, round robin over the shards.
    next: AtomicUsize,
}

/// A pass's state: none running, running, or running and asked to run again (an update
/// arrived meanwhile). One pass per shard at a time, never a queue of them.
const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const AGAIN: u8 = 2;

#[derive(Debug, Default)]
struct Shard {
    members: Mutex<Members>,
    pass: AtomicU8,
    /// Members held (sockets and tasks), read without the lock to skip empty shards.
    len: AtomicUsize,
}

/// A shard's members: sockets the pass writes, and tasks it only wakes (hyper's bodies,
/// which look at the hub themselves when woken). A task is held as its bare `Waker`, not
/// a shared cell: this is memory per subscriber, and a task refreshes it under the lock.
#[derive(Debug, Default)]
struct Members {
    sockets: Slab<Arc<Link>>,
    tasks: Slab<Waker>,
}

/// Entries at stable indices (a pass walks them in batches while members come and go: an
/// index must not move under it), free places reused.
#[derive(Debug)]
struct Slab<T> {
    entries: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, value: T) -> u32 {
        match self.free.pop() {
            Some(index) => {
                self.entries[index as usize] = Some(value);
                index
            }
            None => {
                self.entries.push(Some(value));
                // Fewer than 2^32 entries: see `Place`.
                (self.entries.len() - 1) as u32
            }
        }
    }

    /// Whether `index` held an entry.
    fn remove(&mut self, index: u32) -> bool {
        let removed = self
            .entries
            .get_mut(index as usize)
            .and_then(Option::take)
            .is_some();
        if removed {
            self.free.push(index);
        }
        if self.free.len() == self.entries.len() {
            // Empty: give the memory back.
            *self = Self::default();
        }
        removed
    }

    /// The entries from `from`, at most one batch, and where the next batch starts.
    fn batch(&self, from: usize) -> Option<(impl Iterator<Item = &T>, Option<usize>)> {
        let end = self.entries.len().min(from.saturating_add(BATCH));
        let batch = self.entries.get(from..end)?;
        let next = (end < self.entries.len()).then_some(end);
        Some((batch.iter().flatten(), next))
    }
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, Members> {
        // Insert and remove leave the slabs consistent at every panic point.
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Audience {
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards.clamp(1, 1 << 16))
                .map(|_| Shard::default())
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The shard count the runtime calls for: one per worker thread.
    pub fn shards_for_runtime() -> usize {
        tokio::runtime::Handle::try_current()
            .map(|handle| handle.metrics().num_workers())
            .or_else(|_| std::thread::available_parallelism().map(usize::from))
            .unwrap_or(1)
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn next_shard(&self) -> u16 {
        // At most `u16::MAX + 1` shards (see `new`), so the remainder fits.
        (self.next.fetch_add(1, Ordering::Relaxed) % self.shards.len()) as u16
    }

    fn shard(&self, place: Place) -> &Shard {
        &self.shards[place.shard as usize]
    }

    /// Registers `link`; it stays until the returned place is given to `detach`.
    pub fn attach(&self, link: Arc<Link>) -> Place {
        let place = Place {
            shard: self.next_shard(),
            index: 0,
            kind: Kind::Socket,
        };
        let shard = self.shard(place);
        let index = shard.lock().sockets.insert(link);
        shard.len.fetch_add(1, Ordering::Relaxed);
        Place { index, ..place }
    }

    /// Registers a task to be woken by every pass (and by `wake_all`), with `waker` until
    /// it calls `register`; it stays until the returned place is given to `detach`.
    pub fn attach_task(&self, waker: Waker) -> Place {
        let place = Place {
            shard: self.next_shard(),
            index: 0,
            kind: Kind::Task,
        };
        let shard = self.shard(place);
        let index = shard.lock().tasks.insert(waker);
        shard.len.fetch_add(1, Ordering::Relaxed);
        Place { index, ..place }
    }

    /// Makes `waker` the one a task at `place` is woken with. Cheap when it already is
    /// (a task's waker rarely changes), so a task calls it every time before it looks.
    pub fn register(&self, place: Place, waker: &Waker) {
        if place.kind != Kind::Task {
            return;
        }
        let mut members = self.shard(place).lock();
        if let Some(Some(held)) = members.tasks.entries.get_mut(place.index as usize)
            && !held.will_wake(waker)
        {
            held.clone_from(waker);
        }
    }

    pub fn detach(&self, place: Place) {
        let shard = self.shard(place);
        let mut members = shard.lock();
        let removed = match place.kind {
            Kind::Socket => members.sockets.remove(place.index),
            Kind::Task => members.tasks.remove(place.index),
        };
        if removed {
            shard.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Asks for a pass over `shard`; true when the caller must run one (none is running).
    pub fn request_pass(&self, shard: usize) -> bool {
        let shard = &self.shards[shard];
        if shard.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut current = shard.pass.load(Ordering::Acquire);
        loop {
            let (want, start) = match current {
                IDLE => (RUNNING, true),
                _ => (AGAIN, false),
            };
            match shard
                .pass
                .compare_exchange(current, want, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return start,
                Err(seen) => current = seen,
            }
        }
    }

    /// Ends a pass over `shard`; true when another update arrived meanwhile and the caller
    /// must run it again (with the newest update).
    pub fn finish_pass(&self, shard: usize) -> bool {
        let pass = &self.shards[shard].pass;
        if pass
            .compare_exchange(AGAIN, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return true;
        }
        pass.store(IDLE, Ordering::Release);
        false
    }

    /// Writes `delivery` to the sockets of `shard` from index `from`, one batch; returns
    /// where the next batch starts, or `None` at the end.
    pub fn write_batch(&self, shard: usize, from: usize, delivery: &Delivery) -> Option<usize> {
        let members = self.shards[shard].lock();
        let (batch, next) = members.sockets.batch(from)?;
        let (now, mut tally) = (Instant::now(), DeliveryTally::default());
        let mut metrics = None;
        for link in batch {
            link.offer(delivery, now, &mut tally);
            metrics = Some(&link.metrics);
        }
        // Every link holds the service's one `Metrics`.
        if let Some(metrics) = metrics {
            metrics.add_deliveries(&tally);
        }
        next
    }

    /// Wakes the tasks of `shard` from index `from`, one batch; returns where the next
    /// batch starts, or `None` at the end.
    pub fn wake_batch(&self, shard: usize, from: usize) -> Option<usize> {
        let members = self.shards[shard].lock();
        let (batch, next) = members.tasks.batch(from)?;
        batch.for_each(Waker::wake_by_ref);
        next
    }

    /// Wakes every member's task (drain began, or the hub closed).
    pub fn wake_all(&self) {
        for shard in &self.shards {
            let members = shard.lock();
            members
                .sockets
                .entries
                .iter()
                .flatten()
                .for_each(|l| l.wake());
            members
                .tasks
                .entries
                .iter()
                .flatten()
                .for_each(Waker::wake_by_ref);
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.len.load(Ordering::Relaxed))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a member sits in its audience.
#[derive(Clone, Copy, Debug)]
pub struct Place {
    /// Narrow fields, so that a place takes 8 bytes: hyper's bodies each hold one. A slab
    /// of 2^32 entries (64 GiB of slots) cannot exist on a machine this runs on, and shards
    /// are one per worker thread.
    index: u32,
    shard: u16,
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Socket,
    Task,
}

/// Writes all of `bytes` to a socket its task owns, waiting for room as needed.
pub async fn write_all(socket: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        socket.writable().await?;
        match socket.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// `write_all` within `timeout`; false when it failed or timed out.
pub async fn write_all_within(socket: &TcpStream, bytes: &[u8], timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, write_all(socket, bytes)).await,
        Ok(Ok(()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(link: &Link, delivery: &Delivery) {
        link.offer(delivery, Instant::now(), &mut DeliveryTally::default());
    }

    fn delivery(micros: i64) -> Delivery {
        Delivery {
            timestamp: Timestamp::from_micros(micros).expect("in range"),
            stored_at: SystemTime::now(),
            chunk: Bytes::from_static(b"5\r\nhello\r\n"),
        }
    }

    /// A connected pair whose server side (returned first, as a link) is full: its client
    /// reads nothing.
    async fn full_link() -> (Arc<Link>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(2048).expect("rcvbuf");
        let client = socket
            .connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let _ = socket2::SockRef::from(&server).set_send_buffer_size(4096);
        let filler = [b'x'; 4096];
        // Until full and still full a moment later (loopback moves bytes on to the
        // receiver's buffer after the write returns).
        'fill: for _ in 0..100 {
            for _ in 0..10_000 {
                match server.try_write(&filler) {
                    Ok(_) => {}
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) => panic!("{err}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Err(err) = server.try_write(&filler) {
                assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
                break 'fill;
            }
        }
        let link = Link::new(server, SystemTime::now(), Arc::new(Metrics::default()));
        link.lock().mode = Mode::Direct;
        (Arc::new(link), client)
    }

    /// A socket that would block is handed to its task (which is woken) and the pass moves
    /// on at once to the next socket, which gets the update.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_socket_that_would_block_goes_to_its_task_and_delays_nobody() {
        let (full, _client) = full_link().await;
        let (healthy, _other) = full_link().await;
        // Room again: its client reads everything.
        let reader = tokio::spawn(async move {
            let mut other = _other;
            let mut sink = vec![0; 1 << 16];
            while let Ok(n) = tokio::io::AsyncReadExt::read(&mut other, &mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let audience = Arc::new(Audience::new(1));
        let _full = audience.attach(full.clone());
        let _healthy = audience.attach(healthy.clone());
        let pass = {
            let audience = audience.clone();
            tokio::task::spawn_blocking(move || {
                let mut from = 0;
                while let Some(next) = audience.write_batch(0, from, &delivery(1)) {
                    from = next;
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(5), pass)
            .await
            .expect("the pass does not wait for a full socket")
            .expect("pass");
        assert_eq!(full.lock().mode, Mode::Task);
        assert_eq!(full.lock().seen, None, "nothing was written");
        assert_eq!(healthy.lock().seen.map(Timestamp::micros), Some(1));
        tokio::time::timeout(Duration::from_secs(1), full.woken())
            .await
            .expect("its task is woken");
        reader.abort();
    }

    /// A pass never writes what the socket has already sent, nor a socket its task owns.
    #[tokio::test]
    async fn a_pass_skips_what_was_sent_and_sockets_their_tasks_own() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let _client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let metrics = Arc::new(Metrics::default());
        let link = Arc::new(Link::new(server, SystemTime::now(), metrics));
        offer(&link, &delivery(1));
        assert_eq!(link.lock().seen, None, "its task owns it at first");
        link.lock().mode = Mode::Direct;
        offer(&link, &delivery(2));
        assert_eq!(link.lock().seen.map(Timestamp::micros), Some(2));
        link.lock().seen = Timestamp::from_micros(3).ok();
        offer(&link, &delivery(3));
        link.lock().mode = Mode::Closed;
        offer(&link, &delivery(4));
        assert_eq!(link.lock().seen.map(Timestamp::micros), Some(3));
    }

    #[test]
    fn passes_never_queue_and_rerun_when_asked_during_one() {
        let audience = Audience::new(1);
        assert!(!audience.request_pass(0), "no sockets, no pass");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let (link, _client) = full_link().await;
            let place = audience.attach(link);
            assert!(audience.request_pass(0));
            assert!(!audience.request_pass(0), "one is running");
            assert!(!audience.request_pass(0), "and asked to run again once");
            assert!(audience.finish_pass(0), "runs again");
            assert!(!audience.finish_pass(0), "then stops");
            assert!(audience.request_pass(0), "the next update starts one");
            audience.detach(place);
            assert!(audience.is_empty());
        });
    }
}
