//! The access rules in force, cached for the auth actors: one snapshot shared by
//! every authenticator of the pool (and read by connections for WebSocket frames),
//! replaced whole when the rules are re-read from the store — at start, after a
//! change made through the admin API on this node, and every
//! `auth.access_rules_refresh_ms` (changes made on other nodes).

use std::sync::{Arc, RwLock};

use crate::{
    domain::access_rules::{Operation, RuleSet},
    error::ApiError,
    model::Role,
    store::{Store, StoreError},
};

/// A handle to the current rule set. Cheap to clone; clones share the snapshot.
#[derive(Clone, Default)]
pub struct AccessRules(Arc<RwLock<Arc<RuleSet>>>);

impl AccessRules {
    /// The rules in force now.
    pub fn snapshot(&self) -> Arc<RuleSet> {
        // A poisoned lock only means a writer panicked between two plain stores;
        // the snapshot inside is still whole.
        match self.0.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether `role` may perform `op` under the rules in force.
    pub fn check(&self, role: Role, op: Operation<'_>) -> Result<(), ApiError> {
        self.snapshot().check(role, op)
    }

    /// Re-reads the rules from the store and puts them in force.
    pub async fn reload(&self, store: &Store) -> Result<usize, StoreError> {
        let records = store.list_access_rules().await?;
        let set = Arc::new(RuleSet::from_records(&records));
        let n = set.len();
        match self.0.write() {
            Ok(mut guard) => *guard = set,
            Err(poisoned) => *poisoned.into_inner() = set,
        }
        Ok(n)
    }
}
