//! hyper's side of the service: routing, CORS and every endpoint's response.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::ready;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::json;
use tracing::{debug, warn};

use crate::broker::Published;
use crate::environment::validate_key;
use crate::error::{ApiError, Body, MAX_BODY_BYTES, full};
use crate::metrics::{Gauges, LastWrite, WriteKind};
use crate::routes::{Route, route};
use crate::sse::{EventBody, Transport};
use crate::state::AppState;
use crate::timestamp::Timestamp;
use crate::wire::{ALLOW_ORIGIN, STREAM_HEADERS};

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    full(status, "application/json", value.to_string())
}

/// What `handle` returns: a boxed future, even for a ready response. hyper keeps the
/// space of a request's future in its HTTP/2 stream's task for the whole life of the
/// stream (beside the body, which replaces it), so the 16-byte box, freed once answered,
/// is memory saved on every HTTP/2 subscriber (a ready `Response` would be 128 bytes).
pub type Handled = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// Serves one request. Generic over the request body so that tests can drive it directly.
pub fn handle<B>(state: Arc<AppState>, request: Request<B>) -> Handled
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let method = request.method().clone();
    if method == Method::OPTIONS {
        return Box::pin(ready(Ok(with_cors(preflight(request.headers())))));
    }
    let is_get = method == Method::GET || method == Method::HEAD;
    let response = match route(request.uri().path()) {
        None => Err(ApiError::NotFound),
        Some(Route::Stream(key)) if is_get => {
            let transport = if request.version() < http::Version::HTTP_2 {
                Transport::Http1
            } else {
                Transport::Http2
            };
            let last_write = request.extensions().get::<Arc<LastWrite>>().cloned();
            match state.open_stream(key, transport, last_write) {
                Ok(subscriber) => Ok(stream_response(subscriber, key)),
                Err(err) => {
                    return Box::pin(async move {
                        state.delay_refusal().await;
                        Ok(with_cors(err.into_response()))
                    });
                }
            }
        }
        Some(Route::QueueChange(key)) if method == Method::POST => {
            let key = key.to_owned();
            return Box::pin(async move {
                let started = std::time::Instant::now();
                let response = queue_change(&state, &key, request)
                    .await
                    .unwrap_or_else(ApiError::into_response);
                state
                    .metrics()
                    .queue_change_answered(response.status().as_u16(), started.elapsed());
                Ok(with_cors(response))
            });
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
    Box::pin(ready(Ok(with_cors(
        response.unwrap_or_else(ApiError::into_response),
    ))))
}

/// Every origin may read every endpoint: SDKs run in browsers on customers' domains.
fn with_cors(mut response: Response<Body>) -> Response<Body> {
    let (name, value) = ALLOW_ORIGIN;
    response
        .headers_mut()
        .insert(name, HeaderValue::from_static(value));
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
    state.metrics().http_write(WriteKind::Healthcheck);
    let mut response = full(status, "text/plain; charset=utf-8", text);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn metrics(state: &AppState) -> Response<Body> {
    let text = state.metrics().render(&Gauges {
        environments: state.hub().len(),
        environments_subscribed: state.hub().subscribed(),
        max_subscribers: state.stream.settings.max_socket_subscribers,
        broker: state.broker.name(),
        broker_connected: state.broker.is_connected(),
        ready: state.is_ready(),
    });
    full(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        text,
    )
}

/// The response of an open stream: the stream headers, and a body that writes whatever
/// the subscriber sends.
fn stream_response(subscriber: crate::sse::Subscriber, key: &str) -> Response<Body> {
    let mut response = Response::new(BodyExt::boxed_unsync(EventBody::new(subscriber, key)));
    let headers = response.headers_mut();
    for (name, value) in STREAM_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
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
    let collected = tokio::time::timeout(state.body_read_timeout, body.collect())
        .await
        .map_err(|_| ApiError::BodyTimeout)?;
    let bytes = match collected {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => return Err(ApiError::TooLarge),
        Err(err) => return Err(ApiError::BodyRead(err)),
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
