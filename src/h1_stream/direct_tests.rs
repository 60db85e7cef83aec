//! The direct fan-out on real loopback sockets: order, the latest value, a slow client that
//! delays nobody and never sees a torn event, drain and shutdown.

use std::net::SocketAddr;
use std::time::SystemTime;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket};

use super::*;
use crate::broker::memory::MemoryBroker;
use crate::hub::{Hub, Update};
use crate::metrics::Metrics;
use crate::sse::StreamSettings;
use crate::state::Settings;
use crate::timestamp::Timestamp;

/// A small server send buffer, so that a client that stops reading blocks the socket soon.
const SERVER_SEND_BUFFER: usize = 4096;

fn settings(drain_window: Duration, max_age: Option<Duration>) -> Settings {
    Settings {
        stream: StreamSettings {
            keepalive: Duration::from_secs(60),
            max_age,
            drain_window,
            max_subscribers: 1000,
            max_socket_subscribers: 1000,
        },
        body_read_timeout: Duration::from_secs(1),
        refusal_delay: Duration::ZERO,
    }
}

/// Serves streams on the direct path only, as `server` does for plain TCP.
async fn serve(drain_window: Duration) -> (Arc<AppState>, SocketAddr) {
    serve_with(drain_window, None).await
}

async fn serve_with(
    drain_window: Duration,
    max_age: Option<Duration>,
) -> (Arc<AppState>, SocketAddr) {
    let hub = Arc::new(Hub::new(Duration::from_secs(3600)));
    let broker = MemoryBroker::new(hub.clone());
    let state = Arc::new(AppState::new(
        hub,
        broker,
        Arc::new(Metrics::default()),
        "token",
        settings(drain_window, max_age),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let serving = state.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let state = serving.clone();
            tokio::spawn(async move {
                while let Sniffed::Stream(request) = sniff(&mut tcp, Duration::from_secs(5)).await {
                    let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(SERVER_SEND_BUFFER);
                    match serve_direct(tcp, &state, &request).await {
                        Some(kept) => tcp = kept,
                        None => return,
                    }
                }
            });
        }
    });
    (state, addr)
}

/// Opens, runs and ends one stream, as `server` does (without its boxing).
async fn serve_direct(
    tcp: TcpStream,
    state: &Arc<AppState>,
    request: &StreamRequest,
) -> Option<TcpStream> {
    let write_timeout = Duration::from_secs(30);
    let mut stream = open_direct(tcp, state, request, write_timeout).await?;
    let ended = stream.run(write_timeout).await;
    stream.end(ended).await
}

fn update(micros: i64) -> Update {
    Update {
        timestamp: Timestamp::from_micros(micros).expect("in range"),
        sequence: micros as u64,
        stored_at: SystemTime::now(),
    }
}

/// A subscriber reading the chunked stream and checking every chunk's framing.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    async fn connect(addr: SocketAddr, receive_buffer: Option<u32>) -> Self {
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(size) = receive_buffer {
            socket.set_recv_buffer_size(size).expect("rcvbuf");
        }
        let tcp = socket.connect(addr).await.expect("connect");
        let mut client = Self {
            reader: BufReader::new(tcp),
        };
        client.request("").await;
        client
    }

    /// Sends a stream request on this connection with `headers`; returns the head.
    async fn request(&mut self, headers: &str) -> String {
        let request =
            format!("GET /sse/environments/env/stream HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .expect("request");
        let mut head = String::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).await.expect("head");
            assert!(!line.is_empty(), "closed in the head");
            head.push_str(&line);
            if line == "\r\n" {
                return head;
            }
        }
    }

    /// The next chunk's payload; `None` at the terminator. Panics on torn framing.
    async fn chunk(&mut self) -> Option<String> {
        let mut size = String::new();
        self.reader.read_line(&mut size).await.expect("size line");
        let len = usize::from_str_radix(size.trim_end(), 16)
            .unwrap_or_else(|_| panic!("a chunk size, got {size:?}"));
        let mut payload = vec![0; len + 2];
        self.reader
            .read_exact(&mut payload)
            .await
            .expect("whole chunk");
        assert_eq!(&payload[len..], b"\r\n", "chunk framing");
        payload.truncate(len);
        (len > 0).then(|| String::from_utf8(payload).expect("utf-8"))
    }

    /// The next event's `updated_at`, in microseconds (keep-alives skipped).
    async fn event(&mut self) -> Option<i64> {
        loop {
            let chunk = self.chunk().await?;
            if chunk == ": keepalive\n\n" {
                continue;
            }
            let value = chunk
                .strip_prefix("event: environment_updated\ndata: {\"updated_at\": ")
                .and_then(|rest| rest.strip_suffix("}\n\n"))
                .unwrap_or_else(|| panic!("a whole event, got {chunk:?}"));
            // The text is a float at or just below the exact instant: the nearest
            // microsecond is the instant.
            let seconds: f64 = value.parse().expect("a JSON number");
            return Some((seconds * 1e6).round() as i64);
        }
    }

    /// Reads events until `newest`, checking they only ever move forward; returns how many.
    async fn until(&mut self, newest: i64) -> usize {
        let mut last = 0;
        let mut count = 0;
        while last != newest {
            let next = tokio::time::timeout(Duration::from_secs(20), self.event())
                .await
                .expect("the newest event in time")
                .expect("the stream goes on");
            assert!(next > last, "out of order or repeated: {next} after {last}");
            last = next;
            count += 1;
        }
        count
    }
}

/// Waits until the hub has registered `n` sockets with the fan-out (the connect event, if
/// any, written and the socket handed over).
async fn until_subscribed(state: &AppState, n: i64) {
    for _ in 0..500 {
        if state.metrics().subscribers() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} subscribers, wanted {n}", state.metrics().subscribers());
}

/// Many subscribers, some connecting while updates arrive back to back and passes run on
/// both worker threads: every subscriber sees strictly newer events, ending with the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_gets_updates_in_order_and_the_newest_last() {
    let (state, addr) = serve(Duration::from_secs(1)).await;
    state.hub().apply("env", update(1_000_000));
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(Client::connect(addr, None).await);
    }
    until_subscribed(&state, 10).await;
    let newest = 1_000_000 + 2000;
    let applier = {
        let state = state.clone();
        tokio::spawn(async move {
            for micros in 1_000_001..=newest {
                state.hub().apply("env", update(micros));
                if micros % 4 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    // These connect mid-flight: their event on connect races the passes.
    for _ in 0..10 {
        clients.push(Client::connect(addr, None).await);
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut client| tokio::spawn(async move { client.until(newest).await }))
        .collect();
    applier.await.expect("applied");
    for reader in readers {
        reader.await.expect("in order, ending with the newest");
    }
}

/// A client that stops reading fills its socket; the others still get every update at
/// once, and when it reads again it gets whole events, in order, ending with the newest,
/// having skipped what it could not take (the latest-value rule), not a queue of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_delays_nobody_and_gets_whole_events_then_the_newest() {
    let (state, addr) = serve(Duration::from_secs(1)).await;
    let mut slow = Client::connect(addr, Some(2048)).await;
    let mut fast = Client::connect(addr, None).await;
    until_subscribed(&state, 2).await;
    let newest = 5_000_000 + 4000;
    let mut fast_got = 0;
    for micros in 5_000_001..=newest {
        state.hub().apply("env", update(micros));
        // The fast client keeps up as it goes; the slow one reads nothing.
        fast_got += fast.until(micros).await;
    }
    assert_eq!(fast_got, 4000, "the fast client got every update");
    let slow_got = slow.until(newest).await;
    assert!(
        slow_got < 4000,
        "the slow client was sent the newest, not a queue of everything ({slow_got})"
    );
}

/// Draining wakes every directly written stream, which ends with the chunked terminator
/// within the window, without sending again what the fan-out already wrote, and closes
/// its connection (a client reconnecting must reach another instance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_ends_direct_streams_cleanly_within_the_window() {
    let (state, addr) = serve(Duration::from_millis(500)).await;
    state.hub().apply("env", update(1_000_000));
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(Client::connect(addr, None).await);
    }
    until_subscribed(&state, 5).await;
    // Written by the fan-out, not by the streams' own tasks.
    state.hub().apply("env", update(1_000_001));
    for client in &mut clients {
        assert_eq!(client.until(1_000_001).await, 2);
    }
    state.begin_drain();
    for client in &mut clients {
        let ended = tokio::time::timeout(Duration::from_secs(5), client.event()).await;
        assert_eq!(
            ended.expect("ends within the window"),
            None,
            "the terminator next, nothing sent again"
        );
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(2), client.reader.read_to_end(&mut rest))
                .await;
        assert!(
            matches!(closed, Ok(Ok(0))),
            "closed after the terminator: {closed:?}"
        );
    }
    until_subscribed(&state, 0).await;
}

/// Closing the hub (the end of shutdown) ends directly written streams cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_hub_ends_direct_streams_cleanly() {
    let (state, addr) = serve(Duration::from_secs(60)).await;
    let mut client = Client::connect(addr, None).await;
    until_subscribed(&state, 1).await;
    state.hub().close();
    let ended = tokio::time::timeout(Duration::from_secs(5), client.chunk()).await;
    assert_eq!(ended.expect("in time"), None, "a terminator, not a cut");
}

/// A stream that ends cleanly at its age leaves the connection open for the client's next
/// request, unless the client said `Connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_serves_the_next_stream_after_a_clean_end() {
    let (state, addr) = serve_with(Duration::from_secs(1), Some(Duration::from_millis(300))).await;
    state.hub().apply("env", update(1_000_000));
    let mut client = Client::connect(addr, None).await;
    for round in 0..3 {
        if round > 0 {
            let head = client.request("").await;
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(!head.contains("connection: close"), "{head}");
        }
        assert_eq!(client.event().await, Some(1_000_000), "round {round}");
        let ended = tokio::time::timeout(Duration::from_secs(5), client.event()).await;
        assert_eq!(ended.expect("ends at its age"), None, "a terminator");
    }
    let head = client.request("Connection: close\r\n").await;
    assert!(head.contains("connection: close\r\n"), "{head}");
    assert_eq!(client.event().await, Some(1_000_000));
    let ended = tokio::time::timeout(Duration::from_secs(5), client.event()).await;
    assert_eq!(ended.expect("ends at its age"), None, "a terminator");
    let mut rest = Vec::new();
    // The harness waits 5 s for the next request on a kept connection: closing sooner
    // shows this one was not kept.
    let closed =
        tokio::time::timeout(Duration::from_secs(2), client.reader.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "closed after the terminator: {closed:?}"
    );
}

/// A subscriber that leaves takes only its own place in the fan-out: every other subscriber
/// of the environment still gets the next update (more subscribers than shards, so that
/// places share a shard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_leaving_takes_only_its_own_place() {
    let (state, addr) = serve(Duration::from_secs(1)).await;
    state.hub().apply("env", update(1_000_000));
    let mut staying = Vec::new();
    for _ in 0..10 {
        staying.push(Client::connect(addr, None).await);
    }
    let mut leaving = Vec::new();
    for _ in 0..10 {
        leaving.push(Client::connect(addr, None).await);
    }
    until_subscribed(&state, 20).await;
    drop(leaving);
    until_subscribed(&state, 10).await;
    state.hub().apply("env", update(1_000_001));
    for client in &mut staying {
        assert_eq!(client.until(1_000_001).await, 2);
    }
}
