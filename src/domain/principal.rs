//! Who is calling: the outcome of authenticating a bearer credential.

use crate::{
    error::ApiError,
    ids::{ApiKeyId, SessionId, UserId},
    model::Role,
};

/// How the caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A roomcast access token of this session.
    Session(SessionId),
    /// A token signed by an external application.
    External,
    /// An API key (server-to-server); acts as the server, not as a user.
    ApiKey(ApiKeyId),
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user; for API keys, the key's id in the user id space (`k_...`).
    pub user_id: UserId,
    pub role: Role,
    pub credential: Credential,
    /// Display name when known without a store read (external tokens).
    pub display_name: Option<String>,
    /// Expiry of the access token in Unix ms (`i64::MAX` for API keys).
    pub expires_at: i64,
}

impl Principal {
    /// The caller as a user; API keys are refused because they have no user.
    pub fn require_user(&self) -> Result<&UserId, ApiError> {
        match self.credential {
            Credential::ApiKey(_) => Err(ApiError::denied(
                "an API key cannot act as a user; use a user's access token",
            )),
            _ => Ok(&self.user_id),
        }
    }

    /// Only server admins (and API keys, which act as the server) may pass.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(ApiError::denied("this call needs the admin role"))
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}
