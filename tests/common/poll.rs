//! Long-polling helpers (`PushService.Poll`), shared by the long-poll and the
//! cross-transport tests: one poll, and a client that keeps its cursors between
//! polls as an application would.

#![allow(dead_code)] // each test binary uses a part

use std::collections::BTreeMap;

use roomcast::proto::v1 as pb;

use super::{Rpc, RpcError, TestServer};

use pb::server_frame::Kind as Out;

/// One poll in binary protobuf as `token`.
pub async fn poll(
    server: &TestServer,
    token: &str,
    req: &pb::PollRequest,
) -> Result<pb::PollResponse, RpcError> {
    server
        .rpc_as(token)
        .call_proto("PushService/Poll", req)
        .await
}

/// A poll request for `rooms` (room, after_seq) waiting up to `wait_ms`.
pub fn request(rooms: &[(&str, Option<u64>)], wait_ms: u32) -> pb::PollRequest {
    pb::PollRequest {
        rooms: rooms
            .iter()
            .map(|(room_id, after_seq)| pb::PollRoom {
                room_id: (*room_id).to_owned(),
                after_seq: *after_seq,
            })
            .collect(),
        wait_ms,
        ..Default::default()
    }
}

/// The room event sequences of `room_id` in a response, in order.
pub fn seqs(response: &pb::PollResponse, room_id: &str) -> Vec<u64> {
    response
        .events
        .iter()
        .filter_map(|f| match &f.kind {
            Some(Out::Message(m) | Out::Edited(m) | Out::Deleted(m)) if m.room_id == room_id => {
                Some(m.seq)
            }
            _ => None,
        })
        .collect()
}

/// The notifications of a response.
pub fn notifications(response: &pb::PollResponse) -> Vec<pb::Notification> {
    response
        .events
        .iter()
        .filter_map(|f| match &f.kind {
            Some(Out::Notification(n)) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

/// The `error` frames of a response.
pub fn errors(response: &pb::PollResponse) -> Vec<pb::Error> {
    response
        .events
        .iter()
        .filter_map(|f| match &f.kind {
            Some(Out::Error(e)) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

/// The cursor of `room_id` in a response.
pub fn cursor(response: &pb::PollResponse, room_id: &str) -> Option<u64> {
    response
        .cursors
        .iter()
        .find(|c| c.room_id == room_id)
        .map(|c| c.after_seq)
}

/// A long-poll client that keeps its position (the cursors) between polls.
#[derive(Debug, Clone, Default)]
pub struct Poller {
    pub token: String,
    pub poll_id: String,
    /// Per room: the last sequence processed (`None`: start live).
    pub rooms: BTreeMap<String, Option<u64>>,
    /// The notification cursor, when polling notifications.
    pub notifications: Option<Option<u64>>,
}

impl Poller {
    /// The next request from the cursors.
    pub fn request(&self, wait_ms: u32) -> pb::PollRequest {
        pb::PollRequest {
            rooms: self
                .rooms
                .iter()
                .map(|(room_id, after_seq)| pb::PollRoom {
                    room_id: room_id.clone(),
                    after_seq: *after_seq,
                })
                .collect(),
            notifications: self.notifications.is_some(),
            notifications_after_seq: self.notifications.flatten(),
            wait_ms,
            poll_id: self.poll_id.clone(),
            limit: 0,
        }
    }

    /// Polls once and moves the cursors.
    pub async fn poll(
        &mut self,
        server: &TestServer,
        wait_ms: u32,
    ) -> Result<pb::PollResponse, RpcError> {
        let response = poll(server, &self.token, &self.request(wait_ms)).await?;
        self.advance(&response);
        Ok(response)
    }

    /// Polls once through `rpc` (a node of a cluster, or nginx; it carries the
    /// token) in binary protobuf and moves the cursors.
    pub async fn poll_rpc(
        &mut self,
        rpc: &Rpc,
        wait_ms: u32,
    ) -> Result<pb::PollResponse, RpcError> {
        let response = rpc
            .call_proto("PushService/Poll", &self.request(wait_ms))
            .await?;
        self.advance(&response);
        Ok(response)
    }

    /// Takes the position a response ends at.
    pub fn advance(&mut self, response: &pb::PollResponse) {
        for c in &response.cursors {
            self.rooms.insert(c.room_id.clone(), Some(c.after_seq));
        }
        if let Some(n) = &mut self.notifications {
            *n = Some(response.notifications_seq);
        }
    }
}
