//! The in-process broker (`BROKER=memory`): one instance, no NATS, for small installs and
//! local development. Updates live in the hub only, for the same retention, and are gone
//! when the process exits. The HTTP and fan-out code see the same `Broker` either way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::{BoxFuture, Broker, PublishError, Published, already_current};
use crate::hub::{Hub, Update};
use crate::timestamp::Timestamp;

pub struct MemoryBroker {
    hub: Arc<Hub>,
    sequence: AtomicU64,
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>) -> Arc<Self> {
        Arc::new(Self {
            hub,
            sequence: AtomicU64::new(0),
        })
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(
        &'a self,
        key: &'a str,
        timestamp: Timestamp,
    ) -> BoxFuture<'a, Result<Published, PublishError>> {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
        let update = Update {
            timestamp,
            sequence,
            stored_at: SystemTime::now(),
        };
        let outcome = if self.hub.apply(key, update) {
            Published::Stored { sequence }
        } else {
            // Equal or older than what the hub holds (or shutting down): nothing moves back.
            already_current(&self.hub, key, timestamp)
                .unwrap_or(Published::AlreadyCurrent { current: timestamp })
        };
        Box::pin(std::future::ready(Ok(outcome)))
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn is_connected(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn stores_newer_and_refuses_to_go_back() {
        let hub = Arc::new(Hub::new(Duration::from_secs(3600)));
        let broker = MemoryBroker::new(hub.clone());
        let at = |m| Timestamp::from_micros(m).expect("in range");
        assert_eq!(
            broker.publish("k", at(2)).await.ok(),
            Some(Published::Stored { sequence: 1 })
        );
        assert_eq!(
            broker.publish("k", at(2)).await.ok(),
            Some(Published::Duplicate { sequence: Some(1) })
        );
        assert_eq!(
            broker.publish("k", at(1)).await.ok(),
            Some(Published::AlreadyCurrent { current: at(2) })
        );
        assert_eq!(hub.latest("k").map(|u| u.timestamp), Some(at(2)));
    }

    /// Always ready and connected (there is nothing to connect to), under its own label.
    #[test]
    fn always_ready_under_its_own_name() {
        let broker = MemoryBroker::new(Arc::new(Hub::new(Duration::from_secs(1))));
        assert!(broker.is_ready());
        assert!(broker.is_connected());
        assert_eq!(broker.name(), "memory");
    }
}
