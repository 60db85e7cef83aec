//! Test harness: real `nats-server` processes and real `flagsmith-sse` processes.
//!
//! Every NATS server gets a random port (`-p -1`), a temporary store and a ports file to
//! learn the port; every service listens on port 0 and prints its address. Nothing is
//! shared between tests, so they run in parallel.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub const TOKEN: &str = "test-token";

/// The `nats-server` binary: `$NATS_SERVER` if set (CI points it at each version we
/// support), else the one on PATH or Debian's.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return path.into();
    }
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/bin"])
    {
        let candidate = Path::new(dir).join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("nats-server not found: install Debian's nats-server or set NATS_SERVER");
}

pub struct Nats {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
    extra_args: Vec<String>,
}

impl Nats {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// `extra` are more nats-server arguments, e.g. `["--auth", "secret"]`.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nats = Nats {
            dir,
            child: None,
            port: 0,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        nats.spawn("-1");
        nats
    }

    fn spawn(&mut self, port: &str) {
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        let log = std::fs::File::create(self.dir.path().join("nats.log")).expect("log file");
        let child = Command::new(nats_server_binary())
            .args(["-js", "-a", "127.0.0.1", "-p", port, "-sd"])
            .arg(self.dir.path().join("store"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        let ports_file = ports_dir.join(format!("nats-server_{}.ports", child.id()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ports_file)
                && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(url) = json["nats"][0].as_str()
            {
                self.port = url
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("port in ports file");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with an empty store, as a server whose disk was
    /// lost comes back.
    pub fn restart_empty(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path().join("store"));
        let port = self.port.to_string();
        self.spawn(&port);
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port.to_string();
        self.spawn(&port);
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Service {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Service {
    pub fn start(nats_url: &str) -> Self {
        Self::start_with(nats_url, &[])
    }

    pub fn start_with(nats_url: &str, env: &[(&str, &str)]) -> Self {
        Self::start_wrapped(nats_url, "", env)
    }

    /// Starts the service through `sh -c "<shell_prefix> exec flagsmith-sse"`, e.g. to set
    /// resource limits first.
    pub fn start_wrapped(nats_url: &str, shell_prefix: &str, env: &[(&str, &str)]) -> Self {
        Self::start_command(shell_prefix, Some(nats_url), env)
    }

    fn start_command(shell_prefix: &str, nats_url: Option<&str>, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("{shell_prefix} exec \"$0\""))
            .arg(env!("CARGO_BIN_EXE_flagsmith-sse"))
            .env_clear()
            .envs(nats_url.map(|url| ("NATS_URL", url)))
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("SSE_AUTHENTICATION_TOKEN", TOKEN)
            .env("LOG_LEVEL", "debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start flagsmith-sse");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("flagsmith-sse listening on ") {
                    let _ = addr_tx.send(addr.trim().to_owned());
                }
                let mut log = sink.lock().expect("log");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr.parse().expect("listen address"),
            Err(_) => panic!("service did not start:\n{}", log.lock().expect("log")),
        };
        Service { child, addr, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `/readyz` says 200.
    pub async fn wait_ready(&self) {
        self.wait_readyz(200, Duration::from_secs(30)).await;
    }

    pub async fn wait_readyz(&self, want: u16, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(resp) = try_get(self.addr, "/readyz").await
                && resp.status == want
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz never said {want}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `/metricsz` shows `series` at `value`.
    pub async fn wait_metric(&self, series: &str, value: f64) {
        eventually_async(
            Duration::from_secs(10),
            &format!("{series} to be {value}"),
            async || metric(&get(self.addr, "/metricsz").await.body, series) == value,
        )
        .await;
    }

    pub async fn publish(&self, key: &str, updated_at: &str) -> Resp {
        let body = format!("{{\"updated_at\": {updated_at}}}");
        post(
            self.addr,
            &format!("/sse/environments/{key}/queue-change"),
            Some(TOKEN),
            &body,
        )
        .await
    }

    pub async fn subscribe(&self, key: &str) -> Sse {
        Sse::connect_h1(self.addr, key).await
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

pub async fn send_h1(addr: SocketAddr, request: Request<Full<Bytes>>) -> Result<Resp, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

pub async fn try_get(addr: SocketAddr, path: &str) -> Result<Resp, String> {
    let request = Request::get(path)
        .header("host", addr.to_string())
        .body(Full::default())
        .expect("request");
    send_h1(addr, request).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    try_get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

pub async fn post(addr: SocketAddr, path: &str, token: Option<&str>, body: &str) -> Resp {
    let mut request = Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Token {token}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    send_h1(addr, request)
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// One SSE subscriber. A background task reads the body and splits it into blocks (an
/// event or a comment, each ended by a blank line).
pub struct Sse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub version: http::Version,
    /// Blocks in order; an `Err` last when the stream did not end cleanly.
    blocks: mpsc::UnboundedReceiver<Result<String, String>>,
    _keep: Box<dyn std::any::Any + Send>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Sse {
    /// Closes the connection, as a client going away does.
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Sse {
    pub async fn connect_h1(addr: SocketAddr, key: &str) -> Sse {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self::over_h1(stream, addr, key).await
    }

    pub async fn over_h1<I>(io: I, addr: SocketAddr, key: &str) -> Sse
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .expect("handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        // Origin-form, as browsers and SDKs send it, so that the fast path serves it (an
        // absolute URI is served by hyper).
        let request = stream_request(addr, key, "");
        let response = sender.send_request(request).await.expect("stream request");
        Self::from_response(response, Box::new(sender), conn)
    }

    pub async fn connect_h2c(addr: SocketAddr, key: &str) -> Sse {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self::over_h2(stream, addr, key).await
    }

    pub async fn over_h2<I>(io: I, addr: SocketAddr, key: &str) -> Sse
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .expect("h2 handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let response = sender
            .send_request(stream_request(addr, key, &format!("http://{addr}")))
            .await
            .expect("stream request");
        Self::from_response(response, Box::new(sender), conn)
    }

    fn from_response(
        response: http::Response<hyper::body::Incoming>,
        keep: Box<dyn std::any::Any + Send>,
        conn: tokio::task::JoinHandle<()>,
    ) -> Sse {
        let (parts, mut body) = response.into_parts();
        let (tx, blocks) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut buffer = String::new();
            loop {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            buffer.push_str(&String::from_utf8_lossy(&data));
                            while let Some(end) = buffer.find("\n\n") {
                                let block: String = buffer.drain(..end + 2).collect();
                                if tx.send(Ok(block)).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    // A reset (HTTP/2 RST_STREAM, a connection closed under the stream) or
                    // an HTTP/1.1 body cut before its chunked terminator.
                    Some(Err(e)) => {
                        let _ = tx.send(Err(format!("{e:?}")));
                        return;
                    }
                    // END_STREAM, or the chunked terminator: clean only after a whole event.
                    None => {
                        if !buffer.is_empty() {
                            let _ = tx.send(Err(format!("ended mid-event: {buffer:?}")));
                        }
                        return;
                    }
                }
            }
        });
        Sse {
            status: parts.status.as_u16(),
            headers: parts.headers,
            version: parts.version,
            blocks,
            _keep: keep,
            tasks: vec![reader, conn],
        }
    }

    /// What comes next within `within`: a block (event or comment), the end of the stream,
    /// or nothing at all.
    pub async fn next(&mut self, within: Duration) -> Next {
        match tokio::time::timeout(within, self.blocks.recv()).await {
            Ok(Some(Ok(block))) => Next::Block(block),
            Ok(Some(Err(reason))) => Next::Reset(reason),
            Ok(None) => Next::Ended,
            Err(_) => Next::Quiet,
        }
    }

    /// The next block (event or comment) within `within`, or `None` if the stream ended or
    /// nothing came (use `next` to tell those apart).
    pub async fn next_block(&mut self, within: Duration) -> Option<String> {
        match self.next(within).await {
            Next::Block(block) => Some(block),
            Next::Ended | Next::Reset(_) | Next::Quiet => None,
        }
    }

    /// Waits up to `within` for the stream to end, skipping what arrives before; panics if
    /// it is still open then.
    pub async fn expect_end(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Block(_) => {}
                Next::Ended | Next::Reset(_) => return,
                Next::Quiet => panic!("the stream did not end within {within:?}"),
            }
        }
    }

    /// Like `expect_end`, and the end must be clean: END_STREAM (HTTP/2) or the chunked
    /// terminator (HTTP/1.1) after a whole event, not a reset or a cut. Returns the blocks
    /// that came before it.
    pub async fn expect_clean_end(&mut self, within: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + within;
        let mut blocks = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Block(block) => blocks.push(block),
                Next::Ended => return blocks,
                Next::Reset(reason) => panic!("the stream ended uncleanly: {reason}"),
                Next::Quiet => panic!("the stream did not end within {within:?}"),
            }
        }
    }

    /// The `updated_at` of the next event, skipping keep-alive comments.
    pub async fn next_update(&mut self, within: Duration) -> Option<f64> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let block = self.next_block(left).await?;
            if block.starts_with(':') {
                continue;
            }
            return Some(parse_event(&block));
        }
    }

    /// Events (not comments) until one carries `last`, or until `within` passes.
    pub async fn updates_until(&mut self, last: f64, within: Duration) -> Vec<f64> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        while out.last() != Some(&last) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_update(left).await {
                Some(update) => out.push(update),
                None => break,
            }
        }
        out
    }

    /// Events (not comments) that arrive within `within`.
    pub async fn updates_within(&mut self, within: Duration) -> Vec<f64> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        while let Some(update) = self
            .next_update(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            out.push(update);
        }
        out
    }
}

/// What a stream gave next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Block(String),
    /// The response body ended cleanly, after a whole block.
    Ended,
    /// The body ended uncleanly: a reset, or cut mid-event or before its terminator.
    Reset(String),
    /// Nothing came in the time given; the stream is still open.
    Quiet,
}

/// A stream request; `origin` is `http://host:port` for HTTP/2 (its `:authority`), empty
/// for HTTP/1.1's origin form.
fn stream_request(addr: SocketAddr, key: &str, origin: &str) -> Request<Full<Bytes>> {
    Request::get(format!("{origin}/sse/environments/{key}/stream"))
        .header("host", addr.to_string())
        .header("accept", "text/event-stream")
        .body(Full::default())
        .expect("request")
}

/// Checks the exact wire shape of one event and returns its `updated_at`.
pub fn parse_event(block: &str) -> f64 {
    let rest = block
        .strip_prefix("event: environment_updated\ndata: {\"updated_at\": ")
        .unwrap_or_else(|| panic!("not an environment_updated event: {block:?}"));
    let number = rest
        .strip_suffix("}\n\n")
        .unwrap_or_else(|| panic!("event does not end with }}\\n\\n: {block:?}"));
    assert!(
        number.contains('.'),
        "updated_at without a decimal point: {block:?}"
    );
    number
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {block:?}"))
}

pub const SECOND: Duration = Duration::from_secs(1);

impl Service {
    /// Waits for the process to exit: `Some(success)`, or `None` if it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<bool> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.success());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// A port that was free a moment ago (for cluster routes, which must be known up front).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Three nats-server processes clustered over loopback routes, JetStream on.
pub struct NatsCluster {
    pub nodes: Vec<Nats>,
}

impl NatsCluster {
    pub fn start() -> Self {
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = cluster_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                Nats::start_with(&[
                    "--server_name",
                    &format!("n{i}"),
                    "--cluster_name",
                    "flagsmith",
                    "--cluster",
                    &format!("nats://127.0.0.1:{port}"),
                    "--routes",
                    &routes,
                ])
            })
            .collect();
        NatsCluster { nodes }
    }

    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Nats::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The last `updated_at` each stream received, kept by a background reader. The reader
/// only records; what it saw is checked by the test itself (`last`, `check_increasing`), so
/// a failure is reported where it belongs, not as a poisoned lock or an ended stream.
pub struct Tracker {
    pub blocks: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tracker {
    pub fn follow(mut sse: Sse) -> Tracker {
        let blocks = Arc::new(Mutex::new(Vec::new()));
        let b = blocks.clone();
        let task = tokio::spawn(async move {
            while let Some(block) = sse.next_block(Duration::from_secs(3600)).await {
                if let Ok(mut blocks) = b.lock() {
                    blocks.push(block);
                }
            }
        });
        Tracker { blocks, task }
    }

    /// Every event's `updated_at` so far, in order (comments left out).
    pub fn updates(&self) -> Vec<f64> {
        self.blocks
            .lock()
            .expect("lock")
            .iter()
            .filter(|b| !b.starts_with(':'))
            .map(|b| parse_event(b))
            .collect()
    }

    /// The newest `updated_at` received, after checking that every event was newer than
    /// the one before (a stream never goes backwards).
    pub fn last(&self) -> Option<f64> {
        let updates = self.updates();
        assert!(
            updates.windows(2).all(|w| w[0] < w[1]),
            "a stream went backwards or repeated itself: {updates:?}"
        );
        updates.last().copied()
    }

    pub fn ended(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the async `check` until it holds or `within` passes.
pub async fn eventually_async(within: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Service {
    /// POSTs `updated_at` until it is answered 200, allowing only 503s before (the first
    /// posts after a NATS recovery may race the reconnect; the task processor retries too).
    pub async fn publish_until_ok(&self, key: &str, updated_at: &str) -> Resp {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let resp = self.publish(key, updated_at).await;
            if resp.status == 200 {
                return resp;
            }
            assert_eq!(resp.status, 503, "{}", resp.body);
            assert!(
                Instant::now() < deadline,
                "never stored: {}\n{}",
                resp.body,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn kill(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// User plus system CPU time of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    flagsmith_sse::procfs::cpu_micros(flagsmith_sse::procfs::Process::Pid(pid)).expect("stat")
        as f64
        / 1e6
}

pub fn rss_kib(pid: u32) -> u64 {
    flagsmith_sse::procfs::rss_bytes(flagsmith_sse::procfs::Process::Pid(pid)).expect("VmRSS")
        / 1024
}

/// The value of one series (`name` or `name{labels}`) in a `/metricsz` text; panics if the
/// series is missing, so that a check on its value cannot pass by its absence.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
}

/// A `redis-server` (Debian's package) on a free port with its data in a temporary
/// directory (append-only file, so a restart keeps what was acknowledged).
pub struct Redis {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
    extra_args: Vec<String>,
    /// Serving TLS only, with this certificate (PEM, also its own CA).
    tls_cert: Option<PathBuf>,
    /// The ACL user (None: the default user) and password every client must give.
    auth: Option<(Option<String>, String)>,
}

impl Redis {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_configured(extra, false)
    }

    /// A server that speaks TLS only, with a self-signed certificate for 127.0.0.1
    /// (`tls_cert()`), and accepts clients without certificates.
    pub fn start_tls() -> Self {
        Self::start_configured(&[], true)
    }

    /// A server that requires `password` (`requirepass`), or, with `user`, an ACL user of
    /// that name and password (the default user switched off); over TLS if `tls`.
    pub fn start_with_auth(user: Option<&str>, password: &str, tls: bool) -> Self {
        Self::start_auth(user, password, tls, &[])
    }

    pub fn start_auth(user: Option<&str>, password: &str, tls: bool, extra: &[&str]) -> Self {
        let rule = format!(">{password}");
        let mut args: Vec<&str> = match user {
            None => vec!["--requirepass", password, "--masterauth", password],
            Some(name) => vec![
                "--user", "default", "off", "--user", name, "on", &rule, "~*", "&*", "+@all",
            ],
        };
        args.extend_from_slice(extra);
        let auth = Some((user.map(str::to_owned), password.to_owned()));
        Self::start_full(&args, tls, auth)
    }

    fn start_configured(extra: &[&str], tls: bool) -> Self {
        Self::start_full(extra, tls, None)
    }

    fn start_full(extra: &[&str], tls: bool, auth: Option<(Option<String>, String)>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut extra_args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut tls_cert = None;
        if tls {
            let cert =
                rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
            let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
            std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
            for (flag, path) in [
                ("--tls-cert-file", &cert_path),
                ("--tls-key-file", &key_path),
                ("--tls-ca-cert-file", &cert_path),
            ] {
                extra_args.push(flag.to_owned());
                extra_args.push(path.display().to_string());
            }
            extra_args.extend(["--tls-auth-clients".to_owned(), "no".to_owned()]);
            tls_cert = Some(cert_path);
        }
        let mut redis = Redis {
            dir,
            child: None,
            port: 0,
            extra_args,
            tls_cert,
            auth,
        };
        // A port found free can be taken before redis-server binds it: try a few.
        for _ in 0..5 {
            redis.port = free_port();
            if redis.spawn() {
                return redis;
            }
        }
        panic!("redis-server did not start: {}", redis.log());
    }

    fn spawn(&mut self) -> bool {
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let port = self.port.to_string();
        let ports = match self.tls_cert {
            Some(_) => ["--port", "0", "--tls-port", &port],
            None => ["--port", &port, "--port", &port],
        };
        let child = Command::new("redis-server")
            .args(ports)
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&data)
            .args([
                "--appendonly",
                "yes",
                "--save",
                "",
                "--protected-mode",
                "no",
            ])
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (Debian's redis-server package)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return true;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        if self.tls_cert.is_some() || self.auth.is_some() {
            return self.cli(&["PING"]).trim() == "PONG";
        }
        let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 7];
        tcp.write_all(b"PING\r\n").is_ok()
            && tcp.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_cert.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The TLS server's certificate, to trust it (`SSL_CERT_FILE`).
    pub fn tls_cert(&self) -> &Path {
        self.tls_cert.as_deref().expect("a TLS server")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// Kills the server (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.spawn(), "redis-server did not restart: {}", self.log());
    }

    /// Starts it again on the same port with no data, as a server whose disk was lost.
    pub fn restart_empty(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path().join("data"));
        assert!(self.spawn(), "redis-server did not restart: {}", self.log());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Service {
    /// An instance on Redis at `redis_url` (`BROKER=redis`), with more settings.
    pub fn start_redis(redis_url: &str, env: &[(&str, &str)]) -> Self {
        let mut all = vec![("BROKER", "redis"), ("REDIS_URL", redis_url)];
        all.extend_from_slice(env);
        Self::start_without_nats(&all)
    }

    /// An instance whose environment names no NATS at all (as Flagsmith's Redis image is
    /// configured).
    pub fn start_without_nats(env: &[(&str, &str)]) -> Self {
        Self::start_command("", None, env)
    }
}

/// A Redis Cluster of three primaries, each with a replica, on loopback.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start() -> Self {
        Self::start_with_password(None)
    }

    /// A cluster whose every node requires `password` (and uses it towards its primary).
    pub fn start_with_password(password: Option<&str>) -> Self {
        let nodes: Vec<Redis> = (0..6)
            .map(|_| {
                // The cluster bus port is chosen too: port + 10000 may not exist.
                let bus = free_port().to_string();
                let args = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    // A replica of a just-created cluster counts as stale with the default
                    // factor and refuses to take over; any replica may here.
                    "--cluster-replica-validity-factor",
                    "0",
                    "--cluster-port",
                    &bus,
                ];
                match password {
                    Some(password) => Redis::start_auth(None, password, false, &args),
                    None => Redis::start_with(&args),
                }
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = Command::new("redis-cli");
        if let Some(password) = password {
            create.env("REDISCLI_AUTH", password);
        }
        let out = create
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli (Debian's redis-tools)");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster
            .nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "cluster never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    /// Seed URLs of every node, for REDIS_URL.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Redis::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node that is primary for `key`'s slot now.
    pub fn primary_for(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("slot");
        let nodes = self.nodes[0].cli(&["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !fields.get(2).is_some_and(|f| f.contains("master"))
                || fields.get(2).is_some_and(|f| f.contains("fail"))
            {
                continue;
            }
            let owns = fields[8..].iter().any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
            });
            if owns {
                let port: u16 = fields[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .expect("port");
                return self
                    .nodes
                    .iter()
                    .position(|n| n.port == port)
                    .expect("known node");
            }
        }
        panic!("no primary for slot {slot}:\n{nodes}");
    }
}

impl Redis {
    /// `redis-cli` against this server; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut command = Command::new("redis-cli");
        command.args(["-p", &self.port.to_string()]);
        if let Some(cert) = &self.tls_cert {
            command.arg("--tls").arg("--cacert").arg(cert);
        }
        if let Some((user, password)) = &self.auth {
            if let Some(user) = user {
                command.args(["--user", user]);
            }
            // From the environment, so that no shell or argument parsing touches it.
            command.env("REDISCLI_AUTH", password);
        }
        let out = command.args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A TCP proxy in front of a broker that can, on command, silence every connection open at
/// that moment: nothing forwarded either way and nothing closed (no FIN, no RST), as when
/// the peer's host dies or a NAT forgets the flow. Connections made afterwards work.
pub struct Proxy {
    pub port: u16,
    silence: tokio::sync::watch::Sender<u64>,
    /// Silenced connections, kept open until the proxy is dropped.
    held: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding 127.0.0.1:<port> to 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy listen");
        let port = listener.local_addr().expect("proxy addr").port();
        let (silence, silenced) = tokio::sync::watch::channel(0u64);
        let held: Arc<Mutex<Vec<(TcpStream, TcpStream)>>> = Arc::default();
        let keep = held.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let mut silenced = silenced.clone();
                silenced.borrow_and_update();
                let keep = keep.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = silenced.changed() => {
                            keep.lock().expect("held").push((client, upstream));
                        }
                    }
                });
            }
        });
        Proxy {
            port,
            silence,
            held,
            accept,
        }
    }

    /// Every connection open now stops forwarding, and stays open.
    pub fn silence(&self) {
        self.silence.send_modify(|n| *n += 1);
    }

    /// Connections currently held silent.
    pub fn silenced(&self) -> usize {
        self.held.lock().expect("held").len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Runs the service with `env` (nothing else) and `args`, expecting it to exit by itself
/// (a refused start, `--help`); its status and everything it printed.
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_flagsmith-sse"))
        .args(args)
        .env_clear()
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run flagsmith-sse");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status, text)
}
