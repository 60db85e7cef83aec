//! The NATS JetStream backend: storing updates and feeding the hub.
//!
//! Each instance runs exactly one JetStream consumer for all environments: an ordered push
//! consumer over `flagsmith.environment.>` that starts with the last message of every
//! subject and then follows new ones. It fills the hub, which answers every subscriber's
//! "latest on connect" from memory. The reference service created a consumer per client;
//! consumers cost the server ~39 KB each and are created at only a few thousand per second,
//! which is where it stopped scaling.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer::push, context::PublishErrorKind, stream};
use async_nats::{ConnectOptions, Event, ServerAddr};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{
    Backoff, BoxFuture, Broker, BrokerError, FailureLog, PublishError, Published, boxed, redact,
};
use crate::config::StreamStorage;
use crate::environment::validate_key;
use crate::hub::{Hub, Update};
use crate::metrics::{BrokerOp, Metrics, NatsOp};
use crate::timestamp::Timestamp;

/// A header with the original store time (ms since the epoch) of an update stored back.
const STORED_AT_HEADER: &str = "Flagsmith-Sse-Stored-At";

/// Every environment's subject is this prefix, a dot, and its key.
pub const SUBJECT_PREFIX: &str = "flagsmith.environment";
const SUBJECT_FILTER: &str = "flagsmith.environment.>";

/// How many times a publish is retried when another writer got to the same environment
/// first; each retry re-reads what is stored, so this bounds a tight race, not a fault.
const MAX_PUBLISH_ATTEMPTS: usize = 8;

/// Settings of the NATS side, from `Config`.
#[derive(Clone, Debug)]
pub struct NatsSettings {
    pub url: String,
    pub stream: String,
    pub max_age: Duration,
    pub replicas: u8,
    pub storage: StreamStorage,
    pub timeout: Duration,
}

pub struct NatsBroker {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    settings: NatsSettings,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    /// The consumer has delivered everything the stream held when it was created.
    caught_up: AtomicBool,
    /// Poked when the stream may have changed under us: a reconnect (the server may have
    /// come back with an empty store), a stream advisory, a publish that found no stream.
    stream_check: Arc<Notify>,
    /// Tells the running consumer to start over on the current stream.
    restart_consumer: Notify,
    /// Creation time of the stream the running consumer reads. A stream created anew starts
    /// its sequences at 1 again, where an ordered consumer resuming at its old sequence
    /// would silently skip every new message.
    consumed_stream: Mutex<Option<SystemTime>>,
}

impl NatsBroker {
    /// Starts connecting (in the background if NATS is not up yet) and starts the consumer
    /// that feeds `hub`. Returns at once: the HTTP side serves `/livez` meanwhile, and
    /// `/readyz` says 503 until this is connected and caught up.
    pub async fn start(
        settings: NatsSettings,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, BrokerError> {
        let (servers, options) = connect_options(&settings.url)?;
        let event_metrics = metrics.clone();
        let stream_check = Arc::new(Notify::new());
        let reconnected = stream_check.clone();
        let connected_before = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(FailureLog::new("nats")));
        let options = options
            .name("flagsmith-sse")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            // A connection that stops answering is declared dead after three pings go
            // unanswered (async-nats's rule): about 4.5 s, inside the 10 s the SPEC allows.
            // The server's answers to a ping cost ~14 bytes each way per 1.5 s, and only
            // when nothing else flows.
            .ping_interval(PING_INTERVAL)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                if matches!(event, Event::Connected) {
                    reconnected.notify_one();
                    // The first Connected is the initial connection, not a reconnect.
                    if connected_before.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        // The ordered consumer resumes by itself: what the server pushed
                        // into a connection that had gone silent is delivered again
                        // (tests/liveness.rs posts during the silence and checks).
                        event_metrics.broker_reconnected();
                    }
                }
                let (metrics, failures) = (event_metrics.clone(), failures.clone());
                async move { log_event(&metrics, &failures, event) }
            });
        let client = options
            .connect(servers)
            .await
            .map_err(|e| BrokerError::Connect(boxed(e)))?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(settings.timeout)
            .ack_timeout(settings.timeout)
            .build(client.clone());
        let broker = Arc::new(Self {
            client,
            jetstream,
            settings,
            hub,
            metrics,
            caught_up: AtomicBool::new(false),
            stream_check,
            restart_consumer: Notify::new(),
            consumed_stream: Mutex::new(None),
        });
        tokio::spawn(broker.clone().run_consumer());
        tokio::spawn(broker.clone().watch_stream());
        Ok(broker)
    }

    /// Keeps one consumer running for the life of the process. The ordered consumer heals
    /// itself across reconnects; this loop only handles failing to set it up at all.
    async fn run_consumer(self: Arc<Self>) {
        let backoff = || Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut retries = backoff();
        loop {
            let delay = match self.consume().await {
                Ok(()) => {
                    warn!("NATS consumer ended; starting a new one");
                    retries = backoff();
                    retries.next_delay()
                }
                Err(err) => {
                    let delay = retries.next_delay();
                    warn!(error = %err, retry_in = ?delay, "NATS consumer not running");
                    delay
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    async fn ensure_stream(&self) -> Result<stream::Stream, PublishError> {
        let config = stream::Config {
            name: self.settings.stream.clone(),
            subjects: vec![SUBJECT_FILTER.to_owned()],
            max_messages_per_subject: 1,
            max_age: self.settings.max_age,
            num_replicas: usize::from(self.settings.replicas),
            storage: match self.settings.storage {
                StreamStorage::Memory => stream::StorageType::Memory,
                StreamStorage::File => stream::StorageType::File,
            },
            discard: stream::DiscardPolicy::Old,
            duplicate_window: self.settings.max_age.min(Duration::from_secs(120)),
            ..Default::default()
        };
        let mut stream = self
            .jetstream
            .get_or_create_stream(config.clone())
            .await
            .map_err(|e| {
                self.metrics.nats_error(NatsOp::CreateJetstream);
                PublishError::Store(boxed(e))
            })?;
        if let Ok(info) = stream.info().await {
            let have = &info.config;
            if have.storage != config.storage {
                warn!(
                    stream = %config.name,
                    existing = ?have.storage,
                    configured = ?config.storage,
                    "the existing stream's storage is not NATS_STREAM_STORAGE's, and JetStream \
                     cannot change it in place; serving with the stream as it is. To switch, \
                     delete the stream (`nats stream rm <name>`; running instances recreate it \
                     and store back what they hold) or set NATS_STREAM_STORAGE to match"
                );
            }
            if have.subjects != config.subjects
                || have.max_messages_per_subject != 1
                || have.max_age != config.max_age
                || have.num_replicas != config.num_replicas
            {
                warn!(
                    stream = %config.name,
                    subjects = ?have.subjects,
                    max_age = ?have.max_age,
                    max_messages_per_subject = have.max_messages_per_subject,
                    replicas = have.num_replicas,
                    "existing stream's settings differ from this service's; using it as it is"
                );
            }
        }
        Ok(stream)
    }

    /// Recreates the stream if it is gone, and restarts the consumer if the stream is not
    /// the one it reads, whenever something suggests the stream changed.
    async fn watch_stream(self: Arc<Self>) {
        let subject = format!("$JS.EVENT.ADVISORY.STREAM.*.{}", self.settings.stream);
        let mut advisories = loop {
            match self.client.subscribe(subject.clone()).await {
                Ok(subscriber) => break subscriber,
                Err(err) => {
                    warn!(error = %err, "cannot subscribe to stream advisories; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        loop {
            tokio::select! {
                _ = advisories.next() => {}
                () = self.stream_check.notified() => {}
            }
            let mut retries = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
            loop {
                match self.ensure_stream().await {
                    Ok(stream) => {
                        let created = SystemTime::from(stream.cached_info().created);
                        let consumed = *self
                            .consumed_stream
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        if consumed.is_some_and(|c| c != created) {
                            warn!(stream = %self.settings.stream, "stream was created anew (NATS lost it); storing back what this instance holds and restarting the consumer");
                            self.store_back().await;
                            self.restart_consumer.notify_one();
                        }
                        break;
                    }
                    Err(err) => {
                        debug!(error = %err, "stream check failed; retrying");
                        tokio::time::sleep(retries.next_delay()).await;
                    }
                }
            }
        }
    }

    async fn consume(&self) -> Result<(), PublishError> {
        let stream = self.ensure_stream().await?;
        *self
            .consumed_stream
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            Some(SystemTime::from(stream.cached_info().created));
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: SUBJECT_FILTER.to_owned(),
                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                self.metrics.nats_error(NatsOp::CreateConsumer);
                PublishError::Store(boxed(e))
            })?;
        let pending = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await.map_err(|e| {
            self.metrics.nats_error(NatsOp::CreateConsumer);
            PublishError::Store(boxed(e))
        })?;
        if pending == 0 {
            self.mark_caught_up();
        }
        info!(stream = %self.settings.stream, pending, "NATS consumer running");
        loop {
            let item = tokio::select! {
                item = messages.next() => item,
                () = self.restart_consumer.notified() => {
                    self.caught_up.store(false, Ordering::Relaxed);
                    return Ok(());
                }
            };
            let Some(item) = item else {
                return Ok(());
            };
            match item {
                Ok(message) => self.receive(&message),
                Err(err) => {
                    // The ordered consumer recreates itself after this; nothing is lost
                    // because it resumes from the last stream sequence it delivered.
                    self.metrics.nats_error(NatsOp::Read);
                    warn!(error = %err, "NATS consumer interrupted; it resumes by itself");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn mark_caught_up(&self) {
        if !self.caught_up.swap(true, Ordering::Relaxed) {
            info!("caught up with every stored environment");
        }
    }

    fn receive(&self, message: &jetstream::Message) {
        let Ok(info) = message.info() else {
            self.metrics.nats_error(NatsOp::Read);
            warn!(subject = %message.subject, "message without JetStream metadata ignored");
            return;
        };
        // An update stored back after the stream was lost carries its original time.
        let original = message
            .headers
            .as_ref()
            .and_then(|h| h.get(STORED_AT_HEADER))
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .map(|millis| UNIX_EPOCH + Duration::from_millis(millis));
        let (sequence, pending, stored_at) = (
            info.stream_sequence,
            info.pending,
            original.unwrap_or_else(|| SystemTime::from(info.published)),
        );
        let key = message
            .subject
            .strip_prefix(SUBJECT_PREFIX)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|key| validate_key(key).ok());
        let timestamp = Timestamp::from_update_json(&message.payload);
        match (key, timestamp) {
            (Some(key), Ok(timestamp)) => {
                let moved = self.hub.apply(
                    key,
                    Update {
                        timestamp,
                        sequence,
                        stored_at,
                    },
                );
                debug!(key, %timestamp, sequence, moved, "update received");
            }
            (key, timestamp) => {
                self.metrics.nats_error(NatsOp::Read);
                warn!(
                    subject = %message.subject,
                    key_ok = key.is_some(),
                    payload_error = ?timestamp.err(),
                    "unreadable message in the stream ignored"
                );
            }
        }
        if pending == 0 {
            self.mark_caught_up();
        }
    }

    /// After NATS lost the stream (a restart with memory storage, a lost store): stores
    /// back the newest update this instance holds per environment, each only if the stream
    /// holds nothing newer (another instance may have stored back first), so that an
    /// instance started later still gets the current state on connect.
    async fn store_back(&self) {
        let held = self.hub.snapshot(SystemTime::now());
        let (mut restored, mut failed) = (0, 0);
        for (key, update) in &held {
            let stored = match self.stored(&format!("{SUBJECT_PREFIX}.{key}")).await {
                Ok(stored) => stored,
                Err(err) => {
                    debug!(error = %err, key = &**key, "could not read what the stream holds");
                    failed += 1;
                    continue;
                }
            };
            match self
                .publish_if_newer(key, update.timestamp, Some(update.stored_at), stored)
                .await
            {
                Ok(Published::Stored { .. }) => restored += 1,
                Ok(_) => {}
                Err(err) => {
                    debug!(error = %err, key = &**key, "could not store back");
                    failed += 1;
                }
            }
        }
        for _ in 0..failed {
            self.metrics.broker_error(BrokerOp::Restore);
        }
        info!(
            held = held.len(),
            restored, failed, "stored back this instance's updates into the new stream"
        );
    }

    /// What the stream holds for `subject`: its timestamp and sequence, or `None`.
    async fn stored(&self, subject: &str) -> Result<Option<(Timestamp, u64)>, PublishError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let stream = self
            .jetstream
            .get_stream_no_info(&self.settings.stream)
            .await
            .map_err(|e| PublishError::Read(boxed(e)))?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => {
                let timestamp = Timestamp::from_update_json(&message.payload)
                    .map_err(PublishError::StoredUnreadable)?;
                Ok(Some((timestamp, message.sequence)))
            }
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(PublishError::Read(boxed(err))),
        }
    }

    async fn publish_update(
        &self,
        key: &str,
        timestamp: Timestamp,
    ) -> Result<Published, PublishError> {
        if !self.is_connected() {
            return Err(PublishError::NotConnected);
        }
        // Start from what our consumer has seen; the stream corrects us if it moved on.
        let stored = self
            .hub
            .latest(key)
            .map(|update| (update.timestamp, update.sequence));
        self.publish_if_newer(key, timestamp, None, stored).await
    }

    /// Stores `timestamp` as `key`'s newest unless the stream holds an equal or newer one,
    /// starting from the belief that it holds `stored` (timestamp, subject sequence).
    /// `stored_at`: the original time of an update being stored back, so that it still
    /// leaves the "latest on connect" answer when its retention ends.
    async fn publish_if_newer(
        &self,
        key: &str,
        timestamp: Timestamp,
        stored_at: Option<SystemTime>,
        mut stored: Option<(Timestamp, u64)>,
    ) -> Result<Published, PublishError> {
        let subject = format!("{SUBJECT_PREFIX}.{key}");
        let payload = Bytes::from(format!("{{\"updated_at\": {timestamp}}}"));
        // The same environment and instant always get the same id, so JetStream drops a
        // retried POST within its duplicate window instead of storing it twice.
        let message_id = format!("{key}:{}", timestamp.micros());
        let mut headers = async_nats::HeaderMap::new();
        if let Some(millis) = stored_at
            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis())
        {
            headers.insert(STORED_AT_HEADER, millis.to_string().as_str());
        }
        for _ in 0..MAX_PUBLISH_ATTEMPTS {
            if let Some((current, _)) = stored
                && current >= timestamp
            {
                return Ok(Published::AlreadyCurrent { current });
            }
            // With one message kept per subject, storing an older timestamp would erase a
            // newer one. Publishing on the condition that the subject's last sequence is the
            // one we compared with makes "compare, then write" atomic in JetStream.
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .headers(headers.clone())
                .message_id(&message_id)
                .expected_last_subject_sequence(stored.map_or(0, |(_, sequence)| sequence));
            let acked = match self.jetstream.send_publish(subject.clone(), publish).await {
                Ok(ack) => ack.await,
                Err(err) => Err(err),
            };
            match acked {
                Ok(ack) if ack.duplicate => {
                    return Ok(Published::Duplicate {
                        sequence: Some(ack.sequence),
                    });
                }
                Ok(ack) => {
                    // Stored: local subscribers need not wait for the consumer's copy, and
                    // the next write to this environment compares with this sequence. The
                    // consumer's delivery of the same message changes nothing after this.
                    self.hub.apply(
                        key,
                        Update {
                            timestamp,
                            sequence: ack.sequence,
                            stored_at: stored_at.unwrap_or_else(SystemTime::now),
                        },
                    );
                    return Ok(Published::Stored {
                        sequence: ack.sequence,
                    });
                }
                Err(err) if err.kind() == PublishErrorKind::StreamNotFound => {
                    // NATS came back without our stream (its store was lost, or someone
                    // deleted it): create it again and let the consumer follow.
                    warn!(stream = %self.settings.stream, "stream missing; creating it again");
                    self.ensure_stream().await.inspect_err(|_| {
                        self.metrics.nats_error(NatsOp::Publish);
                    })?;
                    self.stream_check.notify_one();
                    stored = None;
                }
                Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
                    stored = self.stored(&subject).await.inspect_err(|_| {
                        self.metrics.nats_error(NatsOp::Publish);
                    })?;
                }
                Err(err) => {
                    self.metrics.nats_error(NatsOp::Publish);
                    return Err(PublishError::Store(boxed(err)));
                }
            }
        }
        self.metrics.nats_error(NatsOp::Publish);
        Err(PublishError::Contended)
    }
}

impl Broker for NatsBroker {
    fn publish<'a>(
        &'a self,
        key: &'a str,
        timestamp: Timestamp,
    ) -> BoxFuture<'a, Result<Published, PublishError>> {
        Box::pin(self.publish_update(key, timestamp))
    }

    fn is_ready(&self) -> bool {
        self.is_connected() && self.caught_up.load(Ordering::Relaxed)
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn name(&self) -> &'static str {
        "nats"
    }
}

/// How often the client pings a NATS server it has heard nothing from.
const PING_INTERVAL: Duration = Duration::from_millis(1500);

/// Delay before reconnect attempt `attempts` (1 after the first failure; async-nats starts
/// over once connected): doubling from 100 ms to 5 s, each drawn in [half, whole] so that
/// instances that lost NATS together do not come back together.
fn reconnect_delay(attempts: usize) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(6);
    let base = (Duration::from_millis(100) * 2u32.pow(doublings)).min(Duration::from_secs(5));
    let salt = u64::from(std::process::id());
    base.mul_f64(0.5 + 0.5 * crate::spread::scatter(attempts as u64, salt))
}

fn log_event(metrics: &Metrics, failures: &Mutex<FailureLog>, event: Event) {
    let mut failures = failures.lock().unwrap_or_else(PoisonError::into_inner);
    match event {
        Event::Connected => {
            failures.recovered();
            info!("NATS connected");
        }
        Event::Disconnected => {
            metrics.nats_error(NatsOp::Connect);
            warn!("NATS disconnected; reconnecting");
        }
        // A failed connection attempt (async-nats says which kind: authorization, TLS,
        // DNS, I/O, timed out), at start-up and on every reconnect.
        Event::ClientError(err) => {
            metrics.nats_error(NatsOp::Connect);
            failures.failed(&std::io::Error::other(err.to_string()), None);
        }
        Event::LameDuckMode => warn!("NATS server entering lame duck mode"),
        Event::SlowConsumer(sid) => {
            metrics.nats_error(NatsOp::Read);
            warn!(sid, "NATS reports this client as a slow consumer");
        }
        other => warn!(event = %other, "NATS event"),
    }
}

/// Splits `NATS_URL` into server addresses and credentials. async-nats does not take
/// credentials from the URL itself, and operators put them there (`nats://token@host`,
/// `nats://user:pass@host`), so we lift them out. The addresses keep no credentials, so
/// they never reach a log.
fn connect_options(url_list: &str) -> Result<(Vec<ServerAddr>, ConnectOptions), BrokerError> {
    let bad = |reason: Box<dyn std::error::Error + Send + Sync>| BrokerError::BadUrl {
        url: redact(url_list),
        reason,
    };
    let mut servers = Vec::new();
    let mut options = ConnectOptions::new();
    let mut credentials: Option<(String, Option<String>)> = None;
    for part in url_list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let addr: ServerAddr = part.parse().map_err(|e: std::io::Error| bad(boxed(e)))?;
        let mut url = addr.into_inner();
        if !url.username().is_empty() {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            let found = (decode(url.username()), url.password().map(decode));
            if credentials.as_ref().is_some_and(|c| c != &found) {
                return Err(bad("servers carry different credentials".into()));
            }
            credentials = Some(found);
            let _ = url.set_username("");
            let _ = url.set_password(None);
        }
        servers.push(ServerAddr::from_url(url).map_err(|e| bad(boxed(e)))?);
    }
    if servers.is_empty() {
        return Err(bad("no server given".into()));
    }
    match credentials {
        Some((user, Some(password))) => options = options.user_and_password(user, password),
        Some((token, None)) => options = options.token(token),
        None => {}
    }
    Ok((servers, options))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_lifted_out_of_the_url() {
        let (servers, _) =
            connect_options("nats://user:p%40ss@a:4222, nats://user:p%40ss@b:4223").expect("ok");
        let hosts: Vec<_> = servers
            .iter()
            .map(|s| (s.host().to_owned(), s.port()))
            .collect();
        assert_eq!(hosts, [("a".to_owned(), 4222), ("b".to_owned(), 4223)]);
        assert!(servers.iter().all(|s| !s.has_user_pass()));
        assert!(connect_options("nats://u:p@a:1,nats://v:q@b:2").is_err());
        assert!(connect_options("").is_err());
        assert!(connect_options("http://a:1").is_err());
        let (servers, _) = connect_options("127.0.0.1:4222").expect("scheme optional");
        assert_eq!(servers[0].port(), 4222);
    }

    /// Reconnect delays double from 100 ms to 5 s, each drawn in [half, whole].
    #[test]
    fn reconnect_delays_double_up_to_five_seconds_and_are_spread() {
        let mut drawn = Vec::new();
        for attempts in 1..=10 {
            let base = Duration::from_millis(100 * (1 << (attempts - 1).min(6)))
                .min(Duration::from_secs(5));
            let delay = reconnect_delay(attempts);
            assert!(
                delay >= base / 2 && delay <= base,
                "attempt {attempts}: {delay:?} not within [{:?}, {base:?}]",
                base / 2
            );
            drawn.push(delay.as_secs_f64() / base.as_secs_f64());
        }
        assert!(
            drawn.iter().any(|&f| f > 0.5 && f < 1.0),
            "never spread: {drawn:?}"
        );
    }

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact("nats://tok@a:1,nats://u:p@b:2,nats://c:3"),
            "nats://***@a:1,nats://***@b:2,nats://c:3"
        );
    }
}
