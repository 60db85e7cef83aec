//! Claims of README and SPEC that no other test pinned (issue 16): each test here failed
//! with the line that makes its claim true removed.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn memory(env: &[(&str, &str)]) -> Service {
    let mut all = vec![("BROKER", "memory")];
    all.extend_from_slice(env);
    Service::start_with("nats://127.0.0.1:1", &all)
}

/// A stream request written on a raw socket; its answer is read later (or never).
async fn stream_request(svc: &Service, key: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(svc.addr).await.expect("connect");
    tcp.write_all(
        format!("GET /sse/environments/{key}/stream HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
    )
    .await
    .expect("request");
    tcp
}

/// The status line of the answer on `tcp`, if one comes within `within`.
async fn status_line(tcp: &mut TcpStream, within: Duration) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(within, async {
        while !head.ends_with(b"\r\n") {
            if tcp.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(String::from_utf8_lossy(&head).trim_end().to_owned())
    })
    .await
    .ok()
    .flatten()
}

/// README: "new streams get 503 while draining". The listener keeps accepting through the
/// drain window (in-flight work finishes), so only the refusal in `AppState::open_stream`
/// stands between a new client and a stream that would end moments later.
#[tokio::test]
async fn new_streams_are_refused_with_503_while_draining() {
    let svc = memory(&[
        ("DRAIN_WINDOW", "6s"),
        ("SHUTDOWN_TIMEOUT", "8s"),
        ("REFUSAL_DELAY", "0s"),
    ]);
    svc.wait_ready().await;
    let _held = svc.subscribe("env").await;
    kill(svc.pid(), "TERM");
    svc.wait_readyz(503, Duration::from_secs(3)).await;
    let mut h1 = stream_request(&svc, "env").await;
    let answer = status_line(&mut h1, Duration::from_secs(3)).await;
    assert_eq!(answer.as_deref(), Some("HTTP/1.1 503 Service Unavailable"));
    // (A new HTTP/2 connection is sent GOAWAY at once: no stream to refuse there.)
}

/// At most `MAX_DELAYED_REFUSALS` (1,024) refused stream requests are held back at once;
/// the next is answered at once, so a flood cannot pin more sockets than that.
#[tokio::test]
async fn refusals_past_the_1024_held_are_answered_at_once() {
    let svc = memory(&[("MAX_SUBSCRIBERS", "1"), ("REFUSAL_DELAY", "60s")]);
    svc.wait_ready().await;
    let _held = svc.subscribe("env").await;
    let mut waiting = Vec::new();
    for _ in 0..1024 {
        waiting.push(stream_request(&svc, "env").await);
    }
    svc.wait_metric(
        "flagsmith_sse_stream_refusals_total{delayed=\"true\"}",
        1024.0,
    )
    .await;
    let mut past = stream_request(&svc, "env").await;
    // Held back, it would wait 30 to 90 s.
    let answer = status_line(&mut past, Duration::from_secs(10)).await;
    assert_eq!(answer.as_deref(), Some("HTTP/1.1 503 Service Unavailable"));
    let metrics = get(svc.addr, "/metricsz").await.body;
    assert_eq!(
        metric(
            &metrics,
            "flagsmith_sse_stream_refusals_total{delayed=\"false\"}"
        ),
        1.0
    );
    drop(waiting);
}

/// Refused clients that came together are answered apart (half to one and a half times
/// `REFUSAL_DELAY`, by a serial that advances with each refusal), so clients that
/// reconnect at once after any answer do not come back in lockstep.
#[tokio::test]
async fn refused_clients_are_answered_spread_not_in_lockstep() {
    let svc = memory(&[("MAX_SUBSCRIBERS", "1"), ("REFUSAL_DELAY", "2s")]);
    svc.wait_ready().await;
    let _held = svc.subscribe("env").await;
    let sent = Instant::now();
    let mut requests = Vec::new();
    for _ in 0..40 {
        requests.push(stream_request(&svc, "env").await);
    }
    let answered: Vec<Duration> =
        futures_util::future::join_all(requests.into_iter().map(|mut tcp| async move {
            let line = status_line(&mut tcp, Duration::from_secs(10)).await;
            assert_eq!(line.as_deref(), Some("HTTP/1.1 503 Service Unavailable"));
            sent.elapsed()
        }))
        .await;
    let (first, last) = (
        answered.iter().min().copied().unwrap_or_default(),
        answered.iter().max().copied().unwrap_or_default(),
    );
    assert!(
        first >= Duration::from_millis(900),
        "answered early: {first:?}"
    );
    assert!(
        last - first >= Duration::from_millis(1000),
        "answers not spread: {first:?}..{last:?}"
    );
}

/// The delivery-latency histogram counts deliveries of news only: the event a subscriber
/// gets on connect (a replay of something stored earlier) would push the p99 alert on
/// every reconnect.
#[tokio::test]
async fn the_replay_on_connect_is_not_a_delivery() {
    let svc = memory(&[]);
    svc.wait_ready().await;
    let count = "flagsmith_sse_delivery_latency_seconds_count";
    assert_eq!(svc.publish("env", "10.5").await.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut sse = svc.subscribe("env").await;
    assert_eq!(sse.next_update(5 * SECOND).await, Some(10.5));
    let mut h2 = Sse::connect_h2c(svc.addr, "env").await;
    assert_eq!(h2.next_update(5 * SECOND).await, Some(10.5));
    assert_eq!(metric(&get(svc.addr, "/metricsz").await.body, count), 0.0);
    assert_eq!(svc.publish("env", "11.5").await.status, 200);
    assert_eq!(sse.next_update(5 * SECOND).await, Some(11.5));
    assert_eq!(h2.next_update(5 * SECOND).await, Some(11.5));
    svc.wait_metric(count, 2.0).await;
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis()
}

/// After a reconnect the Redis reader loads the hash again; an update stored longer ago
/// than the retention is known but not sent on connect (the stored time comes from the
/// hash, not the moment of loading).
#[tokio::test]
async fn after_a_redis_reconnect_updates_past_the_retention_are_not_sent_on_connect() {
    let redis = Redis::start();
    let svc = Service::start_redis(&redis.url(), &[]);
    svc.wait_ready().await;
    // Written with Redis's own tools, past the stream: only a load of the hash sees them.
    let two_hours_ago = now_ms() - 2 * 3600 * 1000;
    redis.cli(&[
        "HSET",
        "{flagsmith-sse}:latest",
        "stale",
        &format!("1000000:{two_hours_ago}"),
        "fresh",
        &format!("2000000:{}", now_ms()),
    ]);
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    eventually_async(10 * SECOND, "the hash loaded again", async || {
        let mut fresh = svc.subscribe("fresh").await;
        fresh.next_update(Duration::from_millis(500)).await == Some(2.0)
    })
    .await;
    let mut stale = svc.subscribe("stale").await;
    assert_eq!(stale.next(Duration::from_millis(1500)).await, Next::Quiet);
}

/// While Redis is down the broker says so: the connected gauge 0 and `/readyz` 503; both
/// come back with Redis.
#[tokio::test]
async fn the_redis_broker_reports_not_connected_while_redis_is_down() {
    let mut redis = Redis::start();
    let svc = Service::start_redis(&redis.url(), &[]);
    svc.wait_ready().await;
    let connected = "flagsmith_sse_broker_connected{broker=\"redis\"}";
    svc.wait_metric(connected, 1.0).await;
    redis.stop();
    svc.wait_metric(connected, 0.0).await;
    svc.wait_readyz(503, Duration::from_secs(1)).await;
    redis.restart();
    svc.wait_metric(connected, 1.0).await;
    svc.wait_ready().await;
}

/// Writes, and the idle reader's checks, that find the epoch the instance caught up with
/// restart nothing: only a changed epoch (Redis lost its data) sends the reader back to
/// reload and store back.
#[tokio::test]
async fn redis_writes_in_a_steady_epoch_restart_no_connection() {
    let redis = Redis::start();
    let svc = Service::start_redis(&redis.url(), &[]);
    svc.wait_ready().await;
    for n in 1..=5 {
        assert_eq!(svc.publish("env", &format!("{n}.5")).await.status, 200);
    }
    // Past two of the idle reader's epoch checks.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let metrics = get(svc.addr, "/metricsz").await.body;
    assert_eq!(
        metric(
            &metrics,
            "flagsmith_sse_broker_reconnects_total{broker=\"redis\"}"
        ),
        0.0
    );
}

/// README: `/readyz` says 200 only once the instance is caught up, so a load balancer never
/// sends a subscriber where "latest on connect" would answer nothing for an environment
/// that has an update. With NATS the consumer counts what the stream held when it started
/// (its pending count): at the first 200, every stored environment is held.
#[tokio::test]
async fn nats_readiness_waits_for_every_stored_environment() {
    const ENVIRONMENTS: usize = 20_000;
    let nats = Nats::start();
    let first = Service::start(&nats.url());
    first.wait_ready().await;
    // Straight into the stream the first instance created: the HTTP API would take long.
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let jetstream = async_nats::jetstream::new(client);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // In batches: async-nats holds back a publish while too many acks are unanswered.
    for batch in (0..ENVIRONMENTS).collect::<Vec<_>>().chunks(500) {
        let mut acks = Vec::with_capacity(batch.len());
        for i in batch {
            let payload = format!("{{\"updated_at\": {now}.5}}");
            acks.push(
                jetstream
                    .publish(format!("flagsmith.environment.env{i}"), payload.into())
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("stored");
        }
    }
    let second = Service::start(&nats.url());
    let deadline = Instant::now() + 30 * SECOND;
    let mut not_ready = 0;
    loop {
        if let Ok(resp) = try_get(second.addr, "/readyz").await
            && resp.status == 200
        {
            break;
        }
        not_ready += 1;
        assert!(Instant::now() < deadline, "never ready:\n{}", second.log());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let held = metric(
        &get(second.addr, "/metricsz").await.body,
        "flagsmith_sse_environments",
    );
    assert_eq!(
        held, ENVIRONMENTS as f64,
        "ready while holding {held} of {ENVIRONMENTS} environments (after {not_ready} answers \
         of not ready)"
    );
}

/// The connected gauge needs both Redis connections, the writer's and the reader's: an
/// instance whose writes succeed but whose reader cannot follow the feed (a Redis user
/// denied XREAD, XREVRANGE and HGETALL) does not say connected, since its subscribers would
/// miss every other instance's updates.
#[tokio::test]
async fn the_redis_broker_is_not_connected_with_its_writer_alone() {
    let redis = Redis::start();
    let reply = redis.cli(&[
        "ACL",
        "SETUSER",
        "blind",
        "on",
        ">blindpw",
        "~*",
        "&*",
        "+@all",
        "-xread",
        "-xrevrange",
        "-hgetall",
    ]);
    assert_eq!(reply.trim(), "OK");
    let svc = Service::start_redis(
        &redis.url(),
        &[("REDIS_USERNAME", "blind"), ("REDIS_PASSWORD", "blindpw")],
    );
    // The writer is up: a write is stored.
    let resp = svc.publish_until_ok("env", "1.5").await;
    assert_eq!(resp.json()["status"], "stored", "{}", resp.body);
    let connected = "flagsmith_sse_broker_connected{broker=\"redis\"}";
    // The reader reconnects and fails again, so it is up for moments at a time: look often.
    let mut said = Vec::new();
    for _ in 0..20 {
        said.push(metric(&get(svc.addr, "/metricsz").await.body, connected));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(said.contains(&0.0), "always connected: {said:?}");
    assert_ne!(get(svc.addr, "/readyz").await.status, 200);
}
