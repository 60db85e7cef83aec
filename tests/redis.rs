//! The Redis broker against real `redis-server` processes (Debian's package): the same
//! guarantees as the NATS broker, and Flagsmith's own image's configuration selecting it.

mod common;

use std::time::Duration;

use common::*;

const KEY: &str = "n9fbf9h3v4fFgH3U3ngWhb";

#[tokio::test]
async fn the_configuration_of_flagsmiths_image_alone_selects_redis() {
    let redis = Redis::start();
    let port = redis.port.to_string();
    // What Flagsmith's Redis image is given: REDIS_HOST and REDIS_PORT, nothing of NATS.
    let svc = Service::start_without_nats(&[
        ("REDIS_HOST", "127.0.0.1"),
        ("REDIS_PORT", &port),
        ("USE_CLUSTER_MODE", "False"),
        ("REDIS_USE_SSL", "False"),
        ("CACHE_UPDATE_INTERVAL_SECONDS", "1"),
        ("STREAM_DELAY", "1"),
    ]);
    svc.wait_ready().await;
    let log = svc.log();
    assert!(
        log.lines()
            .any(|l| l.contains("broker chosen") && l.contains("Redis")),
        "Redis not chosen:\n{log}"
    );
    let mut sse = svc.subscribe(KEY).await;
    let resp = svc
        .publish(KEY, "\"2025-07-14T13:49:43.123456+00:00\"")
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.json()["status"], "stored");
    assert_eq!(sse.next_update(5 * SECOND).await, Some(1752500983.1234558));
}

#[tokio::test]
async fn retries_and_out_of_order_posts_across_instances_never_move_backwards() {
    let redis = Redis::start();
    let a = Service::start_redis(&redis.url(), &[]);
    let b = Service::start_redis(&redis.url(), &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    let mut on_b = b.subscribe(KEY).await;

    let first = a.publish(KEY, "100.5").await;
    assert_eq!(first.json()["status"], "stored", "{}", first.body);
    let retry = a.publish(KEY, "100.5").await;
    assert_eq!(retry.status, 200);
    assert_ne!(retry.json()["status"], "stored", "{}", retry.body);
    let newer = b.publish(KEY, "300.25").await;
    assert_eq!(newer.json()["status"], "stored", "{}", newer.body);
    // Older, on the instance that did not store the newer one, straight away: Redis's
    // compare-and-set refuses it even if this instance has not heard of 300.25 yet.
    let older = a.publish(KEY, "200").await;
    assert_eq!(older.status, 200, "{}", older.body);
    assert_eq!(older.json()["status"], "already_current", "{}", older.body);

    let got = on_b.updates_until(300.25, 10 * SECOND).await;
    assert!(
        got == [100.5, 300.25] || got == [300.25],
        "subscriber on B saw {got:?}"
    );
    // Posted on A, seen on B: one subscription per instance carries it across.
    let mut on_a = a.subscribe(KEY).await;
    assert_eq!(on_a.next_update(5 * SECOND).await, Some(300.25));
    // A new instance loads the newest from Redis at start-up.
    let c = Service::start_redis(&redis.url(), &[]);
    c.wait_ready().await;
    let mut on_c = c.subscribe(KEY).await;
    assert_eq!(on_c.next_update(5 * SECOND).await, Some(300.25));
}

#[tokio::test]
async fn concurrent_posts_in_random_order_end_at_the_newest_everywhere() {
    let redis = Redis::start();
    let a = Service::start_redis(&redis.url(), &[]);
    let b = Service::start_redis(&redis.url(), &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    let mut watcher = b.subscribe("race").await;
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
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&40.5), "{seen:?}");
    // What Redis holds is the newest too: an instance started now loads it from there.
    let c = Service::start_redis(&redis.url(), &[]);
    c.wait_ready().await;
    for svc in [&a, &b, &c] {
        let mut sse = svc.subscribe("race").await;
        assert_eq!(sse.next_update(5 * SECOND).await, Some(40.5));
    }
}

/// Redis down: 503 with Retry-After, /readyz 503, streams stay open with keep-alives;
/// Redis back with its data: everything heals without a restart of ours, and what was
/// posted meanwhile elsewhere is not lost.
#[tokio::test]
async fn a_redis_restart_heals_and_loses_nothing() {
    let mut redis = Redis::start();
    let a = Service::start_redis(&redis.url(), &[("KEEPALIVE_INTERVAL", "300ms")]);
    let b = Service::start_redis(&redis.url(), &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    let tracker = Tracker::follow(a.subscribe("env").await);
    assert_eq!(b.publish("env", "1.5").await.status, 200);
    eventually(10 * SECOND, "first update", || tracker.last() == Some(1.5)).await;

    redis.stop();
    a.wait_readyz(503, Duration::from_secs(10)).await;
    let resp = a.publish("env", "2.5").await;
    assert_eq!(resp.status, 503, "{}", resp.body);
    assert_eq!(resp.headers["retry-after"], "1");
    let before = tracker.blocks.lock().expect("lock").len();
    eventually(10 * SECOND, "keep-alives while Redis is down", || {
        tracker.blocks.lock().expect("lock").len() >= before + 3
    })
    .await;
    assert!(!tracker.ended());

    redis.restart();
    b.wait_ready().await;
    b.publish_until_ok("env", "3.5").await;
    // A was not told by pub/sub (there is none): it reads the stream from where it was.
    eventually(
        15 * SECOND,
        "the update posted on B after the restart",
        || tracker.last() == Some(3.5),
    )
    .await;
    a.wait_ready().await;
}

/// Redis back without its data: the next writes repopulate it, and every instance follows
/// the new stream without a restart.
#[tokio::test]
async fn a_redis_that_lost_its_data_is_repopulated_by_the_next_writes() {
    let mut redis = Redis::start();
    let a = Service::start_redis(&redis.url(), &[]);
    let b = Service::start_redis(&redis.url(), &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    for n in 1..=5 {
        assert_eq!(a.publish("env", &format!("{n}.5")).await.status, 200);
    }
    let tracker = Tracker::follow(b.subscribe("env").await);
    eventually(10 * SECOND, "5.5 on B", || tracker.last() == Some(5.5)).await;

    redis.restart_empty();
    a.wait_ready().await;
    b.wait_ready().await;
    // An older post than what the instances hold is answered from memory, not stored.
    let resp = a.publish_until_ok("env", "4.5").await;
    assert_eq!(resp.json()["status"], "already_current", "{}", resp.body);
    let resp = a.publish_until_ok("env", "9.5").await;
    assert_eq!(resp.json()["status"], "stored", "{}", resp.body);
    eventually(10 * SECOND, "9.5 on B after the data loss", || {
        tracker.last() == Some(9.5)
    })
    .await;
    // A third instance, started now, loads the repopulated store.
    let c = Service::start_redis(&redis.url(), &[]);
    c.wait_ready().await;
    let mut on_c = c.subscribe("env").await;
    assert_eq!(on_c.next_update(5 * SECOND).await, Some(9.5));
}

/// A Redis Cluster (three primaries with a replica each) loses the primary that holds our
/// keys, and it comes back as a replica of the promoted one: every update acknowledged
/// with 200 (after a replica took it, `REDIS_WAIT_REPLICAS=1`) before, during or after the
/// failover is what an instance started after it all reads. Each phase writes to environments of its own, and nothing is written
/// after the failover, so a later write cannot cover a lost one; the instances that wrote
/// hold their writes in memory anyway, so only a fresh instance is asked. While no replica
/// can take a write, queue-change answers 503 and Flagsmith's task processor retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_primary_loss_loses_no_acknowledged_update() {
    let mut cluster = RedisCluster::start();
    let env = [("USE_CLUSTER_MODE", "true"), ("REDIS_WAIT_REPLICAS", "1")];
    let urls = cluster.urls();
    let a = Service::start_redis(&urls, &env);
    let b = Service::start_redis(&urls, &env);
    a.wait_ready().await;
    b.wait_ready().await;
    let name = |phase: &str, i: usize| format!("{phase}{i}");
    // (environment, newest value acknowledged), per phase.
    let mut newest_acked: Vec<(String, f64)> = Vec::new();
    let mut answered = (0, 0);
    let primary = cluster.primary_for("{flagsmith-sse}:latest");
    for round in 1..=100u32 {
        if round == 31 {
            cluster.nodes[primary].stop();
        }
        if round == 46 {
            cluster.nodes[primary].restart();
        }
        // While the primary is down, the promoted replica has no replica of its own:
        // `WAIT 1` fails and those writes answer 503 (or, if one did get 200, it is
        // checked like the others). Each phase writes to its own environments.
        let phase = match round {
            1..=30 => "before",
            31..=45 => "failover",
            _ => "rejoined",
        };
        let key = name(phase, (round % 5) as usize);
        let svc = if round % 2 == 0 { &a } else { &b };
        let value = f64::from(round) + 0.5;
        let resp = svc.publish(&key, &format!("{value}")).await;
        match resp.status {
            200 => {
                answered.0 += 1;
                match newest_acked.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => *v = v.max(value),
                    None => newest_acked.push((key, value)),
                }
            }
            503 => answered.1 += 1,
            other => panic!("status {other}: {}", resp.body),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing is written from here on.
    println!(
        "acknowledged {} writes, 503 for {}; newest acknowledged {newest_acked:?}",
        answered.0, answered.1
    );
    for phase in ["before", "rejoined"] {
        for i in 0..5 {
            let key = name(phase, i);
            assert!(
                newest_acked.iter().any(|(k, _)| *k == key),
                "{key}: no write acknowledged"
            );
        }
    }
    let c = Service::start_redis(&urls, &env);
    c.wait_ready().await;
    for (key, newest) in &newest_acked {
        let mut sse = c.subscribe(key).await;
        let got = sse.next_update(5 * SECOND).await;
        // A write answered 503 may still have been stored (its replica did not confirm in
        // time): the newest acknowledged update or a newer one.
        assert!(
            got.is_some_and(|g| g >= *newest),
            "{key}: a fresh instance reads {got:?}, newest acknowledged {newest}"
        );
    }
}

/// `REDIS_USE_SSL` as Flagsmith's image reads it: TLS to Redis, the server's certificate
/// verified (a private CA is trusted through `SSL_CERT_FILE`).
#[tokio::test]
async fn redis_over_tls_with_the_shipped_settings() {
    let redis = Redis::start_tls();
    let port = redis.port.to_string();
    let ca = redis.tls_cert().display().to_string();
    let svc = Service::start_without_nats(&[
        ("REDIS_HOST", "127.0.0.1"),
        ("REDIS_PORT", &port),
        ("REDIS_USE_SSL", "True"),
        ("SSL_CERT_FILE", &ca),
    ]);
    svc.wait_ready().await;
    let mut sse = svc.subscribe(KEY).await;
    let resp = svc.publish(KEY, "7.5").await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(sse.next_update(5 * SECOND).await, Some(7.5));
    // Without trusting that CA the certificate is refused: never ready.
    let untrusting = Service::start_without_nats(&[
        ("REDIS_HOST", "127.0.0.1"),
        ("REDIS_PORT", &port),
        ("REDIS_USE_SSL", "true"),
    ]);
    untrusting.wait_readyz(503, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(get(untrusting.addr, "/readyz").await.status, 503);
}

/// A password given in REDIS_URL (URL-encoded there) is used as well.
#[tokio::test]
async fn a_password_in_redis_url_is_used() {
    let redis = Redis::start_with_auth(None, "s3cret", false);
    let with = format!("redis://:s3cret@127.0.0.1:{}", redis.port);
    let svc = Service::start_redis(&with, &[]);
    svc.wait_ready().await;
    assert_eq!(svc.publish(KEY, "3.5").await.status, 200);
    assert!(
        !svc.log().contains("s3cret"),
        "the password reached the log"
    );
    // Without it Redis refuses every command: never ready, writes refused.
    let without = Service::start_redis(&redis.url(), &[]);
    without.wait_readyz(503, Duration::from_secs(5)).await;
    assert_eq!(without.publish(KEY, "4.5").await.status, 503);
}

/// A secret with every character that breaks URL or list parsing.
const HARD_PASSWORD: &str = "p#?,@: w/rd%";

/// Each way Flagsmith's chart configures a Redis that needs a password: REDIS_HOST and
/// REDIS_PORT with REDIS_PASSWORD (from a secret), an ACL user (REDIS_USERNAME), and TLS
/// with a password. The raw secret is used as given, and never printed.
#[tokio::test]
async fn redis_passwords_as_flagsmiths_chart_passes_them() {
    for (user, tls) in [(None, false), (Some("flagsmith"), false), (None, true)] {
        let redis = Redis::start_with_auth(user, HARD_PASSWORD, tls);
        let port = redis.port.to_string();
        let ca = tls.then(|| redis.tls_cert().display().to_string());
        let mut env = vec![
            ("REDIS_HOST", "127.0.0.1"),
            ("REDIS_PORT", port.as_str()),
            ("REDIS_PASSWORD", HARD_PASSWORD),
        ];
        if let Some(user) = user {
            env.push(("REDIS_USERNAME", user));
        }
        if let Some(ca) = &ca {
            env.extend([("REDIS_USE_SSL", "true"), ("SSL_CERT_FILE", ca.as_str())]);
        }
        let svc = Service::start_without_nats(&env);
        svc.wait_ready().await;
        let mut sse = svc.subscribe(KEY).await;
        let resp = svc.publish(KEY, "3.5").await;
        assert_eq!(resp.status, 200, "{user:?} tls={tls}: {}", resp.body);
        assert_eq!(sse.next_update(5 * SECOND).await, Some(3.5));
        // Stored in Redis itself, under the ACL user's rights.
        assert!(
            redis
                .cli(&["HGET", "{flagsmith-sse}:latest", KEY])
                .starts_with("3500000:"),
            "{user:?} tls={tls}"
        );
        let log = svc.log();
        assert!(!log.contains(HARD_PASSWORD), "the password reached the log");
        assert!(
            !log.contains("w/rd"),
            "part of the password reached the log"
        );
    }
}

/// Without the password Redis refuses every command: never ready, writes refused, and the
/// cause logged at `warn` (the default level shows it) as an authentication failure.
#[tokio::test]
async fn a_missing_or_wrong_password_is_logged_as_such() {
    let redis = Redis::start_with_auth(None, HARD_PASSWORD, false);
    let port = redis.port.to_string();
    for password in [None, Some("wrong")] {
        let mut env = vec![
            ("REDIS_HOST", "127.0.0.1"),
            ("REDIS_PORT", port.as_str()),
            ("LOG_LEVEL", "warn"),
        ];
        env.extend(password.map(|p| ("REDIS_PASSWORD", p)));
        let svc = Service::start_without_nats(&env);
        svc.wait_readyz(503, Duration::from_secs(5)).await;
        assert_eq!(svc.publish(KEY, "4.5").await.status, 503);
        eventually_async(10 * SECOND, "an authentication warning", async || {
            let log = svc.log();
            log.contains("WARN")
                && log.contains("broker connection failed")
                && log.contains("authentication")
        })
        .await;
        let log = svc.log();
        // Rate-limited: two connections (writer, reader) fail every few hundred ms, but
        // each says so once per 30 s.
        let warnings = log.matches("broker connection failed").count();
        assert!(warnings <= 2, "{warnings} warnings:\n{log}");
        assert!(!log.contains(HARD_PASSWORD));
    }
}

/// A Redis Cluster whose nodes require a password, configured as Flagsmith's chart does:
/// USE_CLUSTER_MODE with one node's REDIS_HOST/REDIS_PORT and REDIS_PASSWORD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_a_password() {
    let cluster = RedisCluster::start_with_password(Some(HARD_PASSWORD));
    let port = cluster.nodes[0].port.to_string();
    let svc = Service::start_without_nats(&[
        ("REDIS_HOST", "127.0.0.1"),
        ("REDIS_PORT", &port),
        ("USE_CLUSTER_MODE", "True"),
        ("REDIS_PASSWORD", HARD_PASSWORD),
    ]);
    svc.wait_ready().await;
    let mut sse = svc.subscribe(KEY).await;
    assert_eq!(svc.publish_until_ok(KEY, "5.5").await.status, 200);
    assert_eq!(sse.next_update(5 * SECOND).await, Some(5.5));
    let primary = cluster.primary_for("{flagsmith-sse}:latest");
    assert!(
        cluster.nodes[primary]
            .cli(&["HGET", "{flagsmith-sse}:latest", KEY])
            .starts_with("5500000:")
    );
    assert!(!svc.log().contains(HARD_PASSWORD));
}

/// What cannot be right is refused at start with a clear error, never silently ignored.
#[test]
fn conflicting_or_unusable_redis_settings_refuse_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing_ca = dir.path().join("missing-ca.pem").display().to_string();
    for (env, says) in [
        (
            vec![
                ("REDIS_URL", "redis://:inurl@127.0.0.1:1"),
                ("REDIS_PASSWORD", "alsohere"),
            ],
            "REDIS_PASSWORD",
        ),
        (
            vec![("REDIS_URL", "redis://127.0.0.1:1,redis://127.0.0.1:2")],
            "USE_CLUSTER_MODE",
        ),
        (
            vec![
                ("REDIS_HOST", "127.0.0.1"),
                ("REDIS_USE_SSL", "true"),
                ("SSL_CERT_FILE", missing_ca.as_str()),
            ],
            "SSL_CERT_FILE",
        ),
        (
            vec![("REDIS_USERNAME", "u"), ("REDIS_HOST", "h")],
            "REDIS_PASSWORD",
        ),
    ] {
        let mut all = env.clone();
        all.push(("SSE_AUTHENTICATION_TOKEN", "t"));
        let (status, out) = run_to_exit(&[], &all);
        assert!(!status.success(), "{env:?} started:\n{out}");
        assert!(out.contains(says), "{env:?}: {out}");
        assert!(!out.contains("inurl") && !out.contains("alsohere"), "{out}");
        if says == "REDIS_PASSWORD" && env.len() == 2 {
            assert!(out.contains("REDIS_URL"), "names both: {out}");
        }
    }
}

/// `--help` shows where each setting comes from, never a secret's value.
#[test]
fn help_prints_no_secret() {
    let (status, help) = run_to_exit(
        &["--help"],
        &[
            ("SSE_AUTHENTICATION_TOKEN", "tok-SECRET-1"),
            ("REDIS_PASSWORD", "pw-SECRET-2"),
            ("REDIS_USERNAME", "user-SECRET-3"),
            ("REDIS_URL", "redis://u:url-SECRET-4@h:1"),
            ("NATS_URL", "nats://nats-SECRET-5@h:4222"),
        ],
    );
    assert!(status.success());
    assert!(help.contains("REDIS_PASSWORD"), "{help}");
    assert!(!help.contains("SECRET"), "{help}");
}

/// Every connection to Redis has TCP keepalive on, so that the kernel notices a peer that
/// vanished on a real network (`ss` shows its timer on an idle socket).
#[tokio::test]
async fn connections_to_redis_have_tcp_keepalive() {
    let redis = Redis::start();
    let svc = Service::start_redis(&redis.url(), &[]);
    svc.wait_ready().await;
    let filter = format!("( dport = :{} )", redis.port);
    eventually(10 * SECOND, "keepalive on each connection to Redis", || {
        let out = std::process::Command::new("ss")
            .args(["-tno", "state", "established", &filter])
            .output()
            .expect("ss runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let sockets: Vec<&str> = text.lines().skip(1).collect();
        sockets.len() >= 2 && sockets.iter().all(|s| s.contains("timer:(keepalive"))
    })
    .await;
}

/// Connections Redis has accepted since it started (`redis-cli` calls included).
fn connections_received(redis: &Redis) -> u64 {
    let info = redis.cli(&["INFO", "stats"]);
    info.lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no connection count in {info}"))
}

/// Without `REDIS_WAIT_REPLICAS` writes share the writer's one connection: no write opens
/// a connection (the second count's own `redis-cli` is the one new).
#[tokio::test]
async fn writes_without_wait_replicas_share_the_writers_connection() {
    let redis = Redis::start();
    let svc = Service::start_redis(&redis.url(), &[]);
    svc.wait_ready().await;
    let before = connections_received(&redis);
    for (i, key) in ["e1", "e2", "e3", "e4", "e5"].iter().enumerate() {
        assert_eq!(svc.publish(key, &format!("{}.5", i + 1)).await.status, 200);
    }
    assert_eq!(svc.publish("e5", "5.5").await.status, 200, "a retry");
    assert_eq!(
        connections_received(&redis) - before,
        1,
        "writes opened connections"
    );
}

/// A write Redis refuses with an error is answered 503 and logged with Redis's own
/// words, not as a timeout. Here the hash key holds a string (WRONGTYPE).
#[tokio::test]
async fn a_write_redis_refuses_is_logged_with_its_cause() {
    let redis = Redis::start();
    let svc = Service::start_redis(&redis.url(), &[]);
    svc.wait_ready().await;
    assert_eq!(
        redis
            .cli(&["SET", "{flagsmith-sse}:latest", "not a hash"])
            .trim(),
        "OK"
    );
    assert_eq!(svc.publish("env", "1.5").await.status, 503);
    eventually(
        10 * SECOND,
        "the refused write logged with its cause",
        || {
            svc.log()
                .lines()
                .any(|line| line.contains("queue-change not stored") && line.contains("WRONGTYPE"))
        },
    )
    .await;
}

/// `REDIS_WAIT_REPLICAS=1` with a primary and one replica: 200 while the replica takes
/// writes; with the replica stopped (SIGSTOP), 503 within Flagsmith's 2 s, for the write and
/// for its retry alike (a retry answered "duplicate" must not skip the wait); and a write
/// waiting for replicas does not hold back a write to another environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_on_connections_of_their_own() {
    let primary = Redis::start();
    let replica = Redis::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    // A replica counts for WAIT only once its initial sync is done.
    eventually(20 * SECOND, "the replica in sync", || {
        primary.cli(&["WAIT", "1", "100"]).trim() == "1"
    })
    .await;
    let svc = Service::start_redis(&primary.url(), &[("REDIS_WAIT_REPLICAS", "1")]);
    svc.wait_ready().await;
    let started = std::time::Instant::now();
    let resp = svc.publish("env", "1.5").await;
    assert_eq!(
        resp.status,
        200,
        "{} after {:?}: {}",
        resp.body,
        started.elapsed(),
        primary.cli(&["INFO", "replication"])
    );
    let resp = svc.publish("env", "1.5").await;
    assert_eq!(
        resp.status, 200,
        "the retry, with the replica running: {}",
        resp.body
    );
    // One write at a time needs one connection of its own, kept for the next: no new
    // connection per write (the second count's own `redis-cli` is the one new).
    let before = connections_received(&primary);
    for (i, key) in ["e1", "e2", "e3", "e4", "e5"].iter().enumerate() {
        assert_eq!(svc.publish(key, &format!("{}.5", i + 1)).await.status, 200);
    }
    assert_eq!(
        connections_received(&primary) - before,
        1,
        "writes waiting for replicas one at a time opened connections"
    );

    let replica_pid = replica.pid().to_string();
    kill(replica.pid(), "STOP");
    let started = std::time::Instant::now();
    let resp = svc.publish("env", "2.5").await;
    let took = started.elapsed();
    assert_eq!(resp.status, 503, "{}", resp.body);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // The write is in the primary; its retry is a duplicate there, and still waits.
    assert!(
        primary
            .cli(&["HGET", "{flagsmith-sse}:latest", "env"])
            .starts_with("2500000:")
    );
    let started = std::time::Instant::now();
    let resp = svc.publish("env", "2.5").await;
    assert_eq!(resp.status, 503, "the retry must wait too: {}", resp.body);
    assert!(started.elapsed() < Duration::from_secs(2));

    // While one write waits for the stopped replica, another environment's write reaches
    // Redis: it is not queued behind the WAIT.
    let base = svc.addr;
    let waiting = tokio::spawn(async move {
        post(
            base,
            "/sse/environments/env/queue-change",
            Some(TOKEN),
            r#"{"updated_at": 3.5}"#,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let other = tokio::spawn(async move {
        post(
            base,
            "/sse/environments/other/queue-change",
            Some(TOKEN),
            r#"{"updated_at": 3.5}"#,
        )
        .await
    });
    eventually(SECOND, "the other environment's write in Redis", || {
        primary
            .cli(&["HGET", "{flagsmith-sse}:latest", "other"])
            .starts_with("3500000:")
    })
    .await;
    assert!(
        !waiting.is_finished(),
        "the first write stopped waiting too early"
    );
    assert_eq!(waiting.await.expect("join").status, 503);
    assert_eq!(other.await.expect("join").status, 503);

    kill(replica_pid.parse().expect("pid"), "CONT");
    eventually_async(10 * SECOND, "200 once the replica is back", async || {
        svc.publish("env", "3.5").await.status == 200
    })
    .await;
}

/// Redis restarted without its data while two instances run, nothing posted afterwards:
/// the instances notice (the epoch is gone) and store back what they hold, so a third
/// instance started later serves the newest acknowledged update of each environment. The
/// same after a FLUSHALL under open connections (no reconnect to notice it by).
#[tokio::test]
async fn redis_losing_its_data_is_detected_and_repopulated_by_the_instances() {
    let mut redis = Redis::start_with(&["--appendonly", "no"]);
    let a = Service::start_redis(&redis.url(), &[]);
    let b = Service::start_redis(&redis.url(), &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    assert_eq!(a.publish("one", "10.5").await.status, 200);
    assert_eq!(b.publish("two", "20.5").await.status, 200);
    assert_eq!(a.publish("one", "11.5").await.status, 200);

    redis.restart_empty();
    a.wait_ready().await;
    b.wait_ready().await;
    let c = Service::start_redis(&redis.url(), &[]);
    c.wait_ready().await;
    for (key, newest) in [("one", 11.5), ("two", 20.5)] {
        let mut sse = c.subscribe(key).await;
        assert_eq!(sse.next_update(10 * SECOND).await, Some(newest), "{key}");
    }

    assert_eq!(redis.cli(&["FLUSHALL"]).trim(), "OK");
    eventually(10 * SECOND, "the flushed data stored back", || {
        redis
            .cli(&["HGET", "{flagsmith-sse}:latest", "two"])
            .starts_with("20500000:")
    })
    .await;
    let d = Service::start_redis(&redis.url(), &[]);
    d.wait_ready().await;
    let mut sse = d.subscribe("one").await;
    assert_eq!(sse.next_update(10 * SECOND).await, Some(11.5));
}

/// Environments whose newest update is older than the retention leave the hash, so that
/// it does not grow with every environment ever updated; newer ones stay.
#[tokio::test]
async fn the_hash_forgets_environments_older_than_the_retention() {
    let redis = Redis::start();
    let svc = Service::start_redis(&redis.url(), &[("NATS_STREAM_MAX_AGE", "2s")]);
    svc.wait_ready().await;
    assert_eq!(svc.publish("old", "1.5").await.status, 200);
    eventually(15 * SECOND, "the old environment pruned", || {
        redis
            .cli(&["HEXISTS", "{flagsmith-sse}:latest", "old"])
            .trim()
            == "0"
    })
    .await;
    assert_eq!(svc.publish("new", "2.5").await.status, 200);
    assert!(
        redis
            .cli(&["HEXISTS", "{flagsmith-sse}:latest", "new"])
            .trim()
            == "1"
    );
    // The epoch stays: it marks the data as this Redis's, whatever was pruned.
    assert!(
        redis
            .cli(&["HEXISTS", "{flagsmith-sse}:latest", ":epoch"])
            .trim()
            == "1"
    );
}

/// Pruning removes only what is older than the retention: an environment written less
/// than the retention ago stays in the hash through every prune. Prunes come at most the
/// retention plus one blocking read (2 s) apart, so writing for ten seconds spans one.
#[tokio::test]
async fn the_hash_keeps_environments_younger_than_the_retention() {
    let retention = 4 * SECOND;
    let redis = Redis::start();
    let svc = Service::start_redis(&redis.url(), &[("NATS_STREAM_MAX_AGE", "4s")]);
    svc.wait_ready().await;
    let mut written: Vec<(String, std::time::Instant)> = Vec::new();
    let mut judged = 0;
    for i in 0..10 {
        let key = format!("young{i}");
        let at = std::time::Instant::now();
        assert_eq!(svc.publish(&key, &format!("{}.5", i + 1)).await.status, 200);
        written.push((key, at));
        tokio::time::sleep(SECOND).await;
        for (key, at) in &written {
            if at.elapsed() >= retention - SECOND {
                continue;
            }
            let held = redis
                .cli(&["HEXISTS", "{flagsmith-sse}:latest", key])
                .trim()
                == "1";
            // Judged only if the check ended well inside the retention: a pause of this
            // process can skip a check, never fail one.
            if at.elapsed() < retention - SECOND {
                assert!(
                    held,
                    "{key} left the hash {:?} after it was written",
                    at.elapsed()
                );
                judged += 1;
            }
        }
    }
    assert!(judged > 0, "no check ended inside the retention");
}

/// Pruning runs in the reader's loop, and the reader goes on following the stream after
/// it. Only A prunes (B keeps the default retention of an hour), so once the stale
/// environment has left the hash, A has pruned; B's next write must still reach A.
#[tokio::test]
async fn the_reader_still_follows_the_stream_after_pruning() {
    let redis = Redis::start();
    let a = Service::start_redis(&redis.url(), &[("NATS_STREAM_MAX_AGE", "2s")]);
    let b = Service::start_redis(&redis.url(), &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    assert_eq!(b.publish("old", "1.5").await.status, 200);
    eventually(15 * SECOND, "the old environment pruned by A", || {
        redis
            .cli(&["HEXISTS", "{flagsmith-sse}:latest", "old"])
            .trim()
            == "0"
    })
    .await;
    let mut sse = a.subscribe("new").await;
    assert_eq!(b.publish("new", "2.5").await.status, 200);
    assert_eq!(sse.next_update(10 * SECOND).await, Some(2.5));
}

/// An update stored back after Redis lost its data keeps its original time: it leaves the
/// "latest on connect" answer when its own retention ends, not a retention after the loss.
#[tokio::test]
async fn a_stored_back_update_keeps_its_original_time() {
    let retention = Duration::from_secs(6);
    let mut redis = Redis::start_with(&["--appendonly", "no"]);
    let env = [("NATS_STREAM_MAX_AGE", "6s")];
    let a = Service::start_redis(&redis.url(), &env);
    a.wait_ready().await;
    let posted = std::time::Instant::now();
    assert_eq!(a.publish("env", "1.5").await.status, 200);
    tokio::time::sleep(retention / 2).await;
    redis.restart_empty();
    a.wait_ready().await;
    let c = Service::start_redis(&redis.url(), &env);
    c.wait_ready().await;
    let mut sse = c.subscribe("env").await;
    assert_eq!(sse.next_update(5 * SECOND).await, Some(1.5));
    tokio::time::sleep((retention + SECOND / 2).saturating_sub(posted.elapsed())).await;
    let d = Service::start_redis(&redis.url(), &env);
    d.wait_ready().await;
    let mut late = d.subscribe("env").await;
    assert_eq!(late.next_update(2 * SECOND).await, None);
}

/// A new instance takes each environment's state from the hash, and reads the stream only
/// from where it stood when the hash was loaded: the stream's history (up to 100,000
/// entries) would bring back what the hash has forgotten. Here the hash field is deleted,
/// as pruning does to an environment past the retention.
#[tokio::test]
async fn a_new_instance_does_not_replay_the_streams_history() {
    let redis = Redis::start();
    let a = Service::start_redis(&redis.url(), &[]);
    a.wait_ready().await;
    assert_eq!(a.publish("env", "1.5").await.status, 200);
    assert_eq!(
        redis.cli(&["HDEL", "{flagsmith-sse}:latest", "env"]).trim(),
        "1"
    );
    let c = Service::start_redis(&redis.url(), &[]);
    c.wait_ready().await;
    let mut sse = c.subscribe("env").await;
    assert_eq!(sse.next_update(3 * SECOND).await, None);
    // C does follow the stream from there on.
    assert_eq!(a.publish("env", "2.5").await.status, 200);
    assert_eq!(sse.next_update(10 * SECOND).await, Some(2.5));
}

/// After a Redis restart an instance resumes reading the stream from the last id it saw,
/// so what was written while it was cut off reaches its subscribers even where the hash it
/// reloads does not hold it. The instance is cut off (silenced, then Redis restarts) while
/// another writes; the hash entry of that write is deleted before the instance reconnects,
/// so only the stream can deliver it.
#[tokio::test]
async fn after_a_restart_the_stream_is_resumed_from_the_last_id_seen() {
    let mut redis = Redis::start();
    let proxy = Proxy::start(redis.port).await;
    let a = Service::start_redis(&format!("redis://127.0.0.1:{}", proxy.port), &[]);
    let b = Service::start_redis(&redis.url(), &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    let tracker = Tracker::follow(a.subscribe("env").await);
    assert_eq!(b.publish("env", "1.5").await.status, 200);
    eventually(10 * SECOND, "first update on A", || {
        tracker.last() == Some(1.5)
    })
    .await;

    proxy.silence();
    assert_eq!(b.publish("env", "3.5").await.status, 200);
    assert_eq!(
        redis.cli(&["HDEL", "{flagsmith-sse}:latest", "env"]).trim(),
        "1"
    );
    redis.restart();
    eventually(
        20 * SECOND,
        "the update written while A was cut off",
        || tracker.last() == Some(3.5),
    )
    .await;
    a.wait_ready().await;
}
