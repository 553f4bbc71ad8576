//! What a [`RoomActor`](super::room::RoomActor) keeps for a live room (not an
//! actor): the host controls and the per-user state they need (slow mode, rate
//! limit), the pinned message, the sequence numbers reserved in the store, and the
//! client message ids of the messages its ring holds (so that a retried send gets
//! the first result, as in chat rooms).
//!
//! Live comments are not stored one by one: the room gives out sequence numbers
//! from a block it reserved in the store (`rooms.last_seq`), so a restarted room
//! never reuses one; a client resuming from a number the ring no longer holds gets
//! a `gap` frame. Several nodes sharing a room (the Redis broker) number it from
//! one counter instead: each flush takes exactly its count of numbers from the
//! store (`RoomActor::flush_live_shared`), so the nodes' numbers never interleave
//! out of order; `reserved`/`reserving` then track that one round trip.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use crate::{
    error::{ApiError, Code},
    ids::UserId,
    proto::v1 as pb,
    settings::{Coalescing, LiveRoomSettings},
    store::LiveControlsRecord,
};

/// The window of `rate_limit_per_minute`.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// How often a live room's event rate is re-estimated (its coalescing window
/// follows it).
const RATE_PERIOD: Duration = Duration::from_millis(100);
/// Weight of the newest period in the smoothed event rate: a burst is seen within
/// a few periods, a single busy period does not swing the window.
const RATE_SMOOTHING: f64 = 0.3;

/// A live room's state inside its room actor.
#[derive(Debug, Default)]
pub struct LiveState {
    pub controls: LiveControlsRecord,
    pub pinned: Option<pb::Message>,
    /// Sequence numbers up to this one are reserved in the store.
    pub reserved: u64,
    /// Set while a reservation is being written.
    pub reserving: bool,
    /// When each user last sent (slow mode).
    last_sent: HashMap<UserId, Instant>,
    /// Each user's sends within the last minute (rate limit), oldest first.
    recent: HashMap<UserId, VecDeque<Instant>>,
    /// (sender, client message id) → sequence, for the messages the ring holds.
    pub sent_ids: HashMap<(UserId, String), u64>,
}

impl LiveState {
    pub fn new(controls: LiveControlsRecord, pinned: Option<pb::Message>, reserved: u64) -> Self {
        Self {
            controls,
            pinned,
            reserved,
            ..Self::default()
        }
    }

    /// Checks a new message (TEXT or EDIT) of `sender` against the controls.
    /// `host`: the room's owners and moderators, exempt from host-only mode, slow
    /// mode and the rate limit. Each refusal names its rule and, when waiting
    /// helps, says how long (and carries that delay).
    pub fn check(
        &self,
        settings: &LiveRoomSettings,
        sender: &UserId,
        text: &str,
        host: bool,
        counts_as_send: bool,
        now: Instant,
    ) -> Result<(), ApiError> {
        let c = &self.controls;
        if c.host_only && !host {
            return Err(refused(
                "host_only",
                ApiError::failed_precondition(
                    "host_only: only the room's hosts may send while host-only mode is on",
                ),
            ));
        }
        if c.max_length > 0 {
            let chars = text.chars().count();
            if chars > c.max_length as usize {
                return Err(refused(
                    "max_length",
                    ApiError::invalid(format!(
                        "max_length: the message has {chars} characters; this room allows at most {}",
                        c.max_length
                    )),
                ));
            }
        }
        if c.word_filter {
            if let Some(word) = filtered_word(&settings.word_filter, text) {
                return Err(refused(
                    "word_filter",
                    ApiError::invalid(format!(
                        "word_filter: the message contains a word this room does not allow (`{word}`)"
                    )),
                ));
            }
        }
        if host || !counts_as_send {
            return Ok(());
        }
        if c.slow_mode_seconds > 0 {
            let every = Duration::from_secs(u64::from(c.slow_mode_seconds));
            if let Some(last) = self.last_sent.get(sender) {
                let since = now.saturating_duration_since(*last);
                if since < every {
                    return Err(slow_mode_refused(c.slow_mode_seconds, every - since));
                }
            }
        }
        if c.rate_limit_per_minute > 0 {
            if let Some(recent) = self.recent.get(sender) {
                let in_window = recent
                    .iter()
                    .filter(|t| now.saturating_duration_since(**t) < RATE_WINDOW)
                    .count();
                if in_window >= c.rate_limit_per_minute as usize {
                    // The oldest send inside the window frees a slot when it leaves it.
                    let oldest = recent
                        .iter()
                        .find(|t| now.saturating_duration_since(**t) < RATE_WINDOW)
                        .copied()
                        .unwrap_or(now);
                    let wait = RATE_WINDOW.saturating_sub(now.saturating_duration_since(oldest));
                    return Err(rate_limit_refused(c.rate_limit_per_minute, wait));
                }
            }
        }
        Ok(())
    }

    /// Records an accepted send of `sender` for slow mode and the rate limit.
    pub fn record_send(&mut self, sender: &UserId, now: Instant) {
        if self.controls.slow_mode_seconds > 0 {
            self.last_sent.insert(sender.clone(), now);
        }
        let limit = self.controls.rate_limit_per_minute as usize;
        if limit > 0 {
            let recent = self.recent.entry(sender.clone()).or_default();
            recent.push_back(now);
            while recent.len() > limit {
                recent.pop_front();
            }
        }
    }

    /// Forgets per-user state that no control needs any more (called periodically).
    pub fn prune(&mut self, now: Instant) {
        let slow = Duration::from_secs(u64::from(self.controls.slow_mode_seconds));
        self.last_sent
            .retain(|_, t| now.saturating_duration_since(*t) < slow);
        self.recent.retain(|_, sends| {
            sends.retain(|t| now.saturating_duration_since(*t) < RATE_WINDOW);
            !sends.is_empty()
        });
    }
}

/// The refusal of a send under slow mode (`seconds`), `wait` before the next;
/// counted in `roomcast_live_refusals`.
pub fn slow_mode_refused(seconds: u32, wait: Duration) -> ApiError {
    refused(
        "slow_mode",
        retry_later(
            format!(
                "slow_mode: one message every {seconds} s per user in this room; you may send again in {} ms",
                wait.as_millis()
            ),
            wait,
        ),
    )
}

/// The refusal of a send over the rate limit (`per_minute`), `wait` before the
/// next; counted in `roomcast_live_refusals`.
pub fn rate_limit_refused(per_minute: u32, wait: Duration) -> ApiError {
    refused(
        "rate_limit",
        retry_later(
            format!(
                "rate_limit: at most {per_minute} messages per minute per user in this room; you may send again in {} ms",
                wait.as_millis()
            ),
            wait,
        ),
    )
}

/// Counts a refusal by `control` in `roomcast_live_refusals` and passes it on.
fn refused(control: &'static str, error: ApiError) -> ApiError {
    crate::metrics::metrics().live_refused(control);
    error
}

fn retry_later(message: String, wait: Duration) -> ApiError {
    // At least a millisecond: a zero delay would read as "no delay".
    ApiError::new(Code::ResourceExhausted, message)
        .with_retry_after(wait.max(Duration::from_millis(1)))
}

/// The first word of `list` that `text` contains as a whole word, ignoring case.
fn filtered_word<'a>(list: &'a [String], text: &str) -> Option<&'a str> {
    if list.is_empty() {
        return None;
    }
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    list.iter()
        .find(|banned| {
            let banned = banned.to_lowercase();
            !banned.is_empty() && words.iter().any(|w| *w == banned)
        })
        .map(String::as_str)
}

#[cfg(test)]
mod window_tests {
    use super::*;

    fn settings(min: u64, max: u64, budget: u64) -> Coalescing {
        Coalescing {
            min_ms: min,
            max_ms: max,
            writes_per_sec: budget,
            groups: 1,
        }
    }

    #[test]
    fn quiet_or_small_rooms_get_the_shortest_window() {
        let s = settings(5, 100, 50_000);
        assert_eq!(window_for(&s, 0.0, 10_000), Duration::from_millis(5));
        // 200 msgs/s × 100 viewers = 20,000 writes/s: within the budget.
        assert_eq!(window_for(&s, 200.0, 100), Duration::from_millis(5));
    }

    #[test]
    fn busy_rooms_get_a_window_that_keeps_writes_within_the_budget() {
        let s = settings(5, 100, 50_000);
        // 2,000 viewers: 25 writes per viewer per second.
        assert_eq!(window_for(&s, 200.0, 2_000), Duration::from_millis(40));
        // 10,000 viewers would need 200 ms: capped at the maximum.
        assert_eq!(window_for(&s, 20.0, 10_000), Duration::from_millis(100));
        // A minimum above the maximum is the maximum; 0 turns coalescing off.
        assert_eq!(
            window_for(&settings(50, 20, 1), 1e6, 10),
            Duration::from_millis(20)
        );
        assert_eq!(window_for(&settings(5, 0, 1), 1e6, 10), Duration::ZERO);
    }

    #[test]
    fn the_window_grows_with_the_rate_and_shrinks_when_it_falls() {
        let s = settings(5, 100, 50_000);
        let mut w = AdaptiveWindow::default();
        let mut now = w.period_start;
        let mut windows = Vec::new();
        // 2,000 viewers; 200 msgs/s for 2 s, then 1 msg/s for 5 s.
        for (rate, periods) in [(200u64, 20), (1, 50)] {
            for _ in 0..periods {
                w.record((rate / 10) as usize);
                now += RATE_PERIOD;
                windows.push(w.window(&s, 2_000, now));
            }
        }
        assert_eq!(windows[19], Duration::from_millis(40), "a sustained burst");
        assert_eq!(*windows.last().expect("windows"), Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(words: &[&str]) -> LiveRoomSettings {
        LiveRoomSettings {
            word_filter: words.iter().map(|w| w.to_string()).collect(),
            ..LiveRoomSettings::default()
        }
    }

    #[test]
    fn word_filter_matches_whole_words_in_any_case() {
        let list = settings(&["Spoiler"]).word_filter;
        assert_eq!(filtered_word(&list, "no SPOILER please"), Some("Spoiler"));
        assert_eq!(filtered_word(&list, "spoilers are fine"), None);
        assert_eq!(filtered_word(&list, "spoiler!"), Some("Spoiler"));
    }

    #[test]
    fn slow_mode_and_rate_limit_say_when_to_retry() {
        let user = UserId::from("u_1");
        let now = Instant::now();
        let mut live = LiveState::new(
            LiveControlsRecord {
                slow_mode_seconds: 10,
                ..Default::default()
            },
            None,
            0,
        );
        let s = settings(&[]);
        live.check(&s, &user, "a", false, true, now)
            .expect("first send");
        live.record_send(&user, now);
        let error = live
            .check(&s, &user, "b", false, true, now + Duration::from_secs(4))
            .expect_err("slow mode");
        assert!(error.message.starts_with("slow_mode:"), "{}", error.message);
        assert_eq!(error.retry_after, Some(Duration::from_secs(6)));
        live.check(&s, &user, "b", true, true, now)
            .expect("hosts are exempt");
        live.check(&s, &user, "c", false, true, now + Duration::from_secs(10))
            .expect("after the interval");

        live.controls = LiveControlsRecord {
            rate_limit_per_minute: 2,
            ..Default::default()
        };
        let other = UserId::from("u_2");
        live.record_send(&other, now);
        live.record_send(&other, now + Duration::from_secs(1));
        let error = live
            .check(&s, &other, "d", false, true, now + Duration::from_secs(2))
            .expect_err("rate limit");
        assert!(
            error.message.starts_with("rate_limit:"),
            "{}",
            error.message
        );
        assert_eq!(error.retry_after, Some(Duration::from_secs(58)));
    }
}

/// A room's coalescing window, adapted to its load: one write per subscriber
/// per event costs the server most of its time (the kernel's send path, and the
/// per-subscriber bookkeeping), so a room whose events would need more than
/// `rooms.live.coalesce_writes_per_sec` (chat rooms:
/// `realtime.coalesce_writes_per_sec`) writes a second if delivered one by one
/// (event rate × subscribers) gets a window long enough to stay within that
/// budget (subscribers ÷ budget), between `rooms.live.coalesce_min_ms` and
/// `rooms.live.coalesce_ms` (chat: `realtime.coalesce_window_ms` and
/// `realtime.coalesce_max_ms`); a room within the budget gets the shortest window.
/// As the rate or the audience falls, the window shrinks again. (A quiet room
/// still delivers at once: the window only holds events that come within it of
/// the last delivery.)
#[derive(Debug)]
pub struct AdaptiveWindow {
    /// Events per second, smoothed.
    rate: f64,
    /// Start of the current estimation period.
    period_start: Instant,
    /// Events published in the current period.
    events: u64,
}

impl Default for AdaptiveWindow {
    fn default() -> Self {
        Self {
            rate: 0.0,
            period_start: Instant::now(),
            events: 0,
        }
    }
}

impl AdaptiveWindow {
    /// Counts `n` published events.
    pub fn record(&mut self, n: usize) {
        self.events = self.events.saturating_add(n as u64);
    }

    /// The smoothed event rate (events per second) at `now`.
    pub fn rate(&mut self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.period_start);
        if elapsed >= RATE_PERIOD {
            let current = self.events as f64 / elapsed.as_secs_f64();
            // A long silence counts as one period at the average rate it had.
            self.rate = RATE_SMOOTHING * current + (1.0 - RATE_SMOOTHING) * self.rate;
            self.events = 0;
            self.period_start = now;
        }
        self.rate
    }

    /// The window for a room with `subscribers` at `now`.
    pub fn window(&mut self, settings: &Coalescing, subscribers: usize, now: Instant) -> Duration {
        let rate = self.rate(now);
        window_for(settings, rate, subscribers)
    }
}

/// The window for `rate` events a second and `subscribers` (see [`AdaptiveWindow`]).
pub fn window_for(settings: &Coalescing, rate: f64, subscribers: usize) -> Duration {
    let max = Duration::from_millis(settings.max_ms);
    let min = Duration::from_millis(settings.min_ms).min(max);
    let budget = settings.writes_per_sec.max(1) as f64;
    let subscribers = subscribers as f64;
    if rate * subscribers <= budget {
        return min;
    }
    Duration::from_secs_f64(subscribers / budget).clamp(min, max)
}
