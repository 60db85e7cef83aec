//! The listener, TLS, connection serving and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::broker::memory::MemoryBroker;
use crate::broker::nats::{NatsBroker, NatsSettings};
use crate::broker::redis::{RedisBroker, RedisSettings};
use crate::broker::{Broker, BrokerError, redact};
use crate::config::{BrokerKind, Config, ConfigError};
use crate::h1_stream::{self, Prefixed, Sniffed};
use crate::http::handle;
use crate::hub::Hub;
use crate::limits;
use crate::metrics::{LastWrite, Metrics};
use crate::sse::StreamSettings;
use crate::state::{AppState, Settings};
use crate::tls;

/// Reconnect storms arrive all at once; tokio's default backlog of 128 would drop SYNs.
const LISTEN_BACKLOG: u32 = 4096;

/// Largest request head accepted (hyper's buffer); SDK requests are well under 2 KiB.
const MAX_HEAD_BYTES: usize = 32 * 1024;

/// Kernel send buffer of an HTTP/1.1 stream socket. Events are ~60 bytes, so this holds
/// about a thousand; it bounds the kernel memory a subscriber that stopped reading can pin
/// (autotuning would let it grow to megabytes) and makes `STREAM_WRITE_TIMEOUT` apply.
const STREAM_SEND_BUFFER: usize = 32 * 1024;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// A bound, not yet serving, instance: tests and `main` learn the address before serving.
pub struct Server {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<AppState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    timeouts: Timeouts,
    shutdown_timeout: Duration,
}

#[derive(Clone, Copy)]
struct Timeouts {
    header_read: Duration,
    stream_write: Duration,
}

impl Server {
    /// Checks the settings, loads TLS, listens, starts the broker and wires the state:
    /// everything that can fail at start-up, before anything is served.
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        let token = config.token()?;
        let addr = config.listen_addr()?;
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        let listener = listen(addr).map_err(|source| ServerError::Bind { addr, source })?;
        let hub = Arc::new(Hub::new(config.nats_stream_max_age));
        let metrics = Arc::new(Metrics::default());
        let broker = start_broker(config, &hub, &metrics).await?;
        let settings = settings(config);
        log_start(config, &listener, tls.is_some(), &settings);
        Ok(Self {
            listener,
            tls,
            state: Arc::new(AppState::new(hub, broker, metrics, token, settings)),
            builder: Arc::new(hyper_builder(config)),
            timeouts: Timeouts {
                header_read: config.header_read_timeout,
                stream_write: config.stream_write_timeout,
            },
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then drains: `/readyz` turns 503 and new streams
    /// are refused at once; streams end at moments spread over the drain window (their
    /// clients reconnect elsewhere a few at a time); then the listener closes, whatever
    /// still streams is ended, and the process returns by the shutdown timeout.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Server {
            listener,
            tls,
            state,
            builder,
            timeouts,
            shutdown_timeout,
        } = self;
        let connections = TaskTracker::new();
        let closing = CancellationToken::new();
        let serving = Arc::new(Serving {
            state: state.clone(),
            builder,
            closing: closing.clone(),
            timeouts,
        });
        let sweeper = tokio::spawn(sweep(state.clone()));
        tokio::pin!(shutdown);
        // Set at shutdown to the end of the drain window. The listener stays open until then,
        // so probes see /readyz say 503 (not a refused connection) and queue-change keeps
        // working while streams drain.
        let mut drain_until: Option<tokio::time::Instant> = None;
        let mut deadline = tokio::time::Instant::now();
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown, if drain_until.is_none() => {
                    let now = tokio::time::Instant::now();
                    deadline = now + shutdown_timeout;
                    let drain_window = state.stream.settings.drain_window;
                    drain_until = Some((now + drain_window).min(deadline));
                    info!(
                        ?drain_window,
                        ?shutdown_timeout,
                        "shutting down: not ready, refusing new streams, ending streams over the drain window"
                    );
                    state.begin_shutdown();
                    state.begin_drain();
                    // In-flight requests finish; idle keep-alives close; HTTP/2 says GOAWAY.
                    closing.cancel();
                    continue;
                }
                () = sleep_until_some(drain_until) => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    accept_error(err).await;
                    continue;
                }
            };
            // Events are small and must leave at once; Nagle would hold them back.
            let _ = tcp.set_nodelay(true);
            let serving = serving.clone();
            match &tls {
                None => connections.spawn(serve_plain(tcp, serving)),
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    connections.spawn(async move {
                        let header_read = serving.timeouts.header_read;
                        match tokio::time::timeout(header_read, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                                Box::pin(serve_hyper(tls, serving)).await;
                            }
                            Ok(Ok(tls)) => {
                                // Never a fast-path stream: over TLS, streams are written
                                // by their own tasks.
                                let _ = Box::pin(serve_request(tls, serving)).await;
                            }
                            Ok(Err(err)) => debug!(%peer, error = %err, "TLS handshake failed"),
                            Err(_) => debug!(%peer, "TLS handshake timed out"),
                        }
                    })
                }
            };
        }
        drop(listener);
        sweeper.abort();
        // Whatever still streams (a client slow to take its last bytes) is ended now.
        state.hub().close();
        connections.close();
        if tokio::time::timeout_at(deadline, connections.wait())
            .await
            .is_err()
        {
            warn!(
                open = connections.len(),
                "connections still open at the shutdown timeout; exiting anyway"
            );
        }
        info!("stopped");
    }
}

/// What every connection's task needs, shared: one pointer per task rather than four.
struct Serving {
    state: Arc<AppState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    closing: CancellationToken,
    timeouts: Timeouts,
}

/// A plain TCP connection whose request is a plain HTTP/1.1 stream: the fast path's.
struct PlainStream {
    tcp: tokio::net::TcpStream,
    request: h1_stream::StreamRequest,
}

/// Serves a plain TCP connection: streams on the fast path, one after another while the
/// client keeps the connection after each clean end, and any other request with hyper.
///
/// Its task lives as long as the subscriber and is as large as its largest state, so only
/// the streaming state stays in it: every other step is boxed, freed once done.
fn serve_plain(
    tcp: tokio::net::TcpStream,
    serving: Arc<Serving>,
) -> impl Future<Output = ()> + Send + 'static {
    // Boxed before the task starts: the socket is not kept in the task beside it.
    let first = Box::pin(serve_request(tcp, serving.clone()));
    serve_streams(first, serving)
}

async fn serve_streams(
    first: Pin<Box<impl Future<Output = Option<Box<PlainStream>>>>>,
    serving: Arc<Serving>,
) {
    let write_timeout = serving.timeouts.stream_write;
    let mut next = first.await;
    while let Some(plain) = next.take() {
        let state = &serving.state;
        let opened = Box::pin(async move {
            let PlainStream { tcp, request } = *plain;
            h1_stream::open_direct(tcp, state, &request, write_timeout).await
        });
        let Some(mut stream) = opened.await else {
            return;
        };
        let ended = stream.run(write_timeout).await;
        let serving = serving.clone();
        next = Box::pin(async move {
            let tcp = stream.end(ended).await?;
            serve_request(tcp, serving).await
        })
        .await;
    }
}

/// Reads a request and serves it, unless it is a plain HTTP/1.1 stream on plain TCP:
/// that is returned for the fast path. hyper serves everything else (from then on, the
/// whole connection); over TLS a stream is written by its own task.
async fn serve_request<I>(mut io: I, serving: Arc<Serving>) -> Option<Box<PlainStream>>
where
    I: AsyncRead + AsyncWrite + StreamSocket + Unpin + Send + 'static,
{
    let timeouts = serving.timeouts;
    match h1_stream::sniff(&mut io, timeouts.header_read).await {
        Sniffed::Stream(request) => {
            io.limit_send_buffer();
            match io.into_tcp() {
                Ok(tcp) => return Some(Box::new(PlainStream { tcp, request })),
                Err(io) => {
                    let state = serving.state.clone();
                    h1_stream::serve_stream(io, state, &request.key, timeouts.stream_write).await;
                }
            }
        }
        Sniffed::Other(head) => serve_hyper(Prefixed::new(head, io), serving).await,
        Sniffed::Gone => {}
    }
    None
}

async fn serve_hyper<I>(io: I, serving: Arc<Serving>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Serving {
        state,
        builder,
        closing,
        ..
    } = &*serving;
    let state = state.clone();
    let last_write = Arc::new(LastWrite::new());
    let metrics = state.stream.metrics.clone();
    let service = {
        let last_write = last_write.clone();
        service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(last_write.clone());
            handle(state.clone(), request)
        })
    };
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = closing.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        // A client that hangs up mid-stream is how SSE ends, not a failed write: hyper
        // reports it as an incomplete message. Anything else (reset, broken pipe, timeout)
        // lost a write.
        let hung_up = err
            .downcast_ref::<hyper::Error>()
            .is_some_and(|e| e.is_incomplete_message() || e.is_canceled());
        debug!(error = %err, hung_up, last_write = ?last_write.get(), "connection ended with an error");
        if !hung_up && let Some(message) = last_write.get() {
            metrics.http_error(message);
        }
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sockets whose kernel send buffer a stream caps (see `STREAM_SEND_BUFFER`), and which
/// the fan-out may write directly (plain TCP; TLS records are its task's to write).
pub trait StreamSocket: Sized {
    fn limit_send_buffer(&self);
    fn into_tcp(self) -> Result<tokio::net::TcpStream, Self>;
}

impl StreamSocket for tokio::net::TcpStream {
    fn limit_send_buffer(&self) {
        let _ = socket2::SockRef::from(self).set_send_buffer_size(STREAM_SEND_BUFFER);
    }

    fn into_tcp(self) -> Result<tokio::net::TcpStream, Self> {
        Ok(self)
    }
}

impl StreamSocket for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn limit_send_buffer(&self) {
        self.get_ref().0.limit_send_buffer();
    }

    fn into_tcp(self) -> Result<tokio::net::TcpStream, Self> {
        Err(self)
    }
}

/// Running out of file descriptors must neither kill the server nor spin the accept loop:
/// wait a moment for connections to close.
async fn accept_error(err: io::Error) {
    if limits::is_out_of_descriptors(&err) {
        error!(error = %err, "out of file descriptors; pausing accepts");
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        debug!(error = %err, "accept failed");
    }
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Drops environments nobody listens to and nothing recent happened in.
async fn sweep(state: Arc<AppState>) {
    let mut interval = tokio::time::interval(Duration::from_secs(60));
    loop {
        interval.tick().await;
        let removed = state.hub().sweep(SystemTime::now());
        if removed > 0 {
            debug!(
                removed,
                held = state.hub().len(),
                "forgot idle environments"
            );
        }
    }
}

/// The broker the configuration chooses, started (connecting in the background).
async fn start_broker(
    config: &Config,
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
) -> Result<Arc<dyn Broker>, ServerError> {
    let (kind, why) = config.broker_choice();
    info!(broker = ?kind, because = why, "broker chosen");
    Ok(match kind {
        BrokerKind::Redis => {
            RedisBroker::start(
                RedisSettings {
                    target: config.redis_target()?,
                    cluster: config.use_cluster_mode,
                    timeout: config.redis_timeout,
                    wait_replicas: config.redis_wait_replicas,
                },
                hub.clone(),
                metrics.clone(),
            )
            .await?
        }
        BrokerKind::Nats => {
            NatsBroker::start(
                NatsSettings {
                    url: config.nats_url().to_owned(),
                    stream: config.nats_stream.clone(),
                    max_age: config.nats_stream_max_age,
                    replicas: config.nats_stream_replicas,
                    storage: config.nats_stream_storage,
                    timeout: config.nats_timeout,
                },
                hub.clone(),
                metrics.clone(),
            )
            .await?
        }
        BrokerKind::Memory => MemoryBroker::new(hub.clone()),
    })
}

/// The request-handling settings. The automatic subscriber cap stops HTTP/1.1 subscribers
/// (a socket each) short of the open-file limit; HTTP/2 streams share their connections'
/// sockets and are bounded per connection.
fn settings(config: &Config) -> Settings {
    let (max_subscribers, max_socket_subscribers) = match config.max_subscribers {
        0 => (usize::MAX, limits::default_max_subscribers()),
        n => (n, n),
    };
    Settings {
        stream: StreamSettings {
            keepalive: config.keepalive_interval,
            max_age: config.stream_age_limit(),
            drain_window: config.drain_window,
            max_subscribers,
            max_socket_subscribers,
        },
        body_read_timeout: config.body_read_timeout,
        refusal_delay: config.refusal_delay,
    }
}

/// hyper's limits for everything the fast path does not serve.
fn hyper_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        // Request heads larger than this get 431; hyper's default allows ~400 KB.
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.http2_max_concurrent_streams)
        // Rapid-reset floods (CVE-2023-44487): a connection whose client resets streams
        // faster than they are accepted, or provokes errors in a loop, is closed.
        .max_pending_accept_reset_streams(Some(100))
        .max_local_error_reset_streams(Some(1024))
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        // Pings find dead peers behind NAT; SSE comments do the same for HTTP/1.1.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// One line with the effective configuration (no secrets), and one per setting of
/// Flagsmith's own image that is accepted and not needed.
fn log_start(config: &Config, listener: &TcpListener, tls: bool, settings: &Settings) {
    let (kind, _) = config.broker_choice();
    let stream = &settings.stream;
    info!(
        listen = ?listener.local_addr().ok(),
        tls,
        broker = ?kind,
        store = %match kind {
            BrokerKind::Nats => redact(config.nats_url()),
            BrokerKind::Redis => config
                .redis_target()
                .map_or_else(|e| e.to_string(), |t| redact(&t.urls.join(","))),
            BrokerKind::Memory => "this process".to_owned(),
        },
        stream = %config.nats_stream,
        max_age = ?config.nats_stream_max_age,
        replicas = config.nats_stream_replicas,
        storage = ?config.nats_stream_storage,
        keepalive = ?stream.keepalive,
        max_stream_age = ?stream.max_age,
        refusal_delay = ?settings.refusal_delay,
        max_http1_subscribers = stream.max_socket_subscribers,
        max_subscribers = (stream.max_subscribers != usize::MAX).then_some(stream.max_subscribers),
        drain_window = ?stream.drain_window,
        shutdown_timeout = ?config.shutdown_timeout,
        "flagsmith-sse starting"
    );
    for (name, value) in config.unneeded_settings() {
        info!(
            setting = name,
            value,
            "accepted for Flagsmith's own image and not needed: updates are pushed, not polled"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain connection's task lives as long as its subscriber, and its size is memory per
    /// subscriber: only the streaming state may stay in it (the rare steps are boxed). The
    /// bound is for the test profile (328 bytes there when this was written).
    #[tokio::test]
    async fn a_plain_connection_task_stays_small() {
        let hub = Arc::new(Hub::new(Duration::from_secs(3600)));
        let broker = MemoryBroker::new(hub.clone());
        let settings = Settings {
            stream: StreamSettings {
                keepalive: Duration::from_secs(60),
                max_age: None,
                drain_window: Duration::from_secs(1),
                max_subscribers: 10,
                max_socket_subscribers: 10,
            },
            body_read_timeout: Duration::from_secs(1),
            refusal_delay: Duration::ZERO,
        };
        let state = Arc::new(AppState::new(
            hub,
            broker,
            Arc::new(Metrics::default()),
            "token",
            settings,
        ));
        let serving = Arc::new(Serving {
            state,
            builder: Arc::new(auto::Builder::new(TokioExecutor::new())),
            closing: CancellationToken::new(),
            timeouts: Timeouts {
                header_read: Duration::from_secs(1),
                stream_write: Duration::from_secs(1),
            },
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let task = serve_plain(tcp, serving);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 384, "{size} bytes");
    }
}
