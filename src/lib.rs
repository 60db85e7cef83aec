//! flagsmith-sse: Flagsmith's real-time flag updates service, backed by NATS JetStream or
//! Redis.
//!
//! Data flows one way: `server` accepts connections and hands them to `h1_stream` (plain
//! HTTP/1.1 streams) or hyper and `http` (everything else); both open subscribers through
//! `state`; `broker` stores updates and feeds `hub`, which every `sse` subscriber reads.
//! `routes` says which path is which endpoint, `error` what each failure answers,
//! `timestamp` and `environment` check what clients send.
#![forbid(unsafe_code)]
pub mod broker;
pub mod config;
pub mod environment;
pub mod error;
pub mod fanout;
pub mod h1_stream;
pub mod healthcheck;
pub mod http;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod procfs;
pub mod routes;
pub mod server;
pub mod spread;
pub mod sse;
pub mod state;
pub mod timestamp;
pub mod tls;
pub mod wire;
