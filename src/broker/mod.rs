//! Where updates are stored, and how every instance learns of them: one trait, one module
//! per backend. A backend stores an update, answers only once it is stored, and feeds every
//! update it learns of (its own and other instances') into the hub, which never moves an
//! environment backwards. It never reaches past the hub to subscribers.

pub mod memory;
pub mod nats;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

use thiserror::Error;

use crate::hub::Hub;
use crate::timestamp::{Timestamp, TimestampError};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An error from a client library, kept whole as the source of ours.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(crate) fn boxed(err: impl std::error::Error + Send + Sync + 'static) -> BoxError {
    Box::new(err)
}

/// What the HTTP layer needs from whatever stores updates.
pub trait Broker: Send + Sync + 'static {
    /// Stores `timestamp` as `key`'s newest update; resolves once it is durably stored.
    fn publish<'a>(
        &'a self,
        key: &'a str,
        timestamp: Timestamp,
    ) -> BoxFuture<'a, Result<Published, PublishError>>;

    /// Connected and holding current data: what `/readyz` reports. Must not do I/O.
    fn is_ready(&self) -> bool;

    /// Connected to the broker at all. Must not do I/O.
    fn is_connected(&self) -> bool;

    /// `nats`, `redis` or `memory`: the `broker` label of the broker's metrics.
    fn name(&self) -> &'static str;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// Stored now, at this number in the backend's order of writes (`Update::sequence`).
    Stored { sequence: u64 },
    /// The same update was stored before (a retried POST); not stored twice. The number of
    /// that earlier write where the backend says it: JetStream's duplicate answer does; the
    /// Redis script answers with the value it holds, not its stream id.
    Duplicate { sequence: Option<u64> },
    /// An equal or newer timestamp is already stored, so this one must not replace it.
    AlreadyCurrent { current: Timestamp },
}

#[derive(Debug, Error)]
pub enum PublishError {
    #[error("the broker is not connected")]
    NotConnected,
    #[error("the broker did not store the update: {0}")]
    Store(#[source] BoxError),
    #[error("could not read what the broker holds: {0}")]
    Read(#[source] BoxError),
    #[error("the broker holds an unreadable update: {0}")]
    StoredUnreadable(#[source] TimestampError),
    #[error("the environment kept changing under concurrent writes; retry")]
    Contended,
}

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("broker URL {url:?}: {reason}")]
    BadUrl { url: String, reason: BoxError },
    #[error("could not connect to the broker: {0}")]
    Connect(#[source] BoxError),
}

/// Broker URLs (`NATS_URL`, `REDIS_URL`; comma-separated) with credentials replaced, for
/// logs and errors. A password may hold `,`, `@`, `:` or `/`, so the list is not split at
/// commas first: each URL's credentials run from its `://` to the last `@` before the next
/// URL's scheme. Where that is unclear, more is hidden, never less.
pub fn redact(url_list: &str) -> String {
    let schemes: Vec<usize> = url_list.match_indices("://").map(|(at, _)| at).collect();
    if schemes.is_empty() {
        // No scheme anywhere (`user:pass@host:4222,host2`): credentials end at an entry's
        // last `@`, so everything up to the last `@` of the whole list is hidden.
        return match url_list.rfind('@') {
            Some(at) => format!("***@{}", &url_list[at + 1..]),
            None => url_list.to_owned(),
        };
    }
    let mut out = String::with_capacity(url_list.len());
    let mut copied = 0;
    for (i, &scheme) in schemes.iter().enumerate() {
        let start = scheme + 3;
        // This URL ends where the next one's scheme name begins: after the last comma
        // before the next `://`.
        let end = schemes.get(i + 1).map_or(url_list.len(), |&next| {
            url_list[start..next]
                .rfind(',')
                .map_or(next, |comma| start + comma)
        });
        if let Some(at) = url_list[start..end].rfind('@') {
            out.push_str(&url_list[copied..start]);
            out.push_str("***");
            copied = start + at;
        }
    }
    out.push_str(&url_list[copied..]);
    out
}

/// Why a connection attempt failed, in the words an operator acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    Authentication,
    Tls,
    Dns,
    Refused,
    Timeout,
    /// The connection went silent or was closed under us.
    Lost,
    Other,
}

impl Cause {
    pub fn label(self) -> &'static str {
        match self {
            Cause::Authentication => "authentication",
            Cause::Tls => "tls",
            Cause::Dns => "dns",
            Cause::Refused => "refused",
            Cause::Timeout => "timeout",
            Cause::Lost => "connection lost",
            Cause::Other => "other",
        }
    }

    /// A best reading of an error's text and its sources, for client libraries that do not
    /// say which of these it was in a type.
    pub fn of(err: &(dyn std::error::Error + 'static)) -> Cause {
        let mut text = String::new();
        let mut next = Some(err);
        while let Some(e) = next {
            text.push_str(&e.to_string().to_ascii_lowercase());
            text.push('\n');
            next = e.source();
        }
        let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
        if has(&["noauth", "wrongpass", "auth", "permission", "noperm"]) {
            Cause::Authentication
        } else if has(&["certificate", "tls", "ssl", "handshake"]) {
            Cause::Tls
        } else if has(&["lookup", "resolve", "name or service", "dns", "nodename"]) {
            Cause::Dns
        } else if has(&["refused"]) {
            Cause::Refused
        } else if has(&["timed out", "timeout", "elapsed", "deadline"]) {
            Cause::Timeout
        } else if has(&["broken pipe", "reset", "closed", "eof", "no answer"]) {
            Cause::Lost
        } else {
            Cause::Other
        }
    }
}

/// Reconnect delays: doubling from `min` up to `max`, each drawn in [half, whole] so that
/// instances that lost the broker together do not come back together, and back to `min`
/// once a connection has stayed up for `healthy_after`.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    healthy_after: Duration,
    current: Duration,
    draws: u64,
    salt: u64,
    connected_at: Option<Instant>,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let salt = u64::from(std::process::id())
            ^ SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos().into());
        Self {
            min,
            max,
            healthy_after: Duration::from_secs(10),
            current: min,
            draws: 0,
            salt,
            connected_at: None,
        }
    }

    /// The delay before the next attempt, after a failure.
    pub fn next_delay(&mut self) -> Duration {
        if self
            .connected_at
            .take()
            .is_some_and(|at| at.elapsed() >= self.healthy_after)
        {
            self.current = self.min;
        }
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        self.draws += 1;
        base.mul_f64(0.5 + 0.5 * crate::spread::scatter(self.draws, self.salt))
    }

    /// A connection is up; the delays start over if it stays up long enough.
    pub fn connected(&mut self) {
        self.connected_at = Some(Instant::now());
    }

    /// The delay that `next_delay` doubles from now (for tests and logs).
    pub fn current(&self) -> Duration {
        self.current
    }
}

/// Failures of one broker connection, logged at `warn` with their cause, at most once per
/// `every` (the rest are counted and summed up in the next line), and the recovery once.
#[derive(Debug)]
pub struct FailureLog {
    what: &'static str,
    every: Duration,
    last_logged: Option<Instant>,
    suppressed: u64,
    failing: bool,
}

impl FailureLog {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            every: Duration::from_secs(30),
            last_logged: None,
            suppressed: 0,
            failing: false,
        }
    }

    /// Logs `err` unless a line went out less than `every` ago; returns whether it logged.
    pub fn failed(
        &mut self,
        err: &(dyn std::error::Error + 'static),
        retry_in: Option<Duration>,
    ) -> bool {
        self.failing = true;
        if self.last_logged.is_some_and(|at| at.elapsed() < self.every) {
            self.suppressed += 1;
            return false;
        }
        let cause = Cause::of(err);
        tracing::warn!(
            connection = self.what,
            cause = cause.label(),
            error = %err,
            retry_in = %retry_in.map_or_else(|| "now".to_owned(), |d| format!("{d:.1?}")),
            failures_not_logged = self.suppressed,
            "broker connection failed"
        );
        self.last_logged = Some(Instant::now());
        self.suppressed = 0;
        true
    }

    /// The connection is up; says so once if it had been failing.
    pub fn recovered(&mut self) {
        if std::mem::take(&mut self.failing) {
            tracing::info!(connection = self.what, "broker connection re-established");
        }
        self.last_logged = None;
        self.suppressed = 0;
    }
}

/// The never-backwards rule, before any write: if the hub already holds `timestamp` or a
/// newer one for `key`, the answer is that, and nothing needs storing.
pub fn already_current(hub: &Hub, key: &str, timestamp: Timestamp) -> Option<Published> {
    let current = hub.latest(key)?;
    (current.timestamp >= timestamp).then_some(if current.timestamp == timestamp {
        Published::Duplicate {
            sequence: (current.sequence != 0).then_some(current.sequence),
        }
    } else {
        Published::AlreadyCurrent {
            current: current.timestamp,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials_whatever_they_hold() {
        assert_eq!(
            redact("nats://tok@a:1,nats://u:p@b:2,nats://c:3"),
            "nats://***@a:1,nats://***@b:2,nats://c:3"
        );
        // Commas, `@`, `:` and `/` in a password, one URL or several.
        for (list, secret) in [
            ("redis://u:pa,ss@h:1", "pa,ss"),
            ("redis://:p@ss,w/rd:x@h:1,redis://h2:2", "p@ss,w/rd:x"),
            (
                "rediss://user:a,b,c@h:1/2, rediss://user:a,b,c@h2:2",
                "a,b,c",
            ),
            ("u:s,e@cret@h:4222", "s,e@cret"),
        ] {
            let shown = redact(list);
            assert!(!shown.contains(secret), "{shown}");
            assert!(shown.contains("***@h"), "{shown}");
        }
        assert_eq!(
            redact("redis://:p,w@h:1,redis://h2:2"),
            "redis://***@h:1,redis://h2:2"
        );
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert_eq!(redact("h:1,h2:2"), "h:1,h2:2");
    }

    #[test]
    fn causes_in_an_operators_words() {
        let io = |kind, text: &str| std::io::Error::new(kind, text.to_owned());
        use std::io::ErrorKind::*;
        assert_eq!(
            Cause::of(&io(Other, "NOAUTH Authentication required.")),
            Cause::Authentication
        );
        assert_eq!(
            Cause::of(&io(Other, "WRONGPASS invalid username-password pair")),
            Cause::Authentication
        );
        assert_eq!(
            Cause::of(&io(Other, "invalid peer certificate: UnknownIssuer")),
            Cause::Tls
        );
        assert_eq!(
            Cause::of(&io(Other, "failed to lookup address information")),
            Cause::Dns
        );
        assert_eq!(
            Cause::of(&io(ConnectionRefused, "Connection refused (os error 111)")),
            Cause::Refused
        );
        assert_eq!(Cause::of(&io(TimedOut, "timed out")), Cause::Timeout);
        assert_eq!(Cause::of(&io(Other, "broken pipe")), Cause::Lost);
        assert_eq!(Cause::of(&io(Other, "weird")), Cause::Other);
    }

    /// The words logged as `cause`, which operators search for.
    #[test]
    fn cause_labels() {
        for (cause, label) in [
            (Cause::Authentication, "authentication"),
            (Cause::Tls, "tls"),
            (Cause::Dns, "dns"),
            (Cause::Refused, "refused"),
            (Cause::Timeout, "timeout"),
            (Cause::Lost, "connection lost"),
            (Cause::Other, "other"),
        ] {
            assert_eq!(cause.label(), label);
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_starts_over_after_a_healthy_while() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut backoff = Backoff::new(min, max);
        let mut delays = Vec::new();
        for _ in 0..8 {
            delays.push(backoff.next_delay());
        }
        let mut base = min;
        for delay in &delays {
            assert!(
                *delay >= base / 2 && *delay <= base,
                "{delay:?} for {base:?}"
            );
            base = (base * 2).min(max);
        }
        assert_eq!(backoff.current(), max);
        // Jittered: not every draw is the same fraction of its base.
        let fractions: Vec<u128> = delays
            .iter()
            .zip([100u128, 200, 400, 800, 1600, 3200, 5000, 5000])
            .map(|(d, b)| d.as_millis() * 100 / b)
            .collect();
        assert!(fractions.windows(2).any(|w| w[0] != w[1]), "{fractions:?}");
        // A connection that dropped at once keeps the delays growing...
        backoff.connected();
        backoff.next_delay();
        assert_eq!(backoff.current(), max);
        // ...one that stayed up a healthy while starts them over.
        backoff.healthy_after = Duration::ZERO;
        backoff.connected();
        assert!(backoff.next_delay() <= min);
        assert_eq!(backoff.current(), min * 2);
    }

    #[test]
    fn failures_are_logged_once_per_period_and_recovery_resets() {
        let err = std::io::Error::other("refused");
        let mut log = FailureLog::new("test");
        assert!(log.failed(&err, None));
        assert!(!log.failed(&err, None));
        assert!(!log.failed(&err, None));
        assert_eq!(log.suppressed, 2);
        log.recovered();
        assert!(log.failed(&err, None));
        log.every = Duration::ZERO;
        assert!(log.failed(&err, None));
    }
}
