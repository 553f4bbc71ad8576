//! A raw Server-Sent Events client for the tests: `GET /sse` over reqwest, the
//! stream parsed by hand (events, comments, `retry:`, the last `id:`), so a test
//! sees exactly what a browser's `EventSource` would.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde_json::Value;

use super::TestServer;

/// How long `next_named` waits for its event.
pub const WAIT: Duration = Duration::from_secs(15);
/// The longest an SSE stream opened by [`Sse::open_url`] may stay open.
pub const STREAM_LIMIT: Duration = Duration::from_secs(300);

/// One SSE event as a parser sees it.
#[derive(Debug, Default, Clone)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("data is JSON")
    }

    /// The room sequence of a `message` event.
    pub fn seq(&self) -> u64 {
        self.json()["message"]["seq"]
            .as_str()
            .expect("seq")
            .parse()
            .expect("numeric seq")
    }
}

/// A raw SSE stream: bytes in, events (and comments, and `retry:`) out.
pub struct Sse {
    response: reqwest::Response,
    buf: String,
    /// Comment lines seen so far (heartbeats).
    pub comments: Vec<String>,
    /// The last `retry:` value.
    pub retry: Option<u64>,
    /// The last event id seen (what `Last-Event-ID` resumes from).
    pub last_id: Option<String>,
}

impl Sse {
    pub async fn open(
        server: &TestServer,
        query: &str,
        token: &str,
        last_id: Option<&str>,
    ) -> Self {
        Self::open_url(
            server.http(),
            &server.url(&format!("/sse?{query}")),
            token,
            last_id,
        )
        .await
    }

    /// Opens `url` (`http://HOST/sse?...`: a node of a cluster, or nginx) as
    /// `token` with `http`, resuming from `last_id` when given; the stream may stay
    /// open for up to [`STREAM_LIMIT`] whatever the client's own timeout.
    pub async fn open_url(
        http: &reqwest::Client,
        url: &str,
        token: &str,
        last_id: Option<&str>,
    ) -> Self {
        let mut request = http.get(url).bearer_auth(token).timeout(STREAM_LIMIT);
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("GET /sse");
        assert_eq!(response.status(), 200, "GET {url}");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            response,
            buf: String::new(),
            comments: Vec::new(),
            retry: None,
            last_id: last_id.map(str::to_owned),
        }
    }

    /// Reads an SSE response a test requested itself (a token in the query, ...).
    pub fn from_response(response: reqwest::Response) -> Self {
        Self {
            response,
            buf: String::new(),
            comments: Vec::new(),
            retry: None,
            last_id: None,
        }
    }

    /// The next event; `None` when the stream ended or nothing came in time.
    pub async fn next(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut event = Event::default();
                let mut is_event = false;
                for line in block.lines() {
                    if let Some(comment) = line.strip_prefix(':') {
                        self.comments.push(comment.trim().to_owned());
                    } else if let Some((field, value)) = line.split_once(':') {
                        let value = value.strip_prefix(' ').unwrap_or(value);
                        match field {
                            "id" => event.id = Some(value.to_owned()),
                            "event" => event.event = value.to_owned(),
                            "data" => {
                                is_event = true;
                                event.data.push_str(value)
                            }
                            "retry" => self.retry = value.parse().ok(),
                            other => panic!("unknown SSE field {other}"),
                        }
                    }
                }
                if let Some(id) = &event.id {
                    self.last_id = Some(id.clone());
                }
                if is_event {
                    return Some(event);
                }
                continue;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.response.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buf.push_str(std::str::from_utf8(&bytes).unwrap()),
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// The next event named `name`, skipping others (within [`WAIT`] each).
    pub async fn next_named(&mut self, name: &str) -> Event {
        loop {
            let event = self
                .next(WAIT)
                .await
                .unwrap_or_else(|| panic!("no `{name}` event"));
            if event.event == name {
                return event;
            }
        }
    }

    /// The next event named `name`, skipping others; panics when it has not come
    /// within `timeout` (in all) or the stream ended first.
    pub async fn next_named_within(&mut self, name: &str, timeout: Duration) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .next(left)
                .await
                .unwrap_or_else(|| panic!("no `{name}` event within {timeout:?}"));
            if event.event == name {
                return event;
            }
        }
    }

    /// Message sequences until the last one is at least `upto`.
    pub async fn messages_until(&mut self, upto: u64) -> Vec<u64> {
        let mut seqs = Vec::new();
        while seqs.last().is_none_or(|s| *s < upto) {
            seqs.push(self.next_named("message").await.seq());
        }
        seqs
    }

    /// Message sequences until `count` arrived.
    pub async fn messages(&mut self, count: usize) -> Vec<u64> {
        let mut seqs = Vec::new();
        while seqs.len() < count {
            let event = self.next_named("message").await;
            assert!(event.id.is_some(), "a message event carries an id");
            seqs.push(event.seq());
        }
        seqs
    }
}
