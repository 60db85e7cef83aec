//! Prometheus metrics, kept as plain atomics and rendered as text on `/metricsz`.
//!
//! The five SPEC metrics keep the reference service's names and labels, so existing
//! dashboards work unchanged.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering::Relaxed};

use crate::procfs::{self, Process};

/// What kind of write a stream or probe made (the `message` label of the write and error
/// counters, named as the reference service named it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    Keepalive,
    Data,
    Healthcheck,
}

impl WriteKind {
    const ALL: [WriteKind; 3] = [
        WriteKind::Keepalive,
        WriteKind::Data,
        WriteKind::Healthcheck,
    ];

    fn label(self) -> &'static str {
        match self {
            WriteKind::Keepalive => "keepalive",
            WriteKind::Data => "data",
            WriteKind::Healthcheck => "healthcheck",
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

    pub fn record(&self, message: WriteKind) {
        self.0.store(message as u8, Relaxed);
    }

    pub fn get(&self) -> Option<WriteKind> {
        WriteKind::ALL
            .get(usize::from(self.0.load(Relaxed)))
            .copied()
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

/// A broker operation that can fail, the `operation` label of
/// `flagsmith_sse_broker_errors_total`: the same words for every backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerOp {
    /// Opening a connection, or a connection found dead.
    Connect,
    /// Creating what the backend needs (a JetStream stream or consumer).
    Setup,
    /// Storing an update.
    Publish,
    /// Following other instances' updates.
    Read,
    /// Waiting for replicas to hold a write (`REDIS_WAIT_REPLICAS`).
    Wait,
    /// Storing back what this instance holds after the broker lost its data.
    Restore,
}

impl BrokerOp {
    const ALL: [BrokerOp; 6] = [
        BrokerOp::Connect,
        BrokerOp::Setup,
        BrokerOp::Publish,
        BrokerOp::Read,
        BrokerOp::Wait,
        BrokerOp::Restore,
    ];

    fn label(self) -> &'static str {
        match self {
            BrokerOp::Connect => "connect",
            BrokerOp::Setup => "setup",
            BrokerOp::Publish => "publish",
            BrokerOp::Read => "read",
            BrokerOp::Wait => "wait",
            BrokerOp::Restore => "restore",
        }
    }
}

impl From<NatsOp> for BrokerOp {
    fn from(op: NatsOp) -> Self {
        match op {
            NatsOp::Connect => BrokerOp::Connect,
            NatsOp::CreateJetstream | NatsOp::CreateConsumer => BrokerOp::Setup,
            NatsOp::Publish => BrokerOp::Publish,
            NatsOp::Pull | NatsOp::Read | NatsOp::Ack => BrokerOp::Read,
        }
    }
}

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus histogram of durations, lock-free: one counter per bucket (not cumulative
/// here; summed at render time), a sum in microseconds and a count.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

/// Deliveries one fan-out batch made, added to the shared series at once: every worker
/// thread's pass writes the same counters, and adding once per batch rather than once per
/// socket keeps the cores from trading those cache lines back and forth.
#[derive(Debug, Default)]
pub struct DeliveryTally {
    writes: u64,
    buckets: [u64; BUCKETS.len() + 1],
    sum_micros: u64,
}

impl DeliveryTally {
    /// An event written (a `data` write).
    pub fn wrote(&mut self) {
        self.writes += 1;
    }

    /// An event delivered as news, `since_stored` after it was stored.
    pub fn delivered(&mut self, since_stored: std::time::Duration) {
        self.buckets[bucket_of(since_stored)] += 1;
        self.sum_micros = self
            .sum_micros
            .saturating_add(u64::try_from(since_stored.as_micros()).unwrap_or(u64::MAX));
    }
}

fn bucket_of(elapsed: std::time::Duration) -> usize {
    let secs = elapsed.as_secs_f64();
    BUCKETS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(BUCKETS.len())
}

impl Histogram {
    pub fn observe(&self, elapsed: std::time::Duration) {
        self.buckets[bucket_of(elapsed)].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// The `status` label values of queue-change: every code it answers, and `other`.
const STATUSES: [&str; 9] = [
    "200", "400", "401", "404", "405", "408", "413", "503", "other",
];

#[derive(Debug, Default)]
pub struct Metrics {
    subscribers: AtomicI64,
    /// Subscribers that hold a socket of their own (HTTP/1.1), the ones the open-file limit
    /// bounds; HTTP/2 streams share their connection's.
    socket_subscribers: AtomicI64,
    subscribers_total: AtomicU64,
    subscribers_rejected: AtomicU64,
    streams_ended_by_age: AtomicU64,
    /// Refused stream requests: [answered at once, held back first].
    stream_refusals: [AtomicU64; 2],
    http_errors: [AtomicU64; 3],
    http_writes: [AtomicU64; 3],
    nats_errors: [AtomicU64; 7],
    broker_errors: [AtomicU64; 6],
    /// Connections to the broker re-established (NATS or Redis alike).
    broker_reconnects: AtomicU64,
    /// From the update being stored to its event written to a subscriber. "Stored" is
    /// this instance's clock at the JetStream acknowledgement for updates it published, and
    /// JetStream's own timestamp for those its consumer delivered from other instances.
    delivery_latency: Histogram,
    queue_change_duration: [Histogram; STATUSES.len()],
}

/// Values that live elsewhere, sampled at render time.
pub struct Gauges {
    pub environments: usize,
    pub environments_subscribed: usize,
    pub max_subscribers: usize,
    /// Which broker this instance uses (`nats`, `redis`, `memory`), the `broker` label.
    pub broker: &'static str,
    pub broker_connected: bool,
    pub ready: bool,
}

impl Metrics {
    /// Counts a new subscriber unless `max` are connected already, or, for one that holds
    /// a socket of its own, `max_socket` such. Returns its serial number (how many came
    /// before it), which spreads the ends of streams at shutdown.
    pub fn try_subscriber_connected(
        &self,
        max: usize,
        holds_socket: bool,
        max_socket: usize,
    ) -> Option<u64> {
        let refuse = |counter: &AtomicI64, cap: usize| {
            let over = counter.fetch_add(1, Relaxed) >= i64::try_from(cap).unwrap_or(i64::MAX);
            if over {
                counter.fetch_sub(1, Relaxed);
            }
            over
        };
        if holds_socket && refuse(&self.socket_subscribers, max_socket) {
            self.subscribers_rejected.fetch_add(1, Relaxed);
            return None;
        }
        if refuse(&self.subscribers, max) {
            if holds_socket {
                self.socket_subscribers.fetch_sub(1, Relaxed);
            }
            self.subscribers_rejected.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.subscribers_total.fetch_add(1, Relaxed))
    }

    pub fn subscriber_disconnected(&self, held_socket: bool) {
        self.subscribers.fetch_sub(1, Relaxed);
        if held_socket {
            self.socket_subscribers.fetch_sub(1, Relaxed);
        }
    }

    pub fn subscribers(&self) -> i64 {
        self.subscribers.load(Relaxed)
    }

    /// A stream ended cleanly at its age (`MAX_STREAM_AGE`); its client reconnects.
    pub fn stream_reached_max_age(&self) {
        self.streams_ended_by_age.fetch_add(1, Relaxed);
    }

    /// A stream request was refused; `delayed`: its answer was held back first.
    pub fn stream_refused(&self, delayed: bool) {
        self.stream_refusals[usize::from(delayed)].fetch_add(1, Relaxed);
    }

    pub fn http_write(&self, message: WriteKind) {
        self.http_writes[message as usize].fetch_add(1, Relaxed);
    }

    pub fn http_error(&self, message: WriteKind) {
        self.http_errors[message as usize].fetch_add(1, Relaxed);
    }

    /// A failed NATS operation: counted under the seed's NATS name and the broker-neutral one.
    pub fn nats_error(&self, op: NatsOp) {
        self.nats_errors[op as usize].fetch_add(1, Relaxed);
        self.broker_error(op.into());
    }

    pub fn broker_error(&self, op: BrokerOp) {
        self.broker_errors[op as usize].fetch_add(1, Relaxed);
    }

    pub fn broker_reconnected(&self) {
        self.broker_reconnects.fetch_add(1, Relaxed);
    }

    pub fn delivered(&self, since_stored: std::time::Duration) {
        self.delivery_latency.observe(since_stored);
    }

    /// Adds what one fan-out batch delivered.
    pub fn add_deliveries(&self, tally: &DeliveryTally) {
        if tally.writes > 0 {
            self.http_writes[WriteKind::Data as usize].fetch_add(tally.writes, Relaxed);
        }
        let latency = &self.delivery_latency;
        for (bucket, count) in latency.buckets.iter().zip(tally.buckets) {
            if count > 0 {
                bucket.fetch_add(count, Relaxed);
            }
        }
        if tally.sum_micros > 0 {
            latency.sum_micros.fetch_add(tally.sum_micros, Relaxed);
        }
    }

    pub fn queue_change_answered(&self, status: u16, elapsed: std::time::Duration) {
        let code = status.to_string();
        let index = STATUSES
            .iter()
            .position(|s| *s == code)
            .unwrap_or(STATUSES.len() - 1);
        self.queue_change_duration[index].observe(elapsed);
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
             # HELP flagsmith_sse_http1_subscribers Active subscribers holding a socket each (HTTP/1.1).\n\
             # TYPE flagsmith_sse_http1_subscribers gauge\n\
             flagsmith_sse_http1_subscribers {}\n\
             # HELP flagsmith_sse_subscribers_max The cap on HTTP/1.1 subscribers (each holds a socket).\n\
             # TYPE flagsmith_sse_subscribers_max gauge\n\
             flagsmith_sse_subscribers_max {}\n\
             # HELP flagsmith_sse_streams_ended_by_age_total Streams ended cleanly at MAX_STREAM_AGE (their clients reconnect).\n\
             # TYPE flagsmith_sse_streams_ended_by_age_total counter\n\
             flagsmith_sse_streams_ended_by_age_total {}\n\
             # HELP flagsmith_sse_stream_refusals_total Refused stream requests, by whether the answer was held back first.\n\
             # TYPE flagsmith_sse_stream_refusals_total counter\n\
             flagsmith_sse_stream_refusals_total{{delayed=\"false\"}} {}\n\
             flagsmith_sse_stream_refusals_total{{delayed=\"true\"}} {}",
            self.subscribers_total.load(Relaxed),
            self.subscribers_rejected.load(Relaxed),
            self.socket_subscribers.load(Relaxed),
            gauges.max_subscribers,
            self.streams_ended_by_age.load(Relaxed),
            self.stream_refusals[0].load(Relaxed),
            self.stream_refusals[1].load(Relaxed),
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
            for message in WriteKind::ALL {
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
             # HELP flagsmith_sse_environments_subscribed Environments with at least one subscriber here.\n\
             # TYPE flagsmith_sse_environments_subscribed gauge\n\
             flagsmith_sse_environments_subscribed {}\n\
             # HELP flagsmith_sse_ready Whether /readyz answers 200 (1) or 503 (0).\n\
             # TYPE flagsmith_sse_ready gauge\n\
             flagsmith_sse_ready {}",
            gauges.environments,
            gauges.environments_subscribed,
            u8::from(gauges.ready),
        );
        self.render_broker(&mut out, gauges);
        let _ = writeln!(
            out,
            "# HELP flagsmith_sse_delivery_latency_seconds From an update being stored to its event written to a subscriber.\n\
             # TYPE flagsmith_sse_delivery_latency_seconds histogram"
        );
        self.delivery_latency
            .render(&mut out, "flagsmith_sse_delivery_latency_seconds", "");
        let _ = writeln!(
            out,
            "# HELP flagsmith_sse_queue_change_duration_seconds queue-change requests, by response status.\n\
             # TYPE flagsmith_sse_queue_change_duration_seconds histogram"
        );
        for (i, status) in STATUSES.iter().enumerate() {
            self.queue_change_duration[i].render(
                &mut out,
                "flagsmith_sse_queue_change_duration_seconds",
                &format!("status=\"{status}\""),
            );
        }
        render_process(&mut out);
        out
    }
}

impl Metrics {
    /// The broker's series under names that do not say NATS, and for NATS also under the
    /// names the seed's dashboards know (`flagsmith_sse_nats_connected` only with NATS, so
    /// that an alert on it does not fire for a Redis deployment).
    fn render_broker(&self, out: &mut String, gauges: &Gauges) {
        let broker = gauges.broker;
        let connected = u8::from(gauges.broker_connected);
        let reconnects = self.broker_reconnects.load(Relaxed);
        let _ = writeln!(
            out,
            "# HELP flagsmith_sse_broker_connected Whether the connection to the broker is up (1) or not (0).\n\
             # TYPE flagsmith_sse_broker_connected gauge\n\
             flagsmith_sse_broker_connected{{broker=\"{broker}\"}} {connected}\n\
             # HELP flagsmith_sse_broker_reconnects_total Times a connection to the broker was re-established.\n\
             # TYPE flagsmith_sse_broker_reconnects_total counter\n\
             flagsmith_sse_broker_reconnects_total{{broker=\"{broker}\"}} {reconnects}\n\
             # HELP flagsmith_sse_broker_errors_total Broker operations that failed.\n\
             # TYPE flagsmith_sse_broker_errors_total counter"
        );
        for op in BrokerOp::ALL {
            let _ = writeln!(
                out,
                "flagsmith_sse_broker_errors_total{{broker=\"{broker}\",operation=\"{}\"}} {}",
                op.label(),
                self.broker_errors[op as usize].load(Relaxed)
            );
        }
        if broker == "nats" {
            let _ = writeln!(
                out,
                "# HELP flagsmith_sse_nats_connected Whether the NATS connection is up (1) or not (0).\n\
                 # TYPE flagsmith_sse_nats_connected gauge\n\
                 flagsmith_sse_nats_connected {connected}\n\
                 # HELP flagsmith_sse_nats_reconnects_total Times the NATS connection was re-established.\n\
                 # TYPE flagsmith_sse_nats_reconnects_total counter\n\
                 flagsmith_sse_nats_reconnects_total {reconnects}"
            );
        }
    }
}

/// The standard process metrics, read from /proc/self at scrape time (Linux).
fn render_process(out: &mut String) {
    let me = Process::Current;
    let _ = writeln!(
        out,
        "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
         # TYPE process_resident_memory_bytes gauge\n\
         process_resident_memory_bytes {}\n\
         # HELP process_open_fds Number of open file descriptors.\n\
         # TYPE process_open_fds gauge\n\
         process_open_fds {}\n\
         # HELP process_max_fds Maximum number of open file descriptors.\n\
         # TYPE process_max_fds gauge\n\
         process_max_fds {}\n\
         # HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
         # TYPE process_cpu_seconds_total counter\n\
         process_cpu_seconds_total {}",
        procfs::rss_bytes(me).unwrap_or(0),
        procfs::open_fds(me).unwrap_or(0),
        procfs::max_fds(me).unwrap_or_else(|| "0".to_owned()),
        procfs::cpu_micros(me).unwrap_or(0) as f64 / 1e6,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fan-out batch's tally adds up to what the same deliveries observed one by one do.
    #[test]
    fn a_tally_counts_as_its_deliveries_one_by_one() {
        let latencies = [7, 7, 40, 900, 120_000].map(std::time::Duration::from_millis);
        let (one_by_one, tallied) = (Metrics::default(), Metrics::default());
        let mut tally = DeliveryTally::default();
        for latency in latencies {
            one_by_one.http_write(WriteKind::Data);
            one_by_one.delivered(latency);
            tally.wrote();
            tally.delivered(latency);
        }
        // A write that was not news (the event sent on connect) counts as a write only.
        one_by_one.http_write(WriteKind::Data);
        tally.wrote();
        tallied.add_deliveries(&tally);
        let gauges = Gauges {
            environments: 0,
            environments_subscribed: 0,
            max_subscribers: 0,
            broker: "memory",
            broker_connected: true,
            ready: true,
        };
        // The service's own series (the process's, RSS and so on, differ run to run).
        let own = |text: String| -> Vec<String> {
            text.lines()
                .filter(|l| l.starts_with("flagsmith_sse_"))
                .map(str::to_owned)
                .collect()
        };
        let text = tallied.render(&gauges);
        assert_eq!(own(text.clone()), own(one_by_one.render(&gauges)));
        assert!(text.contains("flagsmith_sse_http_writes_total{message=\"data\"} 6"));
        assert!(text.contains("flagsmith_sse_delivery_latency_seconds_count 5"));
    }

    #[test]
    fn renders_every_spec_metric_with_its_labels() {
        let metrics = Metrics::default();
        // Two socket-holding subscribers at most, three in all.
        assert_eq!(metrics.try_subscriber_connected(3, true, 2), Some(0));
        assert_eq!(metrics.try_subscriber_connected(3, true, 2), Some(1));
        assert_eq!(metrics.try_subscriber_connected(3, true, 2), None);
        assert_eq!(metrics.try_subscriber_connected(3, false, 2), Some(2));
        assert_eq!(metrics.try_subscriber_connected(3, false, 2), None);
        metrics.subscriber_disconnected(true);
        metrics.subscriber_disconnected(false);
        // No cap at all (the automatic setting for HTTP/2 streams).
        let uncapped = Metrics::default();
        assert_eq!(
            uncapped.try_subscriber_connected(usize::MAX, false, usize::MAX),
            Some(0)
        );
        metrics.http_write(WriteKind::Data);
        metrics.stream_reached_max_age();
        metrics.stream_refused(true);
        metrics.http_error(WriteKind::Keepalive);
        metrics.nats_error(NatsOp::CreateJetstream);
        metrics.broker_reconnected();
        metrics.delivered(std::time::Duration::from_millis(7));
        metrics.delivered(std::time::Duration::from_secs(60));
        metrics.queue_change_answered(503, std::time::Duration::from_millis(3));
        let text = metrics.render(&Gauges {
            environments: 3,
            environments_subscribed: 1,
            max_subscribers: 2,
            broker: "nats",
            broker_connected: true,
            ready: false,
        });
        for line in [
            "flagsmith_sse_subscribers 1",
            "flagsmith_sse_http1_subscribers 1",
            "flagsmith_sse_subscribers_total 3",
            "flagsmith_sse_subscribers_rejected_total 2",
            "flagsmith_sse_subscribers_max 2",
            "flagsmith_sse_streams_ended_by_age_total 1",
            "flagsmith_sse_stream_refusals_total{delayed=\"true\"} 1",
            "flagsmith_sse_stream_refusals_total{delayed=\"false\"} 0",
            "flagsmith_sse_http_writes_total{message=\"data\"} 1",
            "flagsmith_sse_http_writes_total{message=\"keepalive\"} 0",
            "flagsmith_sse_http_errors_total{message=\"keepalive\"} 1",
            "flagsmith_sse_http_errors_total{message=\"healthcheck\"} 0",
            "flagsmith_sse_nats_errors_total{operation=\"create_jetstream\"} 1",
            "flagsmith_sse_nats_errors_total{operation=\"ack\"} 0",
            "flagsmith_sse_environments 3",
            "flagsmith_sse_environments_subscribed 1",
            "flagsmith_sse_nats_connected 1",
            "flagsmith_sse_ready 0",
            "flagsmith_sse_nats_reconnects_total 1",
            "flagsmith_sse_broker_connected{broker=\"nats\"} 1",
            "flagsmith_sse_broker_reconnects_total{broker=\"nats\"} 1",
            "flagsmith_sse_broker_errors_total{broker=\"nats\",operation=\"setup\"} 1",
            "flagsmith_sse_broker_errors_total{broker=\"nats\",operation=\"wait\"} 0",
            "flagsmith_sse_delivery_latency_seconds_bucket{le=\"0.01\"} 1",
            "flagsmith_sse_delivery_latency_seconds_bucket{le=\"+Inf\"} 2",
            "flagsmith_sse_delivery_latency_seconds_count 2",
            "flagsmith_sse_queue_change_duration_seconds_bucket{status=\"503\",le=\"+Inf\"} 1",
            "flagsmith_sse_queue_change_duration_seconds_count{status=\"200\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn a_redis_instance_exports_no_nats_connection_series() {
        let metrics = Metrics::default();
        metrics.broker_error(BrokerOp::Wait);
        let text = metrics.render(&Gauges {
            environments: 0,
            environments_subscribed: 0,
            max_subscribers: 0,
            broker: "redis",
            broker_connected: false,
            ready: false,
        });
        assert!(text.contains("flagsmith_sse_broker_connected{broker=\"redis\"} 0\n"));
        assert!(text.contains(
            "flagsmith_sse_broker_errors_total{broker=\"redis\",operation=\"wait\"} 1\n"
        ));
        assert!(!text.contains("flagsmith_sse_nats_connected"), "{text}");
        assert!(
            !text.contains("flagsmith_sse_nats_reconnects_total"),
            "{text}"
        );
    }
}
