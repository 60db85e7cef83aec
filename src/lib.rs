//! flagsmith-sse: Flagsmith's real-time flag updates service, backed by NATS JetStream.
pub mod timestamp;
