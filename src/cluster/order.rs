//! [`RoomOrder`]: how a room actor turns the events that reach it from every node
//! (its own commits, handed back by the broker, and the other nodes', through
//! Redis) into one gapless order, delivering each sequence exactly once.
//!
//! Redis pub/sub is at-most-once, and two nodes' publishes can arrive out of
//! order. The room remembers the last sequence it delivered: an event at or below
//! it is dropped (never delivered twice); an event beyond the next one is held
//! while the hole is filled:
//!
//! - chat rooms read the hole from the store. A sequence is assigned in the commit
//!   that stores it, after the commit of every lower one, so an event seen means
//!   every earlier one is readable. Sequences the store no longer has (removed by
//!   retention) are skipped, as a history page skips them.
//! - live rooms keep nothing in the store: the hole is held back for
//!   `cluster.live_holdback_ms` (the missing events may still be on their way from
//!   another node), then reported as a `gap` and skipped.
//!
//! [`RoomOrder::want_catch_up`] reads everything the store has past the last delivered
//! sequence (after a Redis fault, or when a client resumes from a sequence that
//! another node committed and this one has not seen yet).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::protocol::RoomEvent;

/// Most events one store read of a fill returns; a longer hole takes several.
pub const FILL_PAGE: u32 = 1_000;

/// A store read the room must make: events with `after < seq <= upto` (to the
/// store's end when `upto` is `None`), at most [`FILL_PAGE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    pub after: u64,
    pub upto: Option<u64>,
}

/// What the room does after giving [`RoomOrder`] something.
#[derive(Debug, Default)]
pub struct Step {
    /// Deliver these, in this order (contiguous, after the last delivered).
    pub ready: Vec<Arc<RoomEvent>>,
    /// Start this store read, and hand its result to [`RoomOrder::filled`].
    pub fill: Option<Fill>,
    /// Live rooms: these sequences (inclusive) will never be delivered: tell the
    /// subscribers with a `gap`. Comes before `ready`.
    pub gap: Option<(u64, u64)>,
    /// Live rooms: call [`RoomOrder::hold_expired`] after the hold-back.
    pub hold: bool,
}

/// One room's cross-node ordering state. See the module docs.
#[derive(Debug)]
pub struct RoomOrder {
    delivered: u64,
    /// Events past a hole, by sequence.
    held: BTreeMap<u64, Arc<RoomEvent>>,
    /// The store read in flight (at most one).
    filling: Option<Fill>,
    /// Live rooms: when the oldest hole was first seen.
    holding_since: Option<Instant>,
    /// Live rooms: the newest sequence the store's counter says exists
    /// ([`RoomOrder::expect_through`]), delivered or not.
    expected: u64,
    live: bool,
    holdback: Duration,
    /// A catch-up (a read to the store's end) is wanted.
    catch_up_wanted: bool,
    /// Catch-ups started so far; the one in flight has this number.
    catch_ups_started: u64,
    /// The number of the last catch-up that reached the store's end.
    catch_ups_done: u64,
}

impl RoomOrder {
    /// A room that delivered everything up to `delivered`.
    pub fn new(delivered: u64, live: bool, holdback: Duration) -> Self {
        Self {
            delivered,
            held: BTreeMap::new(),
            filling: None,
            holding_since: None,
            expected: 0,
            live,
            holdback,
            catch_up_wanted: false,
            catch_ups_started: 0,
            catch_ups_done: 0,
        }
    }

    /// Asks for a catch-up (a read of everything the store has past the last
    /// delivered sequence). Answers a ticket: [`RoomOrder::caught_up`] says when a
    /// catch-up that started after this call has reached the store's end. Start it
    /// with [`RoomOrder::next_catch_up`]. A live room has nothing in the store: its
    /// tickets are answered at once.
    pub fn want_catch_up(&mut self) -> u64 {
        if self.live {
            return self.catch_ups_done;
        }
        self.catch_up_wanted = true;
        self.catch_ups_started + 1
    }

    /// Whether the catch-up of `ticket` is done.
    pub fn caught_up(&self, ticket: u64) -> bool {
        self.catch_ups_done >= ticket
    }

    /// The last sequence delivered.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Whether a store read is in flight.
    pub fn filling(&self) -> bool {
        self.filling.is_some()
    }

    /// The newest sequence known to exist (delivered, held, or expected).
    pub fn newest_known(&self) -> u64 {
        self.held
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(self.delivered)
            .max(self.expected)
    }

    /// Live rooms: the store's counter says sequences up to `upto` exist (some
    /// node numbered them). What has not arrived is held back like any hole
    /// (it may still be on its way), then reported as a `gap`. Chat rooms read the
    /// store instead ([`RoomOrder::want_catch_up`]); nothing happens for them.
    pub fn expect_through(&mut self, upto: u64) -> Step {
        if !self.live || upto <= self.newest_known() {
            return Step::default();
        }
        self.expected = upto;
        self.advance(Instant::now())
    }

    /// Events published by some node (this one included).
    pub fn accept(&mut self, events: impl IntoIterator<Item = Arc<RoomEvent>>) -> Step {
        let mut events = events.into_iter().peekable();
        if self.held.is_empty() {
            // The usual case (one node, or the next events from another): nothing
            // is waiting, so events in order pass straight through.
            let mut ready = Vec::new();
            while let Some(event) = events.next_if(|e| e.seq <= self.delivered + 1) {
                if event.seq == self.delivered + 1 {
                    self.delivered = event.seq;
                    ready.push(event);
                }
            }
            if events.peek().is_none() {
                if self.delivered >= self.expected {
                    // An expected hole closed in time.
                    self.holding_since = None;
                }
                return Step {
                    ready,
                    ..Step::default()
                };
            }
            let mut step = self.accept_held(events);
            ready.append(&mut step.ready);
            step.ready = ready;
            return step;
        }
        self.accept_held(events)
    }

    fn accept_held(&mut self, events: impl IntoIterator<Item = Arc<RoomEvent>>) -> Step {
        for event in events {
            if event.seq > self.delivered {
                self.held.entry(event.seq).or_insert(event);
            }
        }
        self.advance(Instant::now())
    }

    /// The catch-up read to start now, if one is wanted and no read is in flight.
    pub fn next_catch_up(&mut self) -> Option<Fill> {
        if !self.catch_up_wanted || self.filling.is_some() {
            return None;
        }
        self.catch_up_wanted = false;
        self.catch_ups_started += 1;
        let fill = Fill {
            after: self.delivered,
            upto: None,
        };
        self.filling = Some(fill);
        Some(fill)
    }

    /// The result of the store read `fill`: `records` ascending, `Err` when it
    /// failed (the room retries it after a pause with [`RoomOrder::retry_fill`]).
    pub fn filled(&mut self, fill: Fill, records: Result<Vec<Arc<RoomEvent>>, ()>) -> Step {
        if self.filling != Some(fill) {
            return Step::default();
        }
        self.filling = None;
        let Ok(records) = records else {
            if fill.upto.is_none() {
                // Wanted again; the room starts it after a pause.
                self.catch_up_wanted = true;
            }
            return Step::default();
        };
        let full_page = records.len() >= FILL_PAGE as usize;
        let last_read = records.last().map(|e| e.seq);
        crate::metrics::metrics()
            .cluster
            .gap_filled_events
            .inc_by(records.len() as u64);
        for event in records {
            if event.seq > self.delivered {
                self.held.entry(event.seq).or_insert(event);
            }
        }
        let mut ready = self.drain();
        if !full_page {
            // The store has nothing more in the range: what is missing in it was
            // removed (retention); a history page skips it too.
            if let Some(upto) = fill.upto {
                while self.delivered < upto {
                    let next = self
                        .held
                        .keys()
                        .next()
                        .copied()
                        .filter(|seq| *seq <= upto)
                        .unwrap_or(upto + 1);
                    self.delivered = next - 1;
                    ready.extend(self.drain());
                }
            }
        }
        let mut step = self.advance(Instant::now());
        ready.append(&mut step.ready);
        step.ready = ready;
        if full_page {
            // A whole page: more may follow.
            if fill.upto.is_none() {
                self.catch_up_wanted = true;
            } else if step.fill.is_none() && self.filling.is_none() {
                let next = Fill {
                    after: last_read.unwrap_or(self.delivered).max(self.delivered),
                    upto: fill.upto,
                };
                self.filling = Some(next);
                step.fill = Some(next);
            }
        } else if fill.upto.is_none() {
            self.catch_ups_done = self.catch_ups_started;
        }
        if step.fill.is_none() {
            step.fill = self.next_catch_up();
        }
        step
    }

    /// After a failed read: the same hole, read again.
    pub fn retry_fill(&mut self) -> Step {
        self.advance(Instant::now())
    }

    /// Live rooms, after the hold-back: a hole still open is given up as a `gap`.
    pub fn hold_expired(&mut self) -> Step {
        let now = Instant::now();
        let Some(since) = self.holding_since else {
            return Step::default();
        };
        if now.duration_since(since) < self.holdback {
            return Step {
                hold: true,
                ..Step::default()
            };
        }
        let gap_end = match self.held.keys().next() {
            Some(&first_held) => first_held - 1,
            None if self.expected > self.delivered => self.expected,
            None => {
                self.holding_since = None;
                return Step::default();
            }
        };
        let gap = (self.delivered + 1, gap_end);
        self.delivered = gap_end;
        self.holding_since = None;
        crate::metrics::metrics().cluster.live_gaps.inc();
        let mut step = self.advance(now);
        step.gap = Some(gap);
        step
    }

    /// The room's delivered sequence moved on without us (a live room numbered an
    /// event itself): nothing at or below `seq` is delivered again.
    pub fn skip_to(&mut self, seq: u64) {
        if seq > self.delivered {
            self.delivered = seq;
            self.held = self.held.split_off(&(seq + 1));
        }
    }

    fn drain(&mut self) -> Vec<Arc<RoomEvent>> {
        let mut ready = Vec::new();
        while let Some(event) = self.held.remove(&(self.delivered + 1)) {
            self.delivered = event.seq;
            ready.push(event);
        }
        ready
    }

    fn advance(&mut self, now: Instant) -> Step {
        let ready = self.drain();
        let mut step = Step {
            ready,
            ..Step::default()
        };
        let Some(&first_held) = self.held.keys().next() else {
            if self.live && self.expected > self.delivered {
                // Expected events that no node delivered yet: a hole like any.
                if self.holding_since.is_none() {
                    self.holding_since = Some(now);
                    step.hold = true;
                }
            } else {
                self.holding_since = None;
            }
            return step;
        };
        if self.live {
            if self.holding_since.is_none() {
                self.holding_since = Some(now);
                step.hold = true;
            }
        } else if self.filling.is_none() {
            crate::metrics::metrics().cluster.gap_fills.inc();
            let fill = Fill {
                after: self.delivered,
                upto: Some(first_held - 1),
            };
            self.filling = Some(fill);
            step.fill = Some(fill);
        }
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ids::{RoomId, UserId},
        model::MessageKind,
        store::MessageRecord,
    };

    fn event(seq: u64) -> Arc<RoomEvent> {
        Arc::new(RoomEvent::new(&MessageRecord {
            room_id: RoomId("r_1".into()),
            seq,
            id: format!("m_{seq}"),
            kind: MessageKind::Text,
            sender_id: UserId("u_1".into()),
            text: format!("{seq}"),
            metadata: Default::default(),
            reply_to_seq: 0,
            target_seq: 0,
            client_message_id: None,
            created_at: 0,
            edited_at: None,
            deleted: false,
        }))
    }

    fn seqs(events: &[Arc<RoomEvent>]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn in_order_events_pass_and_old_ones_are_dropped() {
        let mut order = RoomOrder::new(2, false, Duration::ZERO);
        let step = order.accept([event(3), event(4)]);
        assert_eq!(seqs(&step.ready), [3, 4]);
        assert!(step.fill.is_none());
        let step = order.accept([event(2), event(4)]);
        assert!(step.ready.is_empty(), "never twice");
        assert_eq!(order.delivered(), 4);
    }

    #[test]
    fn a_chat_hole_is_filled_from_the_store_before_what_follows_it() {
        let mut order = RoomOrder::new(0, false, Duration::ZERO);
        let step = order.accept([event(3)]);
        assert!(step.ready.is_empty());
        let fill = step.fill.expect("reads the hole");
        assert_eq!(
            fill,
            Fill {
                after: 0,
                upto: Some(2)
            }
        );
        // Later arrivals wait behind the hole, without a second read.
        let step = order.accept([event(4)]);
        assert!(step.ready.is_empty() && step.fill.is_none());
        // The hole's own event arrives late, during the read: delivered at once.
        let step = order.accept([event(1)]);
        assert_eq!(seqs(&step.ready), [1]);
        let step = order.filled(fill, Ok(vec![event(1), event(2)]));
        assert_eq!(seqs(&step.ready), [2, 3, 4]);
        assert!(step.fill.is_none());
        assert_eq!(order.delivered(), 4);
    }

    #[test]
    fn a_hole_inside_one_batch_delivers_what_comes_before_it() {
        let mut order = RoomOrder::new(0, false, Duration::ZERO);
        let step = order.accept([event(1), event(1), event(2), event(4)]);
        assert_eq!(seqs(&step.ready), [1, 2]);
        assert_eq!(
            step.fill,
            Some(Fill {
                after: 2,
                upto: Some(3)
            })
        );
        let step = order.filled(
            Fill {
                after: 2,
                upto: Some(3),
            },
            Ok(vec![event(3)]),
        );
        assert_eq!(seqs(&step.ready), [3, 4]);
    }

    #[test]
    fn a_failed_fill_is_retried_and_pruned_sequences_are_skipped() {
        let mut order = RoomOrder::new(0, false, Duration::ZERO);
        let fill = order.accept([event(5)]).fill.expect("read");
        assert!(order.filled(fill, Err(())).ready.is_empty());
        let fill = order.retry_fill().fill.expect("read again");
        // The store holds 3 and 4 only: 1 and 2 went with retention.
        let step = order.filled(fill, Ok(vec![event(3), event(4)]));
        assert_eq!(seqs(&step.ready), [3, 4, 5]);
        assert_eq!(order.delivered(), 5);
    }

    #[test]
    fn catch_up_reads_past_the_last_delivered_in_pages() {
        let mut order = RoomOrder::new(0, false, Duration::ZERO);
        let ticket = order.want_catch_up();
        let fill = order.next_catch_up().expect("reads");
        // Asked for during the read: another read follows it.
        let later = order.want_catch_up();
        assert!(order.next_catch_up().is_none(), "one read at a time");
        let page: Vec<_> = (1..=u64::from(FILL_PAGE)).map(event).collect();
        let step = order.filled(fill, Ok(page));
        assert_eq!(step.ready.len(), FILL_PAGE as usize);
        assert!(!order.caught_up(ticket), "a whole page: not at the end yet");
        let next = step.fill.expect("a whole page: read on");
        assert_eq!(next.after, u64::from(FILL_PAGE));
        let step = order.filled(next, Ok(vec![event(u64::from(FILL_PAGE) + 1)]));
        assert_eq!(step.ready.len(), 1);
        assert!(order.caught_up(ticket) && order.caught_up(later));
        assert!(step.fill.is_none());
        assert!(!order.filling());
    }

    #[test]
    fn a_live_hole_becomes_a_gap_after_the_holdback() {
        let mut order = RoomOrder::new(1, true, Duration::ZERO);
        let step = order.accept([event(4), event(5)]);
        assert!(step.ready.is_empty() && step.fill.is_none() && step.hold);
        let step = order.hold_expired();
        assert_eq!(step.gap, Some((2, 3)));
        assert_eq!(seqs(&step.ready), [4, 5]);
        // What arrives late for the gap is never delivered.
        assert!(order.accept([event(3)]).ready.is_empty());
    }

    #[test]
    fn a_live_hole_closed_in_time_is_no_gap() {
        let mut order = RoomOrder::new(1, true, Duration::from_secs(60));
        assert!(order.accept([event(3)]).hold);
        let step = order.accept([event(2)]);
        assert_eq!(seqs(&step.ready), [2, 3]);
        let step = order.hold_expired();
        assert!(step.gap.is_none() && step.ready.is_empty() && !step.hold);
    }

    #[test]
    fn expected_live_events_that_never_come_become_a_gap() {
        let mut order = RoomOrder::new(2, true, Duration::ZERO);
        // The store's counter is at 5; nothing past 2 arrived.
        let step = order.expect_through(5);
        assert!(step.hold && step.ready.is_empty());
        assert_eq!(order.newest_known(), 5);
        let step = order.hold_expired();
        assert_eq!(step.gap, Some((3, 5)));
        assert_eq!(order.delivered(), 5);
        assert_eq!(seqs(&order.accept([event(6)]).ready), [6]);
    }

    #[test]
    fn expected_live_events_that_arrive_in_time_are_no_gap() {
        let mut order = RoomOrder::new(2, true, Duration::from_secs(60));
        assert!(order.expect_through(4).hold);
        assert_eq!(seqs(&order.accept([event(3), event(4)]).ready), [3, 4]);
        let step = order.hold_expired();
        assert!(step.gap.is_none() && step.ready.is_empty() && !step.hold);
        // A chat room reads the store instead.
        let mut chat = RoomOrder::new(2, false, Duration::ZERO);
        assert!(!chat.expect_through(9).hold);
        assert_eq!(chat.newest_known(), 2);
    }
}
