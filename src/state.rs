//! What every request handler shares: the hub, the broker, the settings, shutdown, and the
//! one way to open a subscriber, used by hyper's stream route and the HTTP/1.1 fast path
//! alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderMap;
use http::header;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use crate::broker::Broker;
use crate::environment::validate_key;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::metrics::{LastWrite, Metrics};
use crate::spread::scatter;
use crate::sse::{StreamContext, StreamSettings, Subscriber, Transport};

/// Refused stream requests held back at once, at most. Each holds its connection (an HTTP/1.1
/// socket) while it waits; past this many, refusals are answered at once, so a flood of
/// parallel requests cannot pin more descriptors than this through the delay.
pub const MAX_DELAYED_REFUSALS: usize = 1024;

/// The request-handling settings, from `Config`.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub stream: StreamSettings,
    pub body_read_timeout: Duration,
    /// A refused stream request is answered after about this long (half to one and a half
    /// times, spread), so that clients that reconnect at once after any answer (Python's
    /// SDK) do not spin. Zero: at once.
    pub refusal_delay: Duration,
}

/// Everything a request handler can reach.
pub struct AppState {
    pub stream: Arc<StreamContext>,
    pub broker: Arc<dyn Broker>,
    pub body_read_timeout: Duration,
    refusal_delay: Duration,
    /// Places for refusals being held back (`MAX_DELAYED_REFUSALS`).
    delayed_refusals: Semaphore,
    refusals: AtomicU64,
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
            stream: Arc::new(StreamContext {
                hub,
                metrics,
                settings: settings.stream,
            }),
            broker,
            body_read_timeout: settings.body_read_timeout,
            refusal_delay: settings.refusal_delay,
            delayed_refusals: Semaphore::new(MAX_DELAYED_REFUSALS),
            refusals: AtomicU64::new(0),
            expected_authorization: format!("Token {token}").into_bytes().into_boxed_slice(),
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn hub(&self) -> &Hub {
        &self.stream.hub
    }

    pub fn metrics(&self) -> &Metrics {
        &self.stream.metrics
    }

    /// From now on `/readyz` answers 503, so load balancers stop sending new clients.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Streams end over the drain window from now, so that their clients do not all
    /// reconnect elsewhere in the same millisecond.
    pub fn begin_drain(&self) {
        self.stream.hub.begin_drain();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        !self.is_shutting_down() && self.broker.is_ready()
    }

    /// Whether `headers` carry `Authorization: Token <secret>`. The scheme is
    /// case-insensitive (RFC 9110); the secret is compared in constant time.
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        let expected = &self.expected_authorization;
        value.len() == expected.len()
            && value[..6].eq_ignore_ascii_case(b"Token ")
            && bool::from(value[6..].ct_eq(&expected[6..]))
    }

    /// A subscriber to `key`'s updates over `transport`: the one way every stream starts.
    /// Refused with the error to answer: a bad key, shutdown, or the subscriber cap.
    pub fn open_stream(
        &self,
        key: &str,
        transport: Transport,
        last_write: Option<Arc<LastWrite>>,
    ) -> Result<Subscriber, ApiError> {
        let key = validate_key(key)?;
        if self.is_shutting_down() {
            return Err(ApiError::ShuttingDown);
        }
        let subscription = self
            .stream
            .hub
            .subscribe(key)
            .ok_or(ApiError::ShuttingDown)?;
        Subscriber::try_new(self.stream.clone(), subscription, last_write, transport)
            .map_err(|_| ApiError::TooManySubscribers)
    }

    /// Waits before a refused stream request is answered: SDKs reconnect as soon as a
    /// response ends (Python's at once, whatever the status), so an instant refusal would
    /// have them spin. Returns at once when `MAX_DELAYED_REFUSALS` already wait.
    pub async fn delay_refusal(&self) {
        let place = if self.refusal_delay.is_zero() {
            None
        } else {
            self.delayed_refusals.try_acquire().ok()
        };
        self.stream.metrics.stream_refused(place.is_some());
        if place.is_none() {
            return;
        }
        let serial = self.refusals.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(spread_delay(self.refusal_delay, serial)).await;
    }
}

/// Half to one and a half times `delay`, spread evenly over consecutive `serial`s, so the
/// refused clients do not come back in lockstep.
fn spread_delay(delay: Duration, serial: u64) -> Duration {
    delay.mul_f64(0.5 + scatter(serial, 0x2EF))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_delays_are_spread_around_the_setting() {
        let delay = Duration::from_secs(1);
        let delays: Vec<Duration> = (0..1000).map(|s| spread_delay(delay, s)).collect();
        let (min, max) = (
            delays.iter().min().copied().unwrap_or_default(),
            delays.iter().max().copied().unwrap_or_default(),
        );
        assert!(min >= Duration::from_millis(500), "{min:?}");
        assert!(max < Duration::from_millis(1500), "{max:?}");
        assert!(min < Duration::from_millis(520), "not spread: {min:?}");
        assert!(max > Duration::from_millis(1480), "not spread: {max:?}");
    }
}
