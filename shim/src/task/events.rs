//! Task events published to containerd (`/tasks/create`, `/tasks/exit`, ...), over containerd's TTRPC
//! events service. Publishing never blocks a Task call: the publisher queues and retries on its own.

use std::time::SystemTime;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::Context;

pub use containerd_shim::protos::topics;

/// The publisher and containerd namespace of this shim.
pub struct Events {
    publisher: RemotePublisher,
    namespace: String,
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: String) -> Self {
        Self {
            publisher,
            namespace,
        }
    }

    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            tracing::warn!(topic, error = %e, "publishing an event to containerd");
        }
    }
}

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}
