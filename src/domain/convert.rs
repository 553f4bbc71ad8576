//! Records (store rows, auth results) to protobuf messages. Only what a client may
//! see crosses here: password hashes, secret hashes and external subjects stay out.

use crate::{
    actors::authenticator::IssuedTokens,
    model::{opt_timestamp, timestamp},
    proto::v1 as pb,
    store::{ApiKeyRecord, UserRecord},
};

/// A user's public profile. External users have no username and `external: true`.
pub fn user_to_proto(user: &UserRecord) -> pb::User {
    let external = user.external_subject.is_some();
    pb::User {
        id: user.id.0.clone(),
        username: if external {
            String::new()
        } else {
            user.username.clone().unwrap_or_default()
        },
        display_name: user.display_name.clone(),
        avatar_url: user.avatar_url.clone(),
        bio: user.bio.clone(),
        role: user.role.to_proto(),
        created_at: Some(timestamp(user.created_at)),
        external,
    }
}

/// A token pair as returned by SignUp, SignIn and Refresh.
pub fn tokens_to_proto(tokens: &IssuedTokens) -> pb::TokenPair {
    pb::TokenPair {
        access_token: tokens.access_token.clone(),
        access_expires_at: Some(timestamp(tokens.access_expires_at)),
        refresh_token: tokens.refresh_token.clone(),
        refresh_expires_at: Some(timestamp(tokens.refresh_expires_at)),
    }
}

/// An API key as listed (never its secret).
pub fn api_key_to_proto(key: &ApiKeyRecord) -> pb::ApiKey {
    pb::ApiKey {
        id: key.id.clone(),
        name: key.name.clone(),
        prefix: key.prefix.clone(),
        created_at: Some(timestamp(key.created_at)),
        last_used_at: opt_timestamp(key.last_used_at),
        revoked_at: opt_timestamp(key.revoked_at),
        created_by: key.created_by.clone(),
    }
}

/// A stored room event as the API shows it.
pub fn message_to_proto(m: &crate::store::MessageRecord) -> pb::Message {
    pb::Message {
        room_id: m.room_id.0.clone(),
        seq: m.seq,
        id: m.id.clone(),
        kind: m.kind.to_proto(),
        sender_id: m.sender_id.0.clone(),
        text: m.text.clone(),
        metadata: m
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        reply_to_seq: m.reply_to_seq,
        target_seq: m.target_seq,
        client_message_id: m.client_message_id.clone().unwrap_or_default(),
        created_at: Some(crate::model::timestamp(m.created_at)),
        edited_at: crate::model::opt_timestamp(m.edited_at),
        deleted: m.deleted,
    }
}

/// A room as the API shows it; `member` is the caller's membership, when any.
pub fn room_to_proto(
    room: &crate::store::RoomRecord,
    member_count: u64,
    member: Option<&crate::store::MemberRecord>,
) -> pb::Room {
    pb::Room {
        id: room.id.0.clone(),
        kind: room.kind.to_proto(),
        title: room.title.clone(),
        topic: room.topic.clone(),
        created_by: room.created_by.0.clone(),
        created_at: Some(crate::model::timestamp(room.created_at)),
        last_seq: room.last_seq,
        retention_seconds: room.retention_seconds,
        member_count: member_count.min(u64::from(u32::MAX)) as u32,
        my_role: member.map_or(0, |m| m.role.to_proto()),
        unread_count: member.map_or(0, |m| room.last_seq.saturating_sub(m.last_read_seq)),
        last_read_seq: member.map_or(0, |m| m.last_read_seq),
        // Live rooms: filled in by domain::live::fill_live_fields.
        live: None,
        pinned: None,
        viewer_count: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ids::UserId, model::Role};

    fn record(external_subject: Option<&str>) -> UserRecord {
        UserRecord {
            id: UserId("u_1".into()),
            username: external_subject.is_none().then(|| "alice".to_owned()),
            display_name: "Alice".into(),
            avatar_url: String::new(),
            bio: String::new(),
            role: Role::Member,
            password_hash: Some("$argon2id$secret".into()),
            external_subject: external_subject.map(str::to_owned),
            created_at: 1_500,
        }
    }

    #[test]
    fn accounts_and_external_users() {
        let account = user_to_proto(&record(None));
        assert_eq!(
            (account.username.as_str(), account.external),
            ("alice", false)
        );
        assert_eq!(account.role, pb::Role::Member as i32);
        assert_eq!(
            account.created_at.map(|t| (t.seconds, t.nanos)),
            Some((1, 500_000_000))
        );
        let external = user_to_proto(&record(Some("42")));
        assert_eq!((external.username.as_str(), external.external), ("", true));
    }
}
