//! Every actix actor, one per file.
//!
//! - [`password_hasher`]: argon2id hashing on dedicated threads (`SyncArbiter`).
//! - [`authenticator`]: token verification, accounts, sessions and API keys, behind
//!   the round-robin [`AuthPool`](authenticator::AuthPool).

pub mod authenticator;
pub mod password_hasher;
