//! Scenario `idle`: memory per idle connection, and the connection storm that opens
//! them.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use futures_util::{stream, StreamExt as _};
use serde::Serialize;
use tokio::{
    sync::watch,
    time::{timeout_at, Instant},
};

use crate::{
    api::{run_id, Account},
    lean::{open_many, LeanWs},
    measure::{micros, open_files_limit, round2, rss_kib, CpuMeter, Latency},
    ws::Incoming,
    Codec, Ctx, IdleArgs,
};

#[derive(Serialize)]
pub(crate) struct IdleReport {
    pub(crate) scenario: &'static str,
    pub(crate) codec: Codec,
    pub(crate) connections: usize,
    pub(crate) users: usize,
    pub(crate) subscribed: bool,
    pub(crate) warmup: usize,
    pub(crate) opened: usize,
    pub(crate) failed: usize,
    pub(crate) first_failure: Option<String>,
    pub(crate) open_s: f64,
    pub(crate) connections_per_s: f64,
    pub(crate) connect_latency: Latency,
    /// The server's CPU while the connections were opened (the storm itself).
    pub(crate) server_cpu_s: Option<f64>,
    /// The bench's own CPU meanwhile, and the cores that kept busy: near the cores
    /// it may use, the generator (not the server) set `open_s`.
    pub(crate) bench_cpu_s: Option<f64>,
    pub(crate) bench_cores_busy: Option<f64>,
    pub(crate) generator_bound: bool,
    /// What warming the store's page cache added to the server's RSS (not part of
    /// `kib_per_connection`).
    pub(crate) server_rss_store_warm_kib: Option<u64>,
    pub(crate) server_rss_before_kib: Option<u64>,
    pub(crate) server_rss_after_kib: Option<u64>,
    pub(crate) kib_per_connection: Option<f64>,
    pub(crate) closed_during_hold: usize,
    pub(crate) first_close: Option<String>,
    pub(crate) ok: bool,
}

pub(crate) async fn run(ctx: &Ctx, args: &IdleArgs) -> Result<IdleReport> {
    ensure!(args.connections > 0, "need connections");
    let needed = (args.connections + args.warmup) as u64 + 64;
    ensure!(
        needed <= ctx.fd_limit,
        "{} connections need about {needed} file descriptors but this process may open {}; \
         raise `ulimit -n` (the server needs as many)",
        args.connections + args.warmup,
        ctx.fd_limit
    );
    if let Some(server_limit) = ctx.server_pid.and_then(open_files_limit) {
        ensure!(
            needed <= server_limit,
            "the server (pid {:?}) may open only {server_limit} files; start it under a \
             higher `ulimit -n`",
            ctx.server_pid
        );
    }
    let run = run_id();
    let users = if args.users == 0 {
        args.connections
    } else {
        args.users.min(args.connections)
    };
    eprintln!("idle: signing up {users} accounts");
    let accounts = ctx.api.sign_up_many(&run, "i", users).await?;
    let room = if args.subscribe {
        Some(ctx.api.create_room(&accounts[0], "bench idle").await?)
    } else {
        None
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let closed = Arc::new(AtomicUsize::new(0));
    let first_close: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let mut holders = Vec::new();
    let mut hold = |mut ws: LeanWs| {
        let mut stop_rx = stop_rx.clone();
        let closed = closed.clone();
        let first_close = first_close.clone();
        let deadline = ctx.deadline;
        holders.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    read = timeout_at(deadline, ws.read()) => match read {
                        Err(_) => break,
                        Ok(Ok(Incoming::Frame(_))) => continue,
                        Ok(Ok(Incoming::Closed(code, reason))) => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut first) = first_close.lock() {
                                first.get_or_insert(format!("closed {code} {reason}"));
                            }
                            return;
                        }
                        Ok(Err(e)) => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut first) = first_close.lock() {
                                first.get_or_insert(format!("read error: {e:#}"));
                            }
                            return;
                        }
                    },
                }
            }
            ws.close().await;
        }));
    };

    let settle = Duration::from_millis(args.settle_ms);
    if args.warmup > 0 {
        eprintln!("idle: {} warm-up connections", args.warmup);
        for result in open_many(
            ctx.addr,
            ctx.codec,
            &accounts,
            args.warmup,
            args.concurrency,
            room.as_deref(),
        )
        .await
        {
            let (conn, _, _) = result.context("open a warm-up connection")?;
            hold(conn);
        }
    }
    let mut store_warm_kib = None;
    if let Some(pid) = ctx.server_pid {
        eprintln!("idle: warming the store's page cache (one authenticated call per account)");
        tokio::time::sleep(settle).await;
        let cold = rss_kib(pid)?;
        warm_store(ctx, &accounts, args.concurrency).await?;
        tokio::time::sleep(settle).await;
        store_warm_kib = Some(rss_kib(pid)?.saturating_sub(cold));
    }
    let before = ctx.server_pid.map(rss_kib).transpose()?;

    eprintln!(
        "idle: opening {} connections, {} at a time",
        args.connections, args.concurrency
    );
    let cpu = CpuMeter::start(&ctx.server_pids);
    let started = Instant::now();
    // Offset the accounts so warm-up connections do not all share the first ones.
    let rotated: Vec<Account> = accounts
        .iter()
        .cycle()
        .skip(args.warmup % accounts.len())
        .take(accounts.len())
        .cloned()
        .collect();
    let results = open_many(
        ctx.addr,
        ctx.codec,
        &rotated,
        args.connections,
        args.concurrency,
        room.as_deref(),
    )
    .await;
    let open_s = started.elapsed().as_secs_f64();
    let (server_cpu_s, bench_cpu_s) = (cpu.server(), cpu.bench());
    let bench_cores_busy = bench_cpu_s.map(|cpu| round2(cpu / open_s.max(1e-9)));
    let mut connect_us = Vec::new();
    let mut failed = 0;
    let mut first_failure = None;
    for result in results {
        match result {
            Ok((conn, _, took)) => {
                connect_us.push(micros(took));
                hold(conn);
            }
            Err(e) => {
                failed += 1;
                first_failure.get_or_insert(format!("{e:#}"));
            }
        }
    }
    let opened = connect_us.len();
    tokio::time::sleep(settle).await;
    let after = ctx.server_pid.map(rss_kib).transpose()?;
    eprintln!("idle: holding {opened} connections for {} s", args.hold);
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let closed_during_hold = closed.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for holder in holders {
        let _ = holder.await;
    }
    let kib_per_connection = match (before, after) {
        (Some(b), Some(a)) if opened > 0 => Some(round2((a as f64 - b as f64) / opened as f64)),
        _ => None,
    };
    let first_close = first_close.lock().ok().and_then(|f| f.clone());
    Ok(IdleReport {
        scenario: "idle",
        codec: ctx.codec,
        connections: args.connections,
        users,
        subscribed: args.subscribe,
        warmup: args.warmup,
        opened,
        failed,
        first_failure,
        open_s: round2(open_s),
        connections_per_s: round2(opened as f64 / open_s.max(1e-9)),
        connect_latency: Latency::from_us(&mut connect_us),
        server_cpu_s: server_cpu_s.map(round2),
        bench_cpu_s: bench_cpu_s.map(round2),
        bench_cores_busy,
        generator_bound: bench_cores_busy.is_some_and(|busy| busy >= 0.9 * ctx.bench_cores),
        server_rss_store_warm_kib: store_warm_kib,
        server_rss_before_kib: before,
        server_rss_after_kib: after,
        kib_per_connection,
        closed_during_hold,
        first_close,
        ok: failed == 0 && closed_during_hold == 0,
    })
}

/// One authenticated unary call (`UserService/GetMe`) per account before the
/// "before" reading: authenticating a connection reads the account's session and
/// user rows, and SQLite's page cache (bounded per pooled connection, not per
/// client) keeps those pages. Warmed first, the cache is not charged to the
/// measured connections; BENCHMARKS.md reports it separately.
async fn warm_store(ctx: &Ctx, accounts: &[Account], concurrency: usize) -> Result<()> {
    let url = format!("{}/roomcast.v1.UserService/GetMe", ctx.api.base);
    let failures = stream::iter(accounts)
        .map(|account| {
            let request = ctx
                .api
                .http
                .post(&url)
                .bearer_auth(&account.token)
                .json(&serde_json::json!({}));
            async move {
                match request.send().await {
                    Ok(response) if response.status().is_success() => 0usize,
                    _ => 1,
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .fold(0, |n, failed| async move { n + failed })
        .await;
    ensure!(
        failures == 0,
        "{failures} GetMe calls failed while warming the store"
    );
    Ok(())
}

impl IdleReport {
    pub(crate) fn print(&self) {
        println!("== idle ({} codec)", self.codec.subprotocol());
        println!(
            "  {} connections ({} accounts{}), {} warm-up: {} opened, {} failed in {:.2} s ({:.0}/s)",
            self.connections,
            self.users,
            if self.subscribed { ", subscribed to one room" } else { "" },
            self.warmup,
            self.opened,
            self.failed,
            self.open_s,
            self.connections_per_s
        );
        println!("  connect + authenticate latency: {}", self.connect_latency);
        if let Some(cpu) = self.server_cpu_s {
            println!(
                "  server CPU while opening: {cpu:.2} s ({:.0} µs per connection)",
                cpu * 1e6 / self.opened.max(1) as f64
            );
        }
        if let (Some(cpu), Some(busy)) = (self.bench_cpu_s, self.bench_cores_busy) {
            println!("  bench (client) CPU while opening: {cpu:.2} s ({busy:.2} cores busy)");
        }
        if self.generator_bound {
            println!("  WARNING: the load generator used nearly all its CPU: it is the bottleneck");
        }
        match (
            self.server_rss_before_kib,
            self.server_rss_after_kib,
            self.kib_per_connection,
        ) {
            (Some(b), Some(a), Some(per)) => {
                println!("  server RSS: {b} KiB before, {a} KiB after: {per:.2} KiB per connection")
            }
            _ => println!("  server RSS: not measured (give --server-pid)"),
        }
        if let Some(warm) = self.server_rss_store_warm_kib {
            println!(
                "  store page cache warmed first (one GetMe per account): +{warm} KiB, not counted above"
            );
        }
        println!("  closed while held: {}", self.closed_during_hold);
        if let Some(e) = &self.first_failure {
            println!("  first failure: {e}");
        }
        if let Some(c) = &self.first_close {
            println!("  first close: {c}");
        }
    }
}
