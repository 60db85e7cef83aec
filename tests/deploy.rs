//! The deployment files (Dockerfile, compose, Kubernetes, systemd, Prometheus alerts,
//! Grafana dashboard) must match the service they deploy: real settings, real ports, real
//! metrics. No container engine runs here, so this checks what can be checked by reading.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

fn file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every environment variable the binary reads, from its `--help`.
fn settings() -> BTreeSet<String> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_flagsmith-sse"))
        .arg("--help")
        .env_clear()
        .output()
        .expect("--help");
    let help = String::from_utf8_lossy(&output.stdout);
    let names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 15, "{names:?}");
    names
}

/// Every metric name `/metricsz` exports (histograms with their series suffixes).
async fn exported_metrics() -> BTreeSet<String> {
    let svc = Service::start_with("nats://127.0.0.1:1", &[("BROKER", "memory")]);
    svc.wait_readyz(200, Duration::from_secs(5)).await;
    let text = get(svc.addr, "/metricsz").await.body;
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// Metric names a PromQL expression refers to (ours and the process_* ones).
fn referenced(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("flagsmith_sse_") || w.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

fn port_of(listen_addr: &str) -> u16 {
    listen_addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    let exported = exported_metrics().await;
    let dashboard: serde_json::Value =
        serde_json::from_str(&file("deploy/grafana/flagsmith-sse.json")).expect("dashboard JSON");
    let mut used = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            for name in referenced(target["expr"].as_str().expect("expr")) {
                assert!(
                    exported.contains(&name),
                    "dashboard uses {name}, not exported: {exported:?}"
                );
                used += 1;
            }
        }
    }
    assert!(used >= 15, "the dashboard references only {used} metrics");

    let alerts: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&file("deploy/prometheus/alerts.yml")).expect("alerts YAML");
    let mut rules = 0;
    for group in alerts["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            assert!(rule["alert"].as_str().is_some_and(|a| !a.is_empty()));
            let expr = rule["expr"].as_str().expect("expr");
            let names = referenced(expr);
            assert!(!names.is_empty(), "{expr}");
            for name in names {
                assert!(exported.contains(&name), "alert uses {name}, not exported");
            }
            rules += 1;
        }
    }
    assert!(rules >= 6, "only {rules} alert rules");
    let scrape: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&file("deploy/prometheus/prometheus.yml"))
            .expect("prometheus YAML");
    assert_eq!(
        scrape["scrape_configs"][0]["metrics_path"].as_str(),
        Some("/metricsz")
    );
}

#[test]
fn compose_runs_nats_with_jetstream_two_instances_and_prometheus() {
    let settings = settings();
    let compose: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&file("docker-compose.yml")).expect("compose YAML");
    let services = compose["services"].as_mapping().expect("services");
    let nats = &compose["services"]["nats"];
    assert!(
        nats["command"]
            .as_sequence()
            .expect("command")
            .iter()
            .any(|a| a.as_str() == Some("-js"))
    );
    assert!(services.contains_key("prometheus"));
    let scrape = file("deploy/prometheus/prometheus.yml");
    let mut instances = 0;
    for (name, service) in services {
        let Some(env) = service["environment"].as_mapping() else {
            continue;
        };
        instances += 1;
        for key in env.keys() {
            let key = key.as_str().expect("key");
            assert!(
                settings.contains(key),
                "{name:?} sets {key}, which the service does not read"
            );
        }
        let port = port_of(
            env.get("LISTEN_ADDR")
                .and_then(|v| v.as_str())
                .expect("LISTEN_ADDR"),
        );
        let mapping = service["ports"][0].as_str().expect("ports");
        assert!(
            mapping.ends_with(&format!(":{port}")),
            "{mapping} does not publish port {port}"
        );
        assert!(
            scrape.contains(&format!("{}:{port}", name.as_str().expect("name"))),
            "Prometheus does not scrape {name:?}"
        );
        assert!(
            env.get("NATS_URL")
                .and_then(|v| v.as_str())
                .is_some_and(|u| u.contains("nats:4222"))
        );
    }
    assert_eq!(instances, 2);
}

#[test]
fn kubernetes_manifests_probe_the_right_paths_and_outlast_the_drain() {
    let settings = settings();
    let docs: Vec<serde_yaml_ng::Value> =
        serde_yaml_ng::Deserializer::from_str(&file("deploy/k8s/flagsmith-sse.yaml"))
            .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
            .collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["Deployment", "Service", "PodDisruptionBudget"]);
    let pod = &docs[0]["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["args"][0].as_str(), Some("serve"));
    let mut env = std::collections::BTreeMap::new();
    for var in container["env"].as_sequence().expect("env") {
        let name = var["name"].as_str().expect("name");
        assert!(
            settings.contains(name),
            "the Deployment sets {name}, which the service does not read"
        );
        env.insert(name, var["value"].as_str().unwrap_or(""));
    }
    assert!(env.contains_key("SSE_AUTHENTICATION_TOKEN"));
    let port = port_of(env["LISTEN_ADDR"]);
    assert_eq!(
        container["ports"][0]["containerPort"].as_u64(),
        Some(u64::from(port))
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/livez")
    );
    let shutdown =
        flagsmith_sse::config::parse_duration(env["SHUTDOWN_TIMEOUT"]).expect("duration");
    let drain = flagsmith_sse::config::parse_duration(env["DRAIN_WINDOW"]).expect("duration");
    assert!(
        drain < shutdown,
        "DRAIN_WINDOW must end before SHUTDOWN_TIMEOUT"
    );
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    assert!(
        Duration::from_secs(grace) > shutdown,
        "grace {grace}s does not outlast SHUTDOWN_TIMEOUT {shutdown:?}"
    );
    assert!(docs[2]["spec"]["minAvailable"].as_u64().is_some());
}

#[test]
fn dockerfile_and_systemd_unit_match_the_service() {
    let settings = settings();
    let docker = file("Dockerfile");
    let listen = docker
        .lines()
        .find_map(|l| l.strip_prefix("ENV LISTEN_ADDR="))
        .expect("ENV LISTEN_ADDR");
    let port = port_of(listen);
    // Flagsmith's chart probes 8000 (hard-coded for liveness); its own image serves there.
    assert_eq!(
        port, 8000,
        "the image must listen where Flagsmith's chart probes"
    );
    assert!(docker.lines().any(|l| l == format!("EXPOSE {port}")));
    assert!(
        docker.contains(&format!("http://127.0.0.1:{port}/livez")),
        "HEALTHCHECK must probe /livez"
    );
    let user = docker
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(user != "root" && user != "0", "runs as root");
    assert!(docker.contains("CMD [\"serve\"]"));

    let unit = file("deploy/systemd/flagsmith-sse.service");
    let mut keys = 0;
    for line in unit.lines() {
        if let Some(assignment) = line.strip_prefix("Environment=") {
            let key = assignment.split('=').next().expect("key");
            assert!(
                settings.contains(key),
                "the unit sets {key}, which the service does not read"
            );
            keys += 1;
        }
    }
    assert!(keys >= 2);
    let nofile: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .and_then(|v| v.parse().ok())
        .expect("LimitNOFILE");
    assert!(nofile >= 65_536);
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.parse().ok())
        .expect("TimeoutStopSec");
    assert!(
        stop > 10,
        "TimeoutStopSec must outlast the default SHUTDOWN_TIMEOUT of 10 s"
    );
}

/// Flagsmith's chart (`charts/flagsmith/templates/deployment-sse.yaml`) runs the SSE image
/// with `args: ["serve"]` on port 8000: switching to this service changes the image and
/// says where updates are stored, nothing else.
#[test]
fn helm_values_for_flagsmiths_chart_change_only_the_image() {
    let settings = settings();
    let values: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&file("deploy/helm/values-flagsmith-sse.yaml")).expect("YAML");
    let top: Vec<&str> = values
        .as_mapping()
        .expect("mapping")
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    assert_eq!(top, ["sse"]);
    let sse = values["sse"].as_mapping().expect("sse");
    let keys: Vec<&str> = sse.keys().filter_map(|k| k.as_str()).collect();
    assert_eq!(keys, ["enabled", "image", "extraEnv"]);
    assert!(values["sse"]["image"]["repository"].as_str().is_some());
    let env = values["sse"]["extraEnv"].as_mapping().expect("extraEnv");
    let names: Vec<&str> = env.keys().filter_map(|k| k.as_str()).collect();
    assert_eq!(names, ["NATS_URL"], "only where updates are stored");
    for name in names {
        assert!(settings.contains(name), "{name} is not a setting");
    }
}

/// Prometheus's own checker (`promtool`, Debian's `prometheus` package, installed by
/// `scripts/test`) accepts what the service exports and the files deploy/ ships.
#[tokio::test]
async fn promtool_accepts_the_metrics_the_rules_and_the_config() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("promtool not found: install Debian's prometheus (scripts/test does)");
    let svc = Service::start_with("nats://127.0.0.1:1", &[("BROKER", "memory")]);
    svc.wait_readyz(200, Duration::from_secs(5)).await;
    // Some traffic first, so that histograms and counters have values, not only zeros.
    let _ = get(svc.addr, "/livez").await;
    let text = get(svc.addr, "/metricsz").await.body;
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let rules = dir.path().join("alerts.yml");
    std::fs::write(&rules, file("deploy/prometheus/alerts.yml")).expect("rules");
    let config = file("deploy/prometheus/prometheus.yml")
        .replace("/etc/prometheus/alerts.yml", &rules.display().to_string());
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, config).expect("config");
    for args in [
        vec!["check", "rules", rules.to_str().expect("utf-8")],
        vec!["check", "config", config_path.to_str().expect("utf-8")],
    ] {
        let out = Command::new(promtool)
            .args(&args)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The Redis variant is configured as Flagsmith's own Redis image is: REDIS_HOST and
/// REDIS_PORT, no NATS, so the service chooses Redis by itself.
#[test]
fn the_redis_compose_file_configures_instances_as_flagsmiths_image() {
    let settings = settings();
    let compose: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&file("docker-compose.redis.yml")).expect("compose YAML");
    let services = compose["services"].as_mapping().expect("services");
    assert!(services.contains_key("redis"));
    let mut instances = 0;
    for (name, service) in services {
        let Some(env) = service["environment"].as_mapping() else {
            continue;
        };
        instances += 1;
        let keys: Vec<&str> = env.keys().filter_map(|k| k.as_str()).collect();
        for key in &keys {
            assert!(
                settings.contains(*key),
                "{name:?} sets {key}, which the service does not read"
            );
        }
        assert!(
            keys.contains(&"REDIS_HOST") && keys.contains(&"REDIS_PORT"),
            "{keys:?}"
        );
        assert!(
            !keys.contains(&"NATS_URL") && !keys.contains(&"BROKER"),
            "{keys:?}"
        );
        let port = port_of(
            env.get("LISTEN_ADDR")
                .and_then(|v| v.as_str())
                .expect("LISTEN_ADDR"),
        );
        assert_eq!(port, 8000);
    }
    assert_eq!(instances, 2);
}
