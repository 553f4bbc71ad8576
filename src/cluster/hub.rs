//! [`Hub`]: this node's interest in topics (topic → local consumers) and the
//! delivery of a published message to them. Shared by both brokers; not an actor
//! (a lookup per publish under a lock split into shards by topic, so that rooms on
//! different threads rarely meet).

use std::{
    collections::{hash_map::DefaultHasher, HashMap},
    hash::{Hash as _, Hasher as _},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use actix::Recipient;

use super::broker::{Delivered, Envelope, Topic};

/// Lock shards of the topic map.
const SHARDS: usize = 16;

type Consumers = Vec<(u64, Recipient<Delivered>)>;

/// Topic → the local consumers registered for it.
#[derive(Default)]
pub struct Hub {
    shards: [Mutex<HashMap<Topic, Consumers>>; SHARDS],
    next_id: AtomicU64,
}

impl Hub {
    fn shard(&self, topic: &Topic) -> MutexGuard<'_, HashMap<Topic, Consumers>> {
        let mut hasher = DefaultHasher::new();
        topic.hash(&mut hasher);
        let index = (hasher.finish() as usize) % SHARDS;
        // A consumer list stays consistent whatever panicked while holding it.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a consumer; its id, and whether it is the topic's first.
    pub fn register(&self, topic: &Topic, recipient: Recipient<Delivered>) -> (u64, bool) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.shard(topic);
        let consumers = shard.entry(topic.clone()).or_default();
        consumers.push((id, recipient));
        (id, consumers.len() == 1)
    }

    /// Removes a consumer; whether it was the topic's last.
    pub fn unregister(&self, topic: &Topic, id: u64) -> bool {
        let mut shard = self.shard(topic);
        let Some(consumers) = shard.get_mut(topic) else {
            return false;
        };
        consumers.retain(|(c, _)| *c != id);
        if consumers.is_empty() {
            shard.remove(topic);
            return true;
        }
        false
    }

    /// Whether some local consumer has interest in `topic` now.
    pub fn interested(&self, topic: &Topic) -> bool {
        self.shard(topic).contains_key(topic)
    }

    /// Every topic with local interest.
    pub fn topics(&self) -> Vec<Topic> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            all.extend(shard.keys().cloned());
        }
        all
    }

    /// Hands `envelope` to the consumers of its topic (all but `except`), or of
    /// `topic` when given; how many got it.
    pub fn dispatch(
        &self,
        envelope: &Arc<Envelope>,
        except: Option<u64>,
        topic: Option<&Topic>,
    ) -> usize {
        let topic = topic.unwrap_or(&envelope.topic);
        let shard = self.shard(topic);
        let Some(consumers) = shard.get(topic) else {
            return 0;
        };
        let mut count = 0;
        for (id, recipient) in consumers {
            if Some(*id) == except {
                continue;
            }
            // A consumer whose actor stopped is unregistered when its Interest drops.
            recipient.do_send(Delivered(envelope.clone()));
            count += 1;
        }
        count
    }

    /// Hands `envelope` to every consumer of every topic (once per registration).
    pub fn dispatch_all(&self, envelope: &Arc<Envelope>) {
        for topic in self.topics() {
            self.dispatch(envelope, None, Some(&topic));
        }
    }
}
