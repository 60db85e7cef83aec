//! Flagsmith's SDKs as they really read a stream, for those that cannot be installed here.
//! Each emulation reproduces one SDK's realtime code, cited by file, against a real
//! service with a short `MAX_STREAM_AGE`: it must refetch its flags for a newer timestamp
//! and not for an equal one, across the reconnects that stream age causes.
//!
//! (The JavaScript SDK runs for real in headless Chromium: `e2e/browser.mjs`.)

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const KEY: &str = "n9fbf9h3v4fFgH3U3ngWhb";

/// A service without NATS whose streams end after about a second.
fn service(max_stream_age: &str) -> Service {
    Service::start_with(
        "nats://unused",
        &[("BROKER", "memory"), ("MAX_STREAM_AGE", max_stream_age)],
    )
}

/// What an SDK did: connections opened, flag refetches, and the newest `updated_at` it
/// holds. Events it could not parse are failures, counted.
#[derive(Default)]
struct Sdk {
    connects: AtomicUsize,
    refetches: AtomicUsize,
    unparsed: AtomicUsize,
    last: Mutex<f64>,
}

impl Sdk {
    /// The rule every SDK applies: refetch only for a newer `updated_at` than it holds.
    fn saw(&self, updated_at: f64) {
        let mut last = self.last.lock().expect("lock");
        if updated_at > *last {
            *last = updated_at;
            self.refetches.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// An event's `updated_at`, as parsed by the SDK (`None`: it could not parse it).
    fn saw_parsed(&self, updated_at: Option<f64>) {
        match updated_at {
            Some(at) => self.saw(at),
            None => {
                self.unparsed.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn connects(&self) -> usize {
        self.connects.load(Ordering::SeqCst)
    }

    fn refetches(&self) -> usize {
        self.refetches.load(Ordering::SeqCst)
    }
}

/// One GET with exactly these headers (no others: hyper's client adds none), over a new
/// connection, as the SDK's HTTP library sends it.
async fn open(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = Request::get(path).header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

fn stream_path() -> String {
    format!("/sse/environments/{KEY}/stream")
}

/// Opens the stream as an SDK that reconnects after every end does: the response, counted
/// as a connect, or `None` after a short pause when the connection failed.
async fn reopen(
    addr: SocketAddr,
    headers: &[(&str, &str)],
    sdk: &Sdk,
) -> Option<http::Response<hyper::body::Incoming>> {
    match open(addr, &stream_path(), headers).await {
        Ok(response) => {
            sdk.connects.fetch_add(1, Ordering::SeqCst);
            Some(response)
        }
        Err(_) => {
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

/// The `updated_at` of a `data: {...}` payload, if it is a JSON object holding a number.
fn updated_at(json: &str) -> Option<f64> {
    serde_json::from_str::<serde_json::Value>(json).ok()?["updated_at"].as_f64()
}

/// flagsmith-ruby-client `lib/flagsmith/sdk/realtime_client.rb` (`listen`): sleep the retry
/// interval, `Faraday.new(url: endpoint).get(...).body.each_line`: the whole response is
/// read before any line is looked at; lines that are empty or start with `:` are skipped,
/// only `data: ` lines are parsed; `updated_at > last_updated_at` calls
/// `update_environment`. `last_updated_at` lives across reconnects.
async fn ruby(addr: SocketAddr, sdk: Arc<Sdk>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(response) = open(
            addr,
            &stream_path(),
            &[
                ("user-agent", "Faraday v2.12.2"),
                ("accept", "*/*"),
                ("accept-encoding", "gzip;q=1.0,deflate;q=0.6,identity;q=0.3"),
            ],
        )
        .await
        else {
            continue;
        };
        sdk.connects.fetch_add(1, Ordering::SeqCst);
        let Ok(body) = response.into_body().collect().await else {
            continue;
        };
        let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        for line in text.lines() {
            if line.trim().is_empty() || line.starts_with(':') {
                continue;
            }
            let Some(json) = line.strip_prefix("data: ") else {
                continue;
            };
            sdk.saw_parsed(updated_at(json.trim()));
        }
    }
}

/// flagsmith-go-client `realtime.go` (`connect`, `parseUpdatedAtFromSSE`): `http.Get` (no
/// Accept header; Go adds its User-Agent and `Accept-Encoding: gzip`), a `bufio.Scanner`
/// over the body, `strings.HasPrefix(line, "data: ")`; after the body ends, it connects
/// again at once.
async fn go(addr: SocketAddr, sdk: Arc<Sdk>) {
    loop {
        let headers = [
            ("user-agent", "Go-http-client/1.1"),
            ("accept-encoding", "gzip"),
        ];
        let Some(response) = reopen(addr, &headers, &sdk).await else {
            continue;
        };
        let mut body = response.into_body();
        let mut pending = String::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                if let Some(json) = line.trim_end_matches('\n').strip_prefix("data: ") {
                    sdk.saw_parsed(updated_at(json).filter(|at| *at > 0.0));
                }
            }
        }
    }
}

/// flagsmith-ios-client `FlagsmithClient/Classes/Internal/SSEManager.swift`: every
/// `didReceive data` chunk is parsed on its own (`processSSEData`: split on `\n`, lines
/// with the prefix `data:`, the prefix removed, JSON-decoded as a `FlagEvent`), so an event
/// split over two reads is a decoding failure; on completion without error it starts again
/// at once.
async fn ios(addr: SocketAddr, sdk: Arc<Sdk>) {
    loop {
        let headers = [
            (
                "accept",
                "text/event-stream, application/json; charset=utf-8",
            ),
            ("cache-control", "no-cache"),
            ("connection", "keep-alive"),
        ];
        let Some(response) = reopen(addr, &headers, &sdk).await else {
            continue;
        };
        let mut body = response.into_body();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let Ok(message) = std::str::from_utf8(&data) else {
                continue;
            };
            for line in message.split('\n').filter(|l| l.starts_with("data:")) {
                sdk.saw_parsed(updated_at(&line.replacen("data:", "", 1)));
            }
        }
    }
}

/// The SSE fields of a block: `event` and `data` (lines joined by `\n`), per the
/// EventSource parsing rules OkHttp and Dart's SSE client follow.
fn sse_fields(block: &str) -> (Option<String>, String) {
    let mut event = None;
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {}
        }
    }
    (event, data.join("\n"))
}

/// Reads SSE blocks from `body`, handing each to `each`, until the body ends.
async fn for_each_block(mut body: hyper::body::Incoming, mut each: impl FnMut(&str)) {
    let mut pending = String::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            each(&block);
        }
    }
}

/// flagsmith-kotlin-android-client
/// `FlagsmithClient/src/main/java/com/flagsmith/internal/FlagsmithEventService.kt`: OkHttp
/// `EventSources` with `Accept: application/json` and `Accept: text/event-stream` (two
/// header lines) and `X-Environment-Key` (`envKeyInterceptor`); OkHttp's EventSource fails
/// unless the response is `text/event-stream`; `onEvent` takes type `environment_updated`
/// with non-empty data; `onClosed` opens a new EventSource at once.
async fn android(addr: SocketAddr, sdk: Arc<Sdk>) {
    loop {
        let headers = [
            ("accept", "application/json"),
            ("accept", "text/event-stream"),
            ("x-environment-key", KEY),
            ("user-agent", "flagsmith-kotlin-android-sdk/1.8.0"),
        ];
        let Some(response) = reopen(addr, &headers, &sdk).await else {
            continue;
        };
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if response.status() != 200 || !content_type.starts_with("text/event-stream") {
            // onFailure: the SDK reports it and does not reconnect by itself.
            sdk.unparsed.fetch_add(1, Ordering::SeqCst);
            return;
        }
        for_each_block(response.into_body(), |block| {
            let (event, data) = sse_fields(block);
            if event.as_deref() == Some("environment_updated") && !data.is_empty() {
                sdk.saw_parsed(updated_at(&data));
            }
        })
        .await;
    }
}

/// flagsmith-flutter-client `lib/src/flagsmith_client.dart` (`_setupRealtimeUpdates`,
/// `onEventReceived`): `SSEClient.subscribeToSSE` with `Accept: application/json ,
/// text/event-stream`, then `Future.delayed(reconnectToSSEInterval)` sets up another
/// stream, never cancelling the previous one. An event counts only if its name is
/// `environment_updated` and its `updated_at` decodes as a Dart `double` (a JSON number
/// with a fraction or exponent: `1.0`, not `1`).
async fn flutter(addr: SocketAddr, sdk: Arc<Sdk>, interval: Duration) {
    loop {
        let sdk_for_stream = sdk.clone();
        tokio::spawn(async move {
            let Ok(response) = open(
                addr,
                &stream_path(),
                &[("accept", "application/json , text/event-stream")],
            )
            .await
            else {
                return;
            };
            sdk_for_stream.connects.fetch_add(1, Ordering::SeqCst);
            for_each_block(response.into_body(), |block| {
                let (event, data) = sse_fields(block);
                if event.as_deref() != Some("environment_updated") {
                    return;
                }
                let is_double = serde_json::from_str::<serde_json::Value>(&data)
                    .ok()
                    .and_then(|v| v.get("updated_at").cloned())
                    .is_some_and(|v| v.is_f64());
                sdk_for_stream.saw_parsed(updated_at(&data).filter(|_| is_double));
            })
            .await;
        });
        tokio::time::sleep(interval).await;
    }
}

/// Posts `updated_at` as Flagsmith's API sends it (an ISO-8601 string).
async fn post_update(service: &Service, iso: &str) {
    let resp = service.publish(KEY, &format!("\"{iso}\"")).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
}

/// The scenario every emulation must pass: the update stored before it connects is fetched
/// once; the equal timestamp sent on each reconnect fetches nothing; a newer one is fetched
/// once, also across the next reconnects.
async fn refetches_only_for_newer(
    name: &str,
    run: impl FnOnce(SocketAddr, Arc<Sdk>) -> tokio::task::JoinHandle<()>,
) {
    let service = service("1");
    service.wait_ready().await;
    post_update(&service, "2025-07-14T13:49:43.123456+00:00").await;
    let sdk = Arc::new(Sdk::default());
    let task = run(service.addr, sdk.clone());
    let within = Duration::from_secs(20);
    eventually(within, &format!("{name}: first refetch"), || {
        sdk.refetches() == 1
    })
    .await;
    assert_eq!(*sdk.last.lock().expect("lock"), 1752500983.123456);
    // Three more streams ended by age, the SDK reconnecting after each (and each new one
    // opening with the equal timestamp).
    streams_end_by_age(&service, &sdk, 3).await;
    assert_eq!(
        sdk.refetches(),
        1,
        "{name} refetched for an equal timestamp"
    );
    post_update(&service, "2025-07-14T13:49:44Z").await;
    eventually(
        within,
        &format!("{name}: refetch for the newer update"),
        || sdk.refetches() == 2,
    )
    .await;
    streams_end_by_age(&service, &sdk, 2).await;
    assert_eq!(
        sdk.refetches(),
        2,
        "{name} refetched for an equal timestamp"
    );
    assert_eq!(*sdk.last.lock().expect("lock"), 1752500984.0);
    assert_eq!(
        sdk.unparsed.load(Ordering::SeqCst),
        0,
        "{name} could not parse an event"
    );
    task.abort();
}

/// Waits until `more` streams have ended by age and the SDK has connected again after
/// the last of them.
async fn streams_end_by_age(service: &Service, sdk: &Sdk, more: u32) {
    let ended = |text: &str| metric(text, "flagsmith_sse_streams_ended_by_age_total");
    let before = ended(&get(service.addr, "/metricsz").await.body);
    eventually_async(
        Duration::from_secs(20),
        "streams ended by age",
        async || ended(&get(service.addr, "/metricsz").await.body) >= before + f64::from(more),
    )
    .await;
    let connects = sdk.connects();
    eventually(Duration::from_secs(20), "a reconnect", || {
        sdk.connects() > connects
    })
    .await;
}

#[tokio::test]
async fn ruby_sees_updates_when_streams_end() {
    refetches_only_for_newer("ruby", |addr, sdk| tokio::spawn(ruby(addr, sdk))).await;
}

#[tokio::test]
async fn go_reads_data_lines_and_reconnects() {
    refetches_only_for_newer("go", |addr, sdk| tokio::spawn(go(addr, sdk))).await;
}

#[tokio::test]
async fn ios_parses_each_read_on_its_own() {
    refetches_only_for_newer("ios", |addr, sdk| tokio::spawn(ios(addr, sdk))).await;
}

#[tokio::test]
async fn android_okhttp_event_source_reconnects_on_close() {
    refetches_only_for_newer("android", |addr, sdk| tokio::spawn(android(addr, sdk))).await;
}

#[tokio::test]
async fn flutter_refetches_only_for_newer() {
    refetches_only_for_newer("flutter", |addr, sdk| {
        tokio::spawn(flutter(addr, sdk, Duration::from_millis(400)))
    })
    .await;
}

/// Flutter opens a stream every interval and never closes one: with stream age, the
/// streams it holds open stay bounded (about age / interval), instead of growing for ever.
#[tokio::test]
async fn flutter_connections_stay_bounded() {
    let service = service("1");
    service.wait_ready().await;
    let sdk = Arc::new(Sdk::default());
    let interval = Duration::from_millis(100);
    let task = tokio::spawn(flutter(service.addr, sdk.clone(), interval));
    // 40 streams opened over 4 s; each lives 0.9-1.1 s, so at most ~12 are open at once.
    eventually(Duration::from_secs(30), "40 Flutter streams", || {
        sdk.connects() >= 40
    })
    .await;
    let mut most = 0.0f64;
    for _ in 0..10 {
        let text = get(service.addr, "/metricsz").await.body;
        most = most.max(metric(&text, "flagsmith_sse_subscribers"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    task.abort();
    assert!(
        most <= 20.0,
        "{most} streams open after {} opened",
        sdk.connects()
    );
}

/// flagsmith-python-client `flagsmith/streaming_manager.py` (`EventStreamManager.run`):
/// `requests.get(stream_url, stream=True, headers={"Accept": "application/json,
/// text/event-stream"})` in a `while not stopped` loop with no pause: whatever the answer
/// (an error status included), it connects again at once. Against a refused stream (a
/// malformed key, the subscriber cap) such a client must make at most a few requests a
/// second.
async fn python_requests(addr: SocketAddr, path: String, requests: Arc<AtomicUsize>) {
    loop {
        let Ok(response) = open(
            addr,
            &path,
            &[
                ("user-agent", "python-requests/2.32.3"),
                ("accept", "application/json, text/event-stream"),
                ("accept-encoding", "gzip, deflate"),
                ("connection", "keep-alive"),
            ],
        )
        .await
        else {
            // No answer at all (connect failed): the loop spins in the SDK as well; here
            // a short pause keeps the test from measuring itself.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = response.into_body().collect().await;
        requests.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_that_reconnect_at_once_do_not_spin_on_refusals() {
    let service = Service::start_with(
        "nats://unused",
        &[("BROKER", "memory"), ("MAX_SUBSCRIBERS", "1")],
    );
    service.wait_ready().await;
    // The one allowed subscriber, so that every other stream is refused at the cap.
    let _held = service.subscribe("held").await;
    let requests = Arc::new(AtomicUsize::new(0));
    let clients = 1_000;
    let mut tasks = Vec::new();
    for n in 0..clients {
        // Half with a malformed key (400), half at the cap (503).
        let path = if n % 2 == 0 {
            "/sse/environments/not.a.key/stream".to_owned()
        } else {
            stream_path()
        };
        tasks.push(tokio::spawn(python_requests(
            service.addr,
            path,
            requests.clone(),
        )));
    }
    // Measured after the first connections' surge, in the steady loop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_before = cpu_seconds(service.pid());
    let count_before = requests.load(Ordering::SeqCst);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let made = requests.load(Ordering::SeqCst) - count_before;
    let cpu = cpu_seconds(service.pid()) - cpu_before;
    for task in &tasks {
        task.abort();
    }
    let per_client_per_second = made as f64 / clients as f64 / elapsed;
    println!(
        "{clients} reconnect-at-once clients: {made} requests in {elapsed:.1} s \
         ({per_client_per_second:.2} per client per second); service CPU {:.0} % of a core",
        cpu / elapsed * 100.0
    );
    assert!(made > 0, "no request was answered");
    // The delay is 0.5-1.5 s: about one request a second, never more than two.
    assert!(
        per_client_per_second <= 2.0,
        "{per_client_per_second} requests per client per second"
    );
}

/// The delay is bounded: past `MAX_DELAYED_REFUSALS` (1,024) waiting at once, refusals are
/// answered at once, so parallel requests cannot pin more descriptors than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_held_back_at_once_are_bounded() {
    let service = Service::start_with(
        "nats://unused",
        &[("BROKER", "memory"), ("REFUSAL_DELAY", "10s")],
    );
    service.wait_ready().await;
    let parallel = 1_500;
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        tasks.push(tokio::spawn(open(
            service.addr,
            "/sse/environments/not.a.key/stream",
            &[],
        )));
    }
    // With a 5-15 s delay nobody held back is answered within this test's wait: the ones
    // answered are those past the bound.
    let counts = |text: &str| {
        (
            metric(
                text,
                "flagsmith_sse_stream_refusals_total{delayed=\"true\"}",
            ),
            metric(
                text,
                "flagsmith_sse_stream_refusals_total{delayed=\"false\"}",
            ),
        )
    };
    eventually_async(
        Duration::from_secs(30),
        "every refusal counted",
        async || {
            let (delayed, at_once) = counts(&get(service.addr, "/metricsz").await.body);
            delayed + at_once >= parallel as f64
        },
    )
    .await;
    let text = get(service.addr, "/metricsz").await.body;
    let (delayed, at_once) = counts(&text);
    assert_eq!(delayed, 1024.0, "{text}");
    assert_eq!(at_once, (parallel - 1024) as f64, "{text}");
    for task in tasks {
        task.abort();
    }
}
