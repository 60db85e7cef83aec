//! A worker process: holds its share of subscribers, reports when they are connected and
//! how many events arrived, and on `finish` sends its histograms to the coordinator.
//!
//! Workers exist because one process may hold at most 20,000 open files here; each takes a
//! slice of the subscribers and its own source addresses, so ephemeral ports never run out.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;

use crate::hist::Histogram;
use crate::wire::{Chunked, Events};

#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long)]
    pub h2: bool,
    /// Index of this worker's first subscriber among all of them.
    #[arg(long)]
    pub first: usize,
    #[arg(long)]
    pub subscribers: usize,
    #[arg(long, default_value_t = 1)]
    pub streams_per_connection: usize,
    #[arg(long, value_delimiter = ',')]
    pub source_ips: Vec<IpAddr>,
    /// Environment names; subscriber i listens to envs[i % len].
    #[arg(long, value_delimiter = ',')]
    pub envs: Vec<String>,
    /// Events for timestamps older than this (Unix µs) are from earlier runs: ignored.
    #[arg(long)]
    pub since_micros: i64,
    /// Each subscriber's first counted event is timed from this instant (Unix µs).
    #[arg(long)]
    pub t0_micros: i64,
    /// Connect with at most this many handshakes in flight (0: all at once, a storm).
    #[arg(long, default_value_t = 512)]
    pub connect_concurrency: usize,
    /// When the server ends a stream (MAX_STREAM_AGE), open it again at once, as SDKs do.
    #[arg(long)]
    pub reconnect: bool,
    /// Open the next stream on the same HTTP/1.1 connection when the server kept it.
    #[arg(long)]
    pub reuse: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Per update timestamp (µs): delivery latency histogram in µs.
    pub per_update: HashMap<i64, Histogram>,
    /// Time from `since_micros` to each subscriber's first counted event, in µs.
    pub first_event: Histogram,
    pub connected: usize,
    pub failed: usize,
    pub ended: usize,
    pub keepalives: u64,
    /// Streams opened again after the server ended them.
    pub reconnects: u64,
    /// How many subscribers hold each newest `updated_at` (µs) at the end.
    pub holding: HashMap<i64, u64>,
}

#[derive(Default)]
struct Shared {
    report: WorkerReport,
    events: u64,
    /// The newest `updated_at` each subscriber of this worker holds, by local index.
    newest: Vec<i64>,
}

pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl Shared {
    /// Counts an event for subscriber `local` unless it holds that timestamp or a newer one
    /// already: a reconnected stream opens with the latest, which is not a new delivery.
    fn record(
        &mut self,
        local: usize,
        updated_at: i64,
        received: i64,
        (since, t0): (i64, i64),
        first: &mut bool,
    ) {
        if let Some(newest) = self.newest.get_mut(local) {
            if updated_at <= *newest {
                return;
            }
            *newest = updated_at;
        }
        if updated_at < since {
            return;
        }
        let latency = (received - updated_at).max(0) as u64;
        self.report
            .per_update
            .entry(updated_at)
            .or_default()
            .record(latency);
        self.events += 1;
        if *first {
            *first = false;
            self.report
                .first_event
                .record((received - t0).max(0) as u64);
        }
    }
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, work(args))
}

async fn work(args: WorkerArgs) -> anyhow::Result<()> {
    // Shared, not cloned per subscriber: the environment list can be thousands long.
    let args = Rc::new(args);
    let shared = Rc::new(RefCell::new(Shared {
        newest: vec![0; args.subscribers],
        ..Shared::default()
    }));
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(
        if args.connect_concurrency == 0 {
            tokio::sync::Semaphore::MAX_PERMITS
        } else {
            args.connect_concurrency
        },
    ));
    let connections = args
        .subscribers
        .div_ceil(args.streams_per_connection.max(1));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    for c in 0..connections {
        let source = args.source_ips[c % args.source_ips.len()];
        let first = args.first + c * args.streams_per_connection;
        let count = args
            .streams_per_connection
            .min(args.first + args.subscribers - first);
        let (args, shared, permits, done) = (
            args.clone(),
            shared.clone(),
            permits.clone(),
            done_tx.clone(),
        );
        tokio::task::spawn_local(async move {
            let permit = permits.acquire_owned().await;
            let result = if args.h2 {
                h2_connection(&args, source, first, count, &shared, permit, &done).await
            } else {
                h1_subscriber(&args, source, first, &shared, permit, &done).await
            };
            if let Err(err) = result {
                let mut s = shared.borrow_mut();
                if s.report.failed < 3 {
                    eprintln!("worker: subscriber {first}: {err}");
                }
                s.report.failed += count;
                let _ = done.send(count);
            }
        });
    }
    drop(done_tx);
    // Wait until every subscriber connected or failed, then say so.
    let mut settled = 0;
    while settled < args.subscribers {
        match done_rx.recv().await {
            Some(n) => settled += n,
            None => break,
        }
    }
    {
        let s = shared.borrow();
        println!("connected {} {}", s.report.connected, s.report.failed);
    }
    let _ = std::io::stdout().flush();
    // Report progress until told to finish.
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut last = u64::MAX;
    loop {
        tokio::select! {
            line = stdin.next_line() => {
                match line {
                    Ok(Some(l)) if l.trim() == "finish" => break,
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            _ = tick.tick() => {
                let events = shared.borrow().events;
                if events != last {
                    last = events;
                    println!("progress {events}");
                    let _ = std::io::stdout().flush();
                }
            }
        }
    }
    let mut s = shared.borrow_mut();
    for hist in s.report.per_update.values_mut() {
        hist.pack();
    }
    s.report.first_event.pack();
    let newest = std::mem::take(&mut s.newest);
    for at in newest {
        *s.report.holding.entry(at).or_default() += 1;
    }
    println!("result {}", serde_json::to_string(&s.report)?);
    let _ = std::io::stdout().flush();
    std::process::exit(0);
}

fn env_of(args: &WorkerArgs, index: usize) -> &str {
    &args.envs[index % args.envs.len()]
}

/// A client socket bound to `source`. The port is chosen at connect time
/// (`IP_BIND_ADDRESS_NO_PORT`), so ports left in TIME_WAIT by an earlier run towards another
/// server port do not block `bind`.
fn client_socket(source: IpAddr) -> std::io::Result<TcpSocket> {
    use std::os::fd::AsRawFd;
    let socket = if source.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a pointer to a c_int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(SocketAddr::new(source, 0))?;
    Ok(socket)
}

/// A connection from `source` to the service, Nagle off (events are small).
async fn connect(source: IpAddr, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let tcp = client_socket(source)?.connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

async fn h1_subscriber(
    args: &WorkerArgs,
    source: IpAddr,
    index: usize,
    shared: &Rc<RefCell<Shared>>,
    permit: Permit,
    done: &tokio::sync::mpsc::UnboundedSender<usize>,
) -> anyhow::Result<()> {
    let mut permit = Some(permit);
    let mut first = true;
    let mut opened = false;
    let mut kept = None;
    loop {
        let result = h1_stream(
            args,
            (source, &mut kept),
            index,
            shared,
            (&mut permit, &mut opened, done),
            &mut first,
        )
        .await;
        if !opened {
            // The first stream decides whether this subscriber connected at all.
            return result;
        }
        if !args.reconnect {
            return Ok(());
        }
        if let Err(err) = result {
            if shared.borrow().report.failed < 3 {
                eprintln!("worker: subscriber {index}: {err}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

type Permit = Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>;

/// One stream: connect (or take the connection `kept` from the last stream), read the
/// head (then release the connect permit and say the subscriber connected, or count a
/// reconnect), count events until the server ends the stream or the connection fails.
/// With `--reuse`, a connection the server left open after a clean end is put back in
/// `kept`.
async fn h1_stream(
    args: &WorkerArgs,
    (source, kept): (IpAddr, &mut Option<tokio::net::TcpStream>),
    index: usize,
    shared: &Rc<RefCell<Shared>>,
    (permit, opened, done): (
        &mut Option<Permit>,
        &mut bool,
        &tokio::sync::mpsc::UnboundedSender<usize>,
    ),
    first: &mut bool,
) -> anyhow::Result<()> {
    let mut tcp = match kept.take() {
        Some(tcp) => tcp,
        None => connect(source, args.addr).await?,
    };
    let request = format!(
        "GET /sse/environments/{}/stream HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        env_of(args, index),
        args.addr
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut buf = [0u8; 2048];
    let mut head = Vec::new();
    let body_start = loop {
        let n = tcp.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "closed before the response headers");
        head.extend_from_slice(&buf[..n]);
        // The last body's final CRLF, when it came apart from its terminator.
        while head.starts_with(b"\r\n") {
            head.drain(..2);
        }
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        anyhow::ensure!(head.len() < 16384, "response headers too long");
    };
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "status: {}",
        String::from_utf8_lossy(&head[..head.len().min(40)])
    );
    drop(permit.take());
    if *opened {
        shared.borrow_mut().report.reconnects += 1;
    } else {
        *opened = true;
        shared.borrow_mut().report.connected += 1;
        let _ = done.send(1);
    }
    // The service frames its body in chunks; a peer (nginx+nchan) may instead send it bare
    // until the connection closes.
    let head_text = String::from_utf8_lossy(&head[..body_start]).to_ascii_lowercase();
    let is_chunked = head_text.contains("transfer-encoding: chunked");
    let server_closes = head_text.contains("connection: close");
    drop(head_text);
    let mut chunked = Chunked::default();
    let mut events = Events::default();
    let since = (args.since_micros, args.t0_micros);
    let local = index - args.first;
    let rest = head.split_off(body_start);
    drop(head);
    let mut feed = |bytes: &[u8], first: &mut bool| {
        let received = now_micros();
        let mut s = shared.borrow_mut();
        let mut record = |data: &[u8]| {
            events.feed(data, |updated_at| {
                s.record(local, updated_at, received, since, first)
            });
        };
        if is_chunked {
            chunked.feed(bytes, record)
        } else {
            record(bytes);
            true
        }
    };
    let mut open = feed(&rest, first);
    let mut clean = !open;
    while open {
        // Connected subscribers are not failures; a read error just ends this one.
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                open = feed(&buf[..n], first);
                clean = !open;
            }
        }
    }
    // A clean end of a chunked body on a connection the server did not say it closes.
    if args.reuse && is_chunked && clean && !server_closes {
        *kept = Some(tcp);
    }
    let mut s = shared.borrow_mut();
    s.report.ended += 1;
    s.report.keepalives += events.keepalives;
    Ok(())
}

async fn h2_connection(
    args: &WorkerArgs,
    source: IpAddr,
    first_index: usize,
    streams: usize,
    shared: &Rc<RefCell<Shared>>,
    permit: Permit,
    done: &tokio::sync::mpsc::UnboundedSender<usize>,
) -> anyhow::Result<()> {
    let tcp = connect(source, args.addr).await?;
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(64 * 1024)
        .max_concurrent_reset_streams(0)
        .handshake(TokioIo::new(tcp))
        .await?;
    tokio::task::spawn_local(async move {
        let _ = connection.await;
    });
    drop(permit);
    for i in 0..streams {
        let index = first_index + i;
        let mut sender = sender.clone();
        let request = hyper::Request::get(format!(
            "http://{}/sse/environments/{}/stream",
            args.addr,
            env_of(args, index)
        ))
        .body(Empty::<Bytes>::new())?;
        let request = RequestTemplate(request);
        let (shared, done, since) = (
            shared.clone(),
            done.clone(),
            (args.since_micros, args.t0_micros),
        );
        let (reconnect, local) = (args.reconnect, index - args.first);
        tokio::task::spawn_local(async move {
            let result: anyhow::Result<()> = async {
                let mut first = true;
                let mut opened = false;
                loop {
                    sender.ready().await?;
                    let response = sender.send_request(request.clone()).await?;
                    anyhow::ensure!(response.status() == 200, "status {}", response.status());
                    if opened {
                        shared.borrow_mut().report.reconnects += 1;
                    } else {
                        opened = true;
                        shared.borrow_mut().report.connected += 1;
                        let _ = done.send(1);
                    }
                    let mut body = response.into_body();
                    let mut events = Events::default();
                    while let Some(Ok(frame)) = body.frame().await {
                        if let Ok(data) = frame.into_data() {
                            let received = now_micros();
                            let mut s = shared.borrow_mut();
                            events.feed(&data, |updated_at| {
                                s.record(local, updated_at, received, since, &mut first)
                            });
                        }
                    }
                    let mut s = shared.borrow_mut();
                    s.report.ended += 1;
                    s.report.keepalives += events.keepalives;
                    if !reconnect {
                        return Ok(());
                    }
                }
            }
            .await;
            if let Err(err) = result {
                let mut s = shared.borrow_mut();
                if s.report.failed < 3 {
                    eprintln!("worker: stream {index}: {err}");
                }
                s.report.failed += 1;
                let _ = done.send(1);
            }
        });
    }
    Ok(())
}

/// A bodiless GET that can be sent again (a `Request` is not `Clone`).
struct RequestTemplate(hyper::Request<Empty<Bytes>>);

impl RequestTemplate {
    fn clone(&self) -> hyper::Request<Empty<Bytes>> {
        let mut request = hyper::Request::new(Empty::new());
        *request.method_mut() = self.0.method().clone();
        *request.uri_mut() = self.0.uri().clone();
        *request.headers_mut() = self.0.headers().clone();
        request
    }
}
