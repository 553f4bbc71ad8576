//! Scenario `sends`: persisted sends, each acknowledged after its commit. Every
//! sender keeps up to `--in-flight` sends outstanding, to one room or to `--rooms`
//! rooms in turn; the acknowledged sequences of every room must be gapless and
//! unique.

use std::{collections::HashMap, time::Duration};

use anyhow::{bail, ensure, Context as _, Result};
use futures_util::{stream, SinkExt as _, StreamExt as _};
use roomcast::proto::v1 as pb;
use serde::Serialize;
use tokio::time::{timeout_at, Instant};

use crate::{
    api::run_id,
    measure::{micros, now_ns, payload, round2, CpuMeter, Latency},
    ws::{encode_frame, read_frame, Conn, Incoming},
    Codec, Ctx, SendsArgs, REPLY_TIMEOUT, SETUP_CONCURRENCY,
};
use pb::{client_frame::Kind as In, server_frame::Kind as Out};

#[derive(Serialize)]
pub(crate) struct SendsReport {
    pub(crate) scenario: &'static str,
    pub(crate) codec: Codec,
    pub(crate) senders: usize,
    pub(crate) messages_per_sender: usize,
    pub(crate) in_flight: usize,
    pub(crate) rooms: usize,
    pub(crate) size: usize,
    pub(crate) acks: usize,
    pub(crate) errors: usize,
    pub(crate) first_error: Option<String>,
    pub(crate) elapsed_s: f64,
    pub(crate) acks_per_s: f64,
    pub(crate) ack_latency: Latency,
    /// Acknowledged sequences that are not contiguous or repeat (must be 0).
    pub(crate) seq_gaps: u64,
    pub(crate) seq_dups: u64,
    pub(crate) server_cpu_s: Option<f64>,
    pub(crate) bench_cpu_s: Option<f64>,
    pub(crate) bench_cores_busy: Option<f64>,
    pub(crate) generator_bound: bool,
    pub(crate) ok: bool,
}

#[derive(Default)]
pub(crate) struct SenderResult {
    pub(crate) latencies_us: Vec<u32>,
    /// (room index, acknowledged sequence)
    pub(crate) seqs: Vec<(usize, u64)>,
    pub(crate) errors: usize,
    pub(crate) first_error: Option<String>,
}

pub(crate) async fn run(ctx: &Ctx, args: &SendsArgs) -> Result<SendsReport> {
    ensure!(
        args.senders > 0 && args.messages > 0,
        "need senders and messages"
    );
    ensure!(
        args.in_flight > 0 && args.rooms > 0,
        "need at least 1 in flight and 1 room"
    );
    let run = run_id();
    eprintln!("sends: signing up {} senders", args.senders);
    let users = ctx.api.sign_up_many(&run, "s", args.senders).await?;
    let mut rooms = Vec::with_capacity(args.rooms);
    for n in 0..args.rooms {
        rooms.push(
            ctx.api
                .create_room(&users[0], &format!("bench sends {n}"))
                .await?,
        );
    }
    let joins: Vec<Result<()>> = stream::iter(
        users[1..]
            .iter()
            .flat_map(|u| rooms.iter().map(move |r| (u, r))),
    )
    .map(|(user, room)| ctx.api.join_room(user, room))
    .buffer_unordered(SETUP_CONCURRENCY)
    .collect()
    .await;
    joins.into_iter().collect::<Result<()>>()?;
    let mut conns = Vec::with_capacity(users.len());
    for user in &users {
        conns.push(Conn::open(ctx.addr, ctx.codec, &user.token).await?);
    }
    eprintln!(
        "sends: {} senders × {} messages, {} in flight each, over {} rooms",
        args.senders, args.messages, args.in_flight, args.rooms
    );
    let cpu = CpuMeter::start(&ctx.server_pids);
    let start = Instant::now();
    let stop_at = start + Duration::from_secs(args.duration);
    let rooms = std::sync::Arc::new(rooms);
    let mut tasks = Vec::new();
    for (n, conn) in conns.into_iter().enumerate() {
        let sender = Sender {
            n,
            senders: args.senders,
            rooms: rooms.clone(),
            messages: args.messages,
            in_flight: args.in_flight,
            size: args.size,
            stop_at,
        };
        tasks.push(tokio::spawn(sender.run(conn)));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.context("sender task")??);
    }
    let elapsed = start.elapsed();
    let server_cpu_s = cpu.server().map(round2);
    let bench_cpu_s = cpu.bench();

    let mut latencies: Vec<u32> = results
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    let mut seqs: Vec<(usize, u64)> = results
        .iter()
        .flat_map(|r| r.seqs.iter().copied())
        .collect();
    seqs.sort_unstable();
    let (mut seq_gaps, mut seq_dups) = (0, 0);
    for pair in seqs.windows(2) {
        let ((room_a, a), (room_b, b)) = (pair[0], pair[1]);
        if room_a != room_b {
            continue;
        }
        match b.cmp(&(a + 1)) {
            std::cmp::Ordering::Less => seq_dups += 1,
            std::cmp::Ordering::Greater => seq_gaps += b - a - 1,
            std::cmp::Ordering::Equal => {}
        }
    }
    let errors = results.iter().map(|r| r.errors).sum();
    let first_error = results.iter().find_map(|r| r.first_error.clone());
    let acks = latencies.len();
    let bench_cores_busy = bench_cpu_s.map(|cpu| round2(cpu / elapsed.as_secs_f64().max(1e-9)));
    Ok(SendsReport {
        scenario: "sends",
        codec: ctx.codec,
        senders: args.senders,
        messages_per_sender: args.messages,
        in_flight: args.in_flight,
        rooms: args.rooms,
        size: args.size,
        acks,
        errors,
        first_error,
        elapsed_s: round2(elapsed.as_secs_f64()),
        acks_per_s: round2(acks as f64 / elapsed.as_secs_f64()),
        ack_latency: Latency::from_us(&mut latencies),
        seq_gaps,
        seq_dups,
        server_cpu_s,
        bench_cpu_s: bench_cpu_s.map(round2),
        bench_cores_busy,
        generator_bound: bench_cores_busy.is_some_and(|busy| busy >= 0.9 * ctx.bench_cores),
        ok: errors == 0 && seq_gaps == 0 && seq_dups == 0 && acks == args.senders * args.messages,
    })
}

/// One sender's share of the run.
struct Sender {
    n: usize,
    senders: usize,
    rooms: std::sync::Arc<Vec<String>>,
    messages: usize,
    in_flight: usize,
    size: usize,
    stop_at: Instant,
}

impl Sender {
    /// Room index of this sender's `i`-th message.
    fn room_of(&self, i: usize) -> usize {
        (i * self.senders + self.n) % self.rooms.len()
    }

    /// Sends while fewer than `in_flight` are unacknowledged; request id `i + 1` is
    /// message `i`.
    async fn run(self, conn: Conn) -> Result<SenderResult> {
        let codec = conn.codec;
        let (mut sink, mut stream) = conn.ws.split();
        let mut out = SenderResult::default();
        let mut sent_at: HashMap<u64, Instant> = HashMap::with_capacity(self.in_flight);
        let mut sent = 0;
        loop {
            while sent < self.messages
                && sent_at.len() < self.in_flight
                && Instant::now() < self.stop_at
            {
                let id = sent as u64 + 1;
                let frame = pb::ClientFrame {
                    id,
                    kind: Some(In::Send(pb::SendMessageRequest {
                        room_id: self.rooms[self.room_of(sent)].clone(),
                        text: payload(now_ns(), &format!("s{}-{sent}", self.n), self.size),
                        client_message_id: format!("s{}-{sent}", self.n),
                        ..Default::default()
                    })),
                };
                // feed, then one flush for the whole window
                sink.feed(encode_frame(codec, &frame))
                    .await
                    .context("send")?;
                sent_at.insert(id, Instant::now());
                sent += 1;
            }
            sink.flush().await.context("send")?;
            if sent_at.is_empty() {
                break;
            }
            let deadline = Instant::now() + REPLY_TIMEOUT;
            let frame = match timeout_at(deadline, read_frame(&mut stream, codec)).await {
                Err(_) => bail!("no ack within {REPLY_TIMEOUT:?}"),
                Ok(read) => match read? {
                    Incoming::Closed(code, reason) => bail!("sender closed: {code} {reason}"),
                    Incoming::Frame(frame) => frame,
                },
            };
            let Some(at) = sent_at.remove(&frame.id) else {
                continue;
            };
            match frame.kind {
                Some(Out::Sent(ack)) => {
                    out.latencies_us.push(micros(at.elapsed()));
                    let room = self.room_of(frame.id as usize - 1);
                    out.seqs.push((room, ack.message.map_or(0, |m| m.seq)));
                }
                Some(Out::Error(e)) => {
                    out.errors += 1;
                    out.first_error
                        .get_or_insert_with(|| format!("{}: {}", e.code, e.message));
                }
                other => bail!("unexpected reply to send: {other:?}"),
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
        Ok(out)
    }
}

impl SendsReport {
    pub(crate) fn print(&self) {
        println!("== sends ({} codec)", self.subprotocol());
        println!(
            "  {} senders × {} messages of {} B ({} in flight each, {} rooms): {} acks, {} errors in {:.2} s",
            self.senders,
            self.messages_per_sender,
            self.size,
            self.in_flight,
            self.rooms,
            self.acks,
            self.errors,
            self.elapsed_s
        );
        println!("  acks/s: {:.0}", self.acks_per_s);
        println!("  ack latency: {}", self.ack_latency);
        println!(
            "  acknowledged sequences: {} gaps, {} duplicates",
            self.seq_gaps, self.seq_dups
        );
        if let Some(cpu) = self.server_cpu_s {
            println!("  server CPU: {cpu:.2} s");
        }
        if let (Some(cpu), Some(busy)) = (self.bench_cpu_s, self.bench_cores_busy) {
            println!("  bench (client) CPU: {cpu:.2} s ({busy:.2} cores busy)");
        }
        if self.generator_bound {
            println!("  WARNING: the load generator used nearly all its CPU: it is the bottleneck");
        }
        if let Some(e) = &self.first_error {
            println!("  first error: {e}");
        }
    }

    pub(crate) fn subprotocol(&self) -> &'static str {
        self.codec.subprotocol()
    }
}
