-- roomcast schema, PostgreSQL (and CockroachDB) flavour. Times are Unix milliseconds; flags are 0/1 integers
-- so the same queries run on PostgreSQL (see ../sqlite).

CREATE TABLE users (
    id               TEXT    PRIMARY KEY,
    username         TEXT    UNIQUE,
    display_name     TEXT    NOT NULL,
    display_name_lc  TEXT    NOT NULL,
    avatar_url       TEXT    NOT NULL DEFAULT '',
    bio              TEXT    NOT NULL DEFAULT '',
    role             TEXT    NOT NULL,
    password_hash    TEXT,
    external_subject TEXT    UNIQUE,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL
);
CREATE INDEX users_display_name_lc ON users (display_name_lc);

CREATE TABLE sessions (
    id         TEXT    PRIMARY KEY,
    user_id    TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at BIGINT  NOT NULL,
    expires_at BIGINT  NOT NULL,
    revoked_at BIGINT 
);
CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE refresh_tokens (
    token_hash TEXT    PRIMARY KEY,
    session_id TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at BIGINT  NOT NULL,
    expires_at BIGINT  NOT NULL,
    used_at    BIGINT 
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

CREATE TABLE api_keys (
    id           TEXT    PRIMARY KEY,
    name         TEXT    NOT NULL,
    prefix       TEXT    NOT NULL,
    secret_hash  TEXT    NOT NULL UNIQUE,
    created_by   TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL,
    last_used_at BIGINT ,
    revoked_at   BIGINT 
);

CREATE TABLE server_kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE rooms (
    id                TEXT    PRIMARY KEY,
    kind              TEXT    NOT NULL,
    title             TEXT    NOT NULL,
    topic             TEXT    NOT NULL DEFAULT '',
    created_by        TEXT    NOT NULL,
    created_at        BIGINT  NOT NULL,
    last_seq          BIGINT  NOT NULL DEFAULT 0,
    retention_seconds BIGINT  NOT NULL DEFAULT 0,
    direct_key        TEXT    UNIQUE
);
CREATE INDEX rooms_kind ON rooms (kind, id);

CREATE TABLE memberships (
    room_id       TEXT    NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id       TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role          TEXT    NOT NULL,
    joined_at     BIGINT  NOT NULL,
    last_read_seq BIGINT  NOT NULL DEFAULT 0,
    muted_until   BIGINT ,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX memberships_user ON memberships (user_id, room_id);

CREATE TABLE invites (
    room_id    TEXT    NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id    TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    invited_by TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (room_id, user_id)
);

CREATE TABLE bans (
    room_id    TEXT    NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id    TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    banned_by  TEXT    NOT NULL,
    reason     TEXT    NOT NULL DEFAULT '',
    created_at BIGINT  NOT NULL,
    expires_at BIGINT ,
    PRIMARY KEY (room_id, user_id)
);

CREATE TABLE messages (
    room_id           TEXT    NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq               BIGINT  NOT NULL,
    id                TEXT    NOT NULL UNIQUE,
    kind              TEXT    NOT NULL,
    sender_id         TEXT    NOT NULL,
    text              TEXT    NOT NULL,
    metadata          TEXT    NOT NULL DEFAULT '{}',
    reply_to_seq      BIGINT  NOT NULL DEFAULT 0,
    target_seq        BIGINT  NOT NULL DEFAULT 0,
    client_message_id TEXT,
    created_at        BIGINT  NOT NULL,
    edited_at         BIGINT ,
    deleted_at        BIGINT ,
    PRIMARY KEY (room_id, seq),
    UNIQUE (room_id, sender_id, client_message_id)
);
CREATE INDEX messages_created ON messages (room_id, created_at);
