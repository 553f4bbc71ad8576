-- Live rooms (RoomService.CreateRoom with `live`): their host controls and pinned
-- message. Their comments are not stored; rooms.last_seq holds the highest
-- sequence number the room reserved, so a restarted room never reuses a number.
CREATE TABLE live_rooms (
    room_id               TEXT    PRIMARY KEY REFERENCES rooms (id) ON DELETE CASCADE,
    anonymous_viewers     BIGINT NOT NULL DEFAULT 0,
    slow_mode_seconds     BIGINT NOT NULL DEFAULT 0,
    host_only             BIGINT NOT NULL DEFAULT 0,
    rate_limit_per_minute BIGINT NOT NULL DEFAULT 0,
    max_length            BIGINT NOT NULL DEFAULT 0,
    word_filter           BIGINT NOT NULL DEFAULT 0,
    -- The pinned message as proto3 JSON (roomcast.v1.Message); NULL when none.
    pinned                TEXT
);
