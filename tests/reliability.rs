//! Faults, draining, limits and hostile input, against real processes.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The phases of the node-loss test. Each phase writes to environments of its own and no
/// other phase writes to them again, so an update acknowledged during a fault is the one
/// its environment must end at: a later write cannot cover its loss.
const PHASES: [&str; 4] = ["before", "node2_down", "node2_back", "node0_down"];

fn phase_env(phase: usize, env: usize) -> String {
    format!("{}_{env}", PHASES[phase])
}

/// Every update that got a 2xx is what a fresh instance reads after NATS nodes died (and
/// came back) (or a newer one of the same phase); what was not stored got a 503. Writes to
/// an environment stop when its phase ends, and only an instance started after the last
/// fault is asked: the instances that wrote an update hold it in memory anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_loss_and_restart_lose_no_acknowledged_update() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    let mut cluster = NatsCluster::start();
    let replicas = [("NATS_STREAM_REPLICAS", "3"), ("KEEPALIVE_INTERVAL", "1s")];
    // A talks to node 0 only (so restarting node 0 cuts it off); B knows every node.
    let a = Service::start_with(&cluster.nodes[0].url(), &replicas);
    let b = Service::start_with(&cluster.urls(), &replicas);
    a.wait_readyz(200, Duration::from_secs(60)).await;
    b.wait_readyz(200, Duration::from_secs(60)).await;

    // (phase, env, value) of every acknowledged write.
    let acked: Arc<Mutex<Vec<(usize, usize, f64)>>> = Arc::default();
    let statuses: Arc<Mutex<Vec<u16>>> = Arc::default();
    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let poster = {
        let (acked, statuses, phase, stop) =
            (acked.clone(), statuses.clone(), phase.clone(), stop.clone());
        let addrs = [a.addr, b.addr];
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                n += 1;
                let (now, env) = (phase.load(Relaxed), (n % 3) as usize);
                let value = 1000.0 + n as f64 + 0.5;
                let body = format!("{{\"updated_at\": {value}}}");
                let path = format!("/sse/environments/{}/queue-change", phase_env(now, env));
                let request = hyper::Request::post(path)
                    .header("authorization", format!("Token {TOKEN}"))
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .expect("request");
                let status = match tokio::time::timeout(
                    Duration::from_secs(10),
                    send_h1(addrs[(n % 2) as usize], request),
                )
                .await
                {
                    Ok(Ok(resp)) => resp.status,
                    _ => 0,
                };
                if (200..300).contains(&status) {
                    acked.lock().expect("lock").push((now, env, value));
                }
                statuses.lock().expect("lock").push(status);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Each phase lasts 3 s, and until every one of its environments has an acknowledged
    // write (a leader election can take NATS a few seconds: 503 meanwhile).
    let run_phase = async |what: &str, p: usize| {
        tokio::time::sleep(Duration::from_secs(3)).await;
        eventually(Duration::from_secs(30), what, || {
            let acked = acked.lock().expect("lock");
            (0..3).all(|env| acked.iter().any(|(ph, e, _)| *ph == p && *e == env))
        })
        .await;
        let s = statuses.lock().expect("lock");
        eprintln!(
            "{what}: {} posts, {} stored",
            s.len(),
            s.iter().filter(|c| **c == 200).count()
        );
    };
    run_phase("before faults", 0).await;
    phase.store(1, Relaxed);
    cluster.nodes[2].stop();
    run_phase("node 2 down", 1).await;
    phase.store(2, Relaxed);
    cluster.nodes[2].restart();
    run_phase("node 2 back", 2).await;
    // A is cut off from its only configured server: its writes answer 503 until it has
    // moved to a server it learnt of from the cluster.
    phase.store(3, Relaxed);
    cluster.nodes[0].stop();
    run_phase("node 0 (A's) down", 3).await;
    // Nothing is written after this; node 0 comes back with its store.
    stop.store(true, Relaxed);
    poster.await.expect("poster");
    cluster.nodes[0].restart();

    let statuses = statuses.lock().expect("lock").clone();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "only 200 or 503 expected: {statuses:?}"
    );
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.len() > 100,
        "too few updates stored: {} of {}",
        acked.len(),
        statuses.len()
    );
    let fresh = Service::start_with(&cluster.urls(), &replicas);
    fresh.wait_readyz(200, Duration::from_secs(60)).await;
    for p in 0..PHASES.len() {
        for env in 0..3 {
            let newest = acked
                .iter()
                .filter(|(ph, e, _)| *ph == p && *e == env)
                .map(|(_, _, v)| *v)
                .fold(f64::MIN, f64::max);
            let name = phase_env(p, env);
            let mut sse = fresh.subscribe(&name).await;
            let mut got = sse.next_update(5 * SECOND).await;
            // Debian's nats-server 2.9.10 has been seen to let a consumer created right
            // after node 0 came back start from an older message of the subject, and
            // deliver the newest a few seconds later: late, not lost. It is logged.
            if got.is_some_and(|g| g < newest) {
                eprintln!("{name}: on connect {got:?}, newest acknowledged {newest}; waiting");
                while got.is_some_and(|g| g < newest) {
                    got = sse.next_update(20 * SECOND).await;
                }
            }
            // A write answered 503 may still have been stored: the same or a newer one.
            assert!(
                got.is_some_and(|g| g >= newest),
                "{name}: a fresh instance reads {got:?}, newest acknowledged {newest}"
            );
        }
    }
}

#[tokio::test]
async fn with_nats_down_streams_stay_open_with_keepalives_and_heal() {
    let mut nats = Nats::start();
    let svc = Service::start_with(&nats.url(), &[("KEEPALIVE_INTERVAL", "300ms")]);
    svc.wait_ready().await;
    let tracker = Tracker::follow(svc.subscribe("env").await);
    nats.stop();
    svc.wait_readyz(503, Duration::from_secs(5)).await;
    let resp = svc.publish("env", "5.5").await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.headers["retry-after"], "1");
    let before = tracker.blocks.lock().expect("lock").len();
    eventually(
        Duration::from_secs(10),
        "three keep-alives while NATS is down",
        || tracker.blocks.lock().expect("lock").len() >= before + 3,
    )
    .await;
    assert!(!tracker.ended());
    nats.restart();
    svc.wait_ready().await;
    svc.publish_until_ok("env", "6.5").await;
    eventually(Duration::from_secs(10), "update after recovery", || {
        tracker.last() == Some(6.5)
    })
    .await;
}

#[tokio::test]
async fn clients_of_a_killed_instance_get_the_latest_from_another_at_once() {
    let nats = Nats::start();
    let mut a = Service::start(&nats.url());
    let b = Service::start(&nats.url());
    a.wait_ready().await;
    b.wait_ready().await;
    assert_eq!(a.publish("env", "42.5").await.status, 200);
    let mut on_a = a.subscribe("env").await;
    assert_eq!(on_a.next_update(5 * SECOND).await, Some(42.5));
    kill(a.pid(), "KILL");
    assert_eq!(a.wait_exit(Duration::from_secs(5)), Some(false));
    // The stream ends with the instance.
    on_a.expect_end(5 * SECOND).await;
    let mut on_b = b.subscribe("env").await;
    assert_eq!(on_b.next_update(2 * SECOND).await, Some(42.5));
}

#[tokio::test]
async fn sigterm_turns_unready_finishes_requests_and_spreads_stream_ends() {
    let nats = Nats::start();
    let mut svc = Service::start_with(
        &nats.url(),
        &[("DRAIN_WINDOW", "2s"), ("SHUTDOWN_TIMEOUT", "6s")],
    );
    svc.wait_ready().await;
    let mut trackers = Vec::new();
    for _ in 0..40 {
        trackers.push(Tracker::follow(svc.subscribe("env").await));
    }
    // A queue-change whose body is still on its way when SIGTERM arrives.
    let mut slow_post = TcpStream::connect(svc.addr).await.expect("connect");
    let body = "{\"updated_at\": 77.5}";
    slow_post
        .write_all(
            format!(
                "POST /sse/environments/env/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .expect("head");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    kill(svc.pid(), "TERM");
    svc.wait_readyz(503, Duration::from_secs(1)).await;
    slow_post.write_all(body.as_bytes()).await.expect("body");
    let mut response = String::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        slow_post.read_to_string(&mut response),
    )
    .await;
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "in-flight queue-change: {response:?}"
    );

    // When each stream ended, as seen by polling every 20 ms.
    let mut ended_at = Vec::new();
    while ended_at.len() < trackers.len() {
        let done = trackers.iter().filter(|t| t.ended()).count();
        ended_at.resize(done.max(ended_at.len()), started.elapsed());
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "streams did not all end: {done}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = ended_at[0];
    let last = ended_at[ended_at.len() - 1];
    assert!(
        last - first >= Duration::from_millis(800),
        "ends not spread: {first:?}..{last:?}"
    );
    assert!(
        last <= Duration::from_millis(3500),
        "ends past the drain window: {last:?}"
    );
    assert_eq!(
        svc.wait_exit(Duration::from_secs(6)),
        Some(true),
        "{}",
        svc.log()
    );
}

#[tokio::test]
async fn shutdown_meets_its_deadline_with_a_client_that_never_reads() {
    let nats = Nats::start();
    let mut svc = Service::start_with(
        &nats.url(),
        &[("DRAIN_WINDOW", "500ms"), ("SHUTDOWN_TIMEOUT", "2s")],
    );
    svc.wait_ready().await;
    let _stuck = stuck_subscriber(svc.addr, "env").await;
    // Fill its socket so that its stream cannot even end cleanly: each event (~62 bytes)
    // is written while there is room, so 1,500 of them (~93 KB) overflow the server's
    // 32 KiB send buffer (64 KiB as Linux doubles it) and the client's 1 KiB receive buffer.
    for n in 0..1_500 {
        assert_eq!(svc.publish("env", &format!("{n}.5")).await.status, 200);
    }
    let started = std::time::Instant::now();
    kill(svc.pid(), "TERM");
    assert_eq!(
        svc.wait_exit(Duration::from_secs(5)),
        Some(true),
        "{}",
        svc.log()
    );
    assert!(
        started.elapsed() < Duration::from_millis(3500),
        "{:?}",
        started.elapsed()
    );
    // The stuck stream was still open at the deadline: the path this test names ran.
    assert!(
        svc.log()
            .contains("connections still open at the shutdown timeout"),
        "{}",
        svc.log()
    );
}

/// A subscriber with a tiny receive buffer that never reads a byte.
async fn stuck_subscriber(addr: std::net::SocketAddr, env: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(1024).expect("rcvbuf");
    let mut tcp = socket.connect(addr).await.expect("connect");
    tcp.write_all(
        format!("GET /sse/environments/{env}/stream HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
    )
    .await
    .expect("request");
    tcp
}

#[tokio::test]
async fn a_subscriber_that_never_reads_is_dropped_and_costs_the_others_nothing() {
    let nats = Nats::start();
    let svc = Service::start_with(&nats.url(), &[("STREAM_WRITE_TIMEOUT", "2s")]);
    svc.wait_ready().await;
    let reader = Tracker::follow(svc.subscribe("env").await);
    let _stuck = stuck_subscriber(svc.addr, "env").await;
    svc.wait_metric("flagsmith_sse_subscribers", 2.0).await;
    let rss_before = rss_kib(svc.pid());
    let gauge = |body: &str| -> String {
        body.lines()
            .find(|l| l.starts_with("flagsmith_sse_subscribers "))
            .expect("gauge")
            .to_owned()
    };
    assert_eq!(
        gauge(&get(svc.addr, "/metricsz").await.body),
        "flagsmith_sse_subscribers 2"
    );
    // 10,000 updates over 8 concurrent posters.
    let posts = (0..8).map(|w| {
        let addr = svc.addr;
        async move {
            for n in 0..1250 {
                let value = format!("{}.5", 1 + n * 8 + w);
                let resp = post(
                    addr,
                    "/sse/environments/env/queue-change",
                    Some(TOKEN),
                    &format!("{{\"updated_at\": {value}}}"),
                )
                .await;
                assert_eq!(resp.status, 200, "{}", resp.body);
            }
        }
    });
    futures_util::future::join_all(posts).await;
    eventually(
        Duration::from_secs(10),
        "the reader gets the last update",
        || reader.last() == Some(10000.5),
    )
    .await;
    let rss_after = rss_kib(svc.pid());
    assert!(
        rss_after < rss_before + 20 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    // The stuck one is dropped once its socket stayed full past the write timeout.
    eventually_async(
        Duration::from_secs(10),
        "the stuck subscriber to be dropped",
        async || gauge(&get(svc.addr, "/metricsz").await.body) == "flagsmith_sse_subscribers 1",
    )
    .await;
    let body = get(svc.addr, "/metricsz").await.body;
    assert!(
        metric(&body, "flagsmith_sse_http_errors_total{message=\"data\"}") >= 1.0,
        "the dropped subscriber's failed write is not counted:\n{body}"
    );
}

#[tokio::test]
async fn the_subscriber_cap_refuses_with_503_and_serves_the_rest() {
    let nats = Nats::start();
    let svc = Service::start_with(&nats.url(), &[("MAX_SUBSCRIBERS", "3")]);
    svc.wait_ready().await;
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| svc.subscribe("env"))).await;
    assert!(held.iter().all(|s| s.status == 200));
    let refused = svc.subscribe("env").await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.headers["retry-after"], "1");
    let h2_refused = Sse::connect_h2c(svc.addr, "env").await;
    assert_eq!(h2_refused.status, 503);
    assert_eq!(svc.publish("env", "3.5").await.status, 200);
    let mut trackers: Vec<_> = held.into_iter().map(Tracker::follow).collect();
    for t in &trackers {
        eventually(
            Duration::from_secs(5),
            "held subscribers are served",
            || t.last() == Some(3.5),
        )
        .await;
    }
    let metrics = get(svc.addr, "/metricsz").await.body;
    assert!(
        metrics.contains("flagsmith_sse_subscribers_rejected_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flagsmith_sse_subscribers_max 3"),
        "{metrics}"
    );
    trackers.pop();
    eventually_async(
        Duration::from_secs(5),
        "a place after one left",
        async || svc.subscribe("env").await.status == 200,
    )
    .await;
}

#[tokio::test]
async fn the_open_file_limit_is_raised_and_running_out_neither_kills_nor_spins() {
    let nats = Nats::start();
    // A hard limit of 64 files: the service raises its soft limit to it, then runs out.
    let svc = Service::start_wrapped(&nats.url(), "ulimit -S -n 32; ulimit -H -n 64;", &[]);
    svc.wait_ready().await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", svc.pid())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files");
    let numbers: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.parse::<u64>().is_ok())
        .collect();
    assert_eq!(numbers, ["64", "64"], "{line}");
    assert!(svc.log().contains("open-file limit"), "{}", svc.log());
    let mut held = Vec::new();
    for _ in 0..100 {
        if let Ok(tcp) = TcpStream::connect(svc.addr).await {
            held.push(tcp);
        }
    }
    let cpu_before = cpu_seconds(svc.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_seconds(svc.pid()) - cpu_before;
    assert!(spent < 0.5, "accept loop spun: {spent} s of CPU in 2 s");
    assert!(
        svc.log().contains("out of file descriptors"),
        "{}",
        svc.log()
    );
    drop(held);
    eventually_async(
        Duration::from_secs(10),
        "recovery from EMFILE",
        async || {
            try_get(svc.addr, "/livez")
                .await
                .is_ok_and(|r| r.status == 200)
        },
    )
    .await;
}

#[tokio::test]
async fn slow_headers_and_slow_bodies_time_out() {
    let nats = Nats::start();
    let svc = Service::start_with(
        &nats.url(),
        &[("HEADER_READ_TIMEOUT", "1s"), ("BODY_READ_TIMEOUT", "1s")],
    );
    svc.wait_ready().await;
    // Slowloris: a head that never finishes is cut off.
    let mut tcp = TcpStream::connect(svc.addr).await.expect("connect");
    tcp.write_all(b"GET /livez HTTP/1.1\r\nHost: t\r\n")
        .await
        .expect("partial head");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(4), tcp.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "connection still open after the header timeout"
    );
    // A body that never finishes gets 408.
    let mut tcp = TcpStream::connect(svc.addr).await.expect("connect");
    tcp.write_all(
        format!(
            "POST /sse/environments/env/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: 100\r\n\r\n{{\"upd"
        )
        .as_bytes(),
    )
    .await
    .expect("partial body");
    let mut response = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(4), tcp.read_to_string(&mut response)).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response:?}");
}

#[tokio::test]
async fn hostile_requests_get_4xx_and_the_service_keeps_serving() {
    let nats = Nats::start();
    let svc = Service::start(&nats.url());
    svc.wait_ready().await;
    let tracker = Tracker::follow(svc.subscribe("env").await);
    let huge_header = format!(
        "GET /livez HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    // Each input gets a complete answer with exactly this status (not merely a closed
    // connection): hyper's own 431/400 for what it cannot parse, ours for the rest.
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (huge_header.into_bytes(), "431"),
        (b"GET /livez HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n".to_vec(), "400"),
        // Not UTF-8 in the request target: hyper refuses the URI.
        (b"GET /sse/environments/\xff\xfe/stream HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), "400"),
        (b"GET /sse/environments/%ff%fe/stream HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), "400"),
        (
            format!("POST /sse/environments/env/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").into_bytes(),
            "400",
        ),
        (b"\x00\x01\x02garbage\r\n\r\n".to_vec(), "400"),
        // An HTTP version that does not exist.
        (b"GET / HTTP/9.9\r\n\r\n".to_vec(), "400"),
    ];
    for (request, want) in cases {
        let mut tcp = TcpStream::connect(svc.addr).await.expect("connect");
        let _ = tcp.write_all(&request).await;
        let mut response = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut response)).await;
        let text = String::from_utf8_lossy(&response);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {want} ")),
            "{:?} got {text:?}",
            String::from_utf8_lossy(&request[..request.len().min(60)])
        );
    }
    // HTTP/2 garbage after the preface: the connection dies, nothing else does.
    let mut tcp = TcpStream::connect(svc.addr).await.expect("connect");
    let _ = tcp
        .write_all(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\xff\xff\xff\xff\xff\xffgarbage-frames",
        )
        .await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    assert_eq!(get(svc.addr, "/livez").await.status, 200);
    assert_eq!(svc.publish("env", "9.5").await.status, 200);
    eventually(
        Duration::from_secs(5),
        "the bystander still gets updates",
        || tracker.last() == Some(9.5),
    )
    .await;
}

#[tokio::test]
async fn thousands_of_environments_on_one_http2_connection() {
    let nats = Nats::start();
    let svc = Service::start(&nats.url());
    svc.wait_ready().await;
    let bystander = Tracker::follow(svc.subscribe("bystander").await);
    let tcp = TcpStream::connect(svc.addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2");
    tokio::spawn(conn);
    let requests = (0..3000).map(|i| {
        let mut sender = sender.clone();
        async move {
            let request = hyper::Request::get(format!("http://t/sse/environments/bulk_{i}/stream"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request");
            sender.send_request(request).await.map(|r| (r.status(), r))
        }
    });
    let responses = futures_util::future::join_all(requests).await;
    let ok = responses
        .iter()
        .filter(|r| matches!(r, Ok((s, _)) if *s == 200))
        .count();
    assert_eq!(ok, 3000);
    let metrics = get(svc.addr, "/metricsz").await.body;
    assert!(
        metrics.contains("flagsmith_sse_environments_subscribed 3001"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flagsmith_sse_environments 3001"),
        "{metrics}"
    );
    assert_eq!(svc.publish("bystander", "1.5").await.status, 200);
    eventually(Duration::from_secs(5), "bystander served", || {
        bystander.last() == Some(1.5)
    })
    .await;
    drop(responses);
}

#[tokio::test]
async fn http2_streams_per_connection_are_capped() {
    let nats = Nats::start();
    let svc = Service::start_with(&nats.url(), &[("HTTP2_MAX_CONCURRENT_STREAMS", "5")]);
    svc.wait_ready().await;
    let tcp = TcpStream::connect(svc.addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2");
    tokio::spawn(conn);
    let open = |i: usize| {
        let mut sender = sender.clone();
        async move {
            let request = hyper::Request::get(format!("http://t/sse/environments/cap_{i}/stream"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request");
            sender.send_request(request).await.expect("response")
        }
    };
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(
            tokio::time::timeout(Duration::from_secs(5), open(i))
                .await
                .expect("within the cap"),
        );
    }
    // The server's SETTINGS allow five: a sixth waits until one of them closes.
    let sixth = tokio::spawn(open(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !sixth.is_finished(),
        "a sixth stream was served past the cap of five"
    );
    held.pop();
    let response = tokio::time::timeout(Duration::from_secs(5), sixth)
        .await
        .expect("served once a stream closed")
        .expect("task");
    assert_eq!(response.status(), 200);
}

/// The automatic cap keeps HTTP/1.1 subscribers (a socket each) under the open-file limit,
/// and leaves HTTP/2 streams, which share their connection's socket, alone.
#[tokio::test]
async fn the_automatic_cap_counts_sockets_not_http2_streams() {
    // 400 open files: the cap is 400 less the 256 kept for everything else.
    let svc = Service::start_wrapped(
        "nats://127.0.0.1:1",
        "ulimit -n 400;",
        &[("BROKER", "memory"), ("REFUSAL_DELAY", "0")],
    );
    svc.wait_readyz(200, Duration::from_secs(5)).await;
    let metrics = get(svc.addr, "/metricsz").await.body;
    assert_eq!(
        metric(&metrics, "flagsmith_sse_subscribers_max"),
        144.0,
        "{metrics}"
    );
    let tcp = TcpStream::connect(svc.addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2");
    tokio::spawn(conn);
    let streams = futures_util::future::join_all((0..150).map(|i| {
        let mut sender = sender.clone();
        async move {
            let request = hyper::Request::get(format!("http://t/sse/environments/h2_{i}/stream"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request");
            sender.send_request(request).await.expect("response")
        }
    }))
    .await;
    assert!(
        streams.iter().all(|r| r.status() == 200),
        "HTTP/2 streams were capped"
    );
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..150 {
        let sse = svc.subscribe("h1").await;
        match sse.status {
            200 => held.push(sse),
            503 => refused += 1,
            other => panic!("status {other}"),
        }
    }
    assert_eq!((held.len(), refused), (144, 6));
}

/// Reconnect storms need a deep accept queue: the listener asks for 4,096 (the kernel caps
/// it at net.core.somaxconn).
#[tokio::test]
async fn the_listen_backlog_is_deep_enough_for_reconnect_storms() {
    let svc = Service::start_with("nats://127.0.0.1:1", &[("BROKER", "memory")]);
    svc.wait_readyz(200, Duration::from_secs(5)).await;
    let output = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", svc.addr.port())])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&output.stdout);
    // For a listening socket, ss shows the backlog in the Send-Q column.
    let backlog: u64 = text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no listener in {text:?}"));
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("somaxconn")
        .trim()
        .parse()
        .expect("number");
    assert_eq!(backlog, somaxconn.min(4096), "{text}");
}
