//! UserService: profiles. Any authenticated principal may read profiles; only a
//! user (not an API key) may read or change its own. Reads go straight to the
//! store: there is no decision to make beyond "authenticated".

use std::collections::{HashMap, HashSet};

use super::{convert::user_to_proto, validate, AppState, Principal};
use crate::{
    error::ApiError,
    ids::UserId,
    proto::v1 as pb,
    store::{ProfileUpdate, StoreError},
};

/// Most ids one BatchGetUsers may ask for.
pub const BATCH_GET_MAX: usize = 100;
/// SearchUsers page size when the request says 0.
pub const SEARCH_PAGE_DEFAULT: u32 = 20;
/// Largest SearchUsers page.
pub const SEARCH_PAGE_MAX: u32 = 100;
/// Longest SearchUsers prefix.
pub const SEARCH_PREFIX_MAX_CHARS: usize = 32;

/// The caller's own profile.
pub async fn get_me(
    state: &AppState,
    principal: &Principal,
    _req: pb::GetMeRequest,
) -> Result<pb::GetMeResponse, ApiError> {
    let user_id = principal.require_user()?;
    let user = match state.store.get_user(user_id).await {
        Ok(user) => user,
        Err(StoreError::NotFound) => {
            return Err(ApiError::not_found("your account no longer exists"))
        }
        Err(e) => return Err(e.into()),
    };
    Ok(pb::GetMeResponse {
        user: Some(user_to_proto(&user)),
    })
}

/// One profile by id.
pub async fn get_user(
    state: &AppState,
    _principal: &Principal,
    req: pb::GetUserRequest,
) -> Result<pb::GetUserResponse, ApiError> {
    let id = validate::id("id", &req.id)?;
    let user = match state.store.get_user(&UserId::from(id)).await {
        Ok(user) => user,
        Err(StoreError::NotFound) => {
            return Err(ApiError::not_found(format!("user `{id}` not found")))
        }
        Err(e) => return Err(e.into()),
    };
    Ok(pb::GetUserResponse {
        user: Some(user_to_proto(&user)),
    })
}

/// Up to 100 profiles by id, in request order; duplicates are ignored and unknown
/// ids listed in `missing_ids`.
pub async fn batch_get_users(
    state: &AppState,
    _principal: &Principal,
    req: pb::BatchGetUsersRequest,
) -> Result<pb::BatchGetUsersResponse, ApiError> {
    let ids = unique_ids(&req.ids)?;
    let found: HashMap<UserId, _> = state
        .store
        .get_users(&ids)
        .await?
        .into_iter()
        .map(|user| (user.id.clone(), user))
        .collect();
    let mut users = Vec::with_capacity(found.len());
    let mut missing_ids = Vec::new();
    for id in ids {
        match found.get(&id) {
            Some(user) => users.push(user_to_proto(user)),
            None => missing_ids.push(id.0),
        }
    }
    Ok(pb::BatchGetUsersResponse { users, missing_ids })
}

/// The ids of a batch request: each valid, duplicates dropped, order kept, 1–100.
fn unique_ids(raw: &[String]) -> Result<Vec<UserId>, ApiError> {
    if raw.is_empty() {
        return Err(ApiError::invalid("ids must name at least one user"));
    }
    let mut seen = HashSet::new();
    let mut ids = Vec::new();
    for (i, id) in raw.iter().enumerate() {
        validate::id(&format!("ids[{i}]"), id)?;
        if seen.insert(id.as_str()) {
            ids.push(UserId::from(id.as_str()));
        }
    }
    if ids.len() > BATCH_GET_MAX {
        return Err(ApiError::invalid(format!(
            "ids must name at most {BATCH_GET_MAX} users"
        )));
    }
    Ok(ids)
}

/// Changes the caller's own profile; fields that are not set stay as they are.
pub async fn update_profile(
    state: &AppState,
    principal: &Principal,
    req: pb::UpdateProfileRequest,
) -> Result<pb::UpdateProfileResponse, ApiError> {
    let user_id = principal.require_user()?;
    let update = profile_update(req)?;
    let result =
        if update.display_name.is_none() && update.avatar_url.is_none() && update.bio.is_none() {
            state.store.get_user(user_id).await
        } else {
            state.store.update_profile(user_id, update).await
        };
    let user = match result {
        Ok(user) => user,
        Err(StoreError::NotFound) => {
            return Err(ApiError::not_found("your account no longer exists"))
        }
        Err(e) => return Err(e.into()),
    };
    tracing::debug!(user = %user.id, "profile updated");
    Ok(pb::UpdateProfileResponse {
        user: Some(user_to_proto(&user)),
    })
}

/// Validates the fields that are set.
fn profile_update(req: pb::UpdateProfileRequest) -> Result<ProfileUpdate, ApiError> {
    let display_name = req
        .display_name
        .as_deref()
        .map(validate::display_name)
        .transpose()?;
    let avatar_url = req
        .avatar_url
        .as_deref()
        .map(|url| validate::http_url_or_empty("avatar_url", url, validate::AVATAR_URL_MAX_CHARS))
        .transpose()?;
    let bio = match req.bio {
        Some(bio) => {
            let bio = bio.trim().to_owned();
            validate::char_len("bio", &bio, 0, validate::BIO_MAX_CHARS)?;
            validate::multi_line("bio", &bio)?;
            Some(bio)
        }
        None => None,
    };
    Ok(ProfileUpdate {
        display_name,
        avatar_url,
        bio,
    })
}

/// Users whose username or display name starts with a prefix, ordered by id.
pub async fn search_users(
    state: &AppState,
    _principal: &Principal,
    req: pb::SearchUsersRequest,
) -> Result<pb::SearchUsersResponse, ApiError> {
    let prefix = req.prefix.trim().to_lowercase();
    validate::char_len("prefix", &prefix, 1, SEARCH_PREFIX_MAX_CHARS)?;
    let page_size = validate::page_size(
        "page_size",
        req.page_size,
        SEARCH_PAGE_DEFAULT,
        SEARCH_PAGE_MAX,
    )?;
    let after_id = validate::decode_page_token("page_token", &req.page_token)?.unwrap_or_default();
    // One more than a page tells whether another page follows.
    let mut found = state
        .store
        .search_users(&prefix, &after_id, page_size + 1)
        .await?;
    let more = found.len() > page_size as usize;
    found.truncate(page_size as usize);
    let next_page_token = match found.last() {
        Some(last) if more => validate::encode_page_token(last.id.as_str()),
        _ => String::new(),
    };
    Ok(pb::SearchUsersResponse {
        users: found.iter().map(user_to_proto).collect(),
        next_page_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_ids_are_deduplicated_in_order_and_bounded() {
        let raw: Vec<String> = ["u_b", "u_a", "u_b"].map(String::from).to_vec();
        let ids = unique_ids(&raw).expect("valid");
        assert_eq!(ids, vec![UserId::from("u_b"), UserId::from("u_a")]);
        assert!(unique_ids(&[]).is_err());
        assert_eq!(
            unique_ids(&["u_a".into(), String::new()])
                .expect_err("empty id")
                .message,
            "ids[1] is required"
        );
        let many: Vec<String> = (0..101).map(|i| format!("u_{i}")).collect();
        assert!(unique_ids(&many).is_err());
        let repeated: Vec<String> = (0..150).map(|i| format!("u_{}", i % 100)).collect();
        assert_eq!(unique_ids(&repeated).expect("100 distinct").len(), 100);
    }

    #[test]
    fn profile_updates_are_validated() {
        let update = profile_update(pb::UpdateProfileRequest {
            display_name: Some("  Alice ".into()),
            avatar_url: Some(String::new()),
            bio: None,
        })
        .expect("valid");
        assert_eq!(update.display_name.as_deref(), Some("Alice"));
        assert_eq!(update.avatar_url.as_deref(), Some(""));
        assert!(update.bio.is_none());
        let err = profile_update(pb::UpdateProfileRequest {
            display_name: Some(" ".into()),
            ..Default::default()
        })
        .expect_err("empty name");
        assert_eq!(err.message, "display_name is required");
        let err = profile_update(pb::UpdateProfileRequest {
            bio: Some("x".repeat(513)),
            ..Default::default()
        })
        .expect_err("long bio");
        assert_eq!(err.message, "bio must be at most 512 characters");
    }
}
