//! Prometheus metrics, kept as plain atomics and rendered as text on `/metricsz`.
//!
//! The five SPEC metrics keep the reference service's names and labels, so existing
//! dashboards work unchanged.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering::Relaxed};

/// What was written to a client, the `message` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    Keepalive,
    Data,
    Healthcheck,
}

impl Message {
    const ALL: [Message; 3] = [Message::Keepalive, Message::Data, Message::Healthcheck];

    fn label(self) -> &'static str {
        match self {
            Message::Keepalive => "keepalive",
            Message::Data => "data",
            Message::Healthcheck => "healthcheck",
        }
    }
}

/// The kind of the last message a connection's stream wrote. hyper reports a failed write
/// only as the connection ending with an error, so the connection keeps this to know which
/// `message` label the failure belongs to.
#[derive(Debug, Default)]
pub struct LastWrite(AtomicU8);

impl LastWrite {
    const NONE: u8 = u8::MAX;

    pub fn new() -> Self {
        Self(AtomicU8::new(Self::NONE))
    }

    pub fn record(&self, message: Message) {
        self.0.store(message as u8, Relaxed);
    }

    pub fn get(&self) -> Option<Message> {
        Message::ALL.get(usize::from(self.0.load(Relaxed))).copied()
    }
}

/// A NATS operation that can fail, the `operation` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatsOp {
    Connect,
    Publish,
    CreateJetstream,
    CreateConsumer,
    Pull,
    Read,
    Ack,
}

impl NatsOp {
    const ALL: [NatsOp; 7] = [
        NatsOp::Connect,
        NatsOp::Publish,
        NatsOp::CreateJetstream,
        NatsOp::CreateConsumer,
        NatsOp::Pull,
        NatsOp::Read,
        NatsOp::Ack,
    ];

    fn label(self) -> &'static str {
        match self {
            NatsOp::Connect => "connect",
            NatsOp::Publish => "publish",
            NatsOp::CreateJetstream => "create_jetstream",
            NatsOp::CreateConsumer => "create_consumer",
            NatsOp::Pull => "pull",
            NatsOp::Read => "read",
            NatsOp::Ack => "ack",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    subscribers: AtomicI64,
    subscribers_total: AtomicU64,
    subscribers_rejected: AtomicU64,
    http_errors: [AtomicU64; 3],
    http_writes: [AtomicU64; 3],
    nats_errors: [AtomicU64; 7],
}

/// Values that live elsewhere, sampled at render time.
pub struct Gauges {
    pub environments: usize,
    pub max_subscribers: usize,
    pub nats_connected: bool,
    pub ready: bool,
}

impl Metrics {
    /// Counts a new subscriber unless `max` are connected already. Returns its serial
    /// number (how many came before it), which spreads the ends of streams at shutdown.
    pub fn try_subscriber_connected(&self, max: usize) -> Option<u64> {
        let before = self.subscribers.fetch_add(1, Relaxed);
        if before >= max as i64 {
            self.subscribers.fetch_sub(1, Relaxed);
            self.subscribers_rejected.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.subscribers_total.fetch_add(1, Relaxed))
    }

    pub fn subscriber_disconnected(&self) {
        self.subscribers.fetch_sub(1, Relaxed);
    }

    pub fn subscribers(&self) -> i64 {
        self.subscribers.load(Relaxed)
    }

    pub fn http_write(&self, message: Message) {
        self.http_writes[message as usize].fetch_add(1, Relaxed);
    }

    pub fn http_error(&self, message: Message) {
        self.http_errors[message as usize].fetch_add(1, Relaxed);
    }

    pub fn nats_error(&self, op: NatsOp) {
        self.nats_errors[op as usize].fetch_add(1, Relaxed);
    }

    pub fn nats_errors(&self, op: NatsOp) -> u64 {
        self.nats_errors[op as usize].load(Relaxed)
    }

    /// The Prometheus text exposition format, version 0.0.4.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(2048);
        let _ = writeln!(
            out,
            "# HELP flagsmith_sse_subscribers Active SSE subscribers.\n\
             # TYPE flagsmith_sse_subscribers gauge\n\
             flagsmith_sse_subscribers {}",
            self.subscribers.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP flagsmith_sse_subscribers_total SSE subscribers ever connected.\n\
             # TYPE flagsmith_sse_subscribers_total counter\n\
             flagsmith_sse_subscribers_total {}\n\
             # HELP flagsmith_sse_subscribers_rejected_total Subscribers refused with 503 at the cap.\n\
             # TYPE flagsmith_sse_subscribers_rejected_total counter\n\
             flagsmith_sse_subscribers_rejected_total {}\n\
             # HELP flagsmith_sse_subscribers_max The subscriber cap of this instance.\n\
             # TYPE flagsmith_sse_subscribers_max gauge\n\
             flagsmith_sse_subscribers_max {}",
            self.subscribers_total.load(Relaxed),
            self.subscribers_rejected.load(Relaxed),
            gauges.max_subscribers,
        );
        for (name, help, values) in [
            (
                "flagsmith_sse_http_errors_total",
                "Writes to clients that failed.",
                &self.http_errors,
            ),
            (
                "flagsmith_sse_http_writes_total",
                "Writes to clients.",
                &self.http_writes,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for message in Message::ALL {
                let _ = writeln!(
                    out,
                    "{name}{{message=\"{}\"}} {}",
                    message.label(),
                    values[message as usize].load(Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP flagsmith_sse_nats_errors_total NATS operations that failed.\n\
             # TYPE flagsmith_sse_nats_errors_total counter"
        );
        for op in NatsOp::ALL {
            let _ = writeln!(
                out,
                "flagsmith_sse_nats_errors_total{{operation=\"{}\"}} {}",
                op.label(),
                self.nats_errors[op as usize].load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP flagsmith_sse_environments Environments held in memory (subscribed or recently updated).\n\
             # TYPE flagsmith_sse_environments gauge\n\
             flagsmith_sse_environments {}\n\
             # HELP flagsmith_sse_nats_connected Whether the NATS connection is up (1) or not (0).\n\
             # TYPE flagsmith_sse_nats_connected gauge\n\
             flagsmith_sse_nats_connected {}\n\
             # HELP flagsmith_sse_ready Whether /readyz answers 200 (1) or 503 (0).\n\
             # TYPE flagsmith_sse_ready gauge\n\
             flagsmith_sse_ready {}",
            gauges.environments,
            u8::from(gauges.nats_connected),
            u8::from(gauges.ready),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_spec_metric_with_its_labels() {
        let metrics = Metrics::default();
        assert_eq!(metrics.try_subscriber_connected(2), Some(0));
        assert_eq!(metrics.try_subscriber_connected(2), Some(1));
        assert_eq!(metrics.try_subscriber_connected(2), None);
        metrics.subscriber_disconnected();
        metrics.http_write(Message::Data);
        metrics.http_error(Message::Keepalive);
        metrics.nats_error(NatsOp::CreateJetstream);
        let text = metrics.render(&Gauges {
            environments: 3,
            max_subscribers: 2,
            nats_connected: true,
            ready: false,
        });
        for line in [
            "flagsmith_sse_subscribers 1",
            "flagsmith_sse_subscribers_total 2",
            "flagsmith_sse_subscribers_rejected_total 1",
            "flagsmith_sse_subscribers_max 2",
            "flagsmith_sse_http_writes_total{message=\"data\"} 1",
            "flagsmith_sse_http_writes_total{message=\"keepalive\"} 0",
            "flagsmith_sse_http_errors_total{message=\"keepalive\"} 1",
            "flagsmith_sse_http_errors_total{message=\"healthcheck\"} 0",
            "flagsmith_sse_nats_errors_total{operation=\"create_jetstream\"} 1",
            "flagsmith_sse_nats_errors_total{operation=\"ack\"} 0",
            "flagsmith_sse_environments 3",
            "flagsmith_sse_nats_connected 1",
            "flagsmith_sse_ready 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
