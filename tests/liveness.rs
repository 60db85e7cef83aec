//! Broker connections that die without a word: the peer's host crashes, a NAT or a load
//! balancer forgets the flow, a partition. Nothing closes the connection (no FIN, no RST);
//! it just goes silent. A TCP proxy between the service and a real broker silences every
//! open connection on command, while letting new ones through, and the SPEC's bound is
//! checked: within 10 s of the silence a POST is answered 200 again, and a subscriber that
//! was connected before (on another instance, fed only by the broker) gets an update
//! posted after it.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The SPEC's bound on noticing a silent connection and replacing it.
const WITHIN: Duration = Duration::from_secs(10);

/// Two instances behind the proxy: `writer` takes the posts, `follower` serves a
/// subscriber that only the broker's feed can reach. Silences the proxy and checks both
/// recover within the bound.
///
/// `direct` reaches the broker without the proxy: what it posts while the others' connections
/// are silent goes to the follower into the void, and must still reach it afterwards.
async fn recovers_from_silence(
    broker: &str,
    proxy: &Proxy,
    writer: &Service,
    follower: &Service,
    direct: &Service,
) {
    writer.wait_ready().await;
    follower.wait_ready().await;
    direct.wait_ready().await;
    let tracker = Tracker::follow(follower.subscribe("env").await);
    let during = Tracker::follow(follower.subscribe("during").await);
    assert_eq!(writer.publish("env", "1.5").await.status, 200);
    eventually(10 * SECOND, "the first update on the follower", || {
        tracker.last() == Some(1.5)
    })
    .await;

    proxy.silence();
    let silent_since = Instant::now();
    eventually(SECOND, "the connections held silent", || {
        proxy.silenced() > 0
    })
    .await;
    assert_eq!(direct.publish("during", "7.5").await.status, 200);
    // Posts fail (503) until the writer's connection is replaced; each one is newer.
    let mut attempt = 1;
    let posted = loop {
        attempt += 1;
        let value = format!("{attempt}.5");
        let resp = writer.publish("env", &value).await;
        if resp.status == 200 {
            break value.parse::<f64>().expect("number");
        }
        assert_eq!(resp.status, 503, "{}", resp.body);
        assert!(
            silent_since.elapsed() < WITHIN,
            "no POST answered 200 within {WITHIN:?} of the silence:\n{}",
            writer.log()
        );
    };
    let took_post = silent_since.elapsed();
    eventually(
        WITHIN.saturating_sub(silent_since.elapsed()),
        "the update posted after the silence, on the follower",
        || tracker.last().is_some_and(|last| last >= posted),
    )
    .await;
    eventually(
        WITHIN.saturating_sub(silent_since.elapsed()),
        "the update posted during the silence, on the follower",
        || during.last() == Some(7.5),
    )
    .await;
    assert!(!tracker.ended(), "the subscriber's stream was ended");
    eprintln!(
        "{broker}: POST 200 after {took_post:?}, both updates on the follower after {:?}",
        silent_since.elapsed()
    );
    // Each instance counted the dead connection and the new one.
    for svc in [writer, follower] {
        let metrics = get(svc.addr, "/metricsz").await.body;
        let series = |name: &str, labels: &str| {
            metric(&metrics, &format!("{name}{{broker=\"{broker}\"{labels}}}"))
        };
        assert!(
            series("flagsmith_sse_broker_reconnects_total", "") >= 1.0,
            "{metrics}"
        );
        assert!(
            series(
                "flagsmith_sse_broker_errors_total",
                ",operation=\"connect\""
            ) >= 1.0,
            "{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nats_connection_is_replaced_within_the_bound() {
    let nats = Nats::start();
    let proxy = Proxy::start(nats.port).await;
    let url = format!("nats://127.0.0.1:{}", proxy.port);
    let writer = Service::start(&url);
    let follower = Service::start(&url);
    let direct = Service::start(&nats.url());
    recovers_from_silence("nats", &proxy, &writer, &follower, &direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_connection_is_replaced_within_the_bound() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port).await;
    let url = format!("redis://127.0.0.1:{}", proxy.port);
    let writer = Service::start_redis(&url, &[]);
    let follower = Service::start_redis(&url, &[]);
    let direct = Service::start_redis(&redis.url(), &[]);
    recovers_from_silence("redis", &proxy, &writer, &follower, &direct).await;
}

/// A broker that refuses the service is visible at the default log level, with the cause,
/// and says so once per period rather than at every retry; the credentials stay out.
#[tokio::test]
async fn a_nats_that_refuses_our_credentials_is_logged_once_with_the_cause() {
    let nats = Nats::start_with(&["--auth", "right-SECRET"]);
    let url = format!("nats://wrong-SECRET@127.0.0.1:{}", nats.port);
    let svc = Service::start_with(&url, &[("LOG_LEVEL", "info")]);
    eventually(10 * SECOND, "a warning with the cause", || {
        let log = svc.log();
        log.contains("WARN")
            && log.contains("broker connection failed")
            && log.contains("authorization")
    })
    .await;
    tokio::time::sleep(3 * SECOND).await;
    let log = svc.log();
    assert_eq!(log.matches("broker connection failed").count(), 1, "{log}");
    assert!(!log.contains("SECRET"), "{log}");
    assert_eq!(get(svc.addr, "/readyz").await.status, 503);
}
