//! The Redis (or Valkey) backend, for deployments of Flagsmith's own Redis-based image.
//!
//! Two keys, hash-tagged so that Redis Cluster keeps them in one slot and one script may
//! touch both: `{flagsmith-sse}:latest`, a hash of each environment's newest timestamp
//! (`<micros>:<stored ms>`), and `{flagsmith-sse}:updates`, a stream of every stored update.
//! A write is one Lua script: compare with the hash, and only if newer set it and append
//! to the stream, atomically, so no instance can move an environment backwards.
//!
//! Each instance reads the stream with one blocking `XREAD` from the last id it saw: no
//! polling, and nothing is lost across a disconnect (it resumes from that id). At start-up
//! and after every reconnect it first loads the hash, so a new subscriber's "latest on
//! connect" is served from memory. Plain pub/sub would drop what is sent while an instance
//! is disconnected; the stream does not.
//!
//! Connections die without a word (a crashed host, a NAT or load balancer that drops the
//! flow): every connection here is bounded in time. The writer is pinged every
//! `HEALTH_EVERY` and replaced when a ping or a write gets no answer in time; the reader's
//! blocking read has a deadline a little past its block time.
//!
//! Redis can lose its data (a restart without persistence, a failover to an empty replica,
//! eviction, a flush). The hash holds an epoch field, set by whoever finds it missing:
//! a changed epoch is a certain sign, and every instance then stores back the newest update
//! it holds per environment (the same compare-and-set, so nothing moves backwards).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::io::tcp::TcpSettings;
use redis::{
    AsyncConnectionConfig, Cmd, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Script,
    Value,
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{
    Backoff, BoxFuture, Broker, BrokerError, FailureLog, PublishError, Published, already_current,
    boxed, redact,
};
use crate::config::RedisTarget;
use crate::environment::validate_key;
use crate::hub::{Hub, Update};
use crate::metrics::{BrokerOp, Metrics};
use crate::timestamp::Timestamp;

pub const LATEST_KEY: &str = "{flagsmith-sse}:latest";
pub const STREAM_KEY: &str = "{flagsmith-sse}:updates";
/// The epoch's field in the hash. Environment keys cannot hold `:`, so it meets none; and
/// living in the hash, it goes whenever the hash goes (eviction included).
pub const EPOCH_FIELD: &str = ":epoch";

/// The stream is a log for instances that reconnect, not the store (the hash is): this
/// many entries cover far more than any disconnect, and keep it small.
const STREAM_MAX_LEN: u64 = 100_000;

/// How long one blocking read waits before it is sent again, and how long past that an
/// answer may take before the connection is declared dead.
const READ_BLOCK: Duration = Duration::from_secs(2);
const READ_RESPONSE_TIMEOUT: Duration = Duration::from_secs(4);

/// The writer's health check: a `PING` this often, and this long for its answer. With the
/// reader's bound, a silent connection is replaced within about 4 s, well inside the 10 s
/// the SPEC allows; an idle Redis sees one PING every 2 s and one XREAD every 2 s per
/// instance.
const HEALTH_EVERY: Duration = Duration::from_secs(2);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// How long opening a connection (TCP, TLS, AUTH) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the epoch is checked while the reader is idle, and (at most) how often hash
/// entries older than the retention are pruned.
const EPOCH_CHECK_EVERY: Duration = Duration::from_secs(2);
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Connections kept idle for writes that wait for replicas (`WAIT` needs a connection of
/// its own for the duration, since Redis serves nothing else on it meanwhile).
const MAX_IDLE_WAITERS: usize = 32;

/// Compare-and-set of an environment's newest timestamp, and the stream entry, in one step.
///
/// KEYS: the hash, the stream. ARGV: key, micros, stream max length, the stored time in ms
/// (empty: Redis's clock now), an epoch to set if the hash has none, and `1` to rewrite
/// what is held when not storing (so that a following `WAIT` covers a retried write too).
/// Returns `{1, stream id, epoch}` when stored, `{0, held, epoch}` when an equal or newer
/// one is held.
const STORE_SCRIPT: &str = r"
local epoch = redis.call('HGET', KEYS[1], ':epoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], ':epoch', epoch)
end
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then
  local micros = tonumber(string.match(held, '^(%d+)'))
  if micros and micros >= tonumber(ARGV[2]) then
    if ARGV[6] == '1' then
      redis.call('HSET', KEYS[1], ARGV[1], held)
    end
    return {0, held, epoch}
  end
end
local stored_ms = ARGV[4]
if stored_ms == '' then
  local now = redis.call('TIME')
  stored_ms = string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000))
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. stored_ms)
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'k', ARGV[1], 't', ARGV[2])
return {1, id, epoch}
";

/// Sets the epoch if the hash has none, and returns the one it holds.
const EPOCH_SCRIPT: &str = r"
if redis.call('HSETNX', KEYS[1], ':epoch', ARGV[1]) == 1 then
  return ARGV[1]
end
return redis.call('HGET', KEYS[1], ':epoch')
";

/// Deletes each (field, value) pair given, only if the field still holds that value: a
/// newer update written since the scan stays.
const PRUNE_SCRIPT: &str = r"
local removed = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    removed = removed + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return removed
";

/// Settings of the Redis side, from `Config`.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// The URLs (one server, or a cluster's seed nodes) and REDIS_USERNAME/REDIS_PASSWORD.
    pub target: RedisTarget,
    pub cluster: bool,
    /// How long to wait for Redis to take a write before answering 503, `WAIT` included.
    pub timeout: Duration,
    /// Replicas that must hold a write (`WAIT`) before it is acknowledged: 0 answers once
    /// the primary has it; 1 or more keeps acknowledged writes across a failover, in a
    /// cluster or a primary with replicas.
    pub wait_replicas: u32,
}

/// A client for one server or a cluster.
#[derive(Clone)]
enum Client {
    Single(Box<redis::Client>),
    Cluster(Box<ClusterClient>),
}

/// A connection to one server or a cluster; both speak the same commands.
#[derive(Clone)]
enum Connection {
    Single(MultiplexedConnection),
    /// A cluster, and the hash slot our two keys live in.
    Cluster(ClusterConnection, u16),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c, _) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c, _) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c, _) => c.get_db(),
        }
    }
}

impl Connection {
    /// Sends `cmd` to the primary that holds our keys. Commands that name no key (`PING`,
    /// `WAIT`) would otherwise go to any node of a cluster.
    async fn on_our_primary<T: redis::FromRedisValue>(&mut self, cmd: Cmd) -> RedisResult<T> {
        match self {
            Connection::Cluster(cluster, slot) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(*slot, SlotAddr::Master),
                ));
                redis::from_redis_value(cluster.route_command(cmd, route).await?)
                    .map_err(redis::RedisError::from)
            }
            Connection::Single(single) => cmd.query_async(single).await,
        }
    }

    async fn ping(&mut self) -> RedisResult<()> {
        self.on_our_primary::<String>(redis::cmd("PING"))
            .await
            .map(drop)
    }
}

pub struct RedisBroker {
    settings: RedisSettings,
    writer_client: Client,
    reader_client: Client,
    /// The health-checked connection writes share; `None` while it is being replaced.
    writer: Mutex<Option<Connection>>,
    /// Poked when a write failed in a way that suggests the writer's connection is dead.
    writer_suspect: Notify,
    /// Connections for writes that wait for replicas, one such write at a time each.
    waiters: Mutex<Vec<Connection>>,
    store_script: Script,
    epoch_script: Script,
    prune_script: Script,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    reader_up: AtomicBool,
    /// The reader is connected and has loaded what Redis holds.
    caught_up: AtomicBool,
    /// The data epoch this instance has caught up with; `None` until the first load.
    epoch: Mutex<Option<String>>,
    /// Poked by a write that found another epoch than ours: the reader checks and stores
    /// back what this instance holds.
    epoch_changed: Notify,
}

impl RedisBroker {
    /// Starts the writer's and the reader's connections in the background (a Redis that
    /// is down at start-up delays readiness, not the start); `/readyz` says 503 until both
    /// are up and the reader has loaded the hash.
    pub async fn start(
        settings: RedisSettings,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, BrokerError> {
        let broker = Arc::new(Self {
            writer_client: client(&settings, settings.timeout)?,
            reader_client: client(&settings, READ_RESPONSE_TIMEOUT)?,
            settings,
            writer: Mutex::new(None),
            writer_suspect: Notify::new(),
            waiters: Mutex::new(Vec::new()),
            store_script: Script::new(STORE_SCRIPT),
            epoch_script: Script::new(EPOCH_SCRIPT),
            prune_script: Script::new(PRUNE_SCRIPT),
            hub,
            metrics,
            reader_up: AtomicBool::new(false),
            caught_up: AtomicBool::new(false),
            epoch: Mutex::new(None),
            epoch_changed: Notify::new(),
        });
        tokio::spawn(broker.clone().keep_writer());
        tokio::spawn(broker.clone().run_reader());
        Ok(broker)
    }

    fn writer(&self) -> Option<Connection> {
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_writer(&self, connection: Option<Connection>) {
        *self.writer.lock().unwrap_or_else(PoisonError::into_inner) = connection;
    }

    fn known_epoch(&self) -> Option<String> {
        self.epoch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A new connection, answering: open, authenticated (a wrong or missing password fails
    /// here, not at the first write), within `CONNECT_TIMEOUT` plus one ping.
    async fn open(
        &self,
        client: &Client,
        response_timeout: Duration,
    ) -> Result<Connection, redis::RedisError> {
        let opened = async {
            let mut connection = match client {
                Client::Single(client) => Connection::Single(
                    client
                        .get_multiplexed_async_connection_with_config(
                            &AsyncConnectionConfig::new()
                                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                                .set_response_timeout(Some(response_timeout)),
                        )
                        .await?,
                ),
                Client::Cluster(client) => {
                    let mut connection = client.get_async_connection().await?;
                    let slot: u16 = redis::cmd("CLUSTER")
                        .arg("KEYSLOT")
                        .arg(LATEST_KEY)
                        .query_async(&mut connection)
                        .await?;
                    Connection::Cluster(connection, slot)
                }
            };
            connection.ping().await?;
            Ok(connection)
        };
        tokio::time::timeout(CONNECT_TIMEOUT + HEALTH_TIMEOUT, opened)
            .await
            .unwrap_or_else(|_| Err(timed_out("connecting to Redis")))
    }

    /// Keeps one healthy connection for writes for the life of the process: opens it,
    /// pings it, and replaces it when a ping (or a write) gets no answer in time.
    async fn keep_writer(self: Arc<Self>) {
        let mut reconnects = Reconnects::new("redis writer");
        loop {
            let mut connection = reconnects
                .open(&self, &self.writer_client, self.settings.timeout)
                .await;
            self.set_writer(Some(connection.clone()));
            let err = loop {
                tokio::select! {
                    () = tokio::time::sleep(HEALTH_EVERY) => {}
                    () = self.writer_suspect.notified() => {}
                }
                match tokio::time::timeout(HEALTH_TIMEOUT, connection.ping()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => break err,
                    Err(_) => break timed_out("no answer to PING in time"),
                }
            };
            // Writes answer 503 until a new connection is up; connections of the same
            // kind that waited for replicas likely died the same way.
            self.set_writer(None);
            self.waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            self.metrics.broker_error(BrokerOp::Connect);
            reconnects.log.failed(&err, None);
        }
    }

    /// Keeps one reader for the life of the process, reconnecting with a backoff.
    async fn run_reader(self: Arc<Self>) {
        let mut reconnects = Reconnects::new("redis reader");
        let mut last_id = String::from("0-0");
        loop {
            let mut connection = reconnects
                .open(&self, &self.reader_client, READ_RESPONSE_TIMEOUT)
                .await;
            self.reader_up.store(true, Ordering::Relaxed);
            let err = match self.read(&mut connection, &mut last_id).await {
                Err(err) => err,
                // The epoch moved under an open connection: start over on a fresh one.
                Ok(()) => continue,
            };
            self.reader_up.store(false, Ordering::Relaxed);
            self.caught_up.store(false, Ordering::Relaxed);
            self.metrics.broker_error(BrokerOp::Read);
            reconnects.wait_after(&err).await;
        }
    }

    /// Checks the epoch (storing back what this instance holds if Redis lost its data),
    /// loads every environment's newest timestamp, then follows the stream from the last
    /// id seen (or from where the stream stood before loading, the first time) until the
    /// connection fails (`Err`) or the epoch changes (`Ok`).
    async fn read(&self, connection: &mut Connection, last_id: &mut String) -> RedisResult<()> {
        let epoch = self.check_epoch(connection).await?;
        // Where the stream stands before loading the hash: every write after the load is
        // read from here on, so nothing falls between the two.
        let newest: Value = bounded(
            redis::cmd("XREVRANGE")
                .arg(STREAM_KEY)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(connection),
        )
        .await?;
        let stream_at = stream_entries(&newest).into_iter().next().map(|e| e.id);
        let held: Vec<(String, String)> = bounded(
            redis::cmd("HGETALL")
                .arg(LATEST_KEY)
                .query_async(connection),
        )
        .await?;
        let mut environments = 0;
        for (key, value) in &held {
            if let (Some(key), Some((timestamp, stored_at))) =
                (validate_key(key).ok(), parse_held(value))
            {
                self.apply(key, timestamp, stored_at, 0);
                environments += 1;
            }
        }
        // A Redis that came back without our stream restarts ids from scratch: follow the
        // new stream from its start.
        if last_id == "0-0" || stream_at.as_deref().is_none_or(|at| !id_after(at, last_id)) {
            *last_id = stream_at.unwrap_or_else(|| "0-0".to_owned());
        }
        if !self.caught_up.swap(true, Ordering::Relaxed) {
            info!(environments, "Redis connected; caught up");
        }
        let mut epoch_checked = Instant::now();
        let mut pruned = Instant::now();
        loop {
            let mut xread = redis::cmd("XREAD");
            xread
                .arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(u64::try_from(READ_BLOCK.as_millis()).unwrap_or(u64::MAX))
                .arg("STREAMS")
                .arg(STREAM_KEY)
                .arg(last_id.as_str());
            // No answer within the block time and a margin means a connection that died
            // quietly: connect afresh rather than wait on it.
            let reply = tokio::select! {
                reply = tokio::time::timeout(READ_RESPONSE_TIMEOUT, xread.query_async::<Value>(connection)) => {
                    reply.map_err(|_| timed_out("no answer to XREAD in time"))??
                }
                // A write found another epoch. The blocked XREAD is abandoned with its
                // connection, which the caller replaces.
                () = self.epoch_changed.notified() => return Ok(()),
            };
            for entry in stream_entries(&reply) {
                if let (Some(key), Some(micros)) = (
                    entry.field("k").and_then(|k| validate_key(k).ok()),
                    entry.field("t").and_then(|t| t.parse::<i64>().ok()),
                ) && let Ok(timestamp) = Timestamp::from_micros(micros)
                {
                    let stored_at = UNIX_EPOCH + Duration::from_millis(entry.millis());
                    self.apply(key, timestamp, stored_at, entry.sequence());
                } else {
                    self.metrics.broker_error(BrokerOp::Read);
                    warn!(id = %entry.id, "unreadable entry in the Redis stream ignored");
                }
                *last_id = entry.id;
            }
            if epoch_checked.elapsed() >= EPOCH_CHECK_EVERY {
                epoch_checked = Instant::now();
                let now: String = bounded(
                    self.epoch_script
                        .key(LATEST_KEY)
                        .arg(new_epoch())
                        .invoke_async(connection),
                )
                .await?;
                if now != epoch {
                    return Ok(());
                }
            }
            // A short retention (tests, small installs) is pruned at its own pace.
            if pruned.elapsed() >= PRUNE_EVERY.min(self.hub.retention()) {
                pruned = Instant::now();
                if let Err(err) = self.prune(connection).await {
                    debug!(error = %err, "pruning old environments failed; trying again later");
                }
            }
        }
    }

    /// The epoch Redis holds (set now if missing). If it is not the one this instance
    /// caught up with, Redis lost its data since: store back what this instance holds.
    async fn check_epoch(&self, connection: &mut Connection) -> RedisResult<String> {
        let epoch: String = bounded(
            self.epoch_script
                .key(LATEST_KEY)
                .arg(new_epoch())
                .invoke_async(connection),
        )
        .await?;
        match self.known_epoch() {
            Some(known) if known != epoch => {
                let held = self.hub.snapshot(SystemTime::now());
                warn!(
                    environments = held.len(),
                    "Redis lost its data (its epoch changed); storing back the newest update this instance holds per environment"
                );
                for (key, update) in held {
                    let stored_ms = update
                        .stored_at
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis());
                    let restored: RedisResult<(i64, String, String)> = bounded(
                        self.store_invocation(&key, update.timestamp, Some(stored_ms), false)
                            .invoke_async(connection),
                    )
                    .await;
                    if let Err(err) = restored {
                        self.metrics.broker_error(BrokerOp::Restore);
                        return Err(err);
                    }
                }
            }
            _ => {}
        }
        *self.epoch.lock().unwrap_or_else(PoisonError::into_inner) = Some(epoch.clone());
        Ok(epoch)
    }

    /// Deletes hash entries older than the retention, so that the hash does not grow with
    /// every environment ever updated.
    async fn prune(&self, connection: &mut Connection) -> RedisResult<()> {
        let retention = self.hub.retention();
        let now = SystemTime::now();
        let mut cursor: u64 = 0;
        loop {
            let (next, page): (u64, Vec<(String, String)>) = bounded(
                redis::cmd("HSCAN")
                    .arg(LATEST_KEY)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(500)
                    .query_async(connection),
            )
            .await?;
            let mut prune = self.prune_script.key(LATEST_KEY);
            let mut stale = 0;
            for (field, value) in &page {
                if let Some((_, stored_at)) = parse_held(value)
                    && now
                        .duration_since(stored_at)
                        .is_ok_and(|age| age > retention)
                {
                    prune.arg(field).arg(value);
                    stale += 1;
                }
            }
            if stale > 0 {
                let removed: u64 = bounded(prune.invoke_async(connection)).await?;
                debug!(removed, "pruned environments older than the retention");
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    fn apply(&self, key: &str, timestamp: Timestamp, stored_at: SystemTime, sequence: u64) {
        let moved = self.hub.apply(
            key,
            Update {
                timestamp,
                sequence,
                stored_at,
            },
        );
        debug!(key, %timestamp, moved, "update received");
    }

    fn store_invocation(
        &self,
        key: &str,
        timestamp: Timestamp,
        stored_ms: Option<u128>,
        rewrite_held: bool,
    ) -> redis::ScriptInvocation<'_> {
        let mut invocation = self.store_script.key(LATEST_KEY);
        invocation
            .key(STREAM_KEY)
            .arg(key)
            .arg(timestamp.micros())
            .arg(STREAM_MAX_LEN)
            .arg(stored_ms.map_or_else(String::new, |ms| ms.to_string()))
            .arg(new_epoch())
            .arg(if rewrite_held { "1" } else { "0" });
        invocation
    }

    async fn store(&self, key: &str, timestamp: Timestamp) -> Result<Published, PublishError> {
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        let waiting = self.settings.wait_replicas > 0;
        // Answering a retry from memory would skip the wait for replicas, and the write it
        // repeats may not have reached them yet.
        if !waiting && let Some(answer) = already_current(&self.hub, key, timestamp) {
            return Ok(answer);
        }
        let mut connection = if waiting {
            self.waiter(deadline).await?
        } else {
            self.writer().ok_or(PublishError::NotConnected)?
        };
        let reply: (i64, String, String) = match tokio::time::timeout_at(
            deadline,
            self.store_invocation(key, timestamp, None, waiting)
                .invoke_async(&mut connection),
        )
        .await
        {
            Ok(Ok(reply)) => reply,
            failed => {
                self.metrics.broker_error(BrokerOp::Publish);
                self.writer_suspect.notify_one();
                return Err(PublishError::Store(match failed {
                    Ok(Err(err)) => boxed(err),
                    _ => boxed(timed_out("Redis did not take the write in time")),
                }));
            }
        };
        let (status, value, epoch) = reply;
        if self.known_epoch().is_some_and(|known| known != epoch) {
            self.epoch_changed.notify_one();
        }
        if waiting {
            self.wait_for_replicas(&mut connection, deadline).await?;
            let mut idle = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < MAX_IDLE_WAITERS {
                idle.push(connection);
            }
        }
        if status == 1 {
            let entry = StreamEntry {
                id: value,
                fields: Vec::new(),
            };
            let sequence = entry.sequence();
            // Local subscribers need not wait for the reader's copy.
            self.apply(key, timestamp, SystemTime::now(), sequence);
            return Ok(Published::Stored { sequence });
        }
        let (current, _) = parse_held(&value).ok_or_else(|| {
            PublishError::StoredUnreadable(crate::timestamp::TimestampError::Number)
        })?;
        Ok(if current == timestamp {
            Published::Duplicate { sequence: None }
        } else {
            Published::AlreadyCurrent { current }
        })
    }

    /// A connection for a write that waits for replicas: an idle one, or a new one.
    async fn waiter(&self, deadline: tokio::time::Instant) -> Result<Connection, PublishError> {
        if self.writer().is_none() {
            return Err(PublishError::NotConnected);
        }
        let idle = self
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        if let Some(connection) = idle {
            return Ok(connection);
        }
        match tokio::time::timeout_at(
            deadline,
            self.open(&self.writer_client, self.settings.timeout),
        )
        .await
        {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(err)) => {
                self.metrics.broker_error(BrokerOp::Connect);
                Err(PublishError::Store(boxed(err)))
            }
            Err(elapsed) => Err(PublishError::Store(boxed(elapsed))),
        }
    }

    /// Holds the answer until `wait_replicas` replicas have the write (or, for a retried
    /// write, what is held), so that a failover cannot lose an acknowledged update. Not
    /// enough by the deadline: 503 (the write stays; a retry waits again).
    async fn wait_for_replicas(
        &self,
        connection: &mut Connection,
        deadline: tokio::time::Instant,
    ) -> Result<(), PublishError> {
        let wanted = self.settings.wait_replicas;
        // Redis answers WAIT by its own timeout; leave a margin for the answer to travel.
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .saturating_sub(Duration::from_millis(100));
        let mut wait = redis::cmd("WAIT");
        wait.arg(wanted)
            .arg(u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1));
        let failed = |err: BoxedErr| {
            self.metrics.broker_error(BrokerOp::Wait);
            PublishError::Store(err)
        };
        let acknowledged: u32 =
            match tokio::time::timeout_at(deadline, connection.on_our_primary(wait)).await {
                Ok(Ok(n)) => n,
                Ok(Err(err)) => return Err(failed(boxed(err))),
                Err(elapsed) => return Err(failed(boxed(elapsed))),
            };
        if acknowledged < wanted {
            return Err(failed(
                format!("{acknowledged} of {wanted} replicas took the write in time").into(),
            ));
        }
        Ok(())
    }
}

type BoxedErr = super::BoxError;

/// One long-lived connection's reconnect state: its back-off, its failure log, and whether
/// it was open before (so that a reconnect is counted as one).
struct Reconnects {
    backoff: Backoff,
    log: FailureLog,
    opened_before: bool,
}

impl Reconnects {
    fn new(what: &'static str) -> Self {
        Self {
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            log: FailureLog::new(what),
            opened_before: false,
        }
    }

    /// Opens a connection, retrying with the back-off until one answers.
    async fn open(
        &mut self,
        broker: &RedisBroker,
        client: &Client,
        response_timeout: Duration,
    ) -> Connection {
        loop {
            match broker.open(client, response_timeout).await {
                Ok(connection) => {
                    self.log.recovered();
                    self.backoff.connected();
                    if std::mem::replace(&mut self.opened_before, true) {
                        broker.metrics.broker_reconnected();
                    }
                    return connection;
                }
                Err(err) => {
                    broker.metrics.broker_error(BrokerOp::Connect);
                    self.wait_after(&err).await;
                }
            }
        }
    }

    /// Logs a failure and waits out the back-off.
    async fn wait_after(&mut self, err: &redis::RedisError) {
        let delay = self.backoff.next_delay();
        self.log.failed(err, Some(delay));
        tokio::time::sleep(delay).await;
    }
}

/// A Redis command bounded by the reader's response timeout.
async fn bounded<T>(command: impl std::future::Future<Output = RedisResult<T>>) -> RedisResult<T> {
    tokio::time::timeout(READ_RESPONSE_TIMEOUT, command)
        .await
        .unwrap_or_else(|_| Err(timed_out("no answer from Redis in time")))
}

fn timed_out(what: &'static str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

/// A value no other instance or restart will draw: the epoch of a hash found without one.
fn new_epoch() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{:x}", std::process::id())
}

impl Broker for RedisBroker {
    fn publish<'a>(
        &'a self,
        key: &'a str,
        timestamp: Timestamp,
    ) -> BoxFuture<'a, Result<Published, PublishError>> {
        Box::pin(self.store(key, timestamp))
    }

    fn is_ready(&self) -> bool {
        self.is_connected() && self.caught_up.load(Ordering::Relaxed)
    }

    /// Both connections are up: the writer's (pinged every 2 s) and the reader's.
    fn is_connected(&self) -> bool {
        self.reader_up.load(Ordering::Relaxed) && self.writer().is_some()
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

/// TCP settings of every Redis connection: keepalive probes and `TCP_USER_TIMEOUT` let the
/// kernel notice a peer that vanished on a real network, beneath the pings above.
fn tcp_settings() -> TcpSettings {
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(
            socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(10))
                .with_interval(Duration::from_secs(2))
                .with_retries(3),
        )
        .set_user_timeout(Duration::from_secs(10))
}

fn client(settings: &RedisSettings, response_timeout: Duration) -> Result<Client, BrokerError> {
    let target = &settings.target;
    let bad = |reason: redis::RedisError| BrokerError::BadUrl {
        url: redact(&target.urls.join(",")),
        reason: boxed(reason),
    };
    if settings.cluster {
        let mut builder = ClusterClient::builder(target.urls.clone())
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(response_timeout)
            .tcp_settings(tcp_settings());
        if let Some(username) = &target.username {
            builder = builder.username(username);
        }
        if let Some(password) = &target.password {
            builder = builder.password(password);
        }
        builder
            .build()
            .map(|client| Client::Cluster(Box::new(client)))
            .map_err(bad)
    } else {
        let url = target.urls.first().map(String::as_str).unwrap_or("");
        let mut info = url.into_connection_info().map_err(bad)?;
        let mut login = info.redis_settings().clone();
        if let Some(username) = &target.username {
            login = login.set_username(username);
        }
        if let Some(password) = &target.password {
            login = login.set_password(password);
        }
        info = info
            .set_redis_settings(login)
            .set_tcp_settings(tcp_settings());
        redis::Client::open(info)
            .map(|client| Client::Single(Box::new(client)))
            .map_err(bad)
    }
}

/// `<micros>:<stored ms>` from the hash.
fn parse_held(value: &str) -> Option<(Timestamp, SystemTime)> {
    let (micros, stored_ms) = value.split_once(':')?;
    let timestamp = Timestamp::from_micros(micros.parse().ok()?).ok()?;
    let stored_at = UNIX_EPOCH + Duration::from_millis(stored_ms.parse().ok()?);
    Some((timestamp, stored_at))
}

/// Whether stream id `a` (`<ms>-<seq>`) comes after `b`.
fn id_after(a: &str, b: &str) -> bool {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    };
    parse(a) > parse(b)
}

/// One entry of a Redis stream.
struct StreamEntry {
    id: String,
    fields: Vec<(String, String)>,
}

impl StreamEntry {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Milliseconds since the epoch: when Redis stored it.
    fn millis(&self) -> u64 {
        self.id
            .split_once('-')
            .map_or(self.id.as_str(), |(ms, _)| ms)
            .parse()
            .unwrap_or(0)
    }

    /// A number that grows with every write: milliseconds and the id's sequence.
    fn sequence(&self) -> u64 {
        let seq = self
            .id
            .split_once('-')
            .and_then(|(_, s)| s.parse::<u64>().ok())
            .unwrap_or(0);
        self.millis().saturating_mul(1000).saturating_add(seq)
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The entries of an `XREAD` or `XREVRANGE` reply, in either protocol's shape.
fn stream_entries(reply: &Value) -> Vec<StreamEntry> {
    fn entry(value: &Value) -> Option<StreamEntry> {
        let Value::Array(parts) = value else {
            return None;
        };
        let id = text(parts.first()?)?;
        let fields = match parts.get(1)? {
            Value::Array(flat) => flat
                .chunks(2)
                .filter_map(|pair| Some((text(pair.first()?)?, text(pair.get(1)?)?)))
                .collect(),
            Value::Map(pairs) => pairs
                .iter()
                .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
                .collect(),
            _ => Vec::new(),
        };
        Some(StreamEntry { id, fields })
    }
    fn entries(list: &Value) -> Vec<StreamEntry> {
        match list {
            Value::Array(items) => items.iter().filter_map(entry).collect(),
            _ => Vec::new(),
        }
    }
    match reply {
        // XREVRANGE: the entries themselves. XREAD (RESP2): [[stream, entries], ...].
        Value::Array(items) => items
            .iter()
            .flat_map(|item| match item {
                Value::Array(pair)
                    if pair.len() == 2
                        && matches!(pair[1], Value::Array(_))
                        && text(&pair[0]).is_some_and(|name| name == STREAM_KEY) =>
                {
                    entries(&pair[1])
                }
                other => entry(other).into_iter().collect(),
            })
            .collect(),
        // XREAD (RESP3): {stream: entries}.
        Value::Map(pairs) => pairs.iter().flat_map(|(_, list)| entries(list)).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_stream_replies() {
        let entry = Value::Array(vec![
            bulk("1700000000123-4"),
            Value::Array(vec![bulk("k"), bulk("env"), bulk("t"), bulk("5000000")]),
        ]);
        let xread = Value::Array(vec![Value::Array(vec![
            bulk(STREAM_KEY),
            Value::Array(vec![entry.clone()]),
        ])]);
        let got = stream_entries(&xread);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].field("k"), Some("env"));
        assert_eq!(got[0].field("t"), Some("5000000"));
        assert_eq!(got[0].millis(), 1_700_000_000_123);
        assert_eq!(got[0].sequence(), 1_700_000_000_123_004);
        let xrevrange = Value::Array(vec![entry]);
        assert_eq!(stream_entries(&xrevrange)[0].id, "1700000000123-4");
        assert!(stream_entries(&Value::Nil).is_empty());
    }

    /// Stream entries whose fields come as a map, or whose texts come as simple strings,
    /// read the same as the usual flat arrays of bulk strings.
    #[test]
    fn reads_fields_as_a_map_and_simple_strings() {
        let entry = Value::Array(vec![
            Value::SimpleString("1700000000123-4".to_owned()),
            Value::Map(vec![
                (bulk("k"), Value::SimpleString("env".to_owned())),
                (Value::SimpleString("t".to_owned()), bulk("5000000")),
            ]),
        ]);
        let xread = Value::Map(vec![(bulk(STREAM_KEY), Value::Array(vec![entry]))]);
        let got = stream_entries(&xread);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "1700000000123-4");
        assert_eq!(got[0].field("k"), Some("env"));
        assert_eq!(got[0].field("t"), Some("5000000"));
    }

    #[test]
    fn ids_and_held_values() {
        assert!(id_after("2-0", "1-5"));
        assert!(id_after("1-6", "1-5"));
        assert!(!id_after("1-5", "1-5"));
        let (timestamp, stored_at) = parse_held("1500000:1700000000000").expect("parses");
        assert_eq!(timestamp.micros(), 1_500_000);
        assert_eq!(
            stored_at,
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_000)
        );
        assert!(parse_held("garbage").is_none());
    }
}
