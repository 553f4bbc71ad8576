//! The operations behind each RPC, shared by the HTTP API and the WebSocket. Each
//! takes the [`AppState`], the caller and a request message, and returns a response
//! message or an [`ApiError`](crate::error::ApiError). Validation of client input
//! happens here; authorization decisions go through the auth actors.

pub mod auth;
pub mod convert;
mod principal;
pub mod users;
pub mod validate;

use std::sync::Arc;

pub use principal::{Credential, Principal};

use crate::{actors::authenticator::AuthPool, settings::Settings, store::Store};

/// Handles to everything an operation may need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub auth: AuthPool,
}
