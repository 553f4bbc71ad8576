-- Operations (issue 9): access rules, the audit log and account suspensions.

-- Admin-editable allow / deny rules, evaluated by the auth actors on every RPC and
-- WebSocket frame. `role` is admin, member, guest or * (any); `operation` is a
-- full RPC name (roomcast.v1.RoomService/SendMessage), a service wildcard
-- (roomcast.v1.RoomService/*), a frame kind (ws:send) or * (everything). The rule
-- with the highest priority that matches decides; ties go to deny.
CREATE TABLE access_rules (
    id          TEXT    PRIMARY KEY,
    role        TEXT    NOT NULL,
    operation   TEXT    NOT NULL,
    effect      TEXT    NOT NULL,
    priority    BIGINT  NOT NULL,
    description TEXT    NOT NULL DEFAULT '',
    created_by  TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);

-- Moderation and admin actions: who did what to which target, when. Ordered by
-- (at, id) for paging; never updated.
CREATE TABLE audit_log (
    id         TEXT    PRIMARY KEY,
    at         BIGINT  NOT NULL,
    actor_id   TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    target     TEXT    NOT NULL DEFAULT '',
    room_id    TEXT    NOT NULL DEFAULT '',
    detail     TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX audit_log_at ON audit_log (at, id);

-- Suspended accounts: no sign-in, no refresh, no token accepted until reinstated.
CREATE TABLE user_suspensions (
    user_id      TEXT    PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    suspended_by TEXT    NOT NULL,
    reason       TEXT    NOT NULL DEFAULT '',
    created_at   BIGINT  NOT NULL
);
