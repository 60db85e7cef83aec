//! flagsmith-sse: Flagsmith's real-time flag updates service, backed by NATS JetStream.
//!
//! `server` owns the listener and shutdown; `http` routes requests; `sse` streams one
//! subscriber; `hub` fans updates out in process; `broker` stores and receives them through
//! NATS JetStream; `timestamp` and `environment` check what clients send.
pub mod broker;
pub mod config;
pub mod environment;
pub mod h1_stream;
pub mod http;
pub mod hub;
pub mod memory_broker;
pub mod metrics;
pub mod server;
pub mod sse;
pub mod timestamp;
