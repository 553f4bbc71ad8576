//! AuthService: sign-up, sign-in, refresh, sign-out and API keys. Each function maps
//! the request onto a message of the [`Authenticator`](crate::actors::authenticator)
//! pool, which validates and decides, and maps the answer back to protobuf.

use super::{
    convert::{api_key_to_proto, tokens_to_proto, user_to_proto},
    validate, AppState, Credential, Principal,
};
use crate::{
    actors::authenticator::{
        ClientAddr, CreateApiKey, ListApiKeys, Refresh, Refreshed, RevokeApiKey, SignIn, SignOut,
        SignUp,
    },
    actors::password_hasher::CallerAlive,
    error::ApiError,
    ids::ApiKeyId,
    proto::v1 as pb,
};

/// Creates an account and signs it in. `client` counts against the per-address
/// sign-up limit.
pub async fn sign_up(
    state: &AppState,
    client: ClientAddr,
    req: pb::SignUpRequest,
) -> Result<pb::SignUpResponse, ApiError> {
    // Dropped with this future: a hashing job still queued for a request that
    // was cancelled or timed out is skipped.
    let alive = CallerAlive::new();
    let signed_in = state
        .auth
        .send(SignUp {
            username: req.username,
            password: req.password,
            display_name: req.display_name,
            client,
            caller: alive.caller(),
        })
        .await?;
    Ok(pb::SignUpResponse {
        user: Some(user_to_proto(&signed_in.user)),
        tokens: Some(tokens_to_proto(&signed_in.tokens)),
    })
}

/// Exchanges a username and password for a token pair. `client` counts against
/// the per-address sign-in limit.
pub async fn sign_in(
    state: &AppState,
    client: ClientAddr,
    req: pb::SignInRequest,
) -> Result<pb::SignInResponse, ApiError> {
    let alive = CallerAlive::new();
    let signed_in = state
        .auth
        .send(SignIn {
            username: req.username,
            password: req.password,
            client,
            caller: alive.caller(),
        })
        .await?;
    Ok(pb::SignInResponse {
        user: Some(user_to_proto(&signed_in.user)),
        tokens: Some(tokens_to_proto(&signed_in.tokens)),
    })
}

/// Exchanges a refresh token for the next token pair.
pub async fn refresh(
    state: &AppState,
    req: pb::RefreshRequest,
) -> Result<pb::RefreshResponse, ApiError> {
    let refreshed = state
        .auth
        .send(Refresh {
            refresh_token: req.refresh_token,
        })
        .await?;
    let tokens = match refreshed {
        Refreshed::Tokens(tokens) => tokens,
        Refreshed::Revoked {
            user_id,
            session_id,
        } => {
            crate::cluster::control::sign_out(&state.bus, &user_id, Some(&session_id));
            return Err(ApiError::unauthenticated(
                "refresh token was already used; the session has been revoked",
            ));
        }
    };
    Ok(pb::RefreshResponse {
        tokens: Some(tokens_to_proto(&tokens)),
    })
}

/// Ends the caller's session, or all of its sessions.
pub async fn sign_out(
    state: &AppState,
    principal: &Principal,
    req: pb::SignOutRequest,
) -> Result<pb::SignOutResponse, ApiError> {
    let ended = state
        .auth
        .send(SignOut {
            principal: principal.clone(),
            all_sessions: req.all_sessions,
        })
        .await?;
    // Live connections of the ended session(s) close with "signed out".
    let session_id = match &principal.credential {
        Credential::Session(id) if !req.all_sessions => Some(id.clone()),
        _ => None,
    };
    // On every node (this one included).
    crate::cluster::control::sign_out(&state.bus, &principal.user_id, session_id.as_ref());
    Ok(pb::SignOutResponse {
        sessions_ended: u32::try_from(ended).unwrap_or(u32::MAX),
    })
}

/// Admin only: creates an API key; the secret is in this response only.
pub async fn create_api_key(
    state: &AppState,
    principal: &Principal,
    req: pb::CreateApiKeyRequest,
) -> Result<pb::CreateApiKeyResponse, ApiError> {
    let created = state
        .auth
        .send(CreateApiKey {
            principal: principal.clone(),
            name: req.name,
        })
        .await?;
    Ok(pb::CreateApiKeyResponse {
        key: Some(api_key_to_proto(&created.key)),
        secret: created.secret,
    })
}

/// Admin only: lists API keys.
pub async fn list_api_keys(
    state: &AppState,
    principal: &Principal,
    req: pb::ListApiKeysRequest,
) -> Result<pb::ListApiKeysResponse, ApiError> {
    let keys = state
        .auth
        .send(ListApiKeys {
            principal: principal.clone(),
            include_revoked: req.include_revoked,
        })
        .await?;
    Ok(pb::ListApiKeysResponse {
        keys: keys.iter().map(api_key_to_proto).collect(),
    })
}

/// Admin only: revokes an API key.
pub async fn revoke_api_key(
    state: &AppState,
    principal: &Principal,
    req: pb::RevokeApiKeyRequest,
) -> Result<pb::RevokeApiKeyResponse, ApiError> {
    let id = validate::id("id", &req.id)?;
    state
        .auth
        .send(RevokeApiKey {
            principal: principal.clone(),
            id: ApiKeyId::from(id),
        })
        .await?;
    // Live connections authenticated with the key end with "signed out"; an API
    // key's principal uses the key id as its user id.
    crate::cluster::control::api_key_revoked(&state.bus, id);
    Ok(pb::RevokeApiKeyResponse {})
}
