//! The HTTP layer driven directly, with a broker that records what it is asked to store.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;

use super::*;
use crate::broker::{BoxFuture, Broker, PublishError};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::sse::{StreamSettings, Subscriber};
use crate::state::Settings;

#[derive(Default)]
struct FakeBroker {
    published: Mutex<Vec<(String, i64)>>,
    down: AtomicBool,
}

impl Broker for FakeBroker {
    fn publish<'a>(
        &'a self,
        key: &'a str,
        timestamp: Timestamp,
    ) -> BoxFuture<'a, Result<Published, PublishError>> {
        Box::pin(async move {
            if self.down.load(Ordering::Relaxed) {
                return Err(PublishError::NotConnected);
            }
            let mut published = self.published.lock().expect("lock");
            published.push((key.to_owned(), timestamp.micros()));
            Ok(Published::Stored {
                sequence: published.len() as u64,
            })
        })
    }

    fn is_ready(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    fn is_connected(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    fn name(&self) -> &'static str {
        "fake"
    }
}

fn settings() -> Settings {
    Settings {
        stream: StreamSettings {
            keepalive: Duration::from_secs(15),
            max_age: None,
            drain_window: Duration::from_secs(2),
            max_subscribers: 3,
            max_socket_subscribers: 3,
        },
        body_read_timeout: Duration::from_secs(1),
        refusal_delay: Duration::ZERO,
    }
}

fn state() -> (Arc<AppState>, Arc<FakeBroker>) {
    state_with(settings())
}

fn state_with(settings: Settings) -> (Arc<AppState>, Arc<FakeBroker>) {
    let broker = Arc::new(FakeBroker::default());
    let state = AppState::new(
        Arc::new(Hub::new(Duration::from_secs(3600))),
        broker.clone(),
        Arc::new(Metrics::default()),
        "s3cret",
        settings,
    );
    (Arc::new(state), broker)
}

fn post(path: &str, auth: Option<&str>, body: &str) -> Request<Full<Bytes>> {
    let mut builder = Request::post(path).header("content-type", "application/json");
    if let Some(auth) = auth {
        builder = builder.header("authorization", auth);
    }
    builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request")
}

async fn send(
    state: &Arc<AppState>,
    request: Request<Full<Bytes>>,
) -> (StatusCode, HeaderMap, String) {
    let response = handle(state.clone(), request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(bytes.to_vec()).expect("utf-8"),
    )
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::default()).expect("request")
}

const PATH: &str = "/sse/environments/n9fbf9h3v4fFgH3U3ngWhb/queue-change";
const BODY: &str = r#"{"updated_at": "2025-07-14T13:49:43.123456+00:00"}"#;

#[tokio::test]
async fn queue_change_stores_with_the_right_token() {
    let (state, broker) = state();
    let (status, headers, body) = send(&state, post(PATH, Some("Token s3cret"), BODY)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["access-control-allow-origin"], "*");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["status"], "stored");
    assert_eq!(json["updated_at"], 1752500983.123456);
    assert_eq!(
        *broker.published.lock().expect("lock"),
        [("n9fbf9h3v4fFgH3U3ngWhb".to_owned(), 1_752_500_983_123_456)]
    );
    // The scheme is case-insensitive.
    let (status, _, _) = send(&state, post(PATH, Some("token s3cret"), BODY)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn queue_change_checks_the_token_before_anything_else() {
    let (state, broker) = state();
    for auth in [
        None,
        Some("Token wrong!"),
        Some("Token s3cre"),
        Some("Bearer s3cret"),
        Some("s3cret"),
    ] {
        // A bad key and a bad body still get 401: the token is checked first.
        for (path, body) in [(PATH, BODY), ("/sse/environments/a.b/queue-change", "{")] {
            let (status, headers, text) = send(&state, post(path, auth, body)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
            assert_eq!(headers["www-authenticate"], "Token");
            assert!(text.contains("\"unauthorized\""), "{text}");
        }
    }
    assert!(broker.published.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn queue_change_rejects_bad_input_with_json_errors_and_publishes_nothing() {
    let (state, broker) = state();
    let auth = Some("Token s3cret");
    let huge = format!(
        r#"{{"updated_at": 1, "pad": "{}"}}"#,
        "x".repeat(MAX_BODY_BYTES)
    );
    let cases: Vec<(String, String, StatusCode, &str)> = vec![
        (
            PATH.into(),
            "not json".into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            PATH.into(),
            "{}".into(),
            StatusCode::BAD_REQUEST,
            "invalid_updated_at",
        ),
        (
            PATH.into(),
            r#"{"updated_at":"soon"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_updated_at",
        ),
        (
            PATH.into(),
            r#"{"updated_at":-5}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_updated_at",
        ),
        (
            PATH.into(),
            huge,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            "/sse/environments/a.b/queue-change".into(),
            BODY.into(),
            StatusCode::BAD_REQUEST,
            "invalid_environment_key",
        ),
        (
            "/sse/environments/a*/queue-change".into(),
            BODY.into(),
            StatusCode::BAD_REQUEST,
            "invalid_environment_key",
        ),
        (
            "/sse/environments/a%20b/queue-change".into(),
            BODY.into(),
            StatusCode::BAD_REQUEST,
            "invalid_environment_key",
        ),
        (
            format!("/sse/environments/{}/queue-change", "k".repeat(200)),
            BODY.into(),
            StatusCode::BAD_REQUEST,
            "invalid_environment_key",
        ),
    ];
    for (path, body, want_status, want_code) in cases {
        let (status, headers, text) = send(&state, post(&path, auth, &body)).await;
        assert_eq!(status, want_status, "{path} {text}");
        assert_eq!(headers["content-type"], "application/json");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json error body");
        assert_eq!(json["error"], want_code, "{text}");
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert!(broker.published.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn queue_change_answers_503_with_retry_after_when_the_broker_is_down() {
    let (state, broker) = state();
    broker.down.store(true, Ordering::Relaxed);
    let (status, headers, text) = send(&state, post(PATH, Some("Token s3cret"), BODY)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert_eq!(headers["retry-after"], "1");
    let (status, _, _) = send(&state, get("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn health_aliases_and_shutdown() {
    let (state, _) = state();
    for path in [
        "/livez",
        "/health",
        "/health/liveness",
        "/health/liveness/",
        "/readyz",
        "/health/readiness",
        "/health/readiness/",
    ] {
        let (status, headers, _) = send(&state, get(path)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(headers["access-control-allow-origin"], "*");
    }
    state.begin_shutdown();
    let (status, _, _) = send(&state, get("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, _) = send(&state, get("/livez")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn preflight_allows_authorization_from_any_origin() {
    let (state, _) = state();
    let request = Request::options(PATH)
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .body(Full::default())
        .expect("req");
    let (status, headers, _) = send(&state, request).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert!(
        headers["access-control-allow-methods"]
            .to_str()
            .expect("ascii")
            .contains("POST")
    );
    assert!(
        headers["access-control-allow-headers"]
            .to_str()
            .expect("ascii")
            .to_ascii_lowercase()
            .contains("authorization")
    );
    let request = Request::options("/sse/environments/k/stream")
        .body(Full::default())
        .expect("req");
    let (_, headers, _) = send(&state, request).await;
    assert!(
        headers["access-control-allow-headers"]
            .to_str()
            .expect("ascii")
            .contains("Authorization")
    );
}

#[tokio::test]
async fn wrong_methods_and_unknown_paths() {
    let (state, _) = state();
    let (status, headers, _) = send(&state, get(PATH)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "POST, OPTIONS");
    let (status, _, _) = send(
        &state,
        post("/sse/environments/k/stream", Some("Token s3cret"), BODY),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    for path in [
        "/",
        "/sse",
        "/sse/environments/k",
        "/sse/environments/k/other",
    ] {
        let (status, _, text) = send(&state, get(path)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(text.contains("not_found"));
    }
    let (status, _, text) = send(&state, get("/sse/environments/a.b/stream")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
}

#[tokio::test]
async fn stream_sends_latest_on_connect_then_only_newer() {
    use crate::hub::Update;
    use std::time::SystemTime;
    let (state, _) = state();
    let at = |micros| Update {
        timestamp: Timestamp::from_micros(micros).expect("in range"),
        sequence: 1,
        stored_at: SystemTime::now(),
    };
    state.hub().apply("env", at(1_000_000));
    let response = handle(state.clone(), get("/sse/environments/env/stream"))
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    assert!(response.headers().get("content-encoding").is_none());
    assert_eq!(state.metrics().subscribers(), 1);
    let mut body = response.into_body();
    let mut next = async || {
        let frame = body.frame().await.expect("frame").expect("infallible");
        String::from_utf8(frame.into_data().expect("data").to_vec()).expect("utf-8")
    };
    assert_eq!(
        next().await,
        "event: environment_updated\ndata: {\"updated_at\": 1.0}\n\n"
    );
    state.hub().apply("env", at(500_000));
    state.hub().apply("env", at(3_000_000));
    assert_eq!(
        next().await,
        "event: environment_updated\ndata: {\"updated_at\": 3.0}\n\n"
    );
    state.hub().close();
    assert!(
        body.frame().await.is_none(),
        "stream ends when the hub closes"
    );
    drop(body);
    assert_eq!(state.metrics().subscribers(), 0);
}

#[tokio::test(start_paused = true)]
async fn stream_sends_keepalives_in_silence() {
    let (state, _) = state();
    let response = handle(state.clone(), get("/sse/environments/env/stream"))
        .await
        .expect("infallible");
    let mut body = response.into_body();
    let started = tokio::time::Instant::now();
    let frame = body.frame().await.expect("frame").expect("infallible");
    assert_eq!(&frame.into_data().expect("data")[..], b": keepalive\n\n");
    assert_eq!(started.elapsed(), Duration::from_secs(15));
}

/// A keep-alive fills a silence: an event puts the next one off to a whole interval after
/// it, rather than the stream sending a comment every interval whatever it wrote.
#[tokio::test(start_paused = true)]
async fn an_event_puts_off_the_next_keepalive() {
    use crate::hub::Update;
    use std::time::SystemTime;
    let (state, _) = state();
    let response = handle(state.clone(), get("/sse/environments/env/stream"))
        .await
        .expect("infallible");
    let mut body = response.into_body();
    let started = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    state.hub().apply(
        "env",
        Update {
            timestamp: Timestamp::from_micros(1_000_000).expect("in range"),
            sequence: 1,
            stored_at: SystemTime::now(),
        },
    );
    let mut next = async || {
        let frame = body.frame().await.expect("frame").expect("infallible");
        let text = String::from_utf8(frame.into_data().expect("data").to_vec()).expect("utf-8");
        (text, started.elapsed())
    };
    let (event, at) = next().await;
    assert!(event.starts_with("event: environment_updated\n"), "{event}");
    assert_eq!(at, Duration::from_secs(10));
    assert_eq!(
        next().await,
        (": keepalive\n\n".to_owned(), Duration::from_secs(25))
    );
    assert_eq!(
        next().await,
        (": keepalive\n\n".to_owned(), Duration::from_secs(40))
    );
}

/// hyper keeps a request's future (the space of it, in the stream's task) and body for the
/// whole life of an HTTP/2 stream, so their sizes are memory per subscriber: the future is
/// a box, and the body holds the subscriber and its place in the fan-out, nothing else.
/// The body's bound is for the test profile (152 bytes there when this was written).
#[tokio::test]
async fn per_stream_state_stays_small() {
    let (state, _) = state();
    let request = Request::get("/x")
        .body(Full::<Bytes>::default())
        .expect("req");
    let future = handle(state.clone(), request);
    assert!(
        std::mem::size_of_val(&future) <= 16,
        "{}",
        std::mem::size_of_val(&future)
    );
    let subscription = state.hub().subscribe("x").expect("open");
    let subscriber =
        Subscriber::try_new(state.stream.clone(), subscription, None, Transport::Http2)
            .expect("under the cap");
    let body = EventBody::new(subscriber, "x");
    let size = std::mem::size_of_val(&body);
    assert!(size <= 152, "{size} bytes");
}

#[tokio::test]
async fn the_subscriber_cap_answers_503_with_retry_after() {
    let (state, _) = state();
    let stream = || get("/sse/environments/env/stream");
    let mut held = Vec::new();
    for _ in 0..3 {
        let response = handle(state.clone(), stream()).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
        held.push(response);
    }
    let (status, headers, body) = send(&state, stream()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["retry-after"], "1");
    assert!(body.contains("too_many_subscribers"), "{body}");
    held.pop();
    let response = handle(state.clone(), stream()).await.expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn draining_ends_streams_within_the_window() {
    let (state, _) = state();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let response = handle(state.clone(), get("/sse/environments/env/stream"))
            .await
            .expect("infallible");
        bodies.push(response.into_body());
    }
    let started = tokio::time::Instant::now();
    state.begin_drain();
    for mut body in bodies {
        assert!(body.frame().await.is_none(), "stream should end");
        assert!(
            started.elapsed() <= Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}

/// `MAX_STREAM_AGE`: a stream ends cleanly (its last frame a whole event or comment) at
/// its age give or take 10 %, and the end is counted.
#[tokio::test(start_paused = true)]
async fn streams_end_at_their_age_spread_and_counted() {
    let mut settings = settings();
    settings.stream.max_age = Some(Duration::from_secs(30));
    settings.stream.max_subscribers = 100;
    settings.stream.max_socket_subscribers = 100;
    let (state, _) = state_with(settings);
    let started = tokio::time::Instant::now();
    let mut ends = Vec::new();
    for _ in 0..20 {
        let response = handle(state.clone(), get("/sse/environments/env/stream"))
            .await
            .expect("infallible");
        let mut body = response.into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.expect("infallible").into_data().expect("data"));
        }
        // 30 s ± 10 % with a 15 s keep-alive: one or two keep-alives, nothing else.
        assert!(
            frames.iter().all(|f| &f[..] == b": keepalive\n\n"),
            "{frames:?}"
        );
        ends.push(started.elapsed());
    }
    let ages: Vec<Duration> = ends
        .iter()
        .scan(Duration::ZERO, |before, end| {
            let age = *end - *before;
            *before = *end;
            Some(age)
        })
        .collect();
    for age in &ages {
        assert!(
            (Duration::from_secs(27)..=Duration::from_secs(33)).contains(age),
            "{ages:?}"
        );
    }
    let (min, max) = (ages.iter().min(), ages.iter().max());
    assert!(
        max.zip(min)
            .is_some_and(|(max, min)| *max - *min >= Duration::from_secs(2)),
        "ages are not spread: {ages:?}"
    );
    let (_, _, text) = send(&state, get("/metricsz")).await;
    assert!(
        text.lines()
            .any(|l| l == "flagsmith_sse_streams_ended_by_age_total 20"),
        "{text}"
    );
}

/// Python's SDK reconnects at once after any answer: a refused stream is answered after a
/// spread delay, whatever the reason.
#[tokio::test(start_paused = true)]
async fn refused_streams_are_answered_after_a_delay() {
    let mut settings = settings();
    settings.refusal_delay = Duration::from_secs(1);
    settings.stream.max_subscribers = 1;
    settings.stream.max_socket_subscribers = 1;
    let (state, _) = state_with(settings);
    let held = handle(state.clone(), get("/sse/environments/env/stream"))
        .await
        .expect("infallible");
    assert_eq!(held.status(), StatusCode::OK);
    for (path, want) in [
        ("/sse/environments/a.b/stream", StatusCode::BAD_REQUEST),
        (
            "/sse/environments/env/stream",
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    ] {
        let started = tokio::time::Instant::now();
        let (status, _, _) = send(&state, get(path)).await;
        assert_eq!(status, want, "{path}");
        let waited = started.elapsed();
        assert!(
            (Duration::from_millis(500)..Duration::from_millis(1500)).contains(&waited),
            "{path}: answered after {waited:?}"
        );
    }
    // Other routes are not held back.
    let started = tokio::time::Instant::now();
    let (status, _, _) = send(&state, get("/nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

/// What Flagsmith's API (`api/sse/tasks.py` with a base URL ending in `/`) and SDKs send.
#[tokio::test]
async fn paths_as_callers_write_them() {
    let (state, broker) = state();
    for path in [
        "//sse/environments/k/queue-change",
        "/sse/environments/k/queue-change/",
        "/sse//environments/k/queue-change?x=1",
    ] {
        let (status, _, text) = send(&state, post(path, Some("Token s3cret"), BODY)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {text}");
    }
    assert_eq!(broker.published.lock().expect("lock").len(), 3);
    for path in [
        "//sse/environments/k/stream",
        "/sse/environments/k/stream/",
        "/sse/environments/k/stream?lastEventId=",
    ] {
        let response = handle(state.clone(), get(path)).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
    }
    let (status, _, _) = send(&state, get("/sse/health")).await;
    assert_eq!(status, StatusCode::OK);
}

/// A subscriber's own filter: when its environment's channel changes without a newer
/// update (here the drain flag at shutdown), it must not send the same event again. The
/// hub never holds an older update, so this is where the filter is what stops a repeat.
#[tokio::test(start_paused = true)]
async fn a_stream_never_repeats_an_event_when_its_channel_changes_without_news() {
    use crate::hub::Update;
    use std::time::SystemTime;
    let (state, _) = state();
    state.hub().apply(
        "env",
        Update {
            timestamp: Timestamp::from_micros(1_000_000).expect("in range"),
            sequence: 1,
            stored_at: SystemTime::now(),
        },
    );
    let response = handle(state.clone(), get("/sse/environments/env/stream"))
        .await
        .expect("infallible");
    let mut body = response.into_body();
    let frame = body.frame().await.expect("frame").expect("infallible");
    assert_eq!(
        &frame.into_data().expect("data")[..],
        b"event: environment_updated\ndata: {\"updated_at\": 1.0}\n\n"
    );
    state.begin_drain();
    // The channel changed (draining), the update did not: the stream ends, silently.
    assert!(body.frame().await.is_none(), "the event was sent again");
}

/// A hyper-served stream that ends takes only its own place in the fan-out: every other
/// stream of the environment is still woken by the next update (more streams than shards,
/// so that places share a shard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ending_takes_only_its_own_place() {
    use crate::hub::Update;
    use std::time::SystemTime;
    let mut settings = settings();
    settings.stream.max_subscribers = 100;
    settings.stream.max_socket_subscribers = 100;
    let (state, _) = state_with(settings);
    let at = |micros| Update {
        timestamp: Timestamp::from_micros(micros).expect("in range"),
        sequence: 1,
        stored_at: SystemTime::now(),
    };
    state.hub().apply("env", at(1_000_000));
    let mut bodies = Vec::new();
    for _ in 0..20 {
        let response = handle(state.clone(), get("/sse/environments/env/stream"))
            .await
            .expect("infallible");
        let mut body = response.into_body();
        // The event on connect; the body then waits, registered with the fan-out.
        body.frame().await.expect("frame").expect("infallible");
        bodies.push(body);
    }
    bodies.truncate(10);
    assert_eq!(state.metrics().subscribers(), 10);
    // Each waits in its own task, as hyper polls it, before the update arrives.
    let waiting: Vec<_> = bodies
        .into_iter()
        .map(|mut body| tokio::spawn(async move { body.frame().await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    state.hub().apply("env", at(2_000_000));
    for task in waiting {
        let frame = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("woken by the update")
            .expect("joined")
            .expect("frame")
            .expect("infallible");
        assert_eq!(
            &frame.into_data().expect("data")[..],
            b"event: environment_updated\ndata: {\"updated_at\": 2.0}\n\n"
        );
    }
}
