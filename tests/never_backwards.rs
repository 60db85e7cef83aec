//! Never backwards, decided by each broker's own rule: JetStream's conditional publish
//! (expected last subject sequence) and the Redis script's compare-and-set.
//!
//! Every instance answers an older post from memory when its hub already holds a newer
//! update, so a test that posts to instances that follow the feed mostly never reaches
//! the broker's rule. Here the older posts go to a "blind" instance: its broker user may
//! write but not read the feed (NATS: no consumer may be created; Redis: no XREAD,
//! XREVRANGE or HGETALL), so its hub never holds what others stored, and only the broker
//! can refuse. What is stored is then read by a fresh instance (and, on Redis, with
//! `redis-cli`). One scenario, run on every backend.

mod common;

use common::*;

const KEY: &str = "n9fbf9h3v4fFgH3U3ngWhb";

enum Backend {
    /// The server, and the directory that holds its configuration file.
    Nats(Nats, #[allow(dead_code)] tempfile::TempDir),
    Redis(Redis),
}

impl Backend {
    fn nats() -> Backend {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            "authorization {\n  users = [\n    {user: full, password: fullpw}\n    \
             {user: blind, password: blindpw, permissions: {publish: {deny: [\"$JS.API.CONSUMER.>\"]}}}\n  ]\n}\n",
        )
        .expect("nats.conf");
        let nats = Nats::start_with(&["-c", conf.to_str().expect("path")]);
        Backend::Nats(nats, dir)
    }

    fn redis() -> Backend {
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
        Backend::Redis(redis)
    }

    /// An instance that reads the feed as usual.
    fn full(&self) -> Service {
        match self {
            Backend::Nats(nats, _) => {
                Service::start(&format!("nats://full:fullpw@127.0.0.1:{}", nats.port))
            }
            Backend::Redis(redis) => Service::start_redis(&redis.url(), &[]),
        }
    }

    /// An instance that can store but never learns what others stored.
    fn blind(&self) -> Service {
        match self {
            Backend::Nats(nats, _) => {
                Service::start(&format!("nats://blind:blindpw@127.0.0.1:{}", nats.port))
            }
            Backend::Redis(redis) => Service::start_redis(
                &redis.url(),
                &[("REDIS_USERNAME", "blind"), ("REDIS_PASSWORD", "blindpw")],
            ),
        }
    }

    /// The broker's own record of `KEY`, read with its own tools where that is one
    /// command (Redis: `HGET`); `None` where a fresh instance is the reader.
    fn stored_micros(&self) -> Option<String> {
        match self {
            Backend::Nats(..) => None,
            Backend::Redis(redis) => Some(
                redis
                    .cli(&["HGET", "{flagsmith-sse}:latest", KEY])
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ),
        }
    }
}

/// What a fresh instance sends a new subscriber of `KEY` on connect.
async fn fresh_instance_reads(backend: &Backend) -> Option<f64> {
    let fresh = backend.full();
    fresh.wait_ready().await;
    let mut sse = fresh.subscribe(KEY).await;
    sse.next_update(5 * SECOND).await
}

async fn older_and_equal_posts_are_refused_by_the_broker(backend: Backend) {
    let writer = backend.full();
    let blind = backend.blind();
    writer.wait_ready().await;
    // The blind instance never turns ready (it cannot catch up); it writes all the same.
    blind.publish_until_ok("warm_up", "1.5").await;

    let stored = writer.publish(KEY, "300.5").await;
    assert_eq!(stored.json()["status"], "stored", "{}", stored.body);

    let older = blind.publish_until_ok(KEY, "200.5").await;
    assert_eq!(older.json()["status"], "already_current", "{}", older.body);
    assert_eq!(older.json()["updated_at"], 300.5, "{}", older.body);
    let equal = blind.publish_until_ok(KEY, "300.5").await;
    let status = equal.json()["status"].clone();
    assert!(
        status == "already_current" || status == "duplicate",
        "{}",
        equal.body
    );
    if let Some(micros) = backend.stored_micros() {
        assert_eq!(micros, "300500000");
    }
    assert_eq!(fresh_instance_reads(&backend).await, Some(300.5));

    // The blind instance's own newer write is stored: the refusals above were the rule's.
    let newer = blind.publish_until_ok(KEY, "400.5").await;
    assert_eq!(newer.json()["status"], "stored", "{}", newer.body);
    assert_eq!(fresh_instance_reads(&backend).await, Some(400.5));
}

#[tokio::test]
async fn nats_conditional_publish_refuses_older_and_equal() {
    older_and_equal_posts_are_refused_by_the_broker(Backend::nats()).await;
}

#[tokio::test]
async fn redis_compare_and_set_refuses_older_and_equal() {
    older_and_equal_posts_are_refused_by_the_broker(Backend::redis()).await;
}
