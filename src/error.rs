//! The one error type of the HTTP side, and the response each error becomes. The HTTP/1.1
//! fast path renders the same responses, byte for byte, from here.

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use thiserror::Error;

use crate::broker::PublishError;
use crate::environment::KeyError;
use crate::timestamp::TimestampError;

/// Flagsmith sends `{"updated_at": "<iso>"}`, about 50 bytes; anything near this is not it.
pub const MAX_BODY_BYTES: usize = 4096;

/// The response body type of every route.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

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
    #[error("could not read the request body")]
    BodyRead(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the update could not be stored; retry later")]
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
    pub fn status(&self) -> StatusCode {
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
            ApiError::BadTimestamp(TimestampError::NotAnObject) => "invalid_body",
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

    /// The message with its causes, `: `-separated, for the caller to read.
    fn message(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            // `transparent` variants show their cause's text as their own.
            let text = cause.to_string();
            if !message.ends_with(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        message
    }

    /// The JSON body every error response carries.
    pub fn body_text(&self) -> String {
        json!({"error": self.code(), "message": self.message()}).to_string()
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

/// A complete response with a body of `content_type`.
pub fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed_unsync());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_their_causes() {
        let err = ApiError::Unavailable(PublishError::NotConnected);
        let body: serde_json::Value = serde_json::from_str(&err.body_text()).expect("json");
        assert_eq!(body["error"], "unavailable");
        let message = body["message"].as_str().expect("message");
        assert!(message.contains("retry later"), "{message}");
        assert!(
            message.contains(&PublishError::NotConnected.to_string()),
            "{message}"
        );
    }
}
