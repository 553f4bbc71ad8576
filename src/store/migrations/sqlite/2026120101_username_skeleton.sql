-- The confusable skeleton (Unicode UTS #39, lower-cased) of each username, so that a
-- new username that looks like an existing one ("adrnin" for "admin", "pay-pa1" for
-- "pay-pal") is refused. NULL for external users, and for accounts made before this
-- column that look like an older one: the start-up backfill (Store::migrate) fills
-- the rest in creation order. Unique, so concurrent sign-ups cannot race past it.
ALTER TABLE users ADD COLUMN username_skeleton TEXT;
CREATE UNIQUE INDEX users_username_skeleton ON users (username_skeleton);
