//! Settings, from environment variables (the names Flagsmith's deployments already use) or
//! the matching command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use thiserror::Error;

/// Flagsmith's real-time flag updates service: Server-Sent Events backed by NATS JetStream
/// or Redis.
#[derive(Clone, Debug, Parser)]
#[command(name = "flagsmith-sse", version, about, long_about = None)]
pub struct Config {
    /// What to do: `serve` (also what runs with no argument; Flagsmith's Helm chart passes
    /// it), or `healthcheck`: GET /readyz (/livez with --live) of the service these same
    /// settings describe (LISTEN_ADDR, TLS_CERT_FILE), exit 0 on 200, 1 otherwise. For a
    /// container's HEALTHCHECK: needs no token, no broker, no curl.
    #[arg(value_parser = ["serve", "healthcheck"], default_value = "serve", hide_default_value = true)]
    pub command: String,

    /// With `healthcheck`: probe /livez (the process answers) instead of /readyz (it also
    /// has its broker and current data).
    #[arg(long)]
    pub live: bool,

    /// Where updates are stored: `nats` (JetStream), `redis` (Redis or Valkey; any number
    /// of instances either way) or `memory` (in this process only: one instance, updates
    /// lost on restart). Unset: `redis` when REDIS_HOST or REDIS_URL is set and NATS_URL is
    /// not (the configuration of Flagsmith's own image), else `nats`.
    #[arg(long, env = "BROKER", value_enum)]
    pub broker: Option<BrokerKind>,

    /// URL of a NATS server, or several separated by commas. May carry credentials:
    /// `nats://user:pass@host:4222` or `nats://token@host:4222`. [default:
    /// nats://127.0.0.1:4222]
    #[arg(long, env = "NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,

    /// Redis host, as Flagsmith's own image reads it. [default: localhost]
    #[arg(long, env = "REDIS_HOST")]
    pub redis_host: Option<String>,

    /// Redis port, as Flagsmith's own image reads it.
    #[arg(long, env = "REDIS_PORT", default_value_t = 6379)]
    pub redis_port: u16,

    /// Connect to a Redis Cluster (REDIS_HOST or REDIS_URL name seed nodes): `true` or
    /// `false`, as Flagsmith's own image reads it.
    #[arg(long, env = "USE_CLUSTER_MODE", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub use_cluster_mode: bool,

    /// Connect to Redis over TLS (`rediss://`): `true` or `false`.
    #[arg(long, env = "REDIS_USE_SSL", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub redis_use_ssl: bool,

    /// Redis password, as Flagsmith's own image reads it: the raw secret, any characters,
    /// not URL-encoded. Used with REDIS_HOST or REDIS_URL (which must then carry none).
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,

    /// Redis ACL user name, as Flagsmith's own image reads it (with REDIS_PASSWORD).
    #[arg(long, env = "REDIS_USERNAME", hide_env_values = true)]
    pub redis_username: Option<String>,

    /// Redis URL(s), for what REDIS_HOST cannot say: `redis://` or `rediss://`,
    /// `user:password@` (URL-encoded), a database (`/2`); several separated by commas only
    /// for the seed nodes of a cluster (USE_CLUSTER_MODE). Wins over REDIS_HOST and
    /// REDIS_PORT.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Replicas that must hold a write before queue-change answers 200 (Redis `WAIT`). 0:
    /// the primary's copy suffices. 1 or more (with replicas, e.g. a cluster with
    /// `--cluster-replicas 1`): an acknowledged update survives a failover.
    #[arg(long, env = "REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,

    /// How long to wait for Redis to take a write before answering 503 (below the 2 s
    /// after which Flagsmith's API gives up).
    #[arg(long, env = "REDIS_TIMEOUT", default_value = "1500ms", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// Address to listen on for HTTP: `:8080` (every IPv4 interface), `127.0.0.1:8080`,
    /// `[::]:8080`. Port 0 picks a free port (the chosen address is logged).
    #[arg(long, env = "LISTEN_ADDR", default_value = ":8080")]
    pub listen_addr: String,

    /// Shared secret the Flagsmith task processor sends as `Authorization: Token <secret>`
    /// to queue-change. Required.
    #[arg(long, env = "SSE_AUTHENTICATION_TOKEN", hide_env_values = true)]
    pub authentication_token: Option<String>,

    /// Send a keep-alive comment after this long without a write to a stream.
    #[arg(long, env = "KEEPALIVE_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,

    /// End each stream cleanly after this many seconds (spread by ±10 % so that clients
    /// that connected together do not reconnect together); 0 or negative: never. The name,
    /// default and meaning of Flagsmith's own service: Ruby's SDK only sees events when a
    /// stream ends, and Flutter's opens a new stream every ~29 s without closing the old.
    #[arg(
        long,
        env = "MAX_STREAM_AGE",
        default_value_t = 30.0,
        allow_negative_numbers = true
    )]
    pub max_stream_age: f64,

    /// Answer a refused stream request (bad key, subscriber cap, shutdown) after about this
    /// long (0.5x to 1.5x, spread), so that SDKs that reconnect at once after any answer do
    /// not spin. 0: at once.
    #[arg(long, env = "REFUSAL_DELAY", default_value = "1s", value_parser = parse_duration)]
    pub refusal_delay: Duration,

    /// Accepted for Flagsmith's own image (its delay between cache polls); not needed here:
    /// updates are pushed, not polled. Logged once when set.
    #[arg(long, env = "STREAM_DELAY")]
    pub stream_delay: Option<String>,

    /// Accepted for Flagsmith's own image (how often it polls Redis); not needed here.
    /// Logged once when set.
    #[arg(long, env = "CACHE_UPDATE_INTERVAL_SECONDS")]
    pub cache_update_interval_seconds: Option<String>,

    /// Accepted for Flagsmith's own image (its Redis SCAN batch); not needed here. Logged
    /// once when set.
    #[arg(long, env = "REDIS_SCAN_COUNT")]
    pub redis_scan_count: Option<String>,

    /// Name of the JetStream stream that holds the last update of each environment.
    #[arg(long, env = "NATS_STREAM", default_value = "FLAGSMITH_SSE")]
    pub nats_stream: String,

    /// How long an update is kept and sent to new subscribers on connect (stream max age).
    #[arg(long, env = "NATS_STREAM_MAX_AGE", default_value = "1h", value_parser = parse_duration)]
    pub nats_stream_max_age: Duration,

    /// Where JetStream keeps the stream: `memory` (as Flagsmith's design prefers: faster,
    /// and lost only when every replica of the stream restarts, after which the running
    /// instances store back what they hold) or `file` (survives NATS restarts). JetStream
    /// cannot change an existing stream's storage: delete the stream to switch.
    #[arg(
        long,
        env = "NATS_STREAM_STORAGE",
        value_enum,
        default_value = "memory"
    )]
    pub nats_stream_storage: StreamStorage,

    /// Replicas of the stream, for clustered NATS (1, 3 or 5).
    #[arg(long, env = "NATS_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_stream_replicas: u8,

    /// How long to wait for NATS to acknowledge a write before answering 503. Flagsmith's
    /// API gives up after 2 s, so this stays below it.
    #[arg(long, env = "NATS_TIMEOUT", default_value = "1500ms", value_parser = parse_duration)]
    pub nats_timeout: Duration,

    /// PEM certificate chain; with TLS_KEY_FILE, serves HTTPS (ALPN h2 and http/1.1).
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key for TLS_CERT_FILE.
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// Most concurrent HTTP/2 streams (subscribers) one connection may open.
    #[arg(long, env = "HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = 10_000)]
    pub http2_max_concurrent_streams: u32,

    /// Close a connection that has not sent its request headers within this time.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Give up on a queue-change body that has not arrived within this time (408).
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,

    /// Drop a subscriber whose socket stays full (it stopped reading) for this long.
    #[arg(long, env = "STREAM_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub stream_write_timeout: Duration,

    /// Most subscribers this instance holds; more get 503 with Retry-After. 0: HTTP/1.1
    /// subscribers (a socket each) up to the open-file limit less 256 for NATS, probes and
    /// queue-change, and HTTP/2 streams bounded only per connection.
    #[arg(long, env = "MAX_SUBSCRIBERS", default_value_t = 0)]
    pub max_subscribers: usize,

    /// On SIGTERM, end streams at moments spread over this window, so their clients do not
    /// all reconnect to the other instances at once.
    #[arg(long, env = "DRAIN_WINDOW", default_value = "5s", value_parser = parse_duration)]
    pub drain_window: Duration,

    /// On SIGTERM or SIGINT, exit after at most this long, whatever clients still hold
    /// open. Keep it above DRAIN_WINDOW, and Kubernetes' grace period above it.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: tracing::Level,

    /// Log format: `text` for people, `json` (one object per line) for log pipelines.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StreamStorage {
    Memory,
    File,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerKind {
    Nats,
    Redis,
    Memory,
}

pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "SSE_AUTHENTICATION_TOKEN is not set: set it (or --authentication-token) to the \
         secret Flagsmith's API sends to queue-change"
    )]
    MissingToken,
    #[error("LISTEN_ADDR {0:?} is not an address like :8080, 127.0.0.1:8080 or [::]:8080")]
    BadListenAddr(String),
    #[error(
        "REDIS_URL carries credentials and REDIS_PASSWORD or REDIS_USERNAME is set too: \
         give them in one place only"
    )]
    ConflictingRedisCredentials,
    #[error(
        "REDIS_URL lists {0} servers but USE_CLUSTER_MODE is not true: set USE_CLUSTER_MODE=true \
         for a cluster's seed nodes, or give one URL"
    )]
    SeveralRedisUrls(usize),
    #[error("REDIS_URL is set but names no server")]
    NoRedisUrl,
    #[error("REDIS_USERNAME is set without REDIS_PASSWORD: an ACL user needs its password")]
    RedisUserWithoutPassword,
    #[error(
        "SSL_CERT_FILE {path:?} (the CA certificates trusted for TLS to Redis) cannot be used: {reason}"
    )]
    BadCaFile { path: PathBuf, reason: String },
}

/// Where to find Redis and how to log in, from Flagsmith's settings or REDIS_URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    /// `redis://host:port[/db]` or `rediss://...`: one server, or a cluster's seed nodes.
    /// Credentials given in REDIS_URL stay in it (URL-encoded, as the operator wrote them).
    pub urls: Vec<String>,
    /// REDIS_USERNAME and REDIS_PASSWORD, raw: set on the connection, never put in a URL.
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Credentials never reach a log through `{:?}`.
impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("urls", &crate::broker::redact(&self.urls.join(",")))
            .field("username", &self.username.as_ref().map(|_| "***"))
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Config {
    /// The token, refusing to run without one: an open queue-change would let anyone push
    /// fake updates to every SDK.
    pub fn token(&self) -> Result<&str, ConfigError> {
        match self.authentication_token.as_deref() {
            Some(token) if !token.is_empty() => Ok(token),
            _ => Err(ConfigError::MissingToken),
        }
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_listen_addr(&self.listen_addr)
    }

    /// The broker to use, and why (for the start-up log).
    pub fn broker_choice(&self) -> (BrokerKind, &'static str) {
        match self.broker {
            Some(kind) => (kind, "BROKER is set"),
            None if (self.redis_host.is_some() || self.redis_url.is_some())
                && self.nats_url.is_none() =>
            {
                (
                    BrokerKind::Redis,
                    "REDIS_HOST or REDIS_URL is set and NATS_URL is not",
                )
            }
            None => (BrokerKind::Nats, "the default"),
        }
    }

    pub fn nats_url(&self) -> &str {
        self.nats_url.as_deref().unwrap_or(DEFAULT_NATS_URL)
    }

    /// Where Redis is and how to log in: REDIS_URL, or a URL built from REDIS_HOST,
    /// REDIS_PORT and REDIS_USE_SSL; with REDIS_USERNAME and REDIS_PASSWORD as Flagsmith's
    /// image takes them. Refuses what would otherwise be silently ignored: credentials in
    /// two places, several URLs without cluster mode, an unusable SSL_CERT_FILE.
    pub fn redis_target(&self) -> Result<RedisTarget, ConfigError> {
        let nonempty = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        let (username, password) = (
            nonempty(&self.redis_username),
            nonempty(&self.redis_password),
        );
        if username.is_some() && password.is_none() {
            return Err(ConfigError::RedisUserWithoutPassword);
        }
        let urls: Vec<String> = match &self.redis_url {
            Some(list) => {
                let urls: Vec<String> = split_urls(list);
                if urls.is_empty() {
                    return Err(ConfigError::NoRedisUrl);
                }
                if password.is_some() && urls.iter().any(|u| url_has_credentials(u)) {
                    return Err(ConfigError::ConflictingRedisCredentials);
                }
                urls
            }
            None => {
                let scheme = if self.redis_use_ssl {
                    "rediss"
                } else {
                    "redis"
                };
                let host = self.redis_host.as_deref().unwrap_or("localhost");
                let host = if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]")
                } else {
                    host.to_owned()
                };
                vec![format!("{scheme}://{host}:{}", self.redis_port)]
            }
        };
        if urls.len() > 1 && !self.use_cluster_mode {
            return Err(ConfigError::SeveralRedisUrls(urls.len()));
        }
        if urls.iter().any(|u| u.starts_with("rediss://"))
            && let Some(path) = std::env::var_os("SSL_CERT_FILE")
        {
            check_ca_file(PathBuf::from(path))?;
        }
        Ok(RedisTarget {
            urls,
            username,
            password,
        })
    }

    /// How long a stream lives, or `None` for ever (`MAX_STREAM_AGE` of 0 or less).
    pub fn stream_age_limit(&self) -> Option<Duration> {
        (self.max_stream_age > 0.0)
            .then(|| Duration::try_from_secs_f64(self.max_stream_age).ok())
            .flatten()
    }

    /// Settings of Flagsmith's own (polling) service that this one accepts and does not
    /// need, with their values, for a log line at start-up.
    pub fn unneeded_settings(&self) -> Vec<(&'static str, &str)> {
        [
            ("STREAM_DELAY", &self.stream_delay),
            (
                "CACHE_UPDATE_INTERVAL_SECONDS",
                &self.cache_update_interval_seconds,
            ),
            ("REDIS_SCAN_COUNT", &self.redis_scan_count),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value.as_deref()?)))
        .collect()
    }
}

/// The URLs of a comma-separated list. A password may hold a comma, so a new URL starts
/// only where a piece has a scheme (`redis://`); a piece without one belongs to the URL
/// before it.
fn split_urls(list: &str) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    for part in list.split(',') {
        match urls.last_mut() {
            _ if part.trim().is_empty() => {}
            Some(last) if !part.contains("://") => {
                last.push(',');
                last.push_str(part);
            }
            _ => urls.push(part.trim_start().to_owned()),
        }
    }
    urls.iter().map(|u| u.trim_end().to_owned()).collect()
}

/// Whether `user:password@` or `password@` precedes the host: a host never holds an `@`.
fn url_has_credentials(url: &str) -> bool {
    url.split_once("://")
        .map_or(url, |(_, rest)| rest)
        .contains('@')
}

/// A CA file must be readable and hold at least one PEM certificate; otherwise TLS to
/// Redis would fail later, at every connection attempt, with a less clear error.
fn check_ca_file(path: PathBuf) -> Result<(), ConfigError> {
    let bad = |reason: String| ConfigError::BadCaFile {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    if !text
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(bad("it holds no PEM certificate".to_owned()));
    }
    Ok(())
}

/// `:8080` is Go's spelling for "every interface", which the reference service accepted.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, ConfigError> {
    let full = match text.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => text.to_owned(),
    };
    full.parse()
        .map_err(|_| ConfigError::BadListenAddr(text.to_owned()))
}

/// `true`/`false` as Python and shell configurations write them (`True`, `1`, `yes`, ...).
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        other => Err(format!("{other:?} is not true or false")),
    }
}

/// `15s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 15s, 500ms, 2m or 1h"))?;
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("{text:?} has an unknown unit (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn listen_addrs() {
        assert_eq!(
            parse_listen_addr(":8080"),
            Ok("0.0.0.0:8080".parse().expect("addr"))
        );
        assert_eq!(
            parse_listen_addr("127.0.0.1:0"),
            Ok("127.0.0.1:0".parse().expect("addr"))
        );
        assert_eq!(
            parse_listen_addr("[::]:80"),
            Ok("[::]:80".parse().expect("addr"))
        );
        assert!(parse_listen_addr("localhost").is_err());
    }

    #[test]
    fn token_is_required() {
        let mut config = Config::parse_from(["flagsmith-sse"]);
        config.authentication_token = None;
        assert_eq!(config.token(), Err(ConfigError::MissingToken));
        config.authentication_token = Some(String::new());
        assert_eq!(config.token(), Err(ConfigError::MissingToken));
        config.authentication_token = Some("secret".into());
        assert_eq!(config.token(), Ok("secret"));
    }

    #[test]
    fn stream_age_as_flagsmiths_service_reads_it() {
        let age = |v: &str| {
            Config::try_parse_from(["flagsmith-sse", "--max-stream-age", v])
                .expect("parses")
                .stream_age_limit()
        };
        assert_eq!(
            Config::parse_from(["flagsmith-sse"]).stream_age_limit(),
            Some(Duration::from_secs(30))
        );
        assert_eq!(age("45"), Some(Duration::from_secs(45)));
        assert_eq!(age("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(age("0"), None);
        assert_eq!(age("-1"), None);
    }

    #[test]
    fn polling_settings_of_flagsmiths_image_are_accepted() {
        let config = Config::try_parse_from([
            "flagsmith-sse",
            "--stream-delay",
            "1",
            "--redis-scan-count",
            "500",
        ])
        .expect("accepted");
        assert_eq!(
            config.unneeded_settings(),
            [("STREAM_DELAY", "1"), ("REDIS_SCAN_COUNT", "500")]
        );
    }

    #[test]
    fn the_broker_follows_what_is_configured() {
        let choice = |args: &[&str]| {
            let mut all = vec!["flagsmith-sse"];
            all.extend_from_slice(args);
            Config::try_parse_from(all)
                .expect("parses")
                .broker_choice()
                .0
        };
        assert_eq!(choice(&[]), BrokerKind::Nats);
        // Flagsmith's own image is configured with REDIS_HOST alone.
        assert_eq!(choice(&["--redis-host", "redis"]), BrokerKind::Redis);
        assert_eq!(
            choice(&["--redis-url", "redis://r:6379"]),
            BrokerKind::Redis
        );
        assert_eq!(
            choice(&["--redis-host", "redis", "--nats-url", "nats://n:4222"]),
            BrokerKind::Nats
        );
        assert_eq!(
            choice(&["--redis-host", "redis", "--broker", "memory"]),
            BrokerKind::Memory
        );
    }

    #[test]
    fn redis_urls_from_the_shipped_settings_or_redis_url() {
        let target = |args: &[&str]| {
            let mut all = vec!["flagsmith-sse"];
            all.extend_from_slice(args);
            Config::try_parse_from(all).expect("parses").redis_target()
        };
        let shipped = target(&[
            "--redis-host",
            "cache",
            "--redis-port",
            "6380",
            "--redis-use-ssl",
            "True",
        ])
        .expect("valid");
        assert_eq!(shipped.urls, ["rediss://cache:6380"]);
        assert_eq!(target(&[]).expect("valid").urls, ["redis://localhost:6379"]);
        let cluster = target(&[
            "--use-cluster-mode",
            "true",
            "--redis-url",
            "redis://u:p@a:1/2, redis://b:2",
        ])
        .expect("valid");
        assert_eq!(cluster.urls, ["redis://u:p@a:1/2", "redis://b:2"]);
        assert_eq!(parse_bool("False"), Ok(false));
        assert_eq!(parse_bool("TRUE"), Ok(true));
        assert!(parse_bool("maybe").is_err());
    }

    #[test]
    fn redis_credentials_as_flagsmiths_image_takes_them() {
        let target = |args: &[&str]| {
            let mut all = vec!["flagsmith-sse"];
            all.extend_from_slice(args);
            Config::try_parse_from(all).expect("parses").redis_target()
        };
        // Raw secrets, any characters, never put into the URL.
        let secret = "p#?,@: w/rd";
        let with_password = target(&[
            "--redis-host",
            "cache",
            "--redis-password",
            secret,
            "--redis-username",
            "flagsmith",
        ])
        .expect("valid");
        assert_eq!(with_password.urls, ["redis://cache:6379"]);
        assert_eq!(with_password.password.as_deref(), Some(secret));
        assert_eq!(with_password.username.as_deref(), Some("flagsmith"));
        let debug = format!("{with_password:?}");
        assert!(!debug.contains(secret), "{debug}");
        assert!(
            debug.contains("redis://cache:6379") && debug.contains("Some(\"***\")"),
            "{debug}"
        );
        // An IPv6 REDIS_HOST is bracketed in the URL; a bracketed one is kept.
        assert_eq!(
            target(&["--redis-host", "::1"]).expect("valid").urls,
            ["redis://[::1]:6379"]
        );
        assert_eq!(
            target(&["--redis-host", "[::1]"]).expect("valid").urls,
            ["redis://[::1]:6379"]
        );
        // Charts pass an empty secret when there is none.
        assert_eq!(
            target(&["--redis-password", ""]).expect("valid").password,
            None
        );
        // A password with a comma in REDIS_URL is one URL, not two.
        assert_eq!(
            target(&["--redis-url", "redis://u:pa,ss@h:1"])
                .expect("valid")
                .urls,
            ["redis://u:pa,ss@h:1"]
        );
        assert_eq!(
            target(&["--redis-url", "redis://:pw@h:1", "--redis-password", "x"]),
            Err(ConfigError::ConflictingRedisCredentials)
        );
        assert_eq!(
            target(&["--redis-url", "redis://h:1", "--redis-password", "x"])
                .expect("valid")
                .password
                .as_deref(),
            Some("x")
        );
        assert_eq!(
            target(&["--redis-url", "redis://a:1,redis://b:2"]),
            Err(ConfigError::SeveralRedisUrls(2))
        );
        assert_eq!(
            target(&["--redis-username", "u"]),
            Err(ConfigError::RedisUserWithoutPassword)
        );
        assert_eq!(
            target(&["--redis-url", " , "]),
            Err(ConfigError::NoRedisUrl)
        );
    }

    #[test]
    fn an_unusable_ca_file_is_refused_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        // Longer than the PEM marker, so that it is searched for and not found.
        std::fs::write(
            &empty,
            "-----BEGIN PRIVATE KEY-----\nnot a certificate at all\n",
        )
        .expect("write");
        for (path, why) in [
            (dir.path().join("missing.pem"), "No such file"),
            (empty, "no PEM certificate"),
        ] {
            match check_ca_file(path.clone()) {
                Err(ConfigError::BadCaFile { path: p, reason }) => {
                    assert_eq!(p, path);
                    assert!(reason.contains(why), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn nats_url_defaults_to_a_local_server() {
        assert_eq!(
            Config::parse_from(["flagsmith-sse"]).nats_url(),
            DEFAULT_NATS_URL
        );
        let set = Config::try_parse_from(["flagsmith-sse", "--nats-url", "nats://n:4222"])
            .expect("parses");
        assert_eq!(set.nats_url(), "nats://n:4222");
    }

    #[test]
    fn stream_storage_defaults_to_memory_and_refuses_unknown_names() {
        assert_eq!(
            Config::parse_from(["flagsmith-sse"]).nats_stream_storage,
            StreamStorage::Memory
        );
        let file = Config::try_parse_from(["flagsmith-sse", "--nats-stream-storage", "file"])
            .expect("parses");
        assert_eq!(file.nats_stream_storage, StreamStorage::File);
        let err = Config::try_parse_from(["flagsmith-sse", "--nats-stream-storage", "disk"])
            .expect_err("refused")
            .to_string();
        assert!(err.contains("memory") && err.contains("file"), "{err}");
    }

    #[test]
    fn serve_is_accepted_for_the_helm_chart() {
        let config =
            Config::try_parse_from(["flagsmith-sse", "serve", "--keepalive-interval", "1s"])
                .expect("serve parses");
        assert_eq!(config.command, "serve");
        assert!(Config::try_parse_from(["flagsmith-sse", "migrate"]).is_err());
    }
}
