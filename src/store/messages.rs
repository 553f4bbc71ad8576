//! Room history. Every event (a message, an edit, a deletion) gets the room's next
//! sequence number inside the transaction that stores it, so the sequence is gapless
//! and its order is the commit order, whichever node or connection sent it.

use std::collections::{BTreeMap, HashMap};

use sqlx::{AnyConnection, FromRow};

use super::{parse_enum, Store, StoreError, StoreResult};
use crate::{
    ids::{now_ms, MessageId, RoomId, UserId},
    model::MessageKind,
};

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub kind: MessageKind,
    pub sender_id: UserId,
    /// Text for TEXT and EDIT; empty for DELETE.
    pub text: String,
    pub metadata: BTreeMap<String, String>,
    pub reply_to_seq: u64,
    /// The message an EDIT or DELETE changes.
    pub target_seq: u64,
    pub client_message_id: Option<String>,
    /// A DELETE by a moderator may remove someone else's message.
    pub moderator: bool,
}

impl NewMessage {
    /// The event as stored in `room_id` with `seq`: a new id, never edited or
    /// deleted.
    pub fn record(&self, room_id: RoomId, seq: u64, created_at: i64) -> MessageRecord {
        MessageRecord {
            room_id,
            seq,
            id: crate::ids::sortable_id(MessageId::PREFIX, created_at),
            kind: self.kind,
            sender_id: self.sender_id.clone(),
            text: self.text.clone(),
            metadata: self.metadata.clone(),
            reply_to_seq: self.reply_to_seq,
            target_seq: self.target_seq,
            client_message_id: self.client_message_id.clone(),
            created_at,
            edited_at: None,
            deleted: false,
        }
    }
}

/// A stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRecord {
    pub room_id: RoomId,
    pub seq: u64,
    pub id: String,
    pub kind: MessageKind,
    pub sender_id: UserId,
    pub text: String,
    pub metadata: BTreeMap<String, String>,
    pub reply_to_seq: u64,
    pub target_seq: u64,
    pub client_message_id: Option<String>,
    pub created_at: i64,
    pub edited_at: Option<i64>,
    pub deleted: bool,
}

/// The outcome of one event of a batch.
#[derive(Debug, Clone)]
pub enum Appended {
    /// Stored with a new sequence number.
    Stored(MessageRecord),
    /// A retry: the event stored the first time with this client message id.
    Duplicate(MessageRecord),
    /// Not stored, and no sequence number used.
    Rejected(AppendRejection),
}

/// Why an event of a batch was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendRejection {
    /// The EDIT/DELETE target, or the reply-to message, does not exist.
    TargetNotFound,
    /// Only the author may edit; only the author or a moderator may delete.
    NotAuthor,
    /// The target was deleted, or is not a TEXT message.
    NotEditable,
}

#[derive(FromRow)]
struct MessageRow {
    room_id: String,
    seq: i64,
    id: String,
    kind: String,
    sender_id: String,
    text: String,
    metadata: String,
    reply_to_seq: i64,
    target_seq: i64,
    client_message_id: Option<String>,
    created_at: i64,
    edited_at: Option<i64>,
    deleted_at: Option<i64>,
}

impl TryFrom<MessageRow> for MessageRecord {
    type Error = StoreError;
    fn try_from(r: MessageRow) -> StoreResult<Self> {
        Ok(Self {
            room_id: RoomId(r.room_id),
            seq: r.seq as u64,
            id: r.id,
            kind: parse_enum(&r.kind, MessageKind::parse)?,
            sender_id: UserId(r.sender_id),
            text: r.text,
            metadata: serde_json::from_str(&r.metadata)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            reply_to_seq: r.reply_to_seq as u64,
            target_seq: r.target_seq as u64,
            client_message_id: r.client_message_id,
            created_at: r.created_at,
            edited_at: r.edited_at,
            deleted: r.deleted_at.is_some(),
        })
    }
}

const MESSAGE_COLUMNS: &str =
    "room_id, seq, id, kind, sender_id, text, metadata, reply_to_seq, target_seq, \
     client_message_id, created_at, edited_at, deleted_at";

impl Store {
    /// Appends `batch` to the room's history in one transaction (group commit).
    /// Results are in batch order. Nothing is visible before the commit, and a
    /// failed commit stores nothing of the batch.
    pub async fn append_messages(
        &self,
        room: &RoomId,
        batch: &[NewMessage],
    ) -> StoreResult<Vec<Appended>> {
        self.timed("append_messages", async move |conn| {
            let mut tx = self.begin_write(conn).await?;
            let mut results = append_in(&mut tx, self.for_update(), &[(room, batch)]).await?;
            tx.commit().await?;
            Ok(results.pop().unwrap_or_default())
        })
        .await
    }

    /// Appends several rooms' batches in one transaction (the group commit across
    /// rooms of [`crate::actors::commit_batcher`]): one commit, one log sync, for
    /// all of them. Results per room, in `batches` order. A room appears at most
    /// once. A failure stores nothing of any batch.
    pub async fn append_many(
        &self,
        batches: &[(RoomId, Vec<NewMessage>)],
    ) -> StoreResult<Vec<Vec<Appended>>> {
        let batches: Vec<(&RoomId, &[NewMessage])> = batches
            .iter()
            .map(|(room, batch)| (room, batch.as_slice()))
            .collect();
        self.timed("append_many", async move |conn| {
            let mut tx = self.begin_write(conn).await?;
            let results = append_in(&mut tx, self.for_update(), &batches).await?;
            tx.commit().await?;
            Ok(results)
        })
        .await
    }

    /// A room's group commit: through the commit batcher when the server runs
    /// one (SQLite, see [`Store::route_grouped_appends`]), else
    /// [`Store::append_messages`]. The same results either way.
    pub async fn append_grouped(
        &self,
        room: &RoomId,
        batch: Vec<NewMessage>,
    ) -> StoreResult<Vec<Appended>> {
        match self.grouped.get() {
            Some(route) => (route.0)(room.clone(), batch).await,
            None => self.append_messages(room, &batch).await,
        }
    }

    /// Events with `after < seq <= upto`, ascending, at most `limit`.
    pub async fn messages_after(
        &self,
        room: &RoomId,
        after: u64,
        upto: u64,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.timed("messages_after", async move |conn| {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4"
        );
        let rows: Vec<MessageRow> = sqlx::query_as(&sql)
            .bind(room.as_str())
            // Sequences never reach 2^63: clamp instead of wrapping to a negative
            // number, which would match the whole history.
            .bind(after.min(i64::MAX as u64) as i64)
            .bind(upto.min(i64::MAX as u64) as i64)
            .bind(i64::from(limit))
            .fetch_all(&mut *conn)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
        })
        .await
    }

    /// The `limit` newest events with `seq < before`, returned ascending.
    pub async fn messages_before(
        &self,
        room: &RoomId,
        before: u64,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.timed("messages_before", async move |conn| {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
        );
        let rows: Vec<MessageRow> = sqlx::query_as(&sql)
            .bind(room.as_str())
            .bind(before.min(i64::MAX as u64) as i64)
            .bind(i64::from(limit))
            .fetch_all(&mut *conn)
            .await?;
        let mut out: Vec<MessageRecord> = rows
            .into_iter()
            .map(TryInto::try_into)
            .collect::<StoreResult<_>>()?;
        out.reverse();
        Ok(out)
        })
        .await
    }

    /// Removes events older than each room's retention; returns how many.
    pub async fn prune_expired_messages(&self) -> StoreResult<u64> {
        self.timed("prune_expired_messages", async move |conn| {
        let now = now_ms();
        let done = sqlx::query(
            "DELETE FROM messages WHERE room_id IN (SELECT id FROM rooms WHERE retention_seconds > 0) \
             AND created_at < $1 - 1000 * (SELECT retention_seconds FROM rooms WHERE rooms.id = messages.room_id)",
        )
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected())
        })
        .await
    }
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

/// Most (sender, client message id) pairs looked up in one query on PostgreSQL.
const CLIENT_IDS_PER_QUERY: usize = 200;
/// Most rows inserted by one statement on PostgreSQL (11 parameters each: well
/// under its 65,535 parameters), where each statement is a round trip.
const ROWS_PER_INSERT: usize = 500;
/// The same two on SQLite, where each statement is a round trip too, to sqlx's
/// worker thread (two thread switches). Its parameters are anonymous there (`?`,
/// see [`Params`]): with numbered ones (`$n`) sqlx asks
/// `sqlite3_bind_parameter_name` for each, which walks the statement's list of
/// names, O(n²) per statement (a 2,816-parameter insert once spent a third of the
/// server's CPU in that walk).
const SQLITE_CLIENT_IDS_PER_QUERY: usize = 64;
const SQLITE_ROWS_PER_INSERT: usize = 128;

/// Most rooms whose sequences one statement reads or writes (a parameter or two
/// each).
const ROOMS_PER_STATEMENT: usize = 256;

/// (rows per insert, client id pairs per lookup) for the transaction's database.
fn chunk_sizes(tx: &Tx<'_>) -> (usize, usize) {
    if is_sqlite(tx) {
        (SQLITE_ROWS_PER_INSERT, SQLITE_CLIENT_IDS_PER_QUERY)
    } else {
        (ROWS_PER_INSERT, CLIENT_IDS_PER_QUERY)
    }
}

fn is_sqlite(conn: &AnyConnection) -> bool {
    conn.backend_name().eq_ignore_ascii_case("sqlite")
}

/// Splits `items` into chunks of at most `most` whose lengths are powers of two,
/// largest first: a statement's text depends on its chunk's length, and each text
/// is prepared once per connection and kept in its statement cache, so a handful
/// of lengths stay prepared where every length up to `most` would churn the cache.
pub(super) fn pow2_chunks<T>(mut items: &[T], most: usize) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if items.is_empty() {
            return None;
        }
        let len = items.len().min(most);
        // The largest power of two not above `len` (at least 1).
        let take = 1 << (usize::BITS - 1 - len.leading_zeros());
        let (chunk, rest) = items.split_at(take);
        items = rest;
        Some(chunk)
    })
}

/// A statement's parameters in the order they appear in its text, each bound in
/// that order: `?` on SQLite (anonymous, bound by position, see
/// [`SQLITE_ROWS_PER_INSERT`]), `$1, $2, ...` on PostgreSQL.
pub(super) struct Params {
    sqlite: bool,
    count: usize,
}

impl Params {
    pub(super) fn new(conn: &AnyConnection) -> Self {
        Self {
            sqlite: is_sqlite(conn),
            count: 0,
        }
    }

    /// Appends the next parameter's placeholder to `sql`.
    pub(super) fn push(&mut self, sql: &mut String) {
        self.count += 1;
        if self.sqlite {
            sql.push('?');
        } else {
            use std::fmt::Write as _;
            let _ = write!(sql, "${}", self.count);
        }
    }

    /// Appends `(p, p, ...)` with `n` placeholders to `sql`.
    pub(super) fn push_tuple(&mut self, sql: &mut String, n: usize) {
        sql.push('(');
        for i in 0..n {
            if i > 0 {
                sql.push_str(", ");
            }
            self.push(sql);
        }
        sql.push(')');
    }
}

/// Appends each room's batch inside `tx`. Every room's sequence continues from
/// its row, read by the first statement (under [`Store::begin_write`]'s write lock
/// on SQLite, with `FOR UPDATE` row locks in id order on PostgreSQL), so concurrent
/// appenders to a room queue there and the sequence stays gapless and in commit
/// order.
///
/// The statements do not grow with the number of rooms: one read of every room's
/// sequence, one lookup of retries (a chunk of pairs per statement), plain
/// messages inserted several rows per statement whatever their room, and one
/// update of every sequence that moved. On SQLite each statement is a round trip
/// to sqlx's worker thread, two thread switches: per-room statements made a group
/// commit over a hundred rooms cost four hundred of them. Events that look at
/// another message (replies, edits, deletions) first insert what is pending, so
/// they see every earlier event of the batch. Results per room, in `batches`
/// order; a room appears at most once.
async fn append_in(
    tx: &mut Tx<'_>,
    for_update: &str,
    batches: &[(&RoomId, &[NewMessage])],
) -> StoreResult<Vec<Vec<Appended>>> {
    let mut last_seqs = room_sequences(tx, for_update, batches).await?;
    let mut known = find_by_client_ids(tx, batches).await?;
    let now = now_ms();
    let mut results: Vec<Vec<Appended>> = batches
        .iter()
        .map(|(_, batch)| Vec::with_capacity(batch.len()))
        .collect();
    // (room, index into its results) of stored events not inserted yet.
    let mut pending: Vec<(usize, usize)> = Vec::new();
    // (room, sender, client message id) stored earlier in this transaction, with
    // where: a second copy later in the batch is a retry of the first.
    let mut stored_here: HashMap<(usize, &str, &str), usize> = HashMap::new();
    for (r, (room, batch)) in batches.iter().enumerate() {
        for new in *batch {
            if let Some(cmid) = new.client_message_id.as_deref() {
                let key = (r, new.sender_id.as_str(), cmid);
                let earlier = stored_here.get(&key).and_then(|&at| match &results[r][at] {
                    Appended::Stored(original) | Appended::Duplicate(original) => {
                        Some(original.clone())
                    }
                    Appended::Rejected(_) => None,
                });
                if let Some(original) = earlier {
                    results[r].push(Appended::Duplicate(original));
                    continue;
                }
                if !known.is_empty() {
                    let stored_key = (r, new.sender_id.0.clone(), cmid.to_owned());
                    if let Some(original) = known.remove(&stored_key) {
                        results[r].push(Appended::Duplicate(original));
                        // Later copies in the batch find it among these results.
                        stored_here.insert(key, results[r].len() - 1);
                        continue;
                    }
                }
            }
            let looks_elsewhere = new.kind != MessageKind::Text || new.reply_to_seq > 0;
            if looks_elsewhere {
                insert_pending(tx, &results, &mut pending).await?;
                if let Some(rejection) = check_target(tx, room, new).await? {
                    results[r].push(Appended::Rejected(rejection));
                    continue;
                }
            }
            last_seqs[r].1 += 1;
            let record = new.record((*room).clone(), last_seqs[r].1 as u64, now);
            if new.kind == MessageKind::Text {
                pending.push((r, results[r].len()));
            } else {
                insert_rows(tx, &[&record]).await?;
                apply_to_target(tx, room, &record).await?;
            }
            if let Some(cmid) = new.client_message_id.as_deref() {
                stored_here.insert((r, new.sender_id.as_str(), cmid), results[r].len());
            }
            results[r].push(Appended::Stored(record));
        }
    }
    insert_pending(tx, &results, &mut pending).await?;
    store_sequences(tx, batches, &last_seqs).await?;
    Ok(results)
}

/// Each room's `last_seq` as it was, in `batches` order, with the rows locked for
/// the transaction (see [`append_in`]). A missing room is [`StoreError::NotFound`].
async fn room_sequences(
    tx: &mut Tx<'_>,
    for_update: &str,
    batches: &[(&RoomId, &[NewMessage])],
) -> StoreResult<Vec<(i64, i64)>> {
    let mut found: HashMap<String, i64> = HashMap::with_capacity(batches.len());
    for chunk in pow2_chunks(batches, ROOMS_PER_STATEMENT) {
        let mut params = Params::new(tx);
        let mut sql = String::from("SELECT id, last_seq FROM rooms WHERE id IN ");
        params.push_tuple(&mut sql, chunk.len());
        // Rows in id order: two transactions locking rooms on PostgreSQL never
        // wait for each other crosswise.
        sql.push_str(" ORDER BY id");
        sql.push_str(for_update);
        let mut query = sqlx::query_as::<_, (String, i64)>(&sql);
        for (room, _) in chunk {
            query = query.bind(room.as_str());
        }
        found.extend(query.fetch_all(&mut **tx).await?);
    }
    batches
        .iter()
        .map(|(room, _)| {
            let seq = found
                .get(room.as_str())
                .copied()
                .ok_or(StoreError::NotFound)?;
            Ok((seq, seq))
        })
        .collect()
}

/// Writes back every room's `last_seq` that moved (`(before, after)` per room, in
/// `batches` order), one statement per [`ROOMS_PER_STATEMENT`] rooms.
async fn store_sequences(
    tx: &mut Tx<'_>,
    batches: &[(&RoomId, &[NewMessage])],
    last_seqs: &[(i64, i64)],
) -> StoreResult<()> {
    let moved: Vec<(&RoomId, i64)> = batches
        .iter()
        .zip(last_seqs)
        .filter(|(_, (before, after))| after != before)
        .map(|((room, _), (_, after))| (*room, *after))
        .collect();
    for chunk in pow2_chunks(&moved, ROOMS_PER_STATEMENT) {
        let mut params = Params::new(tx);
        let mut sql = String::from("UPDATE rooms SET last_seq = CASE id");
        for _ in chunk {
            sql.push_str(" WHEN ");
            params.push(&mut sql);
            sql.push_str(" THEN ");
            params.push(&mut sql);
        }
        sql.push_str(" END WHERE id IN ");
        params.push_tuple(&mut sql, chunk.len());
        let mut query = sqlx::query(&sql);
        for (room, seq) in chunk {
            query = query.bind(room.as_str()).bind(*seq);
        }
        for (room, _) in chunk {
            query = query.bind(room.as_str());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// The stored events with the (room, sender, client message id) of an event of
/// `batches`, by (room index in `batches`, sender, client message id).
async fn find_by_client_ids(
    tx: &mut Tx<'_>,
    batches: &[(&RoomId, &[NewMessage])],
) -> StoreResult<HashMap<(usize, String, String), MessageRecord>> {
    let triples: Vec<(&str, &str, &str)> = batches
        .iter()
        .flat_map(|(room, batch)| {
            batch.iter().filter_map(|m| {
                Some((
                    room.as_str(),
                    m.sender_id.as_str(),
                    m.client_message_id.as_deref()?,
                ))
            })
        })
        .collect();
    let mut found = HashMap::new();
    if triples.is_empty() {
        return Ok(found);
    }
    let index: HashMap<&str, usize> = batches
        .iter()
        .enumerate()
        .map(|(i, (room, _))| (room.as_str(), i))
        .collect();
    let (_, per_query) = chunk_sizes(tx);
    for chunk in pow2_chunks(&triples, per_query) {
        // Each branch names the whole unique key (room, sender, client id), so
        // both databases answer it from the unique index, branch by branch.
        let mut params = Params::new(tx);
        let mut sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE ");
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(" OR ");
            }
            sql.push_str("(room_id = ");
            params.push(&mut sql);
            sql.push_str(" AND sender_id = ");
            params.push(&mut sql);
            sql.push_str(" AND client_message_id = ");
            params.push(&mut sql);
            sql.push(')');
        }
        let mut query = sqlx::query_as::<_, MessageRow>(&sql);
        for (room, sender, cmid) in chunk {
            query = query.bind(*room).bind(*sender).bind(*cmid);
        }
        for row in query.fetch_all(&mut **tx).await? {
            let record = MessageRecord::try_from(row)?;
            let (Some(&r), Some(cmid)) = (
                index.get(record.room_id.as_str()),
                record.client_message_id.clone(),
            ) else {
                continue;
            };
            found.insert((r, record.sender_id.0.clone(), cmid), record);
        }
    }
    Ok(found)
}

/// Inserts the stored events `pending` points at (room, index into its
/// results), whatever their rooms, and empties it.
async fn insert_pending(
    tx: &mut Tx<'_>,
    results: &[Vec<Appended>],
    pending: &mut Vec<(usize, usize)>,
) -> StoreResult<()> {
    let records: Vec<&MessageRecord> = pending
        .drain(..)
        .filter_map(|(r, i)| match &results[r][i] {
            Appended::Stored(record) => Some(record),
            _ => None,
        })
        .collect();
    let (per_insert, _) = chunk_sizes(tx);
    for chunk in pow2_chunks(&records, per_insert) {
        insert_rows(tx, chunk).await?;
    }
    Ok(())
}

/// Inserts `records` with one statement.
async fn insert_rows(tx: &mut Tx<'_>, records: &[&MessageRecord]) -> StoreResult<()> {
    if records.is_empty() {
        return Ok(());
    }
    const COLUMNS: usize = 11;
    let mut params = Params::new(tx);
    let mut sql = String::from(
        "INSERT INTO messages (room_id, seq, id, kind, sender_id, text, metadata, reply_to_seq, \
         target_seq, client_message_id, created_at) VALUES ",
    );
    for r in 0..records.len() {
        if r > 0 {
            sql.push_str(", ");
        }
        params.push_tuple(&mut sql, COLUMNS);
    }
    let mut query = sqlx::query(&sql);
    for m in records {
        let metadata =
            serde_json::to_string(&m.metadata).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        query = query
            .bind(m.room_id.as_str())
            .bind(m.seq as i64)
            .bind(m.id.as_str())
            .bind(m.kind.as_str())
            .bind(m.sender_id.as_str())
            .bind(m.text.as_str())
            .bind(metadata)
            .bind(m.reply_to_seq as i64)
            .bind(m.target_seq as i64)
            .bind(m.client_message_id.as_deref())
            .bind(m.created_at);
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

async fn check_target(
    tx: &mut Tx<'_>,
    room: &RoomId,
    new: &NewMessage,
) -> StoreResult<Option<AppendRejection>> {
    let target = match new.kind {
        MessageKind::Text if new.reply_to_seq > 0 => new.reply_to_seq,
        MessageKind::Text => return Ok(None),
        MessageKind::Edit | MessageKind::Delete => new.target_seq,
    };
    let found: Option<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT kind, sender_id, deleted_at FROM messages WHERE room_id = $1 AND seq = $2",
    )
    .bind(room.as_str())
    .bind(target.min(i64::MAX as u64) as i64)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((kind, sender, deleted_at)) = found else {
        return Ok(Some(AppendRejection::TargetNotFound));
    };
    if new.kind == MessageKind::Text {
        return Ok(None);
    }
    if kind != MessageKind::Text.as_str() || deleted_at.is_some() {
        return Ok(Some(AppendRejection::NotEditable));
    }
    let is_author = sender == new.sender_id.0;
    let allowed = match new.kind {
        MessageKind::Edit => is_author,
        _ => is_author || new.moderator,
    };
    Ok((!allowed).then_some(AppendRejection::NotAuthor))
}

/// Makes the original message show its edit or deletion in history.
async fn apply_to_target(tx: &mut Tx<'_>, room: &RoomId, event: &MessageRecord) -> StoreResult<()> {
    let sql = match event.kind {
        MessageKind::Text => return Ok(()),
        MessageKind::Edit => "UPDATE messages SET text = $1, edited_at = $2 WHERE room_id = $3 AND seq = $4",
        MessageKind::Delete => {
            "UPDATE messages SET text = $1, metadata = '{}', deleted_at = $2 WHERE room_id = $3 AND seq = $4"
        }
    };
    sqlx::query(sql)
        .bind(&event.text)
        .bind(event.created_at)
        .bind(room.as_str())
        .bind(event.target_seq as i64)
        .execute(&mut **tx)
        .await?;
    if event.kind == MessageKind::Delete {
        // The deleted text must not stay readable through earlier edits.
        sqlx::query("UPDATE messages SET text = '' WHERE room_id = $1 AND kind = 'edit' AND target_seq = $2")
            .bind(room.as_str())
            .bind(event.target_seq as i64)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::pow2_chunks;

    #[test]
    fn chunks_are_powers_of_two_largest_first_and_cover_everything_in_order() {
        let items: Vec<u32> = (0..247).collect();
        let chunks: Vec<&[u32]> = pow2_chunks(&items, 128).collect();
        let lengths: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        assert_eq!(lengths, [128, 64, 32, 16, 4, 2, 1]);
        assert_eq!(chunks.concat(), items);
        // `most` that is not a power of two: chunks stay powers of two below it.
        let lengths: Vec<usize> = pow2_chunks(&items[..200], 100).map(<[u32]>::len).collect();
        assert_eq!(lengths, [64, 64, 64, 8]);
        assert_eq!(pow2_chunks(&items[..1], 128).count(), 1);
        assert_eq!(pow2_chunks(&items[..0], 128).count(), 0);
    }
}
