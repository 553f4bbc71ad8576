-- Per-user notification streams. Each user's notifications get a gapless sequence
-- taken from users.last_notification_seq inside the inserting transaction (the
-- UPDATE of that row is the lock that orders concurrent inserts, as rooms.last_seq
-- is for messages); no database sequence, no advisory lock, so CockroachDB runs it.
ALTER TABLE users ADD COLUMN last_notification_seq INTEGER NOT NULL DEFAULT 0;
-- Everything up to this sequence is read (MarkNotificationsRead).
ALTER TABLE users ADD COLUMN notification_read_seq INTEGER NOT NULL DEFAULT 0;

CREATE TABLE notifications (
    user_id         TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    seq             INTEGER  NOT NULL,
    id              TEXT    NOT NULL UNIQUE,
    kind            TEXT    NOT NULL,
    sender          TEXT    NOT NULL DEFAULT '',
    room_id         TEXT    NOT NULL DEFAULT '',
    room_seq        INTEGER  NOT NULL DEFAULT 0,
    text            TEXT    NOT NULL,
    data            TEXT    NOT NULL DEFAULT '{}',
    -- PublishToUser's idempotency key; NULL for the others.
    idempotency_key TEXT,
    created_at      INTEGER  NOT NULL,
    PRIMARY KEY (user_id, seq),
    UNIQUE (user_id, idempotency_key)
);
-- Retention removes by age.
CREATE INDEX notifications_created ON notifications (created_at);
