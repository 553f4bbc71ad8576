//! [`MemoryBroker`]: the in-process broker of a node alone (the default). Nothing
//! leaves the node: a publish reaches this node's consumers through the [`Bus`]
//! and that is all there is.

use std::sync::Arc;

use super::{
    broker::{Broker, BrokerKind, Bus, Envelope, Topic},
    hub::Hub,
};

/// The broker of a node without peers.
#[derive(Debug, Default)]
pub struct MemoryBroker;

impl MemoryBroker {
    /// A bus with this broker and its own interest map.
    pub fn bus(node_id: Arc<str>) -> Bus {
        Bus::new(node_id, Arc::new(Hub::default()), Arc::new(MemoryBroker))
    }
}

impl Broker for MemoryBroker {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Local
    }

    fn send_to_others(&self, _envelope: &Arc<Envelope>) {}

    fn interest_changed(&self, _topic: &Topic, _interested: bool) {}

    fn linked(&self) -> bool {
        true
    }
}
