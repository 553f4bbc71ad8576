//! Scenario `fanout`: live subscribers of one or many rooms (over WebSocket or SSE)
//! and publishers at a fixed total rate; publish-to-delivery latency and
//! exactly-once, in-order delivery.
//!
//! With `--rooms R` the subscribers are spread evenly over R rooms (subscriber n reads
//! room n mod R) and every publisher sends to the rooms in turn, so each room gets
//! rate/R messages per second: `--rooms 1000 --subscribers 10000` is 1,000 small
//! rooms of 10.

use std::{sync::Arc, time::Duration};

use anyhow::{anyhow, ensure, Context as _, Result};
use futures_util::{stream, SinkExt as _, StreamExt as _};
use roomcast::proto::v1 as pb;
use serde::Serialize;
use tokio::{
    sync::watch,
    time::{sleep_until, timeout_at, Instant},
};

use crate::{
    api::{run_id, Account},
    lean::LeanWs,
    measure::{micros_ns, now_ns, payload, payload_sent_ns, round2, CpuMeter, Latency},
    poll::Poller,
    sse::{stream_client, SseStream},
    ws::{encode_frame, read_frame, Conn, Incoming, Ws},
    Codec, Ctx, FanoutArgs, Transport, MAX_PLANNED_DELIVERIES, REPLY_TIMEOUT, SETUP_CONCURRENCY,
};
use pb::{client_frame::Kind as In, server_frame::Kind as Out};

#[derive(Serialize)]
pub(crate) struct FanoutReport {
    pub(crate) scenario: &'static str,
    pub(crate) codec: Codec,
    pub(crate) transport: Transport,
    /// Servers (nodes) the subscribers and publishers were spread over.
    pub(crate) servers: usize,
    pub(crate) live: bool,
    pub(crate) batch: bool,
    pub(crate) anonymous: bool,
    pub(crate) rooms: usize,
    pub(crate) subscribers: usize,
    pub(crate) subscriber_users: usize,
    pub(crate) publishers: usize,
    pub(crate) target_rate: f64,
    pub(crate) duration_s: f64,
    pub(crate) size: usize,
    pub(crate) published: usize,
    pub(crate) acks: usize,
    pub(crate) publish_errors: usize,
    pub(crate) first_error: Option<String>,
    pub(crate) publish_rate: f64,
    pub(crate) ack_latency: Latency,
    pub(crate) expected_deliveries: u64,
    pub(crate) deliveries: u64,
    pub(crate) deliveries_per_s: f64,
    pub(crate) delivery_latency: Latency,
    /// Sequences skipped inside a subscription (must be 0).
    pub(crate) gaps: u64,
    /// Sequences received again or out of order (must be 0).
    pub(crate) dups: u64,
    /// Sequences never received by the end of the drain (must be 0).
    pub(crate) missing: u64,
    pub(crate) lagging_frames: u64,
    /// `gap` frames received, and the sequences they said would not come.
    pub(crate) gap_frames: u64,
    pub(crate) gap_seqs: u64,
    /// `batch` frames received (each carrying several events).
    pub(crate) batch_frames: u64,
    pub(crate) subscribers_closed: usize,
    pub(crate) first_close: Option<String>,
    pub(crate) server_cpu_s: Option<f64>,
    pub(crate) deliveries_per_server_cpu_s: Option<f64>,
    pub(crate) bench_cpu_s: Option<f64>,
    /// The load generator's CPU over the run, in cores: near the cores it may use,
    /// it is the bottleneck and the figures above are the generator's, not the server's.
    pub(crate) bench_cores_busy: Option<f64>,
    pub(crate) generator_bound: bool,
    pub(crate) ok: bool,
}

#[derive(Default)]
pub(crate) struct PublisherResult {
    pub(crate) published: usize,
    pub(crate) acks: usize,
    pub(crate) errors: usize,
    pub(crate) first_error: Option<String>,
    /// Per room index: acknowledged sends and the highest acknowledged sequence.
    pub(crate) room_acks: Vec<u64>,
    pub(crate) max_seq: Vec<u64>,
    pub(crate) ack_latencies_us: Vec<u32>,
}

#[derive(Default)]
pub(crate) struct SubscriberResult {
    pub(crate) received: u64,
    pub(crate) gaps: u64,
    pub(crate) dups: u64,
    pub(crate) missing: u64,
    pub(crate) lagging: u64,
    pub(crate) gap_frames: u64,
    pub(crate) gap_seqs: u64,
    pub(crate) batches: u64,
    pub(crate) latencies_us: Vec<u32>,
    pub(crate) last_receive_ns: u64,
    pub(crate) closed: Option<String>,
}

/// A subscriber's connection: a WebSocket or an SSE stream.
enum Source {
    Ws(Box<LeanWs>),
    Sse(Box<SseStream>),
    Poll(Box<Poller>),
}

impl Source {
    /// Cancel-safe (see [`LeanWs::read`] and [`SseStream::read`]).
    async fn read(&mut self) -> Result<Incoming> {
        match self {
            Source::Ws(ws) => ws.read().await,
            Source::Sse(sse) => sse.read().await,
            Source::Poll(poller) => poller.read().await,
        }
    }

    async fn close(self) {
        match self {
            Source::Ws(ws) => ws.close().await,
            // Dropping the response (or the pending poll) closes its HTTP request.
            Source::Sse(_) | Source::Poll(_) => {}
        }
    }
}

/// What one subscriber knows about its room while reading.
struct Reader {
    room: String,
    last: u64,
    out: SubscriberResult,
}

impl Reader {
    fn frame(&mut self, frame: pb::ServerFrame) {
        match frame.kind {
            Some(Out::Message(m)) if m.room_id == self.room => self.message(&m),
            Some(Out::Batch(b)) if b.room_id == self.room => {
                self.out.batches += 1;
                for inner in b.frames {
                    self.frame(inner);
                }
            }
            Some(Out::Gap(g)) if g.room_id == self.room => {
                self.out.gap_frames += 1;
                if g.to_seq > self.last {
                    let from = g.from_seq.max(self.last + 1);
                    self.out.gap_seqs += g.to_seq + 1 - from;
                    // Sequences before the gap that never came are gaps of ours.
                    self.out.gaps += from.saturating_sub(self.last + 1);
                    self.last = g.to_seq;
                }
            }
            Some(Out::Lagging(l)) if l.room_id == self.room => self.out.lagging += 1,
            _ => {}
        }
    }

    fn message(&mut self, m: &pb::Message) {
        let now = now_ns();
        self.out.received += 1;
        self.out.last_receive_ns = now;
        if let Some(sent) = payload_sent_ns(&m.text) {
            self.out
                .latencies_us
                .push(micros_ns(now.saturating_sub(sent)));
        }
        if m.seq <= self.last {
            self.out.dups += 1;
        } else {
            self.out.gaps += m.seq - self.last - 1;
            self.last = m.seq;
        }
    }
}

/// Reads `source` into `reader` until it has its room's last sequence (known once
/// `final_rx` holds it), the connection ends, or the caller stops polling. One
/// future for the whole run, not a timer and a `select!` per frame: the
/// generator's CPU per delivered event bounds what a run can measure. Cancel-safe
/// ([`Source::read`] is).
async fn read_until_final(
    source: &mut Source,
    reader: &mut Reader,
    final_rx: &watch::Receiver<Option<Arc<Vec<u64>>>>,
    room_index: usize,
) {
    loop {
        let target = final_rx.borrow().as_ref().map(|t| t[room_index]);
        if target.is_some_and(|target| reader.last >= target) {
            return;
        }
        match source.read().await {
            Err(e) => {
                reader.out.closed = Some(format!("read error: {e:#}"));
                return;
            }
            Ok(Incoming::Closed(code, reason)) => {
                reader.out.closed = Some(format!("closed {code} {reason}"));
                return;
            }
            Ok(Incoming::Frame(frame)) => reader.frame(*frame),
        }
    }
}

/// Opens subscriber `n` on `room` as `account` (`None`: an anonymous viewer);
/// answers its source and the room's sequence at subscription.
async fn open_subscriber(
    ctx: &Ctx,
    args: &FanoutArgs,
    http: &reqwest::Client,
    n: usize,
    account: Option<&Account>,
    room: &str,
) -> Result<(Source, u64)> {
    let token = account.map(|a| a.token.as_str());
    // Round robin over the servers (the nodes of a cluster).
    let addr = ctx.addrs[n % ctx.addrs.len()];
    match args.transport {
        Transport::Ws => {
            let mut ws = LeanWs::open(addr, ctx.codec, args.batch, token).await?;
            let base = ws.subscribe_live(room).await?;
            Ok((Source::Ws(Box::new(ws)), base))
        }
        Transport::Sse => {
            let token = token.ok_or_else(|| anyhow!("SSE needs an account"))?;
            let (sse, base) = SseStream::open(http, addr, token, room, args.batch).await?;
            Ok((Source::Sse(Box::new(sse)), base))
        }
        Transport::Poll => {
            let token = token.ok_or_else(|| anyhow!("long-polling needs an account"))?;
            let (poller, base) =
                Poller::open(http, addr, token, room, format!("bench-{n}")).await?;
            Ok((Source::Poll(Box::new(poller)), base))
        }
    }
}

pub(crate) async fn run(ctx: &Ctx, args: &FanoutArgs) -> Result<FanoutReport> {
    ensure!(
        args.subscribers > 0 && args.publishers > 0,
        "need subscribers and publishers"
    );
    ensure!(
        args.rooms > 0 && args.rooms <= args.subscribers,
        "need 1..=subscribers rooms"
    );
    ensure!(
        args.rate > 0.0 && args.duration > 0.0,
        "need a positive rate and duration"
    );
    ensure!(
        !args.anonymous || (args.live && args.transport == Transport::Ws),
        "--anonymous needs --live and WebSocket subscribers"
    );
    let per_publisher = ((args.rate * args.duration) / args.publishers as f64).round() as usize;
    ensure!(per_publisher > 0, "rate × duration gives no message");
    // Every room gets about the same share of messages and of subscribers.
    let planned =
        (per_publisher * args.publishers) as u64 * args.subscribers as u64 / args.rooms as u64;
    ensure!(
        planned <= MAX_PLANNED_DELIVERIES,
        "{planned} planned deliveries exceed the bench's limit of {MAX_PLANNED_DELIVERIES}"
    );
    let run = run_id();
    let subscriber_users = if args.anonymous {
        0
    } else {
        args.subscriber_users.clamp(1, args.subscribers)
    };
    eprintln!(
        "fanout: signing up {} publishers and {subscriber_users} subscriber accounts",
        args.publishers
    );
    let publishers = ctx.api.sign_up_many(&run, "p", args.publishers).await?;
    let readers = ctx.api.sign_up_many(&run, "r", subscriber_users).await?;
    eprintln!(
        "fanout: creating {} {}rooms",
        args.rooms,
        if args.live { "live " } else { "" }
    );
    let live = args.live.then(|| pb::LiveControls {
        anonymous_viewers: args.anonymous,
        ..Default::default()
    });
    let mut rooms = Vec::with_capacity(args.rooms);
    for n in 0..args.rooms {
        rooms.push(
            ctx.api
                .create_room_with(&publishers[0], &format!("bench fanout {n}"), live)
                .await?,
        );
    }
    for publisher in &publishers[1..] {
        let joins: Vec<Result<()>> = stream::iter(&rooms)
            .map(|room| ctx.api.join_room(publisher, room))
            .buffer_unordered(SETUP_CONCURRENCY)
            .collect()
            .await;
        joins.into_iter().collect::<Result<()>>()?;
    }

    eprintln!(
        "fanout: opening {} {} subscribers over {} rooms",
        args.subscribers,
        args.transport.name(),
        args.rooms
    );
    let http = stream_client()?;
    let opened: Vec<Result<(usize, Source, u64)>> = stream::iter(0..args.subscribers)
        .map(|n| {
            let room_index = n % rooms.len();
            let room = &rooms[room_index];
            let account = (!readers.is_empty()).then(|| &readers[n % readers.len()]);
            let http = &http;
            async move {
                let (source, base) = open_subscriber(ctx, args, http, n, account, room).await?;
                Ok((room_index, source, base))
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    let mut subs = Vec::with_capacity(opened.len());
    let mut subs_per_room = vec![0u64; rooms.len()];
    for result in opened {
        let (room_index, source, base) = result.context("open a subscriber")?;
        subs_per_room[room_index] += 1;
        subs.push((room_index, source, base));
    }
    let mut pub_conns = Vec::with_capacity(publishers.len());
    for (n, publisher) in publishers.iter().enumerate() {
        let addr = ctx.addrs[n % ctx.addrs.len()];
        pub_conns.push(Conn::open(addr, ctx.codec, &publisher.token).await?);
    }

    // Subscribers read until they have their room's last acknowledged sequence (sent
    // on `final_tx` once every publisher is done) or their deadline passes.
    let (final_tx, final_rx) = watch::channel::<Option<Arc<Vec<u64>>>>(None);
    let hard_deadline = ctx.deadline;
    let drain = Duration::from_secs(args.drain_timeout);
    let codec = ctx.codec;
    let mut sub_tasks = Vec::with_capacity(subs.len());
    for (room_index, mut source, base) in subs {
        let final_rx = final_rx.clone();
        let mut reader = Reader {
            room: rooms[room_index].clone(),
            last: base,
            out: SubscriberResult::default(),
        };
        sub_tasks.push(tokio::spawn(async move {
            // Reads until the subscriber has its room's last sequence: while the
            // publishers run (bounded by the hard deadline), then at most `drain`
            // more for the last deliveries.
            let mut final_watch = final_rx.clone();
            let finished = tokio::select! {
                () = read_until_final(&mut source, &mut reader, &final_rx, room_index) => true,
                changed = timeout_at(hard_deadline, final_watch.changed()) => changed.is_err(),
            };
            if !finished {
                let deadline = hard_deadline.min(Instant::now() + drain);
                let reading = read_until_final(&mut source, &mut reader, &final_rx, room_index);
                let _ = timeout_at(deadline, reading).await;
            }
            if let Some(targets) = final_rx.borrow().as_ref() {
                reader.out.missing = targets[room_index].saturating_sub(reader.last);
            }
            source.close().await;
            reader.out
        }));
    }

    eprintln!(
        "fanout: {} publishers at {} msgs/s for {} s ({per_publisher} messages each)",
        args.publishers, args.rate, args.duration
    );
    let cpu = CpuMeter::start(&ctx.server_pids);
    let start = Instant::now() + Duration::from_millis(100);
    let start_ns = now_ns() + 100_000_000;
    let period = Duration::from_secs_f64(args.publishers as f64 / args.rate);
    let rooms = Arc::new(rooms);
    let mut pub_tasks = Vec::with_capacity(pub_conns.len());
    for (n, conn) in pub_conns.into_iter().enumerate() {
        let plan = Plan {
            rooms: rooms.clone(),
            publisher: n,
            publishers: args.publishers,
            size: args.size,
            // Publishers start spread over one period, not all at the same instant.
            start: start + period.mul_f64(n as f64 / args.publishers as f64),
            period,
            count: per_publisher,
            hard_deadline,
        };
        pub_tasks.push(tokio::spawn(publish(conn.ws, codec, plan)));
    }
    let mut pub_results = Vec::new();
    for task in pub_tasks {
        pub_results.push(task.await.context("publisher task")??);
    }
    let publish_end = Instant::now();
    let finals: Vec<u64> = (0..rooms.len())
        .map(|r| pub_results.iter().map(|p| p.max_seq[r]).max().unwrap_or(0))
        .collect();
    let _ = final_tx.send(Some(Arc::new(finals)));
    let mut sub_results = Vec::with_capacity(sub_tasks.len());
    for task in sub_tasks {
        sub_results.push(task.await.context("subscriber task")?);
    }
    drop(final_tx);
    let server_cpu_s = cpu.server();
    let bench_cpu_s = cpu.bench();

    let acks: usize = pub_results.iter().map(|r| r.acks).sum();
    let published: usize = pub_results.iter().map(|r| r.published).sum();
    let publish_errors: usize = pub_results.iter().map(|r| r.errors).sum();
    let first_error = pub_results.iter().find_map(|r| r.first_error.clone());
    let mut ack_latencies: Vec<u32> = pub_results
        .iter()
        .flat_map(|r| r.ack_latencies_us.iter().copied())
        .collect();
    let deliveries: u64 = sub_results.iter().map(|r| r.received).sum();
    let last_receive_ns = sub_results
        .iter()
        .map(|r| r.last_receive_ns)
        .max()
        .unwrap_or(start_ns);
    let delivery_window = (last_receive_ns.saturating_sub(start_ns) as f64 / 1e9).max(1e-9);
    let publish_window = publish_end.duration_since(start).as_secs_f64().max(1e-9);
    let mut latencies: Vec<u32> = Vec::with_capacity(deliveries as usize);
    for r in &mut sub_results {
        latencies.append(&mut r.latencies_us);
    }
    let gaps = sub_results.iter().map(|r| r.gaps).sum();
    let dups = sub_results.iter().map(|r| r.dups).sum();
    let missing = sub_results.iter().map(|r| r.missing).sum();
    let gap_seqs: u64 = sub_results.iter().map(|r| r.gap_seqs).sum();
    let closed: Vec<&String> = sub_results
        .iter()
        .filter_map(|r| r.closed.as_ref())
        .collect();
    let expected_deliveries: u64 = (0..rooms.len())
        .map(|r| pub_results.iter().map(|p| p.room_acks[r]).sum::<u64>() * subs_per_room[r])
        .sum();
    let wall = start.elapsed().as_secs_f64().max(1e-9);
    let bench_cores_busy = bench_cpu_s.map(|cpu| round2(cpu / wall));
    Ok(FanoutReport {
        scenario: "fanout",
        codec,
        transport: args.transport,
        servers: ctx.addrs.len(),
        live: args.live,
        batch: args.batch,
        anonymous: args.anonymous,
        rooms: args.rooms,
        subscribers: args.subscribers,
        subscriber_users,
        publishers: args.publishers,
        target_rate: args.rate,
        duration_s: args.duration,
        size: args.size,
        published,
        acks,
        publish_errors,
        first_error,
        publish_rate: round2(acks as f64 / publish_window),
        ack_latency: Latency::from_us(&mut ack_latencies),
        expected_deliveries,
        deliveries,
        deliveries_per_s: round2(deliveries as f64 / delivery_window),
        delivery_latency: Latency::from_us(&mut latencies),
        gaps,
        dups,
        missing,
        lagging_frames: sub_results.iter().map(|r| r.lagging).sum(),
        gap_frames: sub_results.iter().map(|r| r.gap_frames).sum(),
        batch_frames: sub_results.iter().map(|r| r.batches).sum(),
        gap_seqs,
        subscribers_closed: closed.len(),
        first_close: closed.first().map(|s| (*s).clone()),
        server_cpu_s: server_cpu_s.map(round2),
        deliveries_per_server_cpu_s: server_cpu_s
            .filter(|s| *s > 0.0)
            .map(|s| round2(deliveries as f64 / s)),
        bench_cpu_s: bench_cpu_s.map(round2),
        bench_cores_busy,
        generator_bound: bench_cores_busy.is_some_and(|busy| busy >= 0.9 * ctx.bench_cores),
        ok: publish_errors == 0
            && acks == per_publisher * args.publishers
            && gaps == 0
            && dups == 0
            && missing == 0
            && deliveries + gap_seqs == expected_deliveries
            && closed.is_empty(),
    })
}

/// What one publisher sends, and when.
struct Plan {
    rooms: Arc<Vec<String>>,
    publisher: usize,
    publishers: usize,
    size: usize,
    start: Instant,
    period: Duration,
    count: usize,
    hard_deadline: Instant,
}

impl Plan {
    /// The room index of this publisher's `i`-th message: the publishers' messages
    /// interleave, so consecutive messages overall go to consecutive rooms.
    fn room_of(&self, i: usize) -> usize {
        (i * self.publishers + self.publisher) % self.rooms.len()
    }
}

/// One publisher: sends `count` messages on schedule (`start + i × period`, sending
/// late ones at once) without waiting for acks, and reads the acks as they come.
async fn publish(ws: Ws, codec: Codec, plan: Plan) -> Result<PublisherResult> {
    let (mut sink, mut stream) = ws.split();
    let mut out = PublisherResult {
        room_acks: vec![0; plan.rooms.len()],
        max_seq: vec![0; plan.rooms.len()],
        ..Default::default()
    };
    let mut next_at = plan.start;
    let mut ack_deadline = plan.hard_deadline;
    let n = plan.publisher;
    loop {
        let sending = out.published < plan.count && Instant::now() < plan.hard_deadline;
        if !sending {
            if out.acks + out.errors >= out.published {
                break;
            }
            ack_deadline = ack_deadline.min(Instant::now() + REPLY_TIMEOUT);
        }
        tokio::select! {
            _ = sleep_until(next_at), if sending => {
                let i = out.published;
                let frame = pb::ClientFrame {
                    // The request id says which room the ack is for.
                    id: i as u64 + 1,
                    kind: Some(In::Send(pb::SendMessageRequest {
                        room_id: plan.rooms[plan.room_of(i)].clone(),
                        text: payload(now_ns(), &format!("p{n}-{i}"), plan.size),
                        client_message_id: format!("p{n}-{i}"),
                        ..Default::default()
                    })),
                };
                sink.send(encode_frame(codec, &frame)).await.context("publish")?;
                out.published += 1;
                next_at = plan.start + plan.period.mul_f64(out.published as f64);
            }
            read = timeout_at(ack_deadline, read_frame(&mut stream, codec)) => match read {
                Err(_) => break,
                Ok(read) => match read? {
                    Incoming::Closed(code, reason) => {
                        out.first_error.get_or_insert(format!("publisher closed: {code} {reason}"));
                        break;
                    }
                    Incoming::Frame(frame) if frame.id != 0 => match frame.kind {
                        Some(Out::Sent(ack)) => {
                            out.acks += 1;
                            let room = plan.room_of(frame.id as usize - 1);
                            out.room_acks[room] += 1;
                            if let Some(m) = ack.message {
                                out.max_seq[room] = out.max_seq[room].max(m.seq);
                                if let Some(sent) = payload_sent_ns(&m.text) {
                                    out.ack_latencies_us.push(micros_ns(now_ns().saturating_sub(sent)));
                                }
                            }
                        }
                        Some(Out::Error(e)) => {
                            out.errors += 1;
                            out.first_error.get_or_insert_with(|| format!("{}: {}", e.code, e.message));
                        }
                        _ => {}
                    },
                    Incoming::Frame(_) => {}
                },
            },
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    Ok(out)
}

impl FanoutReport {
    pub(crate) fn print(&self) {
        println!(
            "== fanout ({} codec{}, subscribers over {}{}{})",
            self.codec.subprotocol(),
            if self.batch { " +batch" } else { "" },
            self.transport.name(),
            if self.live { ", live rooms" } else { "" },
            if self.anonymous {
                ", anonymous viewers"
            } else {
                ""
            }
        );
        if self.servers > 1 {
            println!(
                "  spread round robin over {} servers (subscribers and publishers)",
                self.servers
            );
        }
        println!(
            "  {} rooms, {} subscribers ({} accounts), {} publishers at {} msgs/s for {} s, {} B texts",
            self.rooms,
            self.subscribers,
            self.subscriber_users,
            self.publishers,
            self.target_rate,
            self.duration_s,
            self.size
        );
        println!(
            "  published {} ({} acks, {} errors), achieved {:.1} msgs/s; ack latency {}",
            self.published, self.acks, self.publish_errors, self.publish_rate, self.ack_latency
        );
        println!(
            "  deliveries: {} of {} expected, {:.0}/s",
            self.deliveries, self.expected_deliveries, self.deliveries_per_s
        );
        println!("  publish-to-delivery latency: {}", self.delivery_latency);
        println!(
            "  order: {} gaps, {} duplicates/out of order, {} missing; {} lagging frames; {} subscribers closed",
            self.gaps, self.dups, self.missing, self.lagging_frames, self.subscribers_closed
        );
        if self.batch_frames > 0 {
            println!(
                "  batch frames: {} ({:.1} events each on average)",
                self.batch_frames,
                self.deliveries as f64 / self.batch_frames as f64
            );
        }
        if self.gap_frames > 0 {
            println!(
                "  gap frames: {} covering {} sequences (announced, not silent)",
                self.gap_frames, self.gap_seqs
            );
        }
        if let (Some(cpu), Some(per)) = (self.server_cpu_s, self.deliveries_per_server_cpu_s) {
            println!("  server CPU: {cpu:.2} s ({per:.0} deliveries per CPU-second)");
        }
        if let (Some(cpu), Some(busy)) = (self.bench_cpu_s, self.bench_cores_busy) {
            println!("  bench (client) CPU: {cpu:.2} s ({busy:.2} cores busy)");
        }
        if self.generator_bound {
            println!("  WARNING: the load generator used nearly all its CPU: it is the bottleneck");
        }
        if let Some(e) = &self.first_error {
            println!("  first publish error: {e}");
        }
        if let Some(c) = &self.first_close {
            println!("  first subscriber close: {c}");
        }
    }
}
