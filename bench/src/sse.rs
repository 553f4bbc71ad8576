//! The Server-Sent Events client: `GET /sse?rooms=...`, each event's `data:` line a
//! proto3-JSON `ServerFrame` (docs/sse.md).

use std::{collections::VecDeque, net::SocketAddr, pin::Pin};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use roomcast::proto::v1 as pb;
use tokio::time::{timeout_at, Instant};

use crate::{ws::Incoming, REPLY_TIMEOUT};
use pb::server_frame::Kind as Out;

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Largest event the client buffers (a server frame is far smaller).
const MAX_EVENT_BYTES: usize = 1 << 20;

/// An HTTP client for streams: no overall timeout (a stream lasts the whole run),
/// no proxies, no redirects.
pub(crate) fn stream_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(REPLY_TIMEOUT)
        .tcp_nodelay(true)
        .build()
        .context("build the SSE client")
}

/// One open event stream.
pub(crate) struct SseStream {
    body: Body,
    buf: Vec<u8>,
    pending: VecDeque<Incoming>,
}

impl SseStream {
    /// Opens `/sse?rooms=<room>` (live start, `batch` frames when `batch`) as `token`
    /// and waits for the room's
    /// `subscribed` event; answers the stream and the room's sequence then.
    pub(crate) async fn open(
        client: &reqwest::Client,
        addr: SocketAddr,
        token: &str,
        room: &str,
        batch: bool,
    ) -> Result<(Self, u64)> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let url = format!("http://{addr}/sse?rooms={room}&notifications=off&batch={batch}");
        let response = timeout_at(deadline, client.get(&url).bearer_auth(token).send())
            .await
            .map_err(|_| anyhow!("GET /sse timed out"))?
            .context("GET /sse")?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("GET /sse: HTTP {status}: {body}");
        }
        let mut stream = Self {
            body: Box::pin(response.bytes_stream()),
            buf: Vec::new(),
            pending: VecDeque::new(),
        };
        loop {
            match stream.next(deadline).await? {
                Incoming::Frame(frame) => match frame.kind {
                    Some(Out::Subscribed(s)) => return Ok((stream, s.last_seq)),
                    Some(Out::Error(e)) => bail!("SSE subscribe: {}: {}", e.code, e.message),
                    _ => continue,
                },
                Incoming::Closed(code, reason) => {
                    bail!("SSE stream ended before subscribing: {code} {reason}")
                }
            }
        }
    }

    /// The next frame (comments and heartbeats skipped), or the end of the stream.
    pub(crate) async fn next(&mut self, deadline: Instant) -> Result<Incoming> {
        timeout_at(deadline, self.read())
            .await
            .map_err(|_| anyhow!("no SSE event from the server in time"))?
    }

    /// Cancel-safe: the only await is the body's next chunk; a chunk is parsed in full
    /// before anything is returned.
    pub(crate) async fn read(&mut self) -> Result<Incoming> {
        loop {
            if let Some(incoming) = self.pending.pop_front() {
                return Ok(incoming);
            }
            match self.body.next().await {
                Some(Ok(chunk)) => {
                    self.buf.extend_from_slice(&chunk);
                    self.parse()?;
                }
                Some(Err(e)) => return Ok(Incoming::Closed(1006, e.to_string())),
                None => return Ok(Incoming::Closed(1006, "stream ended".into())),
            }
        }
    }

    /// Moves every complete event of the buffer into `pending`.
    fn parse(&mut self) -> Result<()> {
        let mut start = 0;
        while let Some(end) = find_blank_line(&self.buf[start..]) {
            let event = &self.buf[start..start + end];
            start += end + 2;
            let text = std::str::from_utf8(event).context("an SSE event is not UTF-8")?;
            let (mut name, mut data) = ("message", String::new());
            for line in text.split('\n') {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim_start();
                } else if let Some(v) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if data.is_empty() {
                continue;
            }
            if name == "close" {
                let close: serde_json::Value =
                    serde_json::from_str(&data).context("undecodable close event")?;
                let code = close["code"].as_u64().unwrap_or(1006) as u16;
                let reason = close["reason"].as_str().unwrap_or_default().to_owned();
                self.pending.push_back(Incoming::Closed(code, reason));
                continue;
            }
            let frame: pb::ServerFrame =
                serde_json::from_str(&data).context("undecodable SSE data")?;
            self.pending.push_back(Incoming::Frame(Box::new(frame)));
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_EVENT_BYTES {
            bail!("an SSE event over {MAX_EVENT_BYTES} bytes");
        }
        Ok(())
    }
}

/// Offset of the first "\n\n" (the server writes LF line ends).
fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn events_split_across_chunks_are_parsed() {
        let chunks: Vec<reqwest::Result<Bytes>> = vec![
            Ok(Bytes::from_static(
                b"retry: 1000\n\n: heartbeat\n\nid: x\nevent: mess",
            )),
            Ok(Bytes::from_static(
                b"age\ndata: {\"message\":{\"roomId\":\"r\",\"seq\":\"7\"}}\n\n",
            )),
            Ok(Bytes::from_static(
                b"event: close\ndata: {\"code\":4501,\"reason\":\"signed out\"}\n\n",
            )),
        ];
        let mut stream = SseStream {
            body: Box::pin(futures_util::stream::iter(chunks)),
            buf: Vec::new(),
            pending: VecDeque::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        match stream.next(deadline).await.expect("frame") {
            Incoming::Frame(f) => match f.kind {
                Some(Out::Message(m)) => assert_eq!((m.room_id.as_str(), m.seq), ("r", 7)),
                other => panic!("unexpected {other:?}"),
            },
            Incoming::Closed(..) => panic!("closed early"),
        }
        match stream.next(deadline).await.expect("close") {
            Incoming::Closed(code, reason) => {
                assert_eq!((code, reason.as_str()), (4501, "signed out"))
            }
            Incoming::Frame(f) => panic!("unexpected {f:?}"),
        }
    }
}
