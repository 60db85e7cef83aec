//! Streams end cleanly at `MAX_STREAM_AGE`, spread over -10 % .. +10 %, on both the
//! HTTP/1.1 fast path and hyper's path (HTTP/2 over h2c, and an HTTP/1.1 request the fast
//! path leaves to hyper): a spread to one side only (+0 .. 10 %, or -10 .. 0 %) fails.
//! A clean end is END_STREAM (HTTP/2) or the chunked terminator (HTTP/1.1) after a whole
//! event; the harness tells it from a reset and from a cut, which the last test shows.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const AGE: f64 = 3.0;
const STREAMS: usize = 40;

#[derive(Clone, Copy, Debug)]
enum Path {
    /// A plain `GET …/stream`: served straight on the socket by `h1_stream`.
    FastHttp1,
    /// The same over HTTP/1.1 with `Content-Length: 0`, which the fast path leaves to hyper.
    HyperHttp1,
    /// HTTP/2 with prior knowledge: hyper.
    HyperH2c,
}

/// Opens one stream on `path` and waits for its clean end: how long it lived from its
/// response, whether the fast path served it (its head has no `date`, which hyper adds),
/// the HTTP version and the blocks it got.
async fn live(path: Path, addr: SocketAddr) -> (f64, bool, http::Version, Vec<String>) {
    let within = Duration::from_secs(10);
    match path {
        Path::HyperH2c => {
            let mut sse = Sse::connect_h2c(addr, "aged").await;
            let opened = Instant::now();
            assert_eq!(sse.status, 200);
            let blocks = sse.expect_clean_end(within).await;
            (opened.elapsed().as_secs_f64(), false, sse.version, blocks)
        }
        Path::FastHttp1 | Path::HyperHttp1 => {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(async move {
                let _ = conn.await;
            });
            // Origin-form, as SDKs send it (an absolute URI is not a path the fast path
            // takes).
            let mut request = http::Request::get("/sse/environments/aged/stream")
                .header("host", addr.to_string())
                .header("accept", "text/event-stream");
            // A request with a body is not the fast path's (an empty one is: Flutter sends
            // `content-length: 0`).
            let body = if matches!(path, Path::HyperHttp1) {
                request = request.header("content-length", "1");
                Full::new(Bytes::from_static(b"x"))
            } else {
                Full::<Bytes>::default()
            };
            let request = request.body(body).expect("request");
            let response = sender.send_request(request).await.expect("response");
            let opened = Instant::now();
            assert_eq!(response.status(), 200);
            // hyper adds `date` to every response; the fast path writes its own head
            // without one (and keeps the connection after a clean end, so no `close`).
            let fast = !response.headers().contains_key("date");
            let version = response.version();
            let mut body = response.into_body();
            let mut text = String::new();
            loop {
                match tokio::time::timeout(within, body.frame()).await {
                    Ok(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            text.push_str(&String::from_utf8_lossy(&data));
                        }
                    }
                    Ok(Some(Err(e))) => panic!("{path:?}: the stream ended uncleanly: {e}"),
                    Ok(None) => break,
                    Err(_) => panic!("{path:?}: the stream did not end within {within:?}"),
                }
            }
            let lived = opened.elapsed().as_secs_f64();
            assert!(
                text.ends_with("\n\n"),
                "{path:?}: ended mid-event: {text:?}"
            );
            let blocks = text.split_inclusive("\n\n").map(str::to_owned).collect();
            (lived, fast, version, blocks)
        }
    }
}

/// Opens `STREAMS` streams at once on `path` and returns how long each lived, from its
/// response to its clean end, after checking that each opened with the stored event.
async fn lifetimes(path: Path) -> Vec<f64> {
    let service = Service::start_with(
        "nats://unused",
        &[("BROKER", "memory"), ("MAX_STREAM_AGE", &AGE.to_string())],
    );
    service.wait_ready().await;
    assert_eq!(service.publish("aged", "1752500983.5").await.status, 200);
    let mut tasks = Vec::new();
    for _ in 0..STREAMS {
        let addr = service.addr;
        tasks.push(tokio::spawn(async move {
            let (lived, fast, version, blocks) = live(path, addr).await;
            assert_eq!(
                blocks.first().map(String::as_str),
                Some("event: environment_updated\ndata: {\"updated_at\": 1752500983.5}\n\n"),
                "{path:?}"
            );
            (lived, fast, version)
        }));
    }
    let mut lived = Vec::new();
    for task in tasks {
        let (seconds, fast, version) = task.await.expect("stream task");
        // The test really exercises the path it names.
        match path {
            Path::FastHttp1 => assert!(fast, "{path:?} was not served by the fast path"),
            Path::HyperHttp1 => assert!(!fast, "{path:?} was served by the fast path"),
            Path::HyperH2c => assert_eq!(version, http::Version::HTTP_2),
        }
        lived.push(seconds);
    }
    let ended = metric(
        &get(service.addr, "/metricsz").await.body,
        "flagsmith_sse_streams_ended_by_age_total",
    );
    assert_eq!(ended, STREAMS as f64);
    lived.sort_by(f64::total_cmp);
    lived
}

/// Every stream lives within age ± 10 % (measured from the client, so a little less, and
/// on a busy machine a little more), some below age - 5 % and some above age + 5 %: with
/// 40 streams the spread reaches within about 1 % of each bound.
fn check_spread(path: Path, lived: &[f64]) {
    let (min, max) = (lived[0], lived[lived.len() - 1]);
    println!("{path:?}: {STREAMS} streams of age {AGE} s lived {min:.3} .. {max:.3} s");
    assert!(
        min >= AGE * 0.9 - 0.1,
        "{path:?}: a stream ended early: {lived:?}"
    );
    assert!(
        max <= AGE * 1.1 + 0.5,
        "{path:?}: a stream ended late: {lived:?}"
    );
    assert!(
        min < AGE * 0.95,
        "{path:?}: nothing below age - 5 %: {lived:?}"
    );
    assert!(
        max > AGE * 1.05,
        "{path:?}: nothing above age + 5 %: {lived:?}"
    );
}

#[tokio::test]
async fn stream_ages_spread_both_ways_on_the_fast_path() {
    let lived = lifetimes(Path::FastHttp1).await;
    check_spread(Path::FastHttp1, &lived);
}

#[tokio::test]
async fn stream_ages_spread_both_ways_on_hyper_over_http1() {
    let lived = lifetimes(Path::HyperHttp1).await;
    check_spread(Path::HyperHttp1, &lived);
}

#[tokio::test]
async fn stream_ages_spread_both_ways_on_hyper_over_h2c() {
    let lived = lifetimes(Path::HyperH2c).await;
    check_spread(Path::HyperH2c, &lived);
}

const EVENT: &str = "event: environment_updated\ndata: {\"updated_at\": 1.5}\n\n";

/// An h2c server whose one response body sends `EVENT`, then `tail` (if any), then ends
/// cleanly (`reset` false) or with an error, which hyper sends as RST_STREAM.
async fn h2_server(tail: &'static str, reset: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| async move {
                    let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
                        vec![Ok(Frame::data(Bytes::from_static(EVENT.as_bytes())))];
                    if !tail.is_empty() {
                        frames.push(Ok(Frame::data(Bytes::from_static(tail.as_bytes()))));
                    }
                    if reset {
                        frames.push(Err(std::io::Error::other("reset")));
                    }
                    // Each frame a little after the one before, so that the response head
                    // reaches the client before a reset does.
                    let body = StreamBody::new(futures_util::StreamExt::then(
                        futures_util::stream::iter(frames),
                        |frame| async move {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            frame
                        },
                    ));
                    Ok::<_, Infallible>(
                        http::Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(body)
                            .expect("response"),
                    )
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    addr
}

/// A raw HTTP/1.1 server: a chunked `EVENT`, then the terminator or not, then close.
async fn h1_server(terminated: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let mut out = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                 transfer-encoding: chunked\r\n\r\n{:x}\r\n{EVENT}\r\n",
                EVENT.len()
            );
            if terminated {
                out.push_str("0\r\n\r\n");
            }
            let _ = socket.write_all(out.as_bytes()).await;
            let _ = socket.shutdown().await;
        }
    });
    addr
}

async fn end_of(mut sse: Sse) -> Next {
    assert_eq!(
        sse.next(Duration::from_secs(5)).await,
        Next::Block(EVENT.to_owned())
    );
    sse.next(Duration::from_secs(5)).await
}

/// The harness's clean end is only END_STREAM or the chunked terminator after a whole
/// event: a RST_STREAM, an END_STREAM mid-event and a body cut before its terminator are
/// not.
#[tokio::test]
async fn the_harness_tells_a_clean_end_from_a_reset_or_a_cut() {
    let clean = Sse::connect_h2c(h2_server("", false).await, "x").await;
    assert_eq!(end_of(clean).await, Next::Ended);
    let reset = Sse::connect_h2c(h2_server("", true).await, "x").await;
    assert!(matches!(end_of(reset).await, Next::Reset(_)));
    let mid_event = Sse::connect_h2c(h2_server("event: environment_", false).await, "x").await;
    assert!(matches!(end_of(mid_event).await, Next::Reset(_)));
    let terminated = Sse::connect_h1(h1_server(true).await, "x").await;
    assert_eq!(end_of(terminated).await, Next::Ended);
    let cut = Sse::connect_h1(h1_server(false).await, "x").await;
    assert!(matches!(end_of(cut).await, Next::Reset(_)));
}
