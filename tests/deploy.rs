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

/// The binary's `--help`, with an empty environment.
fn help() -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_flagsmith-sse"))
        .arg("--help")
        .env_clear()
        .output()
        .expect("--help");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Every environment variable the binary reads, from its `--help`.
fn settings() -> BTreeSet<String> {
    let help = help();
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

/// The broker-neutral series (issue 13) that the dashboard and alerts are written against.
/// Until the service exports any `flagsmith_sse_broker_*` series these names are accepted
/// unexported; as soon as it exports one, every one of them must be exported.
const BROKER_SERIES: [&str; 3] = [
    "flagsmith_sse_broker_connected",
    "flagsmith_sse_broker_errors_total",
    "flagsmith_sse_broker_reconnects_total",
];

fn check_exported(exported: &BTreeSet<String>, name: &str, what: &str) {
    let broker_metrics_exist = exported
        .iter()
        .any(|n| n.starts_with("flagsmith_sse_broker_"));
    let pending = !broker_metrics_exist && BROKER_SERIES.contains(&name);
    assert!(
        pending || exported.contains(name),
        "{what} uses {name}, not exported: {exported:?}"
    );
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    let exported = exported_metrics().await;
    let dashboard: serde_json::Value =
        serde_json::from_str(&file("deploy/grafana/flagsmith-sse.json")).expect("dashboard JSON");
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            for name in referenced(target["expr"].as_str().expect("expr")) {
                check_exported(&exported, &name, "the dashboard");
                used.insert(name);
            }
        }
    }
    assert!(used.len() >= 15, "the dashboard references only {used:?}");

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
                check_exported(&exported, &name, "an alert");
                used.insert(name);
            }
            rules += 1;
        }
    }
    assert!(rules >= 6, "only {rules} alert rules");
    for name in BROKER_SERIES {
        assert!(
            used.contains(name),
            "neither dashboard nor alerts use {name}"
        );
    }
    let scrape: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&file("deploy/prometheus/prometheus.yml"))
            .expect("prometheus YAML");
    assert_eq!(
        scrape["scrape_configs"][0]["metrics_path"].as_str(),
        Some("/metricsz")
    );
}

/// Kubernetes scraping names its job after the discovery config (or a ServiceMonitor), not
/// `flagsmith-sse`: the dashboard selects job and instance by variables, and nothing
/// filters on a fixed job name; the process_* series, which every target exports, are kept
/// to targets that also export ours.
#[test]
fn dashboard_and_alerts_work_under_any_job_label() {
    let dashboard_text = file("deploy/grafana/flagsmith-sse.json");
    let alerts_text = file("deploy/prometheus/alerts.yml");
    for (what, text) in [("dashboard", &dashboard_text), ("alerts", &alerts_text)] {
        assert!(
            !text.contains("job=\"") && !text.contains("job=\\\""),
            "the {what} filters on a fixed job name"
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).expect("JSON");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(variables.contains(&"job") && variables.contains(&"instance"));
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    let alerts: serde_yaml_ng::Value = serde_yaml_ng::from_str(&alerts_text).expect("YAML");
    let alert_exprs: Vec<String> = alerts["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .map(|r| r["expr"].as_str().expect("expr").to_owned())
        .collect();
    for expr in &exprs {
        // Every selector of ours (name followed by a matcher) picks the chosen job and
        // instance.
        for (i, _) in expr
            .match_indices("flagsmith_sse_")
            .chain(expr.match_indices("process_"))
        {
            let rest = &expr[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let after = &rest[end..];
            let on_clause = expr[..i].ends_with("on (job, instance) ");
            assert!(
                on_clause || after.starts_with("{job=~\"$job\",instance=~\"$instance\""),
                "{expr}: {} is not filtered by $job and $instance",
                &rest[..end]
            );
        }
    }
    for expr in exprs.iter().chain(&alert_exprs) {
        if expr.contains("process_") {
            assert!(
                expr.contains("and on (job, instance) flagsmith_sse_ready"),
                "{expr}: process_* series of every target, not only ours"
            );
        }
    }
}

/// A Compose instance may hold as many subscribers as sockets, and its drain must finish
/// before Docker kills it.
fn check_compose_instance_limits(name: &str, service: &serde_yaml_ng::Value) {
    let hard = service["ulimits"]["nofile"]["hard"].as_u64().unwrap_or(0);
    assert!(hard >= 65_536, "{name}: nofile {hard}");
    let grace = service["stop_grace_period"]
        .as_str()
        .and_then(|g| flagsmith_sse::config::parse_duration(g).ok())
        .unwrap_or_default();
    assert!(
        grace > Duration::from_secs(10),
        "{name}: stop_grace_period {grace:?} does not outlast SHUTDOWN_TIMEOUT (10 s)"
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
        check_compose_instance_limits(&format!("{name:?}"), service);
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
    // The health check is the binary's own (it reads LISTEN_ADDR and TLS_CERT_FILE as
    // `serve` does), so the image needs no curl and no hard-coded port or scheme.
    assert!(
        docker.contains(r#"CMD ["/usr/local/bin/flagsmith-sse", "healthcheck", "--live"]"#),
        "HEALTHCHECK must run the binary's healthcheck"
    );
    assert!(docker.contains(
        "COPY --from=build /src/target/release/flagsmith-sse /usr/local/bin/flagsmith-sse"
    ));
    assert!(
        !docker.contains("curl"),
        "the image still installs or runs curl"
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

/// Flagsmith's chart (Flagsmith/flagsmith-charts e8b4d783, chart 0.81.0,
/// `charts/flagsmith/templates/deployment-sse.yaml` and `_sse_environment.yaml`) runs the
/// SSE image with `args: ["serve"]` on port 8000 and turns `sse.extraEnv` and
/// `sse.extraEnvFromSecret` into the container's environment. A Redis user's values keep
/// their REDIS_* settings there: ours must change the image and add nothing that overrides
/// them.
#[test]
fn helm_values_for_redis_users_change_only_the_image() {
    let values: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&file("deploy/helm/values-redis.yaml")).expect("YAML");
    let top: Vec<&str> = values
        .as_mapping()
        .expect("mapping")
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    assert_eq!(top, ["sse"]);
    let sse = values["sse"].as_mapping().expect("sse");
    let keys: Vec<&str> = sse.keys().filter_map(|k| k.as_str()).collect();
    assert_eq!(
        keys,
        ["image", "podAnnotations"],
        "anything else would replace what the release has"
    );
    let image = values["sse"]["image"].as_mapping().expect("image");
    let image_keys: Vec<&str> = image.keys().filter_map(|k| k.as_str()).collect();
    assert_eq!(image_keys, ["repository", "tag"]);
    check_scrape_annotations(&values["sse"]["podAnnotations"]);
    // The chart's own example, which the file repeats for the reader, uses settings this
    // service reads.
    let settings = settings();
    let text = file("deploy/helm/values-redis.yaml");
    for name in ["REDIS_HOST", "REDIS_PORT", "USE_CLUSTER_MODE"] {
        assert!(
            text.contains(&format!("#       {name}: ")),
            "{name} example"
        );
        assert!(settings.contains(name), "{name} is not a setting");
    }
    assert!(text.contains("extraEnvFromSecret:") && text.contains("REDIS_PASSWORD:"));
    assert!(
        text.contains("--reuse-values")
            && text.contains("-f my-values.yaml -f deploy/helm/values-redis.yaml"),
        "the upgrade command must keep the release's values"
    );
}

/// What the chart's Service and probes use (`service.sse.port`, liveness hard-coded).
const CHART_SSE_PORT: &str = "8000";

fn check_scrape_annotations(annotations: &serde_yaml_ng::Value) {
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(CHART_SSE_PORT)
    );
    assert_eq!(
        annotations["prometheus.io/path"].as_str(),
        Some("/metricsz")
    );
    let docker = file("Dockerfile");
    assert!(docker.contains(&format!("ENV LISTEN_ADDR=:{CHART_SSE_PORT}")));
}

/// The NATS user's values point at every node of the shipped JetStream cluster, with one
/// stream replica per node.
#[test]
fn helm_values_for_nats_users_match_the_shipped_nats_cluster() {
    let settings = settings();
    let values: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&file("deploy/helm/values-nats.yaml")).expect("YAML");
    let env = values["sse"]["extraEnv"].as_mapping().expect("extraEnv");
    for name in env.keys().filter_map(|k| k.as_str()) {
        assert!(settings.contains(name), "{name} is not a setting");
    }
    check_scrape_annotations(&values["sse"]["podAnnotations"]);
    let (statefulset, _) = nats_manifest();
    let replicas = statefulset["spec"]["replicas"].as_u64().expect("replicas");
    assert_eq!(
        values["sse"]["extraEnv"]["NATS_STREAM_REPLICAS"].as_str(),
        Some(replicas.to_string().as_str()),
        "one stream replica per NATS node"
    );
    let name = statefulset["metadata"]["name"].as_str().expect("name");
    let service = statefulset["spec"]["serviceName"]
        .as_str()
        .expect("serviceName");
    let want: Vec<String> = (0..replicas)
        .map(|i| format!("nats://{name}-{i}.{service}:4222"))
        .collect();
    let urls: Vec<&str> = values["sse"]["extraEnv"]["NATS_URL"]
        .as_str()
        .expect("NATS_URL")
        .split(',')
        .collect();
    assert_eq!(urls, want);
    // Kubernetes without the chart points at the same cluster.
    let docs: Vec<serde_yaml_ng::Value> =
        serde_yaml_ng::Deserializer::from_str(&file("deploy/k8s/flagsmith-sse.yaml"))
            .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
            .collect();
    let env: std::collections::BTreeMap<&str, &str> =
        docs[0]["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .filter_map(|v| Some((v["name"].as_str()?, v["value"].as_str()?)))
            .collect();
    assert_eq!(env["NATS_URL"].split(',').collect::<Vec<_>>(), want);
    assert_eq!(env["NATS_STREAM_REPLICAS"], replicas.to_string());
    let text = file("deploy/helm/values-nats.yaml");
    assert!(
        text.contains("--reuse-values")
            && text.contains("-f my-values.yaml -f deploy/helm/values-nats.yaml"),
        "the upgrade command must keep the release's values"
    );
}

/// The StatefulSet and the nats.conf of `deploy/k8s/nats-jetstream.yaml`.
fn nats_manifest() -> (serde_yaml_ng::Value, String) {
    let docs: Vec<serde_yaml_ng::Value> =
        serde_yaml_ng::Deserializer::from_str(&file("deploy/k8s/nats-jetstream.yaml"))
            .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
            .collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        ["ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget"]
    );
    let conf = docs[0]["data"]["nats.conf"]
        .as_str()
        .expect("nats.conf")
        .to_owned();
    assert_eq!(docs[1]["spec"]["clusterIP"].as_str(), Some("None"));
    (docs[2].clone(), conf)
}

/// The shipped nats.conf, run by real nats-server processes: three nodes, rewritten only
/// where one machine differs from three pods (host names, ports, directories). The service
/// configured as values-nats.yaml configures it gets ready, stores with three replicas, and
/// keeps taking writes and delivering them with a node killed.
#[tokio::test]
async fn the_shipped_nats_cluster_runs_jetstream_and_survives_a_node() {
    let (statefulset, conf) = nats_manifest();
    let replicas = statefulset["spec"]["replicas"].as_u64().expect("replicas") as usize;
    let name = statefulset["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_owned();
    let service = statefulset["spec"]["serviceName"]
        .as_str()
        .expect("serviceName")
        .to_owned();
    // The routes name exactly the StatefulSet's pods, by the headless Service's DNS.
    let routes: Vec<&str> = conf
        .split_whitespace()
        .filter(|w| w.starts_with("nats://"))
        .collect();
    let want: Vec<String> = (0..replicas)
        .map(|i| format!("nats://{name}-{i}.{service}:6222"))
        .collect();
    assert_eq!(routes, want, "cluster routes");
    let dir = tempfile::tempdir().expect("temp dir");
    let client: Vec<u16> = (0..replicas).map(|_| free_port()).collect();
    let cluster: Vec<u16> = (0..replicas).map(|_| free_port()).collect();
    let monitor: Vec<u16> = (0..replicas).map(|_| free_port()).collect();
    let mut nodes: Vec<std::process::Child> = Vec::new();
    for i in 0..replicas {
        let node_dir = dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&node_dir).expect("node dir");
        let mut local = conf
            .replace("0.0.0.0:4222", &format!("127.0.0.1:{}", client[i]))
            .replace("0.0.0.0:6222", &format!("127.0.0.1:{}", cluster[i]))
            .replace("0.0.0.0:8222", &format!("127.0.0.1:{}", monitor[i]))
            .replace("/data", &node_dir.display().to_string())
            .replace("/var/run/nats", &node_dir.display().to_string());
        for (j, port) in cluster.iter().enumerate() {
            local = local.replace(
                &format!("{name}-{j}.{service}:6222"),
                &format!("127.0.0.1:{port}"),
            );
        }
        assert!(
            !local.contains(&format!(".{service}:")),
            "a host name was left: {local}"
        );
        let path = node_dir.join("nats.conf");
        std::fs::write(&path, &local).expect("conf");
        let log = std::fs::File::create(node_dir.join("nats.log")).expect("log");
        nodes.push(
            std::process::Command::new(nats_server_binary())
                .arg("--config")
                .arg(&path)
                .env("POD_NAME", format!("{name}-{i}"))
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .expect("nats-server"),
        );
    }
    struct Killer(Vec<std::process::Child>);
    impl Drop for Killer {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let mut nodes = Killer(nodes);
    let logs = |dir: &std::path::Path| {
        (0..replicas)
            .map(|i| {
                std::fs::read_to_string(dir.join(format!("n{i}/nats.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    };

    let values: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&file("deploy/helm/values-nats.yaml")).expect("YAML");
    let stream_replicas = values["sse"]["extraEnv"]["NATS_STREAM_REPLICAS"]
        .as_str()
        .expect("NATS_STREAM_REPLICAS");
    let urls = client
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let svc = Service::start_with(&urls, &[("NATS_STREAM_REPLICAS", stream_replicas)]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while try_get(svc.addr, "/readyz").await.map(|r| r.status).ok() != Some(200) {
        for node in &mut nodes.0 {
            if let Ok(Some(status)) = node.try_wait() {
                panic!("a nats-server exited ({status}):\n{}", logs(dir.path()));
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready against the shipped cluster:\n{}\n{}",
            svc.log(),
            logs(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut sse = svc.subscribe("helm_nats").await;
    assert_eq!(svc.publish_until_ok("helm_nats", "100.5").await.status, 200);
    assert_eq!(sse.next_update(Duration::from_secs(10)).await, Some(100.5));

    // The stream as NATS reports it (monitoring endpoint of the shipped `http:` port).
    let jsz = get(
        format!("127.0.0.1:{}", monitor[0]).parse().expect("addr"),
        "/jsz?accounts=true&streams=true&config=true",
    )
    .await
    .json();
    let streams: Vec<&serde_json::Value> = jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
        .collect();
    let ours = streams
        .iter()
        .find(|s| s["name"] == "FLAGSMITH_SSE")
        .unwrap_or_else(|| panic!("no FLAGSMITH_SSE stream in {jsz}"));
    assert_eq!(
        ours["config"]["num_replicas"].as_u64(),
        Some(replicas as u64),
        "{ours}"
    );

    // A node lost (SIGKILL: no goodbye): writes are still acknowledged and delivered.
    let _ = nodes.0[0].kill();
    let _ = nodes.0[0].wait();
    let resp = svc.publish_until_ok("helm_nats", "101.5").await;
    assert_eq!(resp.status, 200, "{}", logs(dir.path()));
    assert_eq!(sse.next_update(Duration::from_secs(15)).await, Some(101.5));
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
    // The dashboard's queries, with its variables as Grafana expands "All", as recording
    // rules: promtool parses every one.
    let dashboard: serde_json::Value =
        serde_json::from_str(&file("deploy/grafana/flagsmith-sse.json")).expect("dashboard JSON");
    let mut recorded = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$job", ".+")
                .replace("$instance", ".+");
            recorded.push_str(&format!(
                "      - record: dashboard:query_{queries}\n        expr: {}\n",
                serde_json::Value::String(expr)
            ));
            queries += 1;
        }
    }
    let dashboard_rules = dir.path().join("dashboard.yml");
    std::fs::write(&dashboard_rules, recorded).expect("dashboard rules");
    for args in [
        vec!["check", "rules", rules.to_str().expect("utf-8")],
        vec!["check", "rules", dashboard_rules.to_str().expect("utf-8")],
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
        check_compose_instance_limits(&format!("{name:?}"), service);
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

/// The Kubernetes scrape job keeps exactly the pods our annotations mark, and takes the
/// path and port from them. (Not given to `promtool check config`: Debian's promtool 2.42
/// is built without Kubernetes discovery and rejects `kubernetes_sd_configs`.)
#[test]
fn the_kubernetes_scrape_job_reads_the_annotations_the_values_set() {
    let config: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&file("deploy/prometheus/kubernetes-scrape.yml")).expect("YAML");
    let relabel = config["scrape_configs"][0]["relabel_configs"]
        .as_sequence()
        .expect("relabel_configs");
    let source = |i: usize| relabel[i]["source_labels"][0].as_str().unwrap_or("");
    // Prometheus turns `prometheus.io/scrape` into ..._prometheus_io_scrape.
    let meta = |annotation: &str| {
        format!(
            "__meta_kubernetes_pod_annotation_{}",
            annotation.replace(['.', '/'], "_")
        )
    };
    let values: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&file("deploy/helm/values-nats.yaml")).expect("YAML");
    let annotations = values["sse"]["podAnnotations"]
        .as_mapping()
        .expect("annotations");
    for key in annotations.keys().filter_map(|k| k.as_str()) {
        assert!(
            (0..relabel.len()).any(|i| relabel[i]["source_labels"]
                .as_sequence()
                .is_some_and(|s| s.iter().any(|l| l.as_str() == Some(meta(key).as_str())))),
            "nothing reads {key}"
        );
    }
    assert_eq!(source(0), meta("prometheus.io/scrape"));
    assert_eq!(relabel[0]["action"].as_str(), Some("keep"));
    assert_eq!(
        relabel[1]["target_label"].as_str(),
        Some("__metrics_path__")
    );
}

/// Every FROM is pinned (an exact tag and a digest); dependencies are built in a layer of
/// their own, before the sources are copied; the build context holds only what the COPY
/// lines use.
#[test]
fn the_dockerfile_pins_its_bases_caches_dependencies_and_sends_a_small_context() {
    let docker = file("Dockerfile");
    let froms: Vec<&str> = docker
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .map(|l| l.split(' ').next().unwrap_or(""))
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    for image in &froms {
        let (name, digest) = image.split_once("@sha256:").expect("pinned by digest");
        assert!(
            digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit()),
            "{image}"
        );
        let tag = name.split_once(':').expect("a tag").1;
        assert!(
            tag.chars().any(|c| c.is_ascii_digit()) && tag.contains(['.', '-']),
            "{image}: the tag must name an exact version"
        );
    }
    let position = |needle: &str| {
        docker
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in Dockerfile"))
    };
    let manifest = position("COPY Cargo.toml Cargo.lock ./");
    let sources = position("COPY src ./src");
    let deps_build = docker[manifest..sources]
        .find("cargo build --release --locked")
        .expect("a build of the dependencies before the sources are copied");
    assert!(manifest + deps_build < sources);
    assert!(docker[sources..].contains("cargo build --release --locked --bin flagsmith-sse"));
    assert!(
        docker[sources..].contains("touch src/main.rs src/lib.rs"),
        "COPY keeps old file times: without a touch cargo may keep the placeholder build"
    );

    let ignore = file(".dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(patterns.first(), Some(&"*"), "exclude everything first");
    let included: BTreeSet<&str> = patterns
        .iter()
        .filter_map(|p| p.strip_prefix('!'))
        .collect();
    let copied: BTreeSet<&str> = docker
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[..words.len() - 1].to_vec()
        })
        .collect();
    assert_eq!(
        included, copied,
        "the context must hold what COPY uses, nothing else"
    );
    for heavy in ["target", "e2e", ".git"] {
        assert!(!included.contains(heavy));
    }
}

/// Runs `flagsmith-sse healthcheck` with exactly `env`: no token, no broker settings.
fn healthcheck(env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flagsmith-sse"))
        .arg("healthcheck")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("healthcheck");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim_end().lines().count(), 1, "one line: {text:?}");
    if !out.status.success() {
        // Docker reads 1 as unhealthy; 2 is reserved.
        assert_eq!(out.status.code(), Some(1), "{text}");
    }
    (out.status.success(), text)
}

/// Against a live service over plain HTTP: ready while NATS is up; not ready (exit 1,
/// saying 503) once NATS is killed, while `--live` still passes; a refused connection
/// after the service is gone. LISTEN_ADDR is given as the image gives it (`:port`), which
/// means every interface and is reached on loopback.
#[tokio::test]
async fn healthcheck_asks_the_plain_service_and_reports_its_readiness() {
    let mut nats = Nats::start();
    let svc = Service::start(&nats.url());
    svc.wait_ready().await;
    let listen = format!(":{}", svc.addr.port());
    let env = [("LISTEN_ADDR", listen.as_str())];

    let (ok, text) = healthcheck(&env, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("/readyz") && text.contains("200"), "{text}");

    nats.stop();
    svc.wait_readyz(503, Duration::from_secs(30)).await;
    let (ok, text) = healthcheck(&env, &[]);
    assert!(!ok, "ready without its broker: {text}");
    assert!(text.contains("/readyz") && text.contains("503"), "{text}");
    let (ok, text) = healthcheck(&env, &["--live"]);
    assert!(ok, "{text}");
    assert!(text.contains("/livez") && text.contains("200"), "{text}");

    drop(svc);
    let (ok, text) = healthcheck(&env, &["--live"]);
    assert!(!ok, "{text}");
    assert!(text.contains("connecting to 127.0.0.1:"), "{text}");
}

/// Against a live HTTPS service: with the same TLS_CERT_FILE and TLS_KEY_FILE as the
/// service it speaks TLS and passes; without them it fails (plain HTTP on a TLS port);
/// with another certificate it fails (it accepts only the service's own); a TLS service
/// whose broker is unreachable is reported not ready.
#[tokio::test]
async fn healthcheck_speaks_tls_when_the_service_does() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write_cert = |name: &str| {
        let cert =
            rcgen::generate_simple_self_signed(vec!["sse.example.com".to_owned()]).expect("cert");
        let cert_path = dir.path().join(format!("{name}.crt"));
        let key_path = dir.path().join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.cert.pem()).expect("cert");
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("key");
        (
            cert_path.display().to_string(),
            key_path.display().to_string(),
        )
    };
    let (cert, key) = write_cert("service");
    let (other_cert, other_key) = write_cert("other");
    let tls = [
        ("TLS_CERT_FILE", cert.as_str()),
        ("TLS_KEY_FILE", key.as_str()),
    ];

    let ready = Service::start_with(
        "nats://127.0.0.1:1",
        &[("BROKER", "memory"), tls[0], tls[1]],
    );
    let listen = ready.addr.to_string();
    let (ok, text) = healthcheck(&[("LISTEN_ADDR", &listen), tls[0], tls[1]], &[]);
    assert!(ok, "{text}");
    assert!(text.contains("/readyz") && text.contains("200"), "{text}");
    let (ok, text) = healthcheck(&[("LISTEN_ADDR", &listen)], &[]);
    assert!(!ok, "plain HTTP answered on a TLS port: {text}");
    let (ok, text) = healthcheck(
        &[
            ("LISTEN_ADDR", &listen),
            ("TLS_CERT_FILE", &other_cert),
            ("TLS_KEY_FILE", &other_key),
        ],
        &[],
    );
    assert!(
        !ok,
        "accepted a certificate other than TLS_CERT_FILE's: {text}"
    );

    // NATS at an address where nothing listens: the service runs, but is never ready.
    let unready = Service::start_with("nats://127.0.0.1:1", &tls);
    let listen = unready.addr.to_string();
    let (ok, text) = healthcheck(&[("LISTEN_ADDR", &listen), tls[0], tls[1]], &[]);
    assert!(!ok, "ready without a broker: {text}");
    assert!(text.contains("503"), "{text}");
    let (ok, text) = healthcheck(&[("LISTEN_ADDR", &listen), tls[0], tls[1]], &["--live"]);
    assert!(ok, "{text}");
}

/// README's set-up commands are the scripts CI runs, and its `cargo run --release` works
/// (the package has two binaries: without `default-run` cargo refuses to choose).
#[test]
fn readme_commands_are_the_ones_ci_runs_and_cargo_run_works() {
    let readme = file("README.md");
    let blocks: Vec<&str> = readme
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|b| b.trim_start_matches("sh").trim())
        .collect();
    for command in ["bash scripts/run", "bash scripts/test"] {
        assert!(blocks.contains(&command), "README has no block `{command}`");
        let script = command.trim_start_matches("bash ");
        let syntax = std::process::Command::new("bash")
            .args(["-n", script])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("bash");
        assert!(syntax.success(), "{script} does not parse");
    }
    let ci = file(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == "exec bash scripts/test"),
        "CI does not run README's test command"
    );
    assert!(readme.contains("cargo run --release"));

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["run", "--release", "--locked", "--quiet", "--", "--help"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("SSE_AUTHENTICATION_TOKEN")
        .output()
        .expect("cargo run");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo run --release -- --help: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(help.contains("Usage: flagsmith-sse"), "{help}");
    assert!(help.contains("healthcheck"), "{help}");
}

/// The deployment guide's table of the settings every proxy is checked against states the
/// defaults the binary really has.
#[test]
fn the_deployment_guide_states_the_real_defaults() {
    let help = help();
    let guide = file("docs/deployment.md");
    let mut checked = 0;
    for line in guide.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, name, default, ..] = cells[..] else {
            continue;
        };
        let Some(name) = name.strip_prefix('`').and_then(|n| n.strip_suffix('`')) else {
            continue;
        };
        if !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            continue;
        }
        let real = help
            .split(&format!("[env: {name}="))
            .nth(1)
            .and_then(|rest| rest.split("[default: ").nth(1))
            .and_then(|rest| rest.split(']').next())
            .unwrap_or_else(|| panic!("{name}: no default in --help"));
        let stated = default.replace(' ', "");
        let real_seconds = flagsmith_sse::config::parse_duration(real).expect("duration");
        let stated_seconds = flagsmith_sse::config::parse_duration(&stated).expect("duration");
        assert_eq!(
            stated_seconds, real_seconds,
            "{name}: the guide says {default}, --help {real}"
        );
        checked += 1;
    }
    assert_eq!(checked, 4, "the guide's settings table");
}

/// The Redis generation end to end: the chart's own example values (which values-redis.yaml
/// repeats in its comments) with ours on top, turned into the container's environment as
/// the chart's `_sse_environment.yaml` does (`extraEnv` as strings, `extraEnvFromSecret`
/// from the secret; the harness adds the token as the chart does), against a redis-server
/// that requires the password. Only what differs on one machine is changed: the host, the
/// port, and cluster mode off (one server here). The service chooses Redis by itself, gets
/// ready, stores and delivers.
#[tokio::test]
async fn the_redis_users_values_run_the_service_on_their_password_protected_redis() {
    let text = file("deploy/helm/values-redis.yaml");
    let example: String = text
        .lines()
        .skip_while(|l| *l != "#   sse:")
        .map_while(|l| l.strip_prefix("#   "))
        .map(|l| format!("{l}\n"))
        .collect();
    let theirs: serde_yaml_ng::Value = serde_yaml_ng::from_str(&example).expect("example YAML");
    let ours: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("YAML");
    assert!(ours["sse"]["extraEnv"].is_null() && ours["sse"]["extraEnvFromSecret"].is_null());

    let password = "s3cret#?,@: x";
    let redis = Redis::start_with_auth(None, password, false);
    let port = redis.port.to_string();
    let mut env: Vec<(String, String)> = Vec::new();
    for (name, value) in theirs["sse"]["extraEnv"].as_mapping().expect("extraEnv") {
        let name = name.as_str().expect("name").to_owned();
        let value = match name.as_str() {
            "REDIS_HOST" => "127.0.0.1".to_owned(),
            "REDIS_PORT" => port.clone(),
            "USE_CLUSTER_MODE" => "false".to_owned(),
            _ => match value {
                serde_yaml_ng::Value::String(s) => s.clone(),
                other => serde_yaml_ng::to_string(other)
                    .expect("scalar")
                    .trim()
                    .to_owned(),
            },
        };
        env.push((name, value));
    }
    let secrets = theirs["sse"]["extraEnvFromSecret"]
        .as_mapping()
        .expect("extraEnvFromSecret");
    for (name, reference) in secrets {
        assert!(
            reference["secretName"].as_str().is_some() && reference["secretKey"].as_str().is_some()
        );
        assert_eq!(name.as_str(), Some("REDIS_PASSWORD"));
        env.push(("REDIS_PASSWORD".to_owned(), password.to_owned()));
    }
    let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "REDIS_HOST",
            "REDIS_PORT",
            "USE_CLUSTER_MODE",
            "REDIS_PASSWORD"
        ]
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let svc = Service::start_without_nats(&env);
    svc.wait_ready().await;
    let log = svc.log();
    assert!(
        log.contains("REDIS_HOST or REDIS_URL is set and NATS_URL is not")
            && log.contains("Redis connected"),
        "{log}"
    );
    let mut sse = svc.subscribe("helm_redis").await;
    assert_eq!(svc.publish("helm_redis", "200.5").await.status, 200);
    assert_eq!(sse.next_update(Duration::from_secs(10)).await, Some(200.5));
}
