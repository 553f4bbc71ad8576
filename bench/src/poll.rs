//! The long-polling client: `PushService/Poll` over the Connect protocol with binary
//! protobuf bodies, one outstanding poll per client, cursors kept by the client
//! (docs/long-polling.md).

use std::{collections::VecDeque, net::SocketAddr};

use anyhow::{anyhow, bail, Context as _, Result};
use prost::Message as _;
use roomcast::proto::v1 as pb;
use tokio::time::{timeout_at, Instant};

use crate::{ws::Incoming, REPLY_TIMEOUT};

/// How long one poll may wait on the server (the server caps it at
/// `poll.max_wait_ms`).
const WAIT_MS: u32 = 20_000;
/// Most events per answer (the server's `poll.page_max` is 500 by default).
const PAGE: u32 = 500;

/// One long-polling client of one room.
pub(crate) struct Poller {
    client: reqwest::Client,
    url: String,
    token: String,
    room: String,
    poll_id: String,
    /// The room cursor: the last sequence delivered (or skipped as a gap).
    after: u64,
    pending: VecDeque<Incoming>,
}

impl Poller {
    /// Starts polling `room` as `token` from the room's current end (a first poll
    /// that does not wait); answers the poller and that sequence.
    pub(crate) async fn open(
        client: &reqwest::Client,
        addr: SocketAddr,
        token: &str,
        room: &str,
        poll_id: String,
    ) -> Result<(Self, u64)> {
        let mut poller = Self {
            client: client.clone(),
            url: format!("http://{addr}/roomcast.v1.PushService/Poll"),
            token: token.to_owned(),
            room: room.to_owned(),
            poll_id,
            after: 0,
            pending: VecDeque::new(),
        };
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let first = timeout_at(deadline, poller.call(None, 0))
            .await
            .map_err(|_| anyhow!("the first poll timed out"))??;
        let start = first
            .cursors
            .iter()
            .find(|c| c.room_id == room)
            .map(|c| c.after_seq)
            .ok_or_else(|| anyhow!("the first poll answered no cursor for {room}: {first:?}"))?;
        poller.after = start;
        Ok((poller, start))
    }

    async fn call(&self, after: Option<u64>, wait_ms: u32) -> Result<pb::PollResponse> {
        let request = pb::PollRequest {
            rooms: vec![pb::PollRoom {
                room_id: self.room.clone(),
                after_seq: after,
            }],
            wait_ms,
            poll_id: self.poll_id.clone(),
            limit: PAGE,
            ..Default::default()
        };
        let response = self
            .client
            .post(&self.url)
            .bearer_auth(&self.token)
            .header("content-type", "application/proto")
            .header("connect-protocol-version", "1")
            .body(request.encode_to_vec())
            .send()
            .await
            .context("Poll")?;
        let status = response.status();
        let body = response.bytes().await.context("Poll body")?;
        if !status.is_success() {
            bail!("Poll: HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        pb::PollResponse::decode(body).context("undecodable PollResponse")
    }

    /// The next frame of the room, polling (and waiting on the server) as needed.
    /// Cancel-safe: the cursor moves only when an answer has been taken in whole.
    pub(crate) async fn read(&mut self) -> Result<Incoming> {
        loop {
            if let Some(incoming) = self.pending.pop_front() {
                return Ok(incoming);
            }
            let answer = self.call(Some(self.after), WAIT_MS).await?;
            if let Some(ended) = answer.ended {
                return Ok(Incoming::Closed(ended.code as u16, ended.reason));
            }
            for frame in answer.events {
                self.pending.push_back(Incoming::Frame(Box::new(frame)));
            }
            if let Some(cursor) = answer.cursors.iter().find(|c| c.room_id == self.room) {
                self.after = cursor.after_seq;
            }
        }
    }
}
