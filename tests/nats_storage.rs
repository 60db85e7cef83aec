//! Where JetStream keeps the stream (`NATS_STREAM_STORAGE`): memory by default, as
//! Flagsmith's design prefers, or file; and what memory storage costs on a NATS restart
//! (the stream is gone) made good by the instances that hold the updates.

mod common;

use std::time::Duration;

use async_nats::jetstream::stream::{DiscardPolicy, StorageType};
use common::*;

/// The stream's storage as NATS itself reports it.
async fn storage_of(nats: &Nats) -> StorageType {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream.get_stream("FLAGSMITH_SSE").await.expect("stream");
    stream.info().await.expect("info").config.storage
}

#[tokio::test]
async fn the_stream_is_kept_where_the_setting_says() {
    for (setting, expected) in [
        (None, StorageType::Memory),
        (Some("memory"), StorageType::Memory),
        (Some("file"), StorageType::File),
    ] {
        let nats = Nats::start();
        let env: Vec<(&str, &str)> = setting
            .map(|s| ("NATS_STREAM_STORAGE", s))
            .into_iter()
            .collect();
        let svc = Service::start_with(&nats.url(), &env);
        svc.wait_ready().await;
        assert_eq!(storage_of(&nats).await, expected, "{setting:?}");
        assert!(
            svc.log().contains(&format!("storage={expected:?}")),
            "{}",
            svc.log()
        );
    }
}

/// The stream is created with this service's settings, as NATS itself reports them. An
/// instance that finds them so says nothing; one configured otherwise (another retention)
/// says they differ, and serves with the stream as it is.
#[tokio::test]
async fn the_stream_is_created_with_the_services_settings() {
    let nats = Nats::start();
    let first = Service::start_with(&nats.url(), &[("NATS_STREAM_MAX_AGE", "90s")]);
    first.wait_ready().await;
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream.get_stream("FLAGSMITH_SSE").await.expect("stream");
    let config = stream.info().await.expect("info").config.clone();
    assert_eq!(config.subjects, ["flagsmith.environment.>"]);
    assert_eq!(config.max_messages_per_subject, 1);
    assert_eq!(config.max_age, Duration::from_secs(90));
    assert_eq!(config.num_replicas, 1);
    assert_eq!(config.storage, StorageType::Memory);
    assert_eq!(config.discard, DiscardPolicy::Old);
    assert_eq!(config.duplicate_window, Duration::from_secs(90));

    let same = Service::start_with(&nats.url(), &[("NATS_STREAM_MAX_AGE", "90s")]);
    same.wait_ready().await;
    let other = Service::start_with(&nats.url(), &[("NATS_STREAM_MAX_AGE", "1h")]);
    other.wait_ready().await;
    eventually(10 * SECOND, "the settings warning", || {
        other.log().contains("settings differ")
    })
    .await;
    for svc in [&first, &same] {
        assert!(!svc.log().contains("settings differ"), "{}", svc.log());
    }
    assert_eq!(other.publish("env", "2.5").await.status, 200);

    // A stream made by hand that differs in one setting only is reported too.
    let nats = Nats::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    async_nats::jetstream::new(client)
        .create_stream(async_nats::jetstream::stream::Config {
            max_messages_per_subject: 5,
            ..config
        })
        .await
        .expect("stream made by hand");
    let svc = Service::start_with(&nats.url(), &[("NATS_STREAM_MAX_AGE", "90s")]);
    svc.wait_ready().await;
    eventually(10 * SECOND, "the settings warning", || {
        svc.log().contains("settings differ")
    })
    .await;
}

/// JetStream cannot change a stream's storage in place: an instance configured otherwise
/// says so, with what to do, and serves with the stream as it is.
#[tokio::test]
async fn an_existing_stream_of_the_other_storage_is_reported_and_used() {
    let nats = Nats::start();
    let first = Service::start_with(&nats.url(), &[("NATS_STREAM_STORAGE", "file")]);
    first.wait_ready().await;
    let second = Service::start_with(&nats.url(), &[("NATS_STREAM_STORAGE", "memory")]);
    second.wait_ready().await;
    eventually(10 * SECOND, "the storage warning", || {
        let log = second.log();
        log.contains("NATS_STREAM_STORAGE") && log.contains("nats stream rm")
    })
    .await;
    assert!(!first.log().contains("NATS_STREAM_STORAGE"));
    assert_eq!(second.publish("env", "2.5").await.status, 200);
    assert_eq!(storage_of(&nats).await, StorageType::File);
}

/// With memory storage a NATS restart loses the stream. The instances that ran through it
/// store back what they hold, so a third instance started afterwards serves the newest
/// update of each environment on connect, though nothing was posted since.
#[tokio::test]
async fn a_nats_restart_with_memory_storage_is_repopulated_by_the_instances() {
    let mut nats = Nats::start();
    let a = Service::start(&nats.url());
    let b = Service::start(&nats.url());
    a.wait_ready().await;
    b.wait_ready().await;
    assert_eq!(a.publish("one", "10.5").await.status, 200);
    assert_eq!(b.publish("two", "20.5").await.status, 200);
    assert_eq!(b.publish("one", "11.5").await.status, 200);
    let on_a = Tracker::follow(a.subscribe("two").await);
    eventually(10 * SECOND, "B's update on A", || on_a.last() == Some(20.5)).await;

    nats.restart();
    a.wait_ready().await;
    b.wait_ready().await;
    let c = Service::start(&nats.url());
    c.wait_ready().await;
    for (key, newest) in [("one", 11.5), ("two", 20.5)] {
        let mut sse = c.subscribe(key).await;
        assert_eq!(sse.next_update(10 * SECOND).await, Some(newest), "{key}");
    }
    // Still never backwards: an older post after the restart is not stored.
    let resp = c.publish("one", "10.5").await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_ne!(resp.json()["status"], "stored", "{}", resp.body);
}

/// An update stored back keeps its original time: it leaves the "latest on connect" answer
/// when its own retention ends, not a retention after the NATS restart.
#[tokio::test]
async fn a_stored_back_update_keeps_its_original_time() {
    let retention = std::time::Duration::from_secs(6);
    let mut nats = Nats::start();
    let env = [("NATS_STREAM_MAX_AGE", "6s")];
    let a = Service::start_with(&nats.url(), &env);
    a.wait_ready().await;
    let posted = std::time::Instant::now();
    assert_eq!(a.publish("env", "1.5").await.status, 200);
    // Half the retention later NATS restarts and the update is stored back: the stream's
    // own clock for it starts then.
    tokio::time::sleep(retention / 2).await;
    nats.restart();
    a.wait_ready().await;
    let c = Service::start_with(&nats.url(), &env);
    c.wait_ready().await;
    let mut sse = c.subscribe("env").await;
    assert_eq!(sse.next_update(5 * SECOND).await, Some(1.5));
    // Past the original retention (the stream still holds it: it was written later), a new
    // subscriber gets nothing on connect.
    tokio::time::sleep((retention + SECOND / 2).saturating_sub(posted.elapsed())).await;
    let d = Service::start_with(&nats.url(), &env);
    d.wait_ready().await;
    let mut late = d.subscribe("env").await;
    assert_eq!(late.next_update(2 * SECOND).await, None);
}

/// A store-back that cannot read what the new stream holds (here: a NATS user denied
/// JetStream's message reads) stores nothing, so that it never overwrites a newer update,
/// and is counted, one per environment, so the operator sees the instance failed to
/// repopulate the stream.
#[tokio::test]
async fn a_store_back_that_fails_is_counted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        "authorization {\n  users = [\n    {user: unread, password: unreadpw, permissions: {publish: {deny: [\"$JS.API.STREAM.MSG.GET.>\", \"$JS.API.DIRECT.GET.>\"]}}}\n  ]\n}\n",
    )
    .expect("nats.conf");
    let mut nats = Nats::start_with(&["-c", conf.to_str().expect("path")]);
    let url = nats.url().replacen("nats://", "nats://unread:unreadpw@", 1);
    let a = Service::start(&url);
    a.wait_ready().await;
    for key in ["one", "two"] {
        let resp = a.publish(key, "10.5").await;
        assert_eq!(resp.json()["status"], "stored", "{}", resp.body);
    }
    let restore_errors = "flagsmith_sse_broker_errors_total{broker=\"nats\",operation=\"restore\"}";
    assert_eq!(
        metric(&get(a.addr, "/metricsz").await.body, restore_errors),
        0.0
    );

    nats.restart();
    eventually_async(30 * SECOND, "both failed store-backs counted", async || {
        metric(&get(a.addr, "/metricsz").await.body, restore_errors) == 2.0
    })
    .await;
    assert!(a.log().contains("restored=0 failed=2"), "{}", a.log());
}
