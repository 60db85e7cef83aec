//! `flagsmith-sse-bench`: load and latency measurements against any running flagsmith-sse.
//!
//! `subscribe` holds N subscribers (HTTP/1.1, one connection each over several source
//! addresses, or HTTP/2 streams, K per connection) across worker processes, publishes
//! updates stamped with the current time and reports each delivery's latency, the server's
//! memory per subscriber and CPU per delivery. `publish` drives queue-change at a fixed
//! concurrency. See BENCHMARKS.md for the method and the figures.

mod broker_floor;
mod floor;
mod hist;
mod proc;
mod wire;
mod worker;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use hist::Histogram;
use worker::{WorkerReport, now_micros};

#[derive(Parser)]
#[command(
    name = "flagsmith-sse-bench",
    version,
    about = "Load and latency benchmarks for flagsmith-sse"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hold subscribers, publish updates, measure delivery.
    Subscribe(SubscribeArgs),
    /// Drive queue-change at a fixed concurrency.
    Publish(PublishArgs),
    /// Serve the physical floor: one thread writing one pre-encoded chunk per subscriber.
    Floor(floor::FloorArgs),
    /// The broker's floor for queue-change: the same conditional JetStream writes, no HTTP.
    BrokerFloor(broker_floor::BrokerFloorArgs),
    /// (internal) one worker process of `subscribe`.
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

#[derive(Clone, clap::Args)]
struct Target {
    /// The service's address (an IP literal and port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// queue-change token.
    #[arg(long, env = "SSE_AUTHENTICATION_TOKEN", hide_env_values = true)]
    token: String,
    /// The server's PID, to read its RSS and CPU time from /proc (same machine only).
    #[arg(long)]
    server_pid: Vec<u32>,
}

#[derive(clap::Args)]
struct SubscribeArgs {
    #[command(flatten)]
    target: Target,
    /// Other instances to spread subscribers over (round robin with --addr); publishing
    /// goes to --addr unless --publish-addr says otherwise.
    #[arg(long, value_delimiter = ',')]
    also: Vec<SocketAddr>,
    /// Post updates to this instance instead of --addr (to time an update crossing from
    /// one instance to subscribers of another).
    #[arg(long)]
    publish_addr: Option<SocketAddr>,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Use HTTP/2 (prior knowledge) streams instead of one HTTP/1.1 connection each.
    #[arg(long)]
    h2: bool,
    /// HTTP/2 streams per connection.
    #[arg(long, default_value_t = 1000)]
    streams_per_connection: usize,
    /// Spread subscribers (and updates) round robin over this many environments.
    #[arg(long, default_value_t = 1)]
    environments: usize,
    /// The environment's name when there is one.
    #[arg(long, default_value = "load_test")]
    env: String,
    #[arg(long, default_value_t = 10)]
    updates: usize,
    /// Pause between updates, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Publish at this many updates per second instead (on a fixed schedule).
    #[arg(long)]
    rate: Option<f64>,
    /// Connections per worker process (each process may hold at most 20,000 files).
    #[arg(long, default_value_t = 15_000)]
    connections_per_worker: usize,
    /// Subscribers per worker process, to spread client CPU.
    #[arg(long, default_value_t = 100_000)]
    subscribers_per_worker: usize,
    /// Source addresses 127.0.0.2 onwards; at least one per worker.
    #[arg(long, default_value_t = 0)]
    source_ips: usize,
    /// Handshakes in flight per worker; 0 connects everything at once.
    #[arg(long, default_value_t = 512)]
    connect_concurrency: usize,
    /// Reconnect storm: publish one update first, connect every subscriber at once, and
    /// measure until each holds that update.
    #[arg(long)]
    storm: bool,
    /// Stream-age churn: hold the subscribers this many seconds, reopening every stream the
    /// server ends (as SDKs do). The first third is idle (the server's CPU then is the cost
    /// of the churn alone); `--updates` are posted evenly over the rest.
    #[arg(long)]
    churn_s: Option<u64>,
    /// With `--churn-s`, reopen each HTTP/1.1 stream on the connection the server kept after
    /// the clean end, as the Go, iOS and Android SDKs' HTTP clients and browsers do
    /// (without it, a new connection per stream, as the Python, Ruby and Flutter SDKs do).
    #[arg(long)]
    reuse: bool,
    /// Give up waiting for connections or deliveries after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Seconds to wait after connecting before reading idle memory.
    #[arg(long, default_value_t = 2)]
    settle_s: u64,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(clap::Args)]
struct PublishArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    /// Environments posted to (each request goes to its connection's environment).
    #[arg(long, default_value_t = 64)]
    environments: usize,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Worker(args) => worker::run(args),
        Command::Subscribe(args) => runtime()?.block_on(subscribe(args)),
        Command::Publish(args) => runtime()?.block_on(publish_load(args)),
        Command::Floor(args) => floor::run(args),
        Command::BrokerFloor(args) => runtime()?.block_on(broker_floor::run(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// 127.0.0.2, 127.0.0.3, ... 127.0.0.251, then 127.0.1.2 and so on: all loopback.
fn source_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, (i / 250) as u8, (2 + i % 250) as u8))
}

/// Subscriber i listens to environment i % envs.
fn subscribers_per_env(subscribers: usize, envs: usize) -> Vec<u64> {
    let mut counts = vec![0u64; envs];
    for i in 0..subscribers {
        counts[i % envs] += 1;
    }
    counts
}

fn micros_text(micros: i64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// One keep-alive HTTP/1.1 connection for POSTing.
struct Poster {
    addr: SocketAddr,
    auth: String,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Poster {
    fn new(addr: SocketAddr, token: &str) -> Self {
        Self {
            addr,
            auth: format!("Token {token}"),
            sender: None,
        }
    }

    /// POSTs `updated_at` (µs) to `env`, once more on a fresh connection after a transport
    /// error (as Flagsmith's task processor retries); returns the status, or 0.
    async fn post(&mut self, env: &str, micros: i64) -> u16 {
        match self.post_once(env, micros).await {
            0 => self.post_once(env, micros).await,
            status => status,
        }
    }

    async fn post_once(&mut self, env: &str, micros: i64) -> u16 {
        if self.sender.is_none() {
            let Ok(tcp) = tokio::net::TcpStream::connect(self.addr).await else {
                return 0;
            };
            let _ = tcp.set_nodelay(true);
            let Ok((sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
            else {
                return 0;
            };
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let Some(sender) = self.sender.as_mut() else {
            return 0;
        };
        let request = hyper::Request::post(format!("/sse/environments/{env}/queue-change"))
            .header("host", self.addr.to_string())
            .header("authorization", &self.auth)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                "{{\"updated_at\": {}}}",
                micros_text(micros)
            ))));
        let Ok(request) = request else { return 0 };
        match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let _ = response.into_body().collect().await;
                status
            }
            Err(err) => {
                eprintln!("queue-change transport error: {err}");
                self.sender = None;
                0
            }
        }
    }
}

struct WorkerHandle {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    connected: tokio::sync::oneshot::Receiver<(usize, usize)>,
    result: tokio::sync::oneshot::Receiver<WorkerReport>,
}

fn spawn_worker(args: Vec<String>, progress: Arc<AtomicU64>) -> anyhow::Result<WorkerHandle> {
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .arg("worker")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting a worker")?;
    let stdin = child.stdin.take().context("worker stdin")?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    let (result_tx, result) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut connected_tx = Some(connected_tx);
        let mut result_tx = Some(result_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("connected ") {
                let mut parts = rest.split(' ').filter_map(|p| p.parse().ok());
                if let (Some(tx), Some(ok), Some(failed)) =
                    (connected_tx.take(), parts.next(), parts.next())
                {
                    let _ = tx.send((ok, failed));
                }
            } else if let Some(n) = line.strip_prefix("progress ") {
                if let Ok(n) = n.parse() {
                    progress.store(n, Ordering::Relaxed);
                }
            } else if let Some(json) = line.strip_prefix("result ")
                && let (Some(tx), Ok(report)) = (result_tx.take(), serde_json::from_str(json))
            {
                let _ = tx.send(report);
            }
        }
    });
    Ok(WorkerHandle {
        child,
        stdin,
        connected,
        result,
    })
}

async fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    let n = args.subscribers;
    if n == 0 {
        bail!("--subscribers must be at least 1");
    }
    let per_conn = if args.h2 {
        args.streams_per_connection.max(1)
    } else {
        1
    };
    let connections = n.div_ceil(per_conn);
    let workers = connections
        .div_ceil(args.connections_per_worker.max(1))
        .max(n.div_ceil(args.subscribers_per_worker.max(1)))
        .max(1);
    // Few connections per source address keep the kernel's ephemeral-port search short: it
    // slows sharply as one address's port range fills up.
    let ips = args
        .source_ips
        .max(workers)
        .max(connections.div_ceil(4_000));
    let envs: Vec<String> = if args.environments <= 1 {
        vec![args.env.clone()]
    } else {
        (0..args.environments)
            .map(|i| format!("bench_{i}"))
            .collect()
    };
    let targets: Vec<SocketAddr> = std::iter::once(args.target.addr)
        .chain(args.also.iter().copied())
        .collect();
    let since = now_micros();
    let mut poster = Poster::new(
        args.publish_addr.unwrap_or(args.target.addr),
        &args.target.token,
    );
    let mut published: Vec<(i64, usize)> = Vec::new();
    if args.storm {
        let ts = now_micros();
        let status = poster.post(&envs[0], ts).await;
        if status != 200 {
            bail!("publishing the storm's update failed: status {status}");
        }
        published.push((ts, 0));
    }
    let rss_before = proc::rss_bytes(&args.target.server_pid);
    let tcp_before = proc::tcp_buffer_bytes();
    let slab_before = proc::tcp_slab_bytes();

    // Subscribers are dealt out in whole connections; each worker gets its own addresses.
    let conns_per_worker = connections.div_ceil(workers);
    let mut handles = Vec::new();
    let mut progress = Vec::new();
    let started = Instant::now();
    let t0 = now_micros();
    for w in 0..workers {
        let first_conn = w * conns_per_worker;
        let last_conn = ((w + 1) * conns_per_worker).min(connections);
        if first_conn >= last_conn {
            break;
        }
        let first = first_conn * per_conn;
        let count = (last_conn * per_conn).min(n) - first;
        let my_ips: Vec<String> = (0..ips)
            .filter(|i| i % workers == w)
            .map(|i| source_ip(i).to_string())
            .collect();
        let counter = Arc::new(AtomicU64::new(0));
        progress.push(counter.clone());
        let target = targets[w % targets.len()];
        let mut wargs = vec![
            format!("--addr={target}"),
            format!("--first={first}"),
            format!("--subscribers={count}"),
            format!("--streams-per-connection={per_conn}"),
            format!("--source-ips={}", my_ips.join(",")),
            format!("--envs={}", envs.join(",")),
            format!("--since-micros={since}"),
            format!("--t0-micros={t0}"),
            format!(
                "--connect-concurrency={}",
                if args.storm {
                    0
                } else {
                    args.connect_concurrency
                }
            ),
        ];
        if args.h2 {
            wargs.push("--h2".into());
        }
        if args.churn_s.is_some() {
            wargs.push("--reconnect".into());
        }
        if args.reuse {
            wargs.push("--reuse".into());
        }
        handles.push(spawn_worker(wargs, counter)?);
    }
    let deadline = started + Duration::from_secs(args.timeout_s);
    let (mut connected, mut failed) = (0, 0);
    for handle in &mut handles {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, &mut handle.connected).await {
            Ok(Ok((ok, bad))) => {
                connected += ok;
                failed += bad;
            }
            _ => bail!(
                "a worker did not finish connecting within {} s",
                args.timeout_s
            ),
        }
    }
    let connect_time = started.elapsed();
    let total_events = || {
        progress
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let mut report = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "subscribers": n,
        "protocol": if args.h2 { "h2c" } else { "http/1.1" },
        "streams_per_connection": per_conn,
        "connections": connections,
        "workers": workers,
        "environments": envs.len(),
        "connected": connected,
        "failed": failed,
        "connect_seconds": connect_time.as_secs_f64(),
    });
    println!(
        "connected {connected}/{n} ({failed} failed) over {connections} connections, {workers} workers, in {:.2} s",
        connect_time.as_secs_f64()
    );

    let mut expected_total = 0u64;
    let mut cpu_window = None;
    if args.storm {
        expected_total = connected as u64;
        let all = wait_until(deadline, || total_events() >= expected_total).await;
        let elapsed = started.elapsed();
        println!(
            "storm: {} of {expected_total} hold the update {:.3} s after the worker processes were started (50 ms resolution){}",
            total_events(),
            elapsed.as_secs_f64(),
            if all { "" } else { " (TIMED OUT)" }
        );
        report["storm_all_seconds"] = serde_json::json!(if all {
            Some(elapsed.as_secs_f64())
        } else {
            None
        });
    } else {
        tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
        let rss_idle = proc::rss_bytes(&args.target.server_pid);
        if let (Some(before), Some(idle)) = (rss_before, rss_idle) {
            let per = (idle as f64 - before as f64) / connected.max(1) as f64;
            println!(
                "server RSS {:.1} MiB -> {:.1} MiB idle: {:.0} bytes ({:.2} KiB) per subscriber",
                before as f64 / 1048576.0,
                idle as f64 / 1048576.0,
                per,
                per / 1024.0
            );
            report["rss_before_bytes"] = before.into();
            report["rss_idle_bytes"] = idle.into();
            report["rss_bytes_per_subscriber"] = per.into();
        }
        // User-space RSS leaves out the kernel's socket buffers; servers are compared with
        // both. On loopback the machine-wide figure holds both ends of every connection.
        if let (Some(before), Some(idle)) = (tcp_before, proc::tcp_buffer_bytes()) {
            let per = (idle as f64 - before as f64) / connected.max(1) as f64;
            println!(
                "kernel TCP buffers (machine-wide, both ends on loopback) {:.1} MiB -> {:.1} MiB: {:.0} bytes per subscriber",
                before as f64 / 1048576.0,
                idle as f64 / 1048576.0,
                per
            );
            report["kernel_tcp_buffer_bytes_per_subscriber"] = per.into();
        }
        if let (Some(before), Some(idle)) = (slab_before, proc::tcp_slab_bytes()) {
            let per = (idle as f64 - before as f64) / connected.max(1) as f64;
            println!(
                "kernel TCP socket objects (slab TCP + sock_inode_cache, machine-wide, both ends on loopback): {per:.0} bytes per subscriber"
            );
            report["kernel_socket_slab_bytes_per_subscriber"] = per.into();
        }
        let mut interval = Duration::from_millis(args.interval_ms);
        if let Some(churn_s) = args.churn_s {
            let idle = Duration::from_secs(churn_s / 3);
            let cpu_before = proc::cpu_micros(&args.target.server_pid);
            tokio::time::sleep(idle).await;
            if let Some((before, after)) = cpu_before.zip(proc::cpu_micros(&args.target.server_pid))
            {
                let share = (after - before) as f64 / 1e6 / idle.as_secs_f64();
                println!(
                    "server CPU while idle (streams ending and reopening, no updates) over {} s: {:.2} % of one core",
                    idle.as_secs(),
                    share * 100.0
                );
                report["idle_cpu_share_of_one_core"] = share.into();
            }
            interval = Duration::from_secs(churn_s - churn_s / 3) / args.updates.max(1) as u32;
        }
        let churn_started = Instant::now();
        let cpu_before = proc::cpu_micros(&args.target.server_pid);
        let per_env = subscribers_per_env(n, envs.len());
        let schedule = Instant::now();
        for u in 0..args.updates {
            if let Some(rate) = args.rate {
                let at = schedule + Duration::from_secs_f64(u as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
            }
            let env = u % envs.len();
            let ts = now_micros();
            let status = poster.post(&envs[env], ts).await;
            // 2xx: the service answers 200, nchan's publisher 201 or 202.
            if (200..300).contains(&status) {
                published.push((ts, env));
                expected_total += per_env[env];
            } else {
                eprintln!("update {u}: queue-change answered {status}");
            }
            if (u + 1 < args.updates || args.churn_s.is_some()) && args.rate.is_none() {
                tokio::time::sleep(interval).await;
            }
        }
        let deliver_deadline = Instant::now() + Duration::from_secs(args.timeout_s);
        let all = wait_until(deliver_deadline, || total_events() >= expected_total).await;
        if !all {
            println!("deliveries: timed out waiting; reporting what arrived");
        }
        cpu_window = cpu_before.zip(proc::cpu_micros(&args.target.server_pid));
        report["churn_window_seconds"] = churn_started.elapsed().as_secs_f64().into();
    }

    // Collect and merge the workers' reports.
    let mut merged: HashMap<i64, Histogram> = HashMap::new();
    let mut first_event = Histogram::default();
    let (mut reconnects, mut holding) = (0u64, HashMap::<i64, u64>::new());
    let held_for = started.elapsed() - connect_time;
    for handle in &mut handles {
        let _ = handle.stdin.write_all(b"finish\n").await;
        let _ = handle.stdin.flush().await;
    }
    for handle in &mut handles {
        let part = tokio::time::timeout(Duration::from_secs(60), &mut handle.result)
            .await
            .context("worker report timed out")?
            .context("worker ended without a report")?;
        for (ts, hist) in part.per_update {
            merged.entry(ts).or_default().merge(&hist);
        }
        first_event.merge(&part.first_event);
        reconnects += part.reconnects;
        for (at, count) in part.holding {
            *holding.entry(at).or_default() += count;
        }
        let _ = handle.child.wait().await;
    }
    if args.churn_s.is_some() {
        let per_second = reconnects as f64 / held_for.as_secs_f64();
        let newest = published.iter().map(|(ts, _)| *ts).max();
        let hold_newest = newest.map_or(0, |ts| holding.get(&ts).copied().unwrap_or(0));
        println!(
            "churn: {reconnects} streams reopened in {:.0} s ({per_second:.0} per second); {hold_newest} of {connected} subscribers hold the newest update at the end",
            held_for.as_secs_f64()
        );
        report["reconnects"] = reconnects.into();
        report["reconnects_per_second"] = per_second.into();
        report["holding_newest"] = hold_newest.into();
    }

    if args.storm {
        println!(
            "time to hold the latest update, from the start of the worker processes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(first_event.quantile(0.5)),
            ms(first_event.quantile(0.99)),
            ms(first_event.max)
        );
        report["first_event_ms"] = serde_json::json!({
            "p50": ms(first_event.quantile(0.5)), "p90": ms(first_event.quantile(0.9)),
            "p99": ms(first_event.quantile(0.99)), "max": ms(first_event.max), "count": first_event.count,
        });
    } else {
        let mut all = Histogram::default();
        let mut rows = Vec::new();
        let mut delivered = 0u64;
        let per_env = subscribers_per_env(n, envs.len());
        for (i, (ts, env)) in published.iter().enumerate() {
            let hist = merged.remove(ts).unwrap_or_default();
            let expected = per_env[*env];
            delivered += hist.count;
            if published.len() <= 20 {
                println!(
                    "update {:>3}: delivered {}/{} p50 {:.1} ms p90 {:.1} ms p99 {:.1} ms max (all delivered) {:.1} ms",
                    i + 1,
                    hist.count,
                    expected,
                    ms(hist.quantile(0.5)),
                    ms(hist.quantile(0.9)),
                    ms(hist.quantile(0.99)),
                    ms(hist.max)
                );
            }
            rows.push(serde_json::json!({
                "delivered": hist.count, "expected": expected,
                "p50_ms": ms(hist.quantile(0.5)), "p99_ms": ms(hist.quantile(0.99)), "max_ms": ms(hist.max),
            }));
            let mut packed = hist.clone();
            packed.pack();
            all.merge(&packed);
        }
        let unexpected: u64 = merged.values().map(|h| h.count).sum();
        println!(
            "all updates: delivered {delivered}/{expected_total} ({:.3}%), latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms{}",
            100.0 * delivered as f64 / expected_total.max(1) as f64,
            ms(all.quantile(0.5)),
            ms(all.quantile(0.9)),
            ms(all.quantile(0.99)),
            ms(all.max),
            if unexpected > 0 {
                format!(" ({unexpected} events for timestamps not published by this run)")
            } else {
                String::new()
            }
        );
        report["updates"] = rows.into();
        report["delivered"] = delivered.into();
        report["expected"] = expected_total.into();
        report["latency_ms"] = serde_json::json!({
            "p50": ms(all.quantile(0.5)), "p90": ms(all.quantile(0.9)),
            "p99": ms(all.quantile(0.99)), "max": ms(all.max),
        });
        if let Some((before, after)) = cpu_window {
            let per = (after - before) as f64 / delivered.max(1) as f64;
            println!(
                "server CPU during updates: {:.3} s, {:.2} µs per delivered event, {:.1} µs per update (its queue-change included)",
                (after - before) as f64 / 1e6,
                per,
                (after - before) as f64 / published.len().max(1) as f64
            );
            report["server_cpu_seconds"] = ((after - before) as f64 / 1e6).into();
            report["server_cpu_us_per_delivery"] = per.into();
        }
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

async fn publish_load(args: PublishArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(args.duration_s);
    let cpu_before = proc::cpu_micros(&args.target.server_pid);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.concurrency {
        let (addr, token) = (args.target.addr, args.target.token.clone());
        let env = format!("bench_pub_{}", c % args.environments.max(1));
        tasks.push(tokio::spawn(async move {
            let mut poster = Poster::new(addr, &token);
            let mut hist = Histogram::default();
            let mut statuses: HashMap<u16, u64> = HashMap::new();
            while Instant::now() < deadline {
                let sent = Instant::now();
                let status = poster.post(&env, now_micros()).await;
                hist.record(sent.elapsed().as_micros() as u64);
                *statuses.entry(status).or_default() += 1;
                if status == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            hist.pack();
            (hist, statuses)
        }));
    }
    let mut all = Histogram::default();
    let mut statuses: HashMap<u16, u64> = HashMap::new();
    for task in tasks {
        let (hist, st) = task.await?;
        all.merge(&hist);
        for (k, v) in st {
            *statuses.entry(k).or_default() += v;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = statuses
        .iter()
        .filter(|(s, _)| (200..300).contains(*s))
        .map(|(_, c)| c)
        .sum::<u64>();
    let mut codes: Vec<_> = statuses.iter().collect();
    codes.sort();
    println!(
        "queue-change: {} requests in {:.1} s at concurrency {}: {:.0} acknowledged/s; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.1} ms; statuses {:?}",
        all.count,
        elapsed,
        args.concurrency,
        ok as f64 / elapsed,
        ms(all.quantile(0.5)),
        ms(all.quantile(0.9)),
        ms(all.quantile(0.99)),
        ms(all.max),
        codes
    );
    let mut report = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "requests": all.count, "seconds": elapsed, "acknowledged_per_second": ok as f64 / elapsed,
        "latency_ms": {"p50": ms(all.quantile(0.5)), "p90": ms(all.quantile(0.9)), "p99": ms(all.quantile(0.99)), "max": ms(all.max)},
        "statuses": statuses.iter().map(|(k, v)| (k.to_string(), *v)).collect::<HashMap<_, _>>(),
    });
    if let Some((before, after)) = cpu_before.zip(proc::cpu_micros(&args.target.server_pid)) {
        let per = (after - before) as f64 / all.count.max(1) as f64;
        println!(
            "server CPU: {:.2} s, {per:.1} µs per request",
            (after - before) as f64 / 1e6
        );
        report["server_cpu_us_per_request"] = per.into();
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
