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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, Script, Value};
use tracing::{debug, info, warn};

use super::{
    BoxFuture, Broker, BrokerError, PublishError, Published, already_current, boxed, redact,
};
use crate::environment::validate_key;
use crate::hub::{Hub, Update};
use crate::timestamp::Timestamp;

pub const LATEST_KEY: &str = "{flagsmith-sse}:latest";
pub const STREAM_KEY: &str = "{flagsmith-sse}:updates";

/// The stream is a log for instances that reconnect, not the store (the hash is): this
/// many entries cover far more than any disconnect, and keep it small.
const STREAM_MAX_LEN: u64 = 100_000;

/// How long one blocking read waits before it is sent again (well below the reader's
/// response timeout, so that an idle Redis is not mistaken for a dead one).
const READ_BLOCK_MS: u64 = 2_000;
const READ_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Compare-and-set of an environment's newest timestamp, and the stream entry, in one step.
/// Returns `{1, stream id}` when stored, `{0, current}` when an equal or newer one is held.
const STORE_SCRIPT: &str = r"
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then
  local micros = tonumber(string.match(held, '^(%d+)'))
  if micros and micros >= tonumber(ARGV[2]) then
    return {0, held}
  end
end
local now = redis.call('TIME')
local stored_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. stored_ms)
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'k', ARGV[1], 't', ARGV[2])
return {1, id}
";

/// Settings of the Redis side, from `Config`.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URLs: one server, or the seed nodes of a cluster.
    pub urls: Vec<String>,
    pub cluster: bool,
    /// How long to wait for Redis to take a write before answering 503.
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
    Single(ConnectionManager),
    Reader(redis::aio::MultiplexedConnection),
    /// A cluster, and the hash slot our two keys live in.
    Cluster(ClusterConnection, u16),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Reader(c) => c.req_packed_command(cmd),
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
            Connection::Reader(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c, _) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Reader(c) => c.get_db(),
            Connection::Cluster(c, _) => c.get_db(),
        }
    }
}

pub struct RedisBroker {
    writer: Arc<Writer>,
    script: Script,
    settings: RedisSettings,
    hub: Arc<Hub>,
    /// The reader is connected and has loaded what Redis holds.
    ready: AtomicBool,
}

impl RedisBroker {
    /// Connects for writing (retrying in the background if Redis is not up yet) and starts
    /// the reader that feeds `hub`. `/readyz` says 503 until the reader has loaded the hash.
    pub async fn start(settings: RedisSettings, hub: Arc<Hub>) -> Result<Arc<Self>, BrokerError> {
        let client = client(&settings, settings.timeout)?;
        let writer = Arc::new(Writer {
            current: Mutex::new(None),
            client,
        });
        match &writer.client {
            Client::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(settings.timeout))
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_max_delay(Duration::from_secs(2));
                // Lazy: connects (and reconnects) on use, so a Redis that is down at
                // start-up delays readiness, not the start.
                let manager = ConnectionManager::new_lazy_with_config((**client).clone(), config)
                    .map_err(|e| BrokerError::Connect(boxed(e)))?;
                writer.replace(Connection::Single(manager));
            }
            Client::Cluster(_) => writer.connect_cluster(),
        }
        let broker = Arc::new(Self {
            writer,
            script: Script::new(STORE_SCRIPT),
            settings: settings.clone(),
            hub,
            ready: AtomicBool::new(false),
        });
        let reader_client = self::client(&settings, READ_RESPONSE_TIMEOUT)?;
        tokio::spawn(broker.clone().run_reader(reader_client));
        Ok(broker)
    }

    /// Keeps one reader for the life of the process, reconnecting with a backoff.
    async fn run_reader(self: Arc<Self>, client: Client) {
        let mut delay = Duration::from_millis(100);
        let mut last_id = String::from("0-0");
        loop {
            match self.read(&client, &mut last_id).await {
                Ok(()) => delay = Duration::from_millis(100),
                Err(err) => {
                    if self.ready.swap(false, Ordering::Relaxed) {
                        warn!(error = %err, "Redis disconnected; reconnecting");
                    } else {
                        debug!(error = %err, retry_in = ?delay, "Redis not reachable");
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Connects, loads every environment's newest timestamp, then follows the stream from
    /// the last id seen (or from where the stream stood before loading, the first time)
    /// until the connection fails.
    async fn read(&self, client: &Client, last_id: &mut String) -> redis::RedisResult<()> {
        let mut connection = match client {
            Client::Single(client) => Connection::Reader(
                client
                    .get_multiplexed_async_connection_with_config(
                        &AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(Duration::from_secs(2)))
                            .set_response_timeout(Some(READ_RESPONSE_TIMEOUT)),
                    )
                    .await?,
            ),
            Client::Cluster(client) => {
                let (connection, slot) = cluster_connection(client).await?;
                Connection::Cluster(connection, slot)
            }
        };
        // Where the stream stands before loading the hash: every write after the load is
        // read from here on, so nothing falls between the two.
        let newest: Value = redis::cmd("XREVRANGE")
            .arg(STREAM_KEY)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut connection)
            .await?;
        let stream_at = stream_entries(&newest).into_iter().next().map(|e| e.id);
        let held: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(LATEST_KEY)
            .query_async(&mut connection)
            .await?;
        for (key, value) in &held {
            if let (Some(key), Some((timestamp, stored_at))) =
                (validate_key(key).ok(), parse_held(value))
            {
                self.apply(key, timestamp, stored_at, 0);
            }
        }
        // A Redis that came back without our stream restarts ids from scratch: follow the
        // new stream from its start.
        if last_id == "0-0" || stream_at.as_deref().is_none_or(|at| !id_after(at, last_id)) {
            *last_id = stream_at.unwrap_or_else(|| "0-0".to_owned());
        }
        if !self.ready.swap(true, Ordering::Relaxed) {
            info!(environments = held.len(), "Redis connected; caught up");
        }
        loop {
            let mut xread = redis::cmd("XREAD");
            xread
                .arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(READ_BLOCK_MS)
                .arg("STREAMS")
                .arg(STREAM_KEY)
                .arg(last_id.as_str());
            let read = xread.query_async::<Value>(&mut connection);
            // No answer within the block time and a margin means a connection that died
            // quietly: connect afresh rather than wait on it.
            let reply = tokio::time::timeout(READ_RESPONSE_TIMEOUT, read)
                .await
                .map_err(|_| {
                    redis::RedisError::from((redis::ErrorKind::Io, "no answer to XREAD in time"))
                })??;
            for entry in stream_entries(&reply) {
                if let (Some(key), Some(micros)) = (
                    entry.field("k").and_then(|k| validate_key(k).ok()),
                    entry.field("t").and_then(|t| t.parse::<i64>().ok()),
                ) && let Ok(timestamp) = Timestamp::from_micros(micros)
                {
                    let stored_at = UNIX_EPOCH + Duration::from_millis(entry.millis());
                    self.apply(key, timestamp, stored_at, entry.sequence());
                } else {
                    warn!(id = %entry.id, "unreadable entry in the Redis stream ignored");
                }
                *last_id = entry.id;
            }
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

    async fn store(&self, key: &str, timestamp: Timestamp) -> Result<Published, PublishError> {
        if !self.is_connected() {
            return Err(PublishError::NotConnected);
        }
        if let Some(answer) = already_current(&self.hub, key, timestamp) {
            return Ok(answer);
        }
        let Some(mut connection) = self.writer.get() else {
            return Err(PublishError::NotConnected);
        };
        let mut invocation = self.script.key(LATEST_KEY);
        invocation
            .key(STREAM_KEY)
            .arg(key)
            .arg(timestamp.micros())
            .arg(STREAM_MAX_LEN);
        let reply: (i64, String) = tokio::time::timeout(
            self.settings.timeout,
            invocation.invoke_async(&mut connection),
        )
        .await
        .map_err(|elapsed| PublishError::Store(boxed(elapsed)))?
        .map_err(|e| PublishError::Store(boxed(e)))?;
        match reply {
            (1, id) => {
                self.wait_for_replicas(&mut connection).await?;
                let entry = StreamEntry {
                    id,
                    fields: Vec::new(),
                };
                let sequence = entry.sequence();
                // Local subscribers need not wait for the reader's copy.
                self.apply(key, timestamp, SystemTime::now(), sequence);
                Ok(Published::Stored { sequence })
            }
            (_, held) => {
                let (current, _) = parse_held(&held).ok_or_else(|| {
                    PublishError::StoredUnreadable(crate::timestamp::TimestampError::Number)
                })?;
                Ok(if current == timestamp {
                    Published::Duplicate { sequence: 0 }
                } else {
                    Published::AlreadyCurrent { current }
                })
            }
        }
    }
}

/// The connection writes go through. A cluster's is opened in the background, so that a
/// cluster that is down at start-up delays readiness, not the start; once open, it follows
/// failovers by itself.
struct Writer {
    client: Client,
    current: Mutex<Option<Connection>>,
}

impl Writer {
    fn get(&self) -> Option<Connection> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, connection: Connection) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(connection);
    }

    /// Opens the cluster connection in the background, retrying until it is open.
    fn connect_cluster(self: &Arc<Self>) {
        let Client::Cluster(client) = &self.client else {
            return;
        };
        let (writer, client) = (self.clone(), client.clone());
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match cluster_connection(&client).await {
                    Ok((connection, slot)) => {
                        writer.replace(Connection::Cluster(connection, slot));
                        break;
                    }
                    Err(err) => {
                        warn!(error = %err, retry_in = ?delay, "Redis Cluster not reachable");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
    }
}

impl RedisBroker {
    /// With `wait_replicas`, holds the answer until that many replicas have the write, so
    /// that a failover cannot lose an acknowledged update. Not enough in time: 503 (the
    /// write stays; a retry is answered from what is stored).
    async fn wait_for_replicas(&self, connection: &mut Connection) -> Result<(), PublishError> {
        let wanted = self.settings.wait_replicas;
        if wanted == 0 {
            return Ok(());
        }
        // A third of the write timeout: replicas take a write in milliseconds, and the
        // whole answer must stay under the 2 s after which Flagsmith's API gives up.
        let mut wait = redis::cmd("WAIT");
        wait.arg(wanted)
            .arg(u64::try_from(self.settings.timeout.as_millis() / 3).unwrap_or(u64::MAX));
        let acknowledged = match connection {
            // WAIT names no key: send it to the primary that took the write.
            Connection::Cluster(cluster, slot) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(*slot, SlotAddr::Master),
                ));
                let value = cluster
                    .route_command(wait, route)
                    .await
                    .map_err(|e| PublishError::Store(boxed(e)))?;
                redis::from_redis_value::<u32>(value).map_err(|e| PublishError::Store(boxed(e)))?
            }
            other => wait
                .query_async::<u32>(other)
                .await
                .map_err(|e| PublishError::Store(boxed(e)))?,
        };
        if acknowledged < wanted {
            return Err(PublishError::Store(
                format!("{acknowledged} of {wanted} replicas took the write in time").into(),
            ));
        }
        Ok(())
    }
}

/// A connection to the cluster, and the slot our keys hash to.
async fn cluster_connection(
    client: &ClusterClient,
) -> redis::RedisResult<(ClusterConnection, u16)> {
    let mut connection = client.get_async_connection().await?;
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(LATEST_KEY)
        .query_async(&mut connection)
        .await?;
    Ok((connection, slot))
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
        self.ready.load(Ordering::Relaxed)
    }

    /// The reader's connection stands for the instance's: it is the one that notices a
    /// Redis going away (its blocking read fails within seconds).
    fn is_connected(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

fn client(settings: &RedisSettings, response_timeout: Duration) -> Result<Client, BrokerError> {
    let bad = |reason: redis::RedisError| BrokerError::BadUrl {
        url: settings
            .urls
            .iter()
            .map(|u| redact(u))
            .collect::<Vec<_>>()
            .join(","),
        reason: boxed(reason),
    };
    if settings.cluster {
        ClusterClient::builder(settings.urls.clone())
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(response_timeout)
            .build()
            .map(|client| Client::Cluster(Box::new(client)))
            .map_err(bad)
    } else {
        let url = settings.urls.first().map(String::as_str).unwrap_or("");
        redis::Client::open(url)
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
