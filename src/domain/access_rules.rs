//! Access rules: admin-editable allow / deny decisions per server role and
//! operation (an RPC or a WebSocket frame kind), with priorities. A plain
//! function over a [`RuleSet`]; the auth actors keep the current set in memory
//! (see `actors::authenticator::rules`) and evaluate it on every authenticated
//! RPC, and connections evaluate the same snapshot on every frame.
//!
//! How a decision is made:
//! - The admin API (`roomcast.v1.AdminService`) is admin-only, always: rules never
//!   apply to it and cannot mention it, so no rule can open it to non-admins and
//!   no rule can lock the admins out of the API that edits the rules.
//! - Otherwise the matching rule with the highest priority decides; at equal
//!   priority a deny wins. No matching rule: allowed (the built-in checks of the
//!   operation, e.g. room membership, still apply after a rule allows).
//! - Calls without a caller (SignUp, SignIn, Refresh) and the `authenticate` and
//!   `ping` frames have no role to match and are not subject to rules.

use crate::{
    error::ApiError,
    model::Role,
    proto::v1::{
        admin_service, auth_service, notification_service, publish_service, push_service,
        room_service, user_service,
    },
    store::AccessRuleRecord,
};

/// Prefix of WebSocket frame kinds in rule operations (`ws:send`).
pub const FRAME_PREFIX: &str = "ws:";

/// Client frame kinds that rules may name (the authenticated ones).
pub const FRAME_KINDS: &[&str] = &[
    "subscribe",
    "unsubscribe",
    "send",
    "typing",
    "mark_read",
    "subscribe_notifications",
];

/// Client frame kinds rules do not govern: they come before the connection has a
/// role (authentication, anonymous viewing) or carry nothing to allow (ping).
pub const UNGOVERNED_FRAME_KINDS: &[&str] = &["authenticate", "authenticate_anonymous", "ping"];

/// The RPC a frame kind performs over the socket (`send` is
/// RoomService.SendMessage, same rules): rules naming that RPC, or its service,
/// govern the frame too.
pub fn frame_rpc(kind: &str) -> Option<&'static str> {
    match kind {
        "send" => Some("roomcast.v1.RoomService/SendMessage"),
        "mark_read" => Some("roomcast.v1.RoomService/MarkRead"),
        _ => None,
    }
}

/// Highest (and, negated, lowest) rule priority.
pub const MAX_PRIORITY: i64 = 1_000_000;

/// Longest rule description.
pub const DESCRIPTION_MAX_CHARS: usize = 200;

/// Every unary RPC subject to rules: the services whose calls carry a caller.
/// A service added to the API is added here too (the table test fails otherwise).
pub fn rule_services() -> [(&'static str, &'static [&'static str]); 6] {
    [
        (auth_service::NAME, auth_service::UNARY_METHODS),
        (user_service::NAME, user_service::UNARY_METHODS),
        (room_service::NAME, room_service::UNARY_METHODS),
        (publish_service::NAME, publish_service::UNARY_METHODS),
        (
            notification_service::NAME,
            notification_service::UNARY_METHODS,
        ),
        (push_service::NAME, push_service::UNARY_METHODS),
    ]
}

/// What a caller is about to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation<'a> {
    /// A unary RPC, by its full name `roomcast.v1.RoomService/SendMessage`.
    Rpc(&'a str),
    /// A WebSocket client frame, by its kind (`send`, `subscribe`, ...).
    Frame(&'a str),
}

impl Operation<'_> {
    /// The admin API, which rules do not govern.
    pub fn is_admin_api(&self) -> bool {
        matches!(self, Operation::Rpc(name) if is_admin_rpc(name))
    }
}

fn is_admin_rpc(name: &str) -> bool {
    name.strip_prefix(admin_service::NAME)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

impl Effect {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Effect::Allow),
            "deny" => Some(Effect::Deny),
            _ => None,
        }
    }
}

/// One rule in evaluation form.
#[derive(Debug, Clone)]
struct Rule {
    id: String,
    /// `None` matches every role.
    role: Option<Role>,
    operation: String,
    effect: Effect,
    priority: i64,
}

impl Rule {
    fn matches(&self, role: Role, op: Operation<'_>) -> bool {
        if self.role.is_some_and(|r| r != role) {
            return false;
        }
        let pattern = self.operation.as_str();
        if pattern == "*" {
            return true;
        }
        match op {
            Operation::Rpc(name) => {
                pattern == name
                    || pattern
                        .strip_suffix("/*")
                        .is_some_and(|service| name.split('/').next() == Some(service))
            }
            Operation::Frame(kind) => {
                pattern
                    .strip_prefix(FRAME_PREFIX)
                    .is_some_and(|p| p == "*" || p == kind)
                    // A frame that is an RPC over the socket follows that RPC's rules.
                    || frame_rpc(kind).is_some_and(|rpc| {
                        pattern == rpc
                            || pattern.strip_suffix("/*") == rpc.split('/').next()
                    })
            }
        }
    }
}

/// The rules in force, in evaluation order.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    /// Builds the set from stored rules; rows that no longer parse (written by a
    /// newer version) are skipped with a warning rather than failing every call.
    pub fn from_records(records: &[AccessRuleRecord]) -> Self {
        let mut rules: Vec<Rule> = records
            .iter()
            .filter_map(|r| {
                let role = match r.role.as_str() {
                    "*" => None,
                    other => Some(Role::parse(other)?),
                };
                Some(Rule {
                    id: r.id.clone(),
                    role,
                    operation: r.operation.clone(),
                    effect: Effect::parse(&r.effect)?,
                    priority: r.priority,
                })
            })
            .collect();
        if rules.len() != records.len() {
            tracing::warn!(
                skipped = records.len() - rules.len(),
                "access rules that cannot be read were skipped"
            );
        }
        // Highest priority first; at equal priority a deny comes first.
        rules.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then((a.effect == Effect::Allow).cmp(&(b.effect == Effect::Allow)))
        });
        Self { rules }
    }

    /// How many rules are in force.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `role` may perform `op`: `permission_denied` naming the rule when not.
    pub fn check(&self, role: Role, op: Operation<'_>) -> Result<(), ApiError> {
        if op.is_admin_api() {
            return if role == Role::Admin {
                Ok(())
            } else {
                Err(ApiError::denied("the admin API needs the admin role"))
            };
        }
        match self.rules.iter().find(|r| r.matches(role, op)) {
            Some(rule) if rule.effect == Effect::Deny => {
                let what = match op {
                    Operation::Rpc(name) => name.to_owned(),
                    Operation::Frame(kind) => format!("the `{kind}` frame"),
                };
                Err(ApiError::denied(format!(
                    "{what} is denied to the {role} role by access rule `{}`",
                    rule.id
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Validates a rule's fields as an admin gave them; returns them normalized.
pub fn validate_rule(
    role: &str,
    operation: &str,
    effect: &str,
    priority: i64,
    description: &str,
) -> Result<(String, String, Effect, i64, String), ApiError> {
    let role = role.trim();
    if role != "*" && Role::parse(role).is_none() {
        return Err(ApiError::invalid(
            "role must be `admin`, `member`, `guest` or `*` (every role)",
        ));
    }
    let operation = operation.trim();
    if is_admin_rpc(operation) || operation.strip_suffix("/*") == Some(admin_service::NAME) {
        return Err(ApiError::invalid(
            "the admin API is always admin-only; access rules cannot name it",
        ));
    }
    if !known_operation(operation) {
        return Err(ApiError::invalid(format!(
            "operation `{operation}` is not `*`, a unary RPC (roomcast.v1.RoomService/SendMessage), \
             a service wildcard (roomcast.v1.RoomService/*) or a frame kind (ws:send, ws:*; kinds: {})",
            FRAME_KINDS.join(", ")
        )));
    }
    let effect = Effect::parse(effect.trim())
        .ok_or_else(|| ApiError::invalid("effect must be `allow` or `deny`"))?;
    if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&priority) {
        return Err(ApiError::invalid(format!(
            "priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}"
        )));
    }
    let description = description.trim();
    crate::domain::validate::char_len("description", description, 0, DESCRIPTION_MAX_CHARS)?;
    crate::domain::validate::single_line("description", description)?;
    Ok((
        role.to_owned(),
        operation.to_owned(),
        effect,
        priority,
        description.to_owned(),
    ))
}

fn known_operation(operation: &str) -> bool {
    if operation == "*" {
        return true;
    }
    if let Some(kind) = operation.strip_prefix(FRAME_PREFIX) {
        return kind == "*" || FRAME_KINDS.contains(&kind);
    }
    let Some((service, method)) = operation.split_once('/') else {
        return false;
    };
    rule_services()
        .iter()
        .any(|(name, methods)| *name == service && (method == "*" || methods.contains(&method)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(role: &str, operation: &str, effect: &str, priority: i64) -> AccessRuleRecord {
        AccessRuleRecord {
            id: format!("ar_{role}_{effect}_{priority}"),
            role: role.into(),
            operation: operation.into(),
            effect: effect.into(),
            priority,
            description: String::new(),
            created_by: "u_admin".into(),
            created_at: 0,
            updated_at: 0,
        }
    }

    /// Every RPC and every frame kind × every role, under the defaults (no rules):
    /// the admin API is admin-only, everything else is left to its own checks.
    #[test]
    fn defaults_table_every_rpc_and_frame_by_role() {
        let rules = RuleSet::default();
        let mut rpcs: Vec<String> = Vec::new();
        for (service, methods) in rule_services() {
            rpcs.extend(methods.iter().map(|m| format!("{service}/{m}")));
        }
        let admin: Vec<String> = admin_service::UNARY_METHODS
            .iter()
            .map(|m| format!("{}/{m}", admin_service::NAME))
            .collect();
        assert!(!admin.is_empty());
        let mut checked = 0;
        for role in [Role::Admin, Role::Member, Role::Guest] {
            for rpc in &rpcs {
                assert!(
                    rules.check(role, Operation::Rpc(rpc)).is_ok(),
                    "{role} {rpc}"
                );
                checked += 1;
            }
            for rpc in &admin {
                let outcome = rules.check(role, Operation::Rpc(rpc));
                assert_eq!(outcome.is_ok(), role == Role::Admin, "{role} {rpc}");
                if let Err(e) = outcome {
                    assert_eq!(e.code, crate::error::Code::PermissionDenied);
                }
                checked += 1;
            }
            for kind in FRAME_KINDS {
                assert!(
                    rules.check(role, Operation::Frame(kind)).is_ok(),
                    "{role} {kind}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 3 * (rpcs.len() + admin.len() + FRAME_KINDS.len()));
    }

    /// The names of a `oneof kind` of `message` in a proto file's text.
    fn oneof_kinds<'a>(proto: &'a str, message: &str) -> Vec<&'a str> {
        let start = proto
            .find(&format!("message {message} {{"))
            .unwrap_or_else(|| panic!("message {message}"));
        let body = &proto[start..];
        let oneof = body.find("oneof kind {").expect("oneof kind");
        let end = body[oneof..].find('}').expect("end of oneof") + oneof;
        body[oneof..end]
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("//") && l.ends_with(';'))
            .filter_map(|l| l.split_whitespace().nth(1))
            .collect()
    }

    /// Every client frame kind of the WebSocket protocol is in the table (rules
    /// govern it) or named as ungoverned, so a new frame kind cannot slip past
    /// the rules unnoticed.
    #[test]
    fn every_client_frame_kind_is_in_the_table_or_ungoverned() {
        let proto = include_str!("../proto/roomcast/v1/realtime.proto");
        let kinds = oneof_kinds(proto, "ClientFrame");
        assert!(kinds.len() >= FRAME_KINDS.len() + UNGOVERNED_FRAME_KINDS.len());
        for kind in &kinds {
            assert!(
                FRAME_KINDS.contains(kind) || UNGOVERNED_FRAME_KINDS.contains(kind),
                "client frame kind `{kind}` is neither in FRAME_KINDS nor ungoverned"
            );
        }
        for kind in FRAME_KINDS.iter().chain(UNGOVERNED_FRAME_KINDS) {
            assert!(kinds.contains(kind), "`{kind}` is no client frame kind");
        }
    }

    /// Every service with unary RPCs is in `rule_services()` or is the admin
    /// API; the live-room RPCs and PushService.Poll are in the table.
    #[test]
    fn every_unary_service_is_in_the_table() {
        let protos = [
            include_str!("../proto/roomcast/v1/admin.proto"),
            include_str!("../proto/roomcast/v1/auth.proto"),
            include_str!("../proto/roomcast/v1/notifications.proto"),
            include_str!("../proto/roomcast/v1/publish.proto"),
            include_str!("../proto/roomcast/v1/push.proto"),
            include_str!("../proto/roomcast/v1/rooms.proto"),
            include_str!("../proto/roomcast/v1/users.proto"),
        ];
        let table: Vec<&str> = rule_services().iter().map(|(name, _)| *name).collect();
        for proto in protos {
            for line in proto.lines().filter(|l| l.starts_with("service ")) {
                let service = line.split_whitespace().nth(1).expect("a service name");
                let full = format!("roomcast.v1.{service}");
                assert!(
                    table.contains(&full.as_str()) || full == admin_service::NAME,
                    "{full} is not in rule_services()"
                );
            }
        }
        for rpc in [
            "roomcast.v1.RoomService/UpdateLiveControls",
            "roomcast.v1.RoomService/PinMessage",
            "roomcast.v1.PushService/Poll",
        ] {
            assert!(known_operation(rpc), "{rpc}");
            let rules = RuleSet::from_records(&[record("guest", rpc, "deny", 1)]);
            assert!(
                rules.check(Role::Guest, Operation::Rpc(rpc)).is_err(),
                "{rpc}"
            );
            assert!(
                rules.check(Role::Member, Operation::Rpc(rpc)).is_ok(),
                "{rpc}"
            );
        }
    }

    #[test]
    fn highest_priority_decides_and_deny_wins_ties() {
        let send = "roomcast.v1.RoomService/SendMessage";
        let rules = RuleSet::from_records(&[
            record("guest", "*", "deny", 10),
            record("guest", send, "allow", 20),
        ]);
        assert!(rules.check(Role::Guest, Operation::Rpc(send)).is_ok());
        assert!(rules
            .check(
                Role::Guest,
                Operation::Rpc("roomcast.v1.RoomService/CreateRoom")
            )
            .is_err());
        // The allow on SendMessage covers the `send` frame; `*` still denies typing.
        assert!(rules.check(Role::Guest, Operation::Frame("send")).is_ok());
        assert!(rules
            .check(Role::Guest, Operation::Frame("typing"))
            .is_err());
        assert!(rules
            .check(Role::Member, Operation::Frame("typing"))
            .is_ok());

        // A rule on the RPC governs the frame that performs it, not the others.
        let rpc_only = RuleSet::from_records(&[record("guest", send, "deny", 1)]);
        assert!(rpc_only
            .check(Role::Guest, Operation::Frame("send"))
            .is_err());
        assert!(rpc_only
            .check(Role::Guest, Operation::Frame("typing"))
            .is_ok());
        let frame_only = RuleSet::from_records(&[record("guest", "ws:send", "deny", 1)]);
        assert!(frame_only.check(Role::Guest, Operation::Rpc(send)).is_ok());
        assert!(frame_only
            .check(Role::Guest, Operation::Frame("send"))
            .is_err());

        let tie = RuleSet::from_records(&[
            record("*", "roomcast.v1.RoomService/*", "allow", 5),
            record("member", "ws:send", "deny", 5),
            record("member", "roomcast.v1.RoomService/*", "deny", 5),
        ]);
        assert!(tie.check(Role::Member, Operation::Rpc(send)).is_err());
        assert!(tie.check(Role::Member, Operation::Frame("send")).is_err());
        assert!(tie.check(Role::Guest, Operation::Rpc(send)).is_ok());
    }

    #[test]
    fn rules_never_touch_the_admin_api() {
        let rules = RuleSet::from_records(&[record("*", "*", "deny", MAX_PRIORITY)]);
        let list = format!("{}/ListAccessRules", admin_service::NAME);
        assert!(rules.check(Role::Admin, Operation::Rpc(&list)).is_ok());
        assert!(rules.check(Role::Member, Operation::Rpc(&list)).is_err());
        for op in [list.as_str(), "roomcast.v1.AdminService/*"] {
            let e = validate_rule("member", op, "allow", 1, "").unwrap_err();
            assert_eq!(e.code, crate::error::Code::InvalidArgument);
        }
    }

    #[test]
    fn rule_fields_are_validated() {
        assert!(validate_rule(
            "guest",
            "roomcast.v1.RoomService/SendMessage",
            "deny",
            1,
            "x"
        )
        .is_ok());
        assert!(validate_rule("guest", "ws:send", "deny", 1, "").is_ok());
        assert!(validate_rule("*", "*", "allow", -5, "").is_ok());
        assert!(validate_rule("owner", "*", "deny", 1, "").is_err());
        assert!(validate_rule("guest", "roomcast.v1.RoomService/Nope", "deny", 1, "").is_err());
        assert!(validate_rule("guest", "ws:ping", "deny", 1, "").is_err());
        assert!(validate_rule("guest", "*", "maybe", 1, "").is_err());
        assert!(validate_rule("guest", "*", "deny", MAX_PRIORITY + 1, "").is_err());
    }
}
