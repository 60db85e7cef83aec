//! The service end to end: real NATS, real processes, real sockets.

mod common;

use std::time::Duration;

use common::*;

const KEY: &str = "n9fbf9h3v4fFgH3U3ngWhb";

#[tokio::test]
async fn stream_has_the_spec_headers_and_sends_the_latest_on_connect() {
    let nats = Nats::start();
    let svc = Service::start(&nats.url());
    svc.wait_ready().await;

    let resp = svc
        .publish(KEY, "\"2025-07-14T13:49:43.123456+00:00\"")
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.json()["status"], "stored");

    let mut sse = svc.subscribe(KEY).await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    assert_eq!(sse.headers["cache-control"], "no-cache");
    assert_eq!(sse.headers["x-accel-buffering"], "no");
    assert_eq!(sse.headers["access-control-allow-origin"], "*");
    assert!(sse.headers.get("content-encoding").is_none());
    let block = sse.next_block(5 * SECOND).await.expect("latest on connect");
    assert_eq!(
        block,
        "event: environment_updated\ndata: {\"updated_at\": 1752500983.1234558}\n\n"
    );

    // A number is accepted as Unix seconds and always rendered with a decimal point.
    assert_eq!(svc.publish(KEY, "1752500990").await.status, 200);
    let block = sse.next_block(5 * SECOND).await.expect("update");
    assert_eq!(
        block,
        "event: environment_updated\ndata: {\"updated_at\": 1752500990.0}\n\n"
    );

    // An environment with no known update sends nothing on connect.
    let mut quiet = svc.subscribe("never_updated").await;
    assert_eq!(quiet.status, 200);
    assert_eq!(quiet.next(Duration::from_millis(500)).await, Next::Quiet);
}

#[tokio::test]
async fn retries_and_out_of_order_posts_never_move_an_environment_backwards() {
    let nats = Nats::start();
    let a = Service::start(&nats.url());
    let b = Service::start(&nats.url());
    a.wait_ready().await;
    b.wait_ready().await;
    let mut on_a = a.subscribe(KEY).await;
    let mut on_b = b.subscribe(KEY).await;

    let first = a.publish(KEY, "100.5").await;
    assert_eq!(first.json()["status"], "stored", "{}", first.body);
    // The same POST retried: acknowledged, not stored twice.
    let retry = a.publish(KEY, "100.5").await;
    assert_eq!(retry.status, 200);
    assert_ne!(retry.json()["status"], "stored", "{}", retry.body);
    let newer = b.publish(KEY, "300.25").await;
    assert_eq!(newer.json()["status"], "stored", "{}", newer.body);
    // Older than what is stored, posted on the instance that did not store the newer one,
    // straight away (its consumer may not have seen 300.25 yet).
    let older = a.publish(KEY, "200").await;
    assert_eq!(older.status, 200, "{}", older.body);
    assert_eq!(older.json()["status"], "already_current", "{}", older.body);
    assert_eq!(older.json()["updated_at"], 300.25);

    for sse in [&mut on_a, &mut on_b] {
        let got = sse.updates_until(300.25, 10 * SECOND).await;
        assert!(
            got == [100.5, 300.25] || got == [300.25],
            "subscriber saw {got:?}: must be increasing, end at 300.25"
        );
    }
    // A new subscriber on either instance, and a new instance, get the newest.
    let c = Service::start(&nats.url());
    c.wait_ready().await;
    for svc in [&a, &b, &c] {
        let mut sse = svc.subscribe(KEY).await;
        assert_eq!(sse.next_update(5 * SECOND).await, Some(300.25));
    }
}

#[tokio::test]
async fn concurrent_posts_in_random_order_end_at_the_newest_everywhere() {
    let nats = Nats::start();
    let a = Service::start(&nats.url());
    let b = Service::start(&nats.url());
    a.wait_ready().await;
    b.wait_ready().await;
    let mut watcher = b.subscribe("race").await;
    // 40 timestamps posted concurrently, alternating instances, in scrambled order.
    let mut order: Vec<u64> = (1..=40).collect();
    order.sort_by_key(|n| (n * 7919) % 41);
    let posts = order.iter().map(|n| {
        let svc = if n % 2 == 0 { &a } else { &b };
        let value = format!("{n}.5");
        async move { svc.publish("race", &value).await }
    });
    for resp in futures_util::future::join_all(posts).await {
        assert_eq!(resp.status, 200, "{}", resp.body);
    }
    let seen = watcher.updates_until(40.5, 10 * SECOND).await;
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "not increasing: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&40.5), "{seen:?}");
    for svc in [&a, &b] {
        let mut sse = svc.subscribe("race").await;
        assert_eq!(sse.next_update(5 * SECOND).await, Some(40.5));
    }
}

#[tokio::test]
async fn an_instance_started_after_a_publish_serves_the_latest_on_connect() {
    let nats = Nats::start();
    {
        let first = Service::start(&nats.url());
        first.wait_ready().await;
        assert_eq!(first.publish("env_a", "10.0").await.status, 200);
        assert_eq!(first.publish("env_b", "20.0").await.status, 200);
        assert_eq!(first.publish("env_a", "11.0").await.status, 200);
    }
    let later = Service::start(&nats.url());
    later.wait_ready().await;
    let mut a = later.subscribe("env_a").await;
    let mut b = later.subscribe("env_b").await;
    assert_eq!(a.next_update(5 * SECOND).await, Some(11.0));
    assert_eq!(b.next_update(5 * SECOND).await, Some(20.0));
}

#[tokio::test]
async fn a_nats_restart_heals_without_subscribers_reconnecting() {
    let mut nats = Nats::start();
    let svc = Service::start(&nats.url());
    svc.wait_ready().await;
    let mut sse = svc.subscribe(KEY).await;
    assert_eq!(svc.publish(KEY, "1.0").await.status, 200);
    assert_eq!(sse.next_update(5 * SECOND).await, Some(1.0));

    nats.stop();
    svc.wait_readyz(503, Duration::from_secs(15)).await;
    let refused = svc.publish(KEY, "2.0").await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.headers["retry-after"], "1");

    nats.restart();
    svc.wait_ready().await;
    svc.publish_until_ok(KEY, "3.0").await;
    assert_eq!(
        sse.next_update(10 * SECOND).await,
        Some(3.0),
        "the subscriber that stayed connected gets the update:\n{}",
        svc.log()
    );
    let mut fresh = svc.subscribe(KEY).await;
    assert_eq!(fresh.next_update(5 * SECOND).await, Some(3.0));
}

#[tokio::test]
async fn keepalive_comments_fill_the_silence() {
    let nats = Nats::start();
    let svc = Service::start_with(&nats.url(), &[("KEEPALIVE_INTERVAL", "300ms")]);
    svc.wait_ready().await;
    let mut sse = svc.subscribe("silent").await;
    let block = sse.next_block(5 * SECOND).await.expect("keep-alive");
    assert_eq!(block, ": keepalive\n\n");
    let block = sse
        .next_block(5 * SECOND)
        .await
        .expect("another keep-alive");
    assert_eq!(block, ": keepalive\n\n");
    let metrics = get(svc.addr, "/metricsz").await.body;
    assert!(
        metric(
            &metrics,
            "flagsmith_sse_http_writes_total{message=\"keepalive\"}"
        ) >= 2.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn h2c_prior_knowledge_streams_on_the_same_port() {
    let nats = Nats::start();
    let svc = Service::start(&nats.url());
    svc.wait_ready().await;
    assert_eq!(svc.publish(KEY, "5.5").await.status, 200);
    let mut sse = Sse::connect_h2c(svc.addr, KEY).await;
    assert_eq!(sse.version, http::Version::HTTP_2);
    assert_eq!(sse.status, 200);
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    assert_eq!(sse.next_update(5 * SECOND).await, Some(5.5));
    assert_eq!(svc.publish(KEY, "6.5").await.status, 200);
    assert_eq!(sse.next_update(5 * SECOND).await, Some(6.5));
}

#[tokio::test]
async fn tls_offers_h2_and_http11_by_alpn() {
    use std::sync::Arc;
    use tokio_rustls::rustls;

    let dir = tempfile::tempdir().expect("temp dir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");

    let nats = Nats::start();
    let svc = Service::start_with(
        &nats.url(),
        &[
            ("TLS_CERT_FILE", cert_path.to_str().expect("utf-8")),
            ("TLS_KEY_FILE", key_path.to_str().expect("utf-8")),
        ],
    );
    // Publish and probe through TLS too: plain HTTP must not be served on a TLS port.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let connector = |alpn: &[&[u8]]| {
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    };
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    assert!(
        try_get(svc.addr, "/livez").await.is_err(),
        "plain HTTP answered on the TLS port"
    );

    // HTTP/2 negotiated by ALPN, as browsers do.
    let tcp = tokio::net::TcpStream::connect(svc.addr)
        .await
        .expect("connect");
    let tls = connector(&[b"h2", b"http/1.1"])
        .connect(name.clone(), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut h2 = Sse::over_h2(tls, svc.addr, KEY).await;
    assert_eq!(h2.status, 200);
    assert_eq!(h2.version, http::Version::HTTP_2);
    // And HTTP/1.1 for clients that offer only that.
    let tcp = tokio::net::TcpStream::connect(svc.addr)
        .await
        .expect("connect");
    let tls = connector(&[b"http/1.1"])
        .connect(name.clone(), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut h1 = Sse::over_h1(tls, svc.addr, KEY).await;
    assert_eq!(h1.status, 200);
    assert_eq!(h1.version, http::Version::HTTP_11);
    // Written by its own task on the fast path's head, not by hyper (which dates every
    // response and keeps 16 KiB of buffers per connection).
    assert!(
        !h1.headers.contains_key("date"),
        "a TLS HTTP/1.1 stream was served by hyper"
    );

    // Publish over TLS once NATS is ready.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let tcp = tokio::net::TcpStream::connect(svc.addr)
            .await
            .expect("connect");
        let tls = connector(&[b"http/1.1"])
            .connect(name.clone(), tcp)
            .await
            .expect("TLS");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let request = hyper::Request::post(format!("/sse/environments/{KEY}/queue-change"))
            .header("host", "localhost")
            .header("authorization", format!("Token {TOKEN}"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"{\"updated_at\": 7.25}",
            )))
            .expect("request");
        let status = sender
            .send_request(request)
            .await
            .expect("response")
            .status();
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publish over TLS kept failing: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h2.next_update(5 * SECOND).await, Some(7.25));
    assert_eq!(h1.next_update(5 * SECOND).await, Some(7.25));

    // A client that resets its TLS HTTP/1.1 stream lost what was in flight: counted under
    // the last thing its stream wrote (the event), as for plain streams.
    let data_errors = async || {
        let tcp = tokio::net::TcpStream::connect(svc.addr)
            .await
            .expect("connect");
        let tls = connector(&[b"http/1.1"])
            .connect(name.clone(), tcp)
            .await
            .expect("TLS");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let request = hyper::Request::get("/metricsz")
            .header("host", "localhost")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .expect("body")
            .to_bytes();
        metric(
            &String::from_utf8_lossy(&body),
            "flagsmith_sse_http_errors_total{message=\"data\"}",
        )
    };
    assert_eq!(data_errors().await, 0.0);
    let tcp = tokio::net::TcpStream::connect(svc.addr)
        .await
        .expect("connect");
    // Closed with a reset rather than a FIN.
    tcp.set_zero_linger().expect("linger");
    let tls = connector(&[b"http/1.1"])
        .connect(name.clone(), tcp)
        .await
        .expect("TLS handshake");
    let mut h1 = Sse::over_h1(tls, svc.addr, KEY).await;
    assert_eq!(h1.next_update(5 * SECOND).await, Some(7.25));
    drop(h1);
    eventually_async(
        Duration::from_secs(5),
        "the reset to be counted",
        async || data_errors().await == 1.0,
    )
    .await;
}

#[tokio::test]
async fn metrics_count_subscribers_and_writes() {
    let nats = Nats::start();
    let svc = Service::start(&nats.url());
    svc.wait_ready().await;
    let mut one = svc.subscribe(KEY).await;
    let mut two = svc.subscribe(KEY).await;
    assert_eq!(svc.publish(KEY, "1.5").await.status, 200);
    assert_eq!(one.next_update(5 * SECOND).await, Some(1.5));
    assert_eq!(two.next_update(5 * SECOND).await, Some(1.5));
    let metrics = get(svc.addr, "/metricsz").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.headers["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    let value = |name: &str| -> f64 {
        metrics
            .body
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} missing:\n{}", metrics.body))
            .parse()
            .expect("number")
    };
    assert_eq!(value("flagsmith_sse_subscribers"), 2.0);
    assert_eq!(value("flagsmith_sse_subscribers_total"), 2.0);
    assert_eq!(
        value("flagsmith_sse_http_writes_total{message=\"data\"}"),
        2.0
    );
    assert!(value("flagsmith_sse_http_writes_total{message=\"healthcheck\"}") >= 1.0);
    // The broker-neutral series name their backend (an alert rule selects on it).
    assert_eq!(
        value("flagsmith_sse_broker_connected{broker=\"nats\"}"),
        1.0
    );
    assert_eq!(
        value("flagsmith_sse_http_errors_total{message=\"data\"}"),
        0.0
    );
    assert_eq!(
        value("flagsmith_sse_nats_errors_total{operation=\"publish\"}"),
        0.0
    );
    drop(one);
    eventually_async(
        Duration::from_secs(5),
        "the gauge to drop to 1",
        async || {
            let body = get(svc.addr, "/metricsz").await.body;
            body.lines().any(|l| l == "flagsmith_sse_subscribers 1")
        },
    )
    .await;
}

#[tokio::test]
async fn nats_credentials_in_the_url_are_used() {
    let token_nats = Nats::start_with(&["--auth", "n4ts-t0ken"]);
    let svc = Service::start(&format!("nats://n4ts-t0ken@127.0.0.1:{}", token_nats.port));
    svc.wait_ready().await;
    assert_eq!(svc.publish(KEY, "1.0").await.status, 200);
    assert!(
        !svc.log().contains("n4ts-t0ken"),
        "the token leaked into the log"
    );

    let user_nats = Nats::start_with(&["--user", "flag", "--pass", "p4ss"]);
    let svc = Service::start(&format!(
        "nats://127.0.0.1:1,nats://flag:p4ss@127.0.0.1:{}",
        user_nats.port
    ));
    svc.wait_ready().await;
    assert_eq!(svc.publish(KEY, "1.0").await.status, 200);
    assert!(
        !svc.log().contains("p4ss"),
        "the password leaked into the log"
    );
}

#[tokio::test]
async fn refuses_to_start_without_a_token() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_flagsmith-sse"))
        .env_clear()
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SSE_AUTHENTICATION_TOKEN"), "{stderr}");
}

#[tokio::test]
async fn sigterm_ends_streams_and_exits() {
    let nats = Nats::start();
    let mut svc = Service::start(&nats.url());
    svc.wait_ready().await;
    let mut sse = svc.subscribe(KEY).await;
    let pid = svc.pid().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    // The stream ends (the reader sees the end of the body), and the process exits.
    sse.expect_end(10 * SECOND).await;
    let exited = svc.wait_exit(Duration::from_secs(15));
    assert_eq!(exited, Some(true), "did not exit cleanly:\n{}", svc.log());
}

#[tokio::test]
async fn failed_writes_are_counted_but_clients_hanging_up_are_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nats = Nats::start();
    let svc = Service::start_with(&nats.url(), &[("KEEPALIVE_INTERVAL", "100ms")]);
    svc.wait_ready().await;
    let errors = |body: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix("flagsmith_sse_http_errors_total{message=\"keepalive\"} "))
            .and_then(|v| v.parse().ok())
            .expect("keepalive error counter")
    };
    let open = |addr| async move {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET /sse/environments/k/stream HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("request");
        let mut buf = [0u8; 4096];
        let mut seen = String::new();
        while !seen.contains(": keepalive") {
            let n = tcp.read(&mut buf).await.expect("read");
            assert!(n > 0, "stream ended early");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        tcp
    };
    // A clean close (FIN) is how SSE clients leave.
    drop(open(svc.addr).await);
    // The server saw the client leave.
    svc.wait_metric("flagsmith_sse_subscribers", 0.0).await;
    assert_eq!(errors(&get(svc.addr, "/metricsz").await.body), 0);
    // A reset loses what was in flight.
    let tcp = open(svc.addr).await;
    tcp.set_zero_linger().expect("linger");
    drop(tcp);
    eventually_async(
        Duration::from_secs(5),
        "the reset to be counted",
        async || errors(&get(svc.addr, "/metricsz").await.body) > 0,
    )
    .await;
}

#[tokio::test]
async fn bad_input_over_a_real_socket_is_refused_and_publishes_nothing() {
    let nats = Nats::start();
    let svc = Service::start(&nats.url());
    svc.wait_ready().await;
    let mut watcher = svc.subscribe(KEY).await;
    let path = format!("/sse/environments/{KEY}/queue-change");
    let big = format!(
        "{{\"updated_at\": 1, \"pad\": \"{}\"}}",
        "x".repeat(100_000)
    );
    for (token, body, want) in [
        (None, "{\"updated_at\": 1.0}", 401),
        (Some("nope"), "{\"updated_at\": 1.0}", 401),
        (Some(TOKEN), "{\"updated_at\": ", 400),
        (Some(TOKEN), "{\"updated\": 1.0}", 400),
        (
            Some(TOKEN),
            "{\"updated_at\": \"2025-02-30T00:00:00Z\"}",
            400,
        ),
        (Some(TOKEN), big.as_str(), 413),
    ] {
        let resp = post(svc.addr, &path, token, body).await;
        assert_eq!(resp.status, want, "{}", resp.body);
        assert!(resp.json()["message"].is_string(), "{}", resp.body);
    }
    for key in ["a.b", "a*", "%3E", "a%20b", "caf%C3%A9"] {
        let resp = post(
            svc.addr,
            &format!("/sse/environments/{key}/queue-change"),
            Some(TOKEN),
            "{\"updated_at\": 1.0}",
        )
        .await;
        assert_eq!(resp.status, 400, "{key}: {}", resp.body);
        assert_eq!(
            get(svc.addr, &format!("/sse/environments/{key}/stream"))
                .await
                .status,
            400,
            "{key}"
        );
    }
    assert_eq!(watcher.next_update(Duration::from_millis(500)).await, None);
    let metrics = get(svc.addr, "/metricsz").await.body;
    assert!(
        metrics.contains("flagsmith_sse_environments 1\n"),
        "{metrics}"
    );
}

#[test]
fn help_lists_every_setting_in_the_readme() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_flagsmith-sse"))
        .arg("--help")
        .env_clear()
        .output()
        .expect("run --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let documented: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| {
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    assert!(
        documented.len() >= 10,
        "README table not found: {documented:?}"
    );
    for name in &documented {
        assert!(
            help.contains(&format!("[env: {name}")),
            "{name} documented but not in --help"
        );
    }
    for line in help.lines().filter(|l| l.contains("[env: ")) {
        let name = line
            .split("[env: ")
            .nth(1)
            .and_then(|r| r.split(['=', ']']).next())
            .expect("env name");
        assert!(
            documented.contains(&name),
            "{name} in --help but not in README"
        );
    }
}

#[tokio::test]
async fn a_nats_that_lost_its_store_is_repopulated_and_nothing_is_missed() {
    let mut nats = Nats::start();
    let a = Service::start(&nats.url());
    let b = Service::start(&nats.url());
    a.wait_ready().await;
    b.wait_ready().await;
    // Enough updates that the old stream's sequence is well ahead of the new one's.
    for n in 1..=20 {
        assert_eq!(
            a.publish(&format!("env{n}"), &format!("{n}.5"))
                .await
                .status,
            200
        );
    }
    let mut on_b = b.subscribe("fresh").await;

    nats.restart_empty();
    a.wait_ready().await;
    b.wait_ready().await;
    let resp = a.publish_until_ok("fresh", "100.5").await;
    assert_eq!(resp.json()["status"], "stored", "{}", resp.body);
    assert_eq!(
        on_b.next_update(10 * SECOND).await,
        Some(100.5),
        "instance b missed an update stored after NATS lost its stream:\n{}",
        b.log()
    );
}

#[tokio::test]
async fn the_memory_broker_serves_one_instance_without_nats() {
    // Nothing listens on port 1: with BROKER=memory the service must not need it.
    let svc = Service::start_with("nats://127.0.0.1:1", &[("BROKER", "memory")]);
    svc.wait_readyz(200, Duration::from_secs(5)).await;
    let mut early = svc.subscribe(KEY).await;
    let stored = svc.publish(KEY, "\"2025-07-14T13:49:43.123456Z\"").await;
    assert_eq!(stored.json()["status"], "stored", "{}", stored.body);
    assert_eq!(
        early.next_update(5 * SECOND).await,
        Some(1752500983.1234558)
    );
    let older = svc.publish(KEY, "100.0").await;
    assert_eq!(older.json()["status"], "already_current", "{}", older.body);
    let mut late = svc.subscribe(KEY).await;
    assert_eq!(late.next_update(5 * SECOND).await, Some(1752500983.1234558));
    let mut h2 = Sse::connect_h2c(svc.addr, KEY).await;
    assert_eq!(h2.next_update(5 * SECOND).await, Some(1752500983.1234558));
    assert_eq!(
        post(
            svc.addr,
            &format!("/sse/environments/{KEY}/queue-change"),
            Some("bad"),
            "{}"
        )
        .await
        .status,
        401
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_effective_configuration() {
    let svc = Service::start_with(
        "nats://secret-token@127.0.0.1:1",
        &[
            ("BROKER", "memory"),
            ("LOG_FORMAT", "json"),
            ("LOG_LEVEL", "info"),
        ],
    );
    svc.wait_readyz(200, Duration::from_secs(5)).await;
    let log = svc.log();
    let objects: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let start = objects
        .iter()
        .find(|o| o["message"] == "flagsmith-sse starting")
        .unwrap_or_else(|| panic!("no start-up line:\n{log}"));
    assert_eq!(start["broker"], "Memory");
    assert!(start["max_http1_subscribers"].is_number(), "{start}");
    assert!(
        !log.contains("secret-token"),
        "a secret reached the log:\n{log}"
    );
    assert!(
        !log.contains(TOKEN),
        "the SSE token reached the log:\n{log}"
    );
}

/// A deployment configured for Flagsmith's own (polling) image starts unchanged: its
/// settings are accepted and each is logged once as not needed.
#[tokio::test]
async fn settings_of_flagsmiths_image_are_accepted_and_logged_once() {
    let svc = Service::start_with(
        "nats://127.0.0.1:1",
        &[
            ("BROKER", "memory"),
            ("STREAM_DELAY", "1"),
            ("CACHE_UPDATE_INTERVAL_SECONDS", "1"),
            ("REDIS_SCAN_COUNT", "500"),
            ("MAX_STREAM_AGE", "30"),
        ],
    );
    svc.wait_ready().await;
    let log = svc.log();
    for name in [
        "STREAM_DELAY",
        "CACHE_UPDATE_INTERVAL_SECONDS",
        "REDIS_SCAN_COUNT",
    ] {
        let lines = log
            .lines()
            .filter(|l| l.contains(name) && l.contains("not needed"))
            .count();
        assert_eq!(lines, 1, "{name} logged {lines} times:\n{log}");
    }
}

/// Over HTTP/2 a stream ends at its age with END_STREAM (the client sees the body end),
/// not with a reset, and no write is counted as failed.
#[tokio::test]
async fn http2_streams_end_cleanly_at_their_age() {
    let svc = Service::start_with(
        "nats://127.0.0.1:1",
        &[("BROKER", "memory"), ("MAX_STREAM_AGE", "1")],
    );
    svc.wait_ready().await;
    assert_eq!(svc.publish(KEY, "5.5").await.status, 200);
    let mut sse = Sse::connect_h2c(svc.addr, KEY).await;
    assert_eq!(sse.version, http::Version::HTTP_2);
    assert_eq!(sse.next_update(5 * SECOND).await, Some(5.5));
    sse.expect_end(5 * SECOND).await;
    svc.wait_metric("flagsmith_sse_streams_ended_by_age_total", 1.0)
        .await;
    assert_eq!(
        metric(
            &get(svc.addr, "/metricsz").await.body,
            "flagsmith_sse_http_errors_total{message=\"data\"}"
        ),
        0.0
    );
}

/// The same POST reaching two instances at once, before either has heard of the other's
/// write (as the task processor's retry can land on another replica): it is stored once,
/// and where JetStream's message id (`<key>:<micros>`) catches it, the second is answered
/// `duplicate` with the first's sequence.
#[tokio::test]
async fn the_same_post_on_two_instances_at_once_is_stored_once_by_its_message_id() {
    let nats = Nats::start();
    let a = Service::start(&nats.url());
    let b = Service::start(&nats.url());
    a.wait_ready().await;
    b.wait_ready().await;
    let mut duplicates = 0;
    for trial in 0..20 {
        let key = format!("twice{trial}");
        let (on_a, on_b) = tokio::join!(a.publish(&key, "500.5"), b.publish(&key, "500.5"));
        let statuses = [on_a.json()["status"].clone(), on_b.json()["status"].clone()];
        let stored = statuses.iter().filter(|s| *s == "stored").count();
        assert_eq!(stored, 1, "{} / {}", on_a.body, on_b.body);
        if statuses.iter().any(|s| *s == "duplicate") {
            duplicates += 1;
            assert_eq!(
                on_a.json()["sequence"],
                on_b.json()["sequence"],
                "{} / {}",
                on_a.body,
                on_b.body
            );
        }
    }
    // NATS 2.9 checks the message id before the expected last sequence: posts that truly
    // raced are told apart by the message id alone (without it the second learns of the
    // first by a failed conditional write and says `already_current`). Later servers check
    // the sequence first, so there the conditional write alone keeps it stored once.
    let version = std::process::Command::new(nats_server_binary())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if version.contains("v2.9.") {
        assert!(duplicates > 0, "no post raced the other in 20 trials");
    }
}
