//! Routes, authentication, CORS and the one error type that becomes a response.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{Either, Ready, ready};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use serde_json::json;
use subtle::ConstantTimeEq;
use thiserror::Error;
use tracing::{debug, warn};

use crate::broker::{Broker, PublishError, Published};
use crate::environment::{KeyError, validate_key};
use crate::hub::Hub;
use crate::metrics::{Gauges, LastWrite, Message, Metrics};
use crate::sse::{Subscriber, Transport, event_stream};
use crate::timestamp::{Timestamp, TimestampError};

/// Flagsmith sends `{"updated_at": "<iso>"}`, about 50 bytes; anything near this is not it.
pub const MAX_BODY_BYTES: usize = 4096;

/// The response body type of every route.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The request-handling settings, from `Config`.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub keepalive: Duration,
    pub body_read_timeout: Duration,
    /// Refuse (503) subscribers beyond this many in all.
    pub max_subscribers: usize,
    /// Refuse (503) HTTP/1.1 subscribers, each of which holds a socket, beyond this many.
    pub max_socket_subscribers: usize,
    /// At shutdown, streams end at moments spread evenly over this window.
    pub drain_window: Duration,
}

/// Everything a request handler can reach.
pub struct AppState {
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// `Token <secret>`, compared in constant time with the `Authorization` header.
    expected_authorization: Box<[u8]>,
    shutting_down: AtomicBool,
}

impl AppState {
    pub fn new(
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
        token: &str,
        settings: Settings,
    ) -> Self {
        Self {
            hub,
            broker,
            metrics,
            settings,
            expected_authorization: format!("Token {token}").into_bytes().into_boxed_slice(),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// From now on `/readyz` answers 503, so load balancers stop sending new clients.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Streams end over the drain window from now, so that their clients do not all
    /// reconnect elsewhere in the same millisecond.
    pub fn begin_drain(&self) {
        self.hub.begin_drain();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Relaxed) && self.broker.is_ready()
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        // The scheme is case-insensitive (RFC 9110); the secret is compared in constant time.
        let expected = &self.expected_authorization;
        value.len() == expected.len()
            && value[..6].eq_ignore_ascii_case(b"Token ")
            && bool::from(value[6..].ct_eq(&expected[6..]))
    }
}

/// Every way a request can fail, and the response each one becomes.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error("missing or wrong Authorization header; expected `Authorization: Token <secret>`")]
    Unauthorized,
    #[error(transparent)]
    BadKey(#[from] KeyError),
    #[error(transparent)]
    BadTimestamp(#[from] TimestampError),
    #[error("request body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("request body did not arrive in time")]
    BodyTimeout,
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("the update could not be stored: {0}; retry later")]
    Unavailable(#[from] PublishError),
    #[error("the service is shutting down; connect to another instance")]
    ShuttingDown,
    #[error("this instance holds its maximum of subscribers; connect to another instance")]
    TooManySubscribers,
    #[error("no such route")]
    NotFound,
    #[error("method not allowed; use {0}")]
    MethodNotAllowed(&'static str),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadKey(_) | ApiError::BadTimestamp(_) | ApiError::BodyRead(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable(_) | ApiError::ShuttingDown | ApiError::TooManySubscribers => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::BadKey(_) => "invalid_environment_key",
            ApiError::BadTimestamp(TimestampError::Json(_)) => "invalid_json",
            ApiError::BadTimestamp(_) => "invalid_updated_at",
            ApiError::TooLarge => "body_too_large",
            ApiError::BodyTimeout => "body_timeout",
            ApiError::BodyRead(_) => "body_unreadable",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::TooManySubscribers => "too_many_subscribers",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
        }
    }

    /// The JSON body every error response carries.
    pub fn body_text(&self) -> String {
        json!({"error": self.code(), "message": self.to_string()}).to_string()
    }

    pub fn into_response(self) -> Response<Body> {
        let mut response = full(self.status(), "application/json", self.body_text());
        let headers = response.headers_mut();
        match self {
            ApiError::Unavailable(_) | ApiError::ShuttingDown | ApiError::TooManySubscribers => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::MethodNotAllowed(allow) => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Token"));
            }
            _ => {}
        }
        response
    }
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed_unsync());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    full(status, "application/json", value.to_string())
}

enum Route<'a> {
    Stream(&'a str),
    QueueChange(&'a str),
    Live,
    Ready,
    Metrics,
}

fn route(path: &str) -> Option<Route<'_>> {
    match path {
        "/livez" | "/health" | "/health/" | "/health/liveness" | "/health/liveness/" => {
            return Some(Route::Live);
        }
        "/readyz" | "/health/readiness" | "/health/readiness/" => return Some(Route::Ready),
        "/metricsz" => return Some(Route::Metrics),
        _ => {}
    }
    let (key, action) = path.strip_prefix("/sse/environments/")?.split_once('/')?;
    match action.strip_suffix('/').unwrap_or(action) {
        "stream" => Some(Route::Stream(key)),
        "queue-change" => Some(Route::QueueChange(key)),
        _ => None,
    }
}

/// What `handle` returns: a ready response for everything but queue-change, whose
/// (large) future is boxed. hyper keeps a request's future for the whole life of its
/// HTTP/2 stream, so a small one here is memory saved on every HTTP/2 subscriber.
pub type Handled = Either<
    Ready<Result<Response<Body>, Infallible>>,
    Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>,
>;

/// Serves one request. Generic over the request body so that tests can drive it directly.
pub fn handle<B>(state: Arc<AppState>, request: Request<B>) -> Handled
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let method = request.method().clone();
    if method == Method::OPTIONS {
        return Either::Left(ready(Ok(with_cors(preflight(request.headers())))));
    }
    let is_get = method == Method::GET || method == Method::HEAD;
    let response = match route(request.uri().path()) {
        None => Err(ApiError::NotFound),
        Some(Route::Stream(key)) if is_get => stream(
            &state,
            key,
            request.extensions().get::<Arc<LastWrite>>().cloned(),
            if request.version() < http::Version::HTTP_2 {
                Transport::Http1
            } else {
                Transport::Http2
            },
        ),
        Some(Route::QueueChange(key)) if method == Method::POST => {
            let key = key.to_owned();
            return Either::Right(Box::pin(async move {
                let started = std::time::Instant::now();
                let response = queue_change(&state, &key, request)
                    .await
                    .unwrap_or_else(ApiError::into_response);
                state
                    .metrics
                    .queue_change_answered(response.status().as_u16(), started.elapsed());
                Ok(with_cors(response))
            }));
        }
        Some(Route::Live) if is_get => Ok(health(&state, StatusCode::OK, "live")),
        Some(Route::Ready) if is_get => Ok(if state.is_ready() {
            health(&state, StatusCode::OK, "ready")
        } else {
            health(&state, StatusCode::SERVICE_UNAVAILABLE, "not ready")
        }),
        Some(Route::Metrics) if is_get => Ok(metrics(&state)),
        Some(Route::QueueChange(_)) => Err(ApiError::MethodNotAllowed("POST, OPTIONS")),
        Some(_) => Err(ApiError::MethodNotAllowed("GET, HEAD, OPTIONS")),
    };
    Either::Left(ready(Ok(with_cors(
        response.unwrap_or_else(ApiError::into_response),
    ))))
}

/// Every origin may read every endpoint: SDKs run in browsers on customers' domains.
fn with_cors(mut response: Response<Body>) -> Response<Body> {
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

/// CORS preflight for any path: `Access-Control-Allow-Headers: *` does not cover
/// `Authorization` under the Fetch spec, so the requested headers are echoed back.
fn preflight(headers: &HeaderMap) -> Response<Body> {
    let mut response = full(StatusCode::NO_CONTENT, "text/plain", Bytes::new());
    let out = response.headers_mut();
    out.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, POST, OPTIONS"),
    );
    let requested = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or(HeaderValue::from_static(
            "Authorization, Content-Type, Cache-Control, Last-Event-ID",
        ));
    out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    out.remove(header::CONTENT_TYPE);
    response
}

fn health(state: &AppState, status: StatusCode, text: &'static str) -> Response<Body> {
    state.metrics.http_write(Message::Healthcheck);
    let mut response = full(status, "text/plain; charset=utf-8", text);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn metrics(state: &AppState) -> Response<Body> {
    let text = state.metrics.render(&Gauges {
        environments: state.hub.len(),
        environments_subscribed: state.hub.subscribed(),
        max_subscribers: state.settings.max_socket_subscribers,
        nats_connected: state.broker.is_connected(),
        ready: state.is_ready(),
    });
    full(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        text,
    )
}

fn stream(
    state: &Arc<AppState>,
    key: &str,
    last_write: Option<Arc<LastWrite>>,
    transport: Transport,
) -> Result<Response<Body>, ApiError> {
    let key = validate_key(key)?;
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let subscription = state.hub.subscribe(key).ok_or(ApiError::ShuttingDown)?;
    let subscriber = Subscriber::try_new(state.clone(), subscription, last_write, transport)?;
    let body = StreamBody::new(event_stream(subscriber));
    let mut response = Response::new(BodyExt::boxed_unsync(body));
    let headers = response.headers_mut();
    // OkHttp (Android) rejects any other content type.
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx buffers responses unless told not to, which would hold events back.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

async fn queue_change<B>(
    state: &AppState,
    key: &str,
    request: Request<B>,
) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // The token is checked before anything else is read, so strangers learn nothing.
    if !state.authorized(request.headers()) {
        return Err(ApiError::Unauthorized);
    }
    let key = validate_key(key)?;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Err(ApiError::TooLarge);
    }
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES);
    let collected = tokio::time::timeout(state.settings.body_read_timeout, body.collect())
        .await
        .map_err(|_| ApiError::BodyTimeout)?;
    let bytes = match collected {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => return Err(ApiError::TooLarge),
        Err(err) => return Err(ApiError::BodyRead(err.to_string())),
    };
    let timestamp = Timestamp::from_update_json(&bytes)?;
    let outcome = state
        .broker
        .publish(key, timestamp)
        .await
        .inspect_err(|err| warn!(key, %timestamp, error = %err, "queue-change not stored"))?;
    debug!(key, %timestamp, ?outcome, "queue-change");
    let body = match outcome {
        Published::Stored { sequence } => {
            json!({"status": "stored", "updated_at": timestamp.as_secs_f64(), "sequence": sequence})
        }
        Published::Duplicate { sequence } => {
            json!({"status": "duplicate", "updated_at": timestamp.as_secs_f64(), "sequence": sequence})
        }
        Published::AlreadyCurrent { current } => {
            json!({"status": "already_current", "updated_at": current.as_secs_f64()})
        }
    };
    Ok(json_response(StatusCode::OK, &body))
}

#[cfg(test)]
mod tests;
