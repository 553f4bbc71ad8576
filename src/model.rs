//! Domain enums shared by the store, the actors and the API, with their stored
//! (text) and protobuf forms. The store keeps the text form so rows stay readable.

use crate::proto::v1 as pb;

macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $text:literal => $pb:path),+ $(,)? } proto $pbty:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// The stored form.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }

            /// Parses the stored form.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some(Self::$variant),)+ _ => None }
            }

            /// The protobuf enum value.
            pub fn to_proto(self) -> i32 {
                match self { $(Self::$variant => $pb as i32),+ }
            }

            /// From a protobuf enum value; `None` for unspecified or unknown values.
            pub fn from_proto(value: i32) -> Option<Self> {
                match <$pbty>::try_from(value).ok()? {
                    $($pb => Some(Self::$variant),)+
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(
    /// Server-wide role; ordered guest < member < admin.
    Role {
        Guest = "guest" => pb::Role::Guest,
        Member = "member" => pb::Role::Member,
        Admin = "admin" => pb::Role::Admin,
    } proto pb::Role
);

text_enum!(
    /// What kind of room, which decides who may join and who may send.
    RoomKind {
        Public = "public" => pb::RoomKind::Public,
        Private = "private" => pb::RoomKind::Private,
        Direct = "direct" => pb::RoomKind::Direct,
        Broadcast = "broadcast" => pb::RoomKind::Broadcast,
    } proto pb::RoomKind
);

text_enum!(
    /// A member's role inside one room; ordered member < moderator < owner.
    MemberRole {
        Member = "member" => pb::MemberRole::Member,
        Moderator = "moderator" => pb::MemberRole::Moderator,
        Owner = "owner" => pb::MemberRole::Owner,
    } proto pb::MemberRole
);

text_enum!(
    /// What a room event is.
    MessageKind {
        Text = "text" => pb::MessageKind::Text,
        Edit = "edit" => pb::MessageKind::Edit,
        Delete = "delete" => pb::MessageKind::Delete,
    } proto pb::MessageKind
);

impl MemberRole {
    /// Owners and moderators moderate, and are the hosts of broadcast rooms.
    pub fn is_moderator(self) -> bool {
        self >= MemberRole::Moderator
    }
}

/// Milliseconds since the epoch as a protobuf timestamp.
pub fn timestamp(ms: i64) -> crate::proto::Timestamp {
    crate::proto::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// An optional time in milliseconds as an optional protobuf timestamp.
pub fn opt_timestamp(ms: Option<i64>) -> Option<crate::proto::Timestamp> {
    ms.map(timestamp)
}
