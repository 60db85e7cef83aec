//! A small-scale run of `flagsmith-sse-bench` against a real service: it must connect every
//! subscriber and count every delivery. Counts only; speed is for BENCHMARKS.md.

mod common;

use std::process::Command;

use common::*;

fn bench(args: &[String]) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_flagsmith-sse-bench"))
        .args(args)
        .arg(format!("--json={}", json.display()))
        .env("SSE_AUTHENTICATION_TOKEN", TOKEN)
        .output()
        .expect("run the bench tool");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed:\n{stdout}\n{stderr}");
    let text =
        std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("{e}:\n{stdout}\n{stderr}"));
    serde_json::from_str(&text).expect("report JSON")
}

#[tokio::test]
async fn subscribe_counts_every_delivery_over_http1_and_http2() {
    let nats = Nats::start();
    let svc = Service::start(&nats.url());
    svc.wait_ready().await;
    for extra in [
        vec![],
        vec!["--h2".to_owned(), "--streams-per-connection=50".to_owned()],
    ] {
        let mut args: Vec<String> = [
            "subscribe",
            "--subscribers=200",
            "--updates=3",
            "--interval-ms=200",
            "--settle-s=0",
            "--timeout-s=30",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--addr={}", svc.addr));
        args.push(format!("--server-pid={}", svc.pid()));
        args.extend(extra.clone());
        let report = bench(&args);
        assert_eq!(report["connected"], 200, "{report:#}");
        assert_eq!(report["failed"], 0, "{report:#}");
        assert_eq!(report["expected"], 600, "{report:#}");
        assert_eq!(report["delivered"], 600, "{report:#}");
        assert!(report["rss_bytes_per_subscriber"].is_number(), "{report:#}");
        assert!(
            report["server_cpu_us_per_delivery"].is_number(),
            "{report:#}"
        );
    }
}

#[tokio::test]
async fn subscribers_spread_over_environments_get_only_their_own() {
    let nats = Nats::start();
    let svc = Service::start(&nats.url());
    svc.wait_ready().await;
    let report = bench(&[
        "subscribe".into(),
        format!("--addr={}", svc.addr),
        "--subscribers=90".into(),
        "--environments=30".into(),
        "--updates=30".into(),
        "--interval-ms=10".into(),
        "--settle-s=0".into(),
        "--timeout-s=30".into(),
    ]);
    assert_eq!(report["expected"], 90, "{report:#}");
    assert_eq!(report["delivered"], 90, "{report:#}");
}

#[tokio::test]
async fn reconnect_storm_and_publish_load_report_counts() {
    let nats = Nats::start();
    let svc = Service::start(&nats.url());
    svc.wait_ready().await;
    let storm = bench(&[
        "subscribe".into(),
        format!("--addr={}", svc.addr),
        "--subscribers=300".into(),
        "--storm".into(),
        "--timeout-s=30".into(),
    ]);
    assert_eq!(storm["connected"], 300, "{storm:#}");
    assert_eq!(storm["first_event_ms"]["count"], 300, "{storm:#}");
    assert!(storm["storm_all_seconds"].is_number(), "{storm:#}");

    let load = bench(&[
        "publish".into(),
        format!("--addr={}", svc.addr),
        "--concurrency=4".into(),
        "--duration-s=1".into(),
    ]);
    let requests = load["requests"].as_u64().expect("requests");
    assert!(requests > 0, "{load:#}");
    assert_eq!(load["statuses"]["200"].as_u64(), Some(requests), "{load:#}");
}

/// The broker floor makes real conditional writes: every one acknowledged, none refused (each
/// writer follows its own subject's sequence).
#[test]
fn broker_floor_makes_acknowledged_conditional_writes() {
    let nats = Nats::start();
    let report = bench(&[
        "broker-floor".to_owned(),
        format!("--nats={}", nats.url()),
        "--concurrency=4".to_owned(),
        "--duration-s=1".to_owned(),
    ]);
    assert!(
        report["acknowledged"].as_u64().expect("count") > 0,
        "{report}"
    );
    assert_eq!(report["refused"], 0, "{report}");
}
