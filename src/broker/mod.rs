//! Where updates are stored, and how every instance learns of them: one trait, one module
//! per backend. A backend stores an update, answers only once it is stored, and feeds every
//! update it learns of (its own and other instances') into the hub, which never moves an
//! environment backwards. It never reaches past the hub to subscribers.

pub mod memory;
pub mod nats;
pub mod redis;

use std::future::Future;
use std::pin::Pin;

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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// Stored now, at this sequence (the backend's order of writes).
    Stored { sequence: u64 },
    /// The same update was stored before (a retried POST); not stored twice.
    Duplicate { sequence: u64 },
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
/// logs and errors.
pub fn redact(url_list: &str) -> String {
    url_list
        .split(',')
        .map(|part| match (part.find("://"), part.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://***@{}", &part[..scheme], &part[at + 1..])
            }
            (None, Some(at)) => format!("***@{}", &part[at + 1..]),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The never-backwards rule, before any write: if the hub already holds `timestamp` or a
/// newer one for `key`, the answer is that, and nothing needs storing.
pub fn already_current(hub: &Hub, key: &str, timestamp: Timestamp) -> Option<Published> {
    let current = hub.latest(key)?;
    (current.timestamp >= timestamp).then_some(if current.timestamp == timestamp {
        Published::Duplicate {
            sequence: current.sequence,
        }
    } else {
        Published::AlreadyCurrent {
            current: current.timestamp,
        }
    })
}
