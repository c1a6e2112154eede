//! The WAL mode's figures, on a private PostgreSQL with `wal_level=logical` started for the
//! run (the shared server cannot decode logical messages): raw INSERT+COMMIT on that same
//! server, emit+commit latency, commit→ack latency through an in-process WAL relay, and
//! drains of backlogs emitted while an `outpost wal relay` process was stopped (SIGSTOP),
//! timed from SIGCONT until the slot's confirmed position passed the backlog's end.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use outpost::testkit::postgres::PrivatePostgres;
use outpost::wal::{self, setup, WalRelay, WalRelayConfig, WalStream};
use outpost::Environment;
use serde_json::{json, Value};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::faults::signal;

use super::{insert_commit, peak_rss_kb, Bench, Latency, Line, RawKafka};

/// Events per transaction when a backlog is emitted.
const PER_TRANSACTION: usize = 1_000;

/// The WAL phase's lines and JSON.
pub(super) struct WalFigures {
    pub lines: Vec<Line>,
    pub report: Value,
}

/// Runs the WAL phase. Its raw limit is the pipelined produce rate measured again right
/// before it: earlier phases leave gigabytes in the broker (tansu keeps them in memory), and
/// the run's first measurement, on an empty broker, is not what the broker can do now.
pub(super) async fn measure(bench: &Bench<'_>) -> anyhow::Result<WalFigures> {
    // The table-mode phases leave the shared server with gigabytes written since its last
    // checkpoint; flushed here, they are not written out beside this phase's drains.
    bench.checkpoint().await;
    bench.say("WAL: raw produce, again");
    let raw = RawKafka::new(bench.settings, false)?;
    raw.send(&bench.template.instance("warm-up")).await?;
    let produce_rate = raw
        .pipelined(&bench.template, bench.sizes.pipelined)
        .await?;
    drop(raw);
    let pg = tokio::task::spawn_blocking(|| {
        PrivatePostgres::start_with(&[
            ("wal_level", "logical"),
            ("shared_buffers", "128MB"),
            ("max_wal_size", "8GB"),
            // The drains stop the relay while the backlog is emitted.
            ("wal_sender_timeout", "0"),
        ])
    })
    .await?
    .context("the WAL phase starts a PostgreSQL of its own (initdb, pg_ctl)")?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .test_before_acquire(false)
        .connect(&pg.url())
        .await?;
    let sequential = bench.sizes.sequential;

    bench.say("WAL: raw INSERT+COMMIT on the logical-decoding server");
    let insert = insert_commit(&pool, &bench.template, "raw_insert", sequential).await?;

    bench.say("WAL: emit+commit and commit→ack latency");
    let stream = WalStream::new(&format!("bench_wal_{}", bench.run_id))?;
    ensure_ready(&pool, &stream).await?;
    let (emit, ack) = latency(bench, &pg, &pool, &stream, sequential).await?;
    setup::remove(&pool, &stream).await?;

    let mut lines = vec![
        Line::new(
            "WAL: raw produce throughput (pipelined), measured again",
            produce_rate,
            "ev/s",
            None,
        ),
        Line::new(
            "WAL: raw INSERT+COMMIT latency p50 (its server)",
            insert.p50_ms,
            "ms",
            None,
        ),
        Line::new(
            "WAL: emit+commit latency p50",
            emit.p50_ms,
            "ms",
            Some(insert.p50_ms),
        ),
        Line::new(
            "WAL: emit+commit latency p99",
            emit.p99_ms,
            "ms",
            Some(insert.p99_ms),
        ),
        Line::new("WAL: commit→ack p50", ack.p50_ms, "ms", Some(insert.p50_ms)),
        Line::new("WAL: commit→ack p99", ack.p99_ms, "ms", Some(insert.p99_ms)),
    ];

    let mut drains = Vec::new();
    let mut peak_rss_kb = 0;
    let goal = 100_000f64.min(0.5 * produce_rate);
    for &(events, keys) in &bench.sizes.wal_drains {
        bench.say(&format!("WAL: drain {events} events, {keys} key(s)"));
        let stream = WalStream::new(&format!("bench_wal_{}_{keys}_{events}", bench.run_id))?;
        ensure_ready(&pool, &stream).await?;
        let d = drain(bench, &pg, &pool, &stream, events, keys).await;
        setup::remove(&pool, &stream).await?;
        let (rate, rss_kb) = d?;
        peak_rss_kb = peak_rss_kb.max(rss_kb);
        lines.push(
            Line::new(
                format!("WAL: drain {events} ev, {keys} keys"),
                rate,
                "ev/s",
                Some(produce_rate),
            )
            .target(format!("≥ {goal:.0} ev/s (100k or 0.5× raw)"), rate >= goal),
        );
        drains.push(json!({ "events": events, "keys": keys, "rate": rate, "peak_rss_kb": rss_kb }));
    }
    let rss_mb = peak_rss_kb as f64 / 1024.0;
    lines.push(
        Line::new(
            "WAL: peak relay RSS (VmHWM) while draining",
            rss_mb,
            "MB",
            None,
        )
        .target("< 64 MB", rss_mb < 64.0),
    );
    pool.close().await;
    drop(pg);
    Ok(WalFigures {
        lines,
        report: json!({
            "produce_pipelined_ev_per_s": produce_rate,
            "insert_commit": insert,
            "emit_commit": emit,
            "commit_to_ack": ack,
            "drain": drains,
            "peak_relay_rss_mb": rss_mb,
            "events_per_transaction": PER_TRANSACTION,
        }),
    })
}

async fn ensure_ready(pool: &PgPool, stream: &WalStream) -> anyhow::Result<()> {
    let report = setup::init(pool, stream).await?;
    ensure!(report.is_ready(), "WAL stream not ready:\n{report}");
    Ok(())
}

/// One event per transaction, one after the other: how long emit+commit takes, and how long
/// from just before the commit until the relay's producer has the broker's ack.
async fn latency(
    bench: &Bench<'_>,
    pg: &PrivatePostgres,
    pool: &PgPool,
    stream: &WalStream,
    n: usize,
) -> anyhow::Result<(Latency, Latency)> {
    let config = WalRelayConfig::new(
        format!("bench-wal-{}", bench.run_id),
        stream.clone(),
        pg.url(),
        Environment::Testing,
    );
    let relay = WalRelay::new(config, pool.clone(), bench.settings.producer()?)?;
    let shutdown = CancellationToken::new();
    let task = {
        let (relay, token) = (relay.clone(), shutdown.clone());
        tokio::spawn(async move { relay.run(token.cancelled_owned()).await })
    };
    let result = async {
        // The first event waits for the replication connection and the producer id.
        let warm = bench.template.instance("warm-up");
        let mut tx = pool.begin().await?;
        wal::emit(&mut tx, stream, &warm).await?;
        tx.commit().await?;
        tokio::time::timeout(Duration::from_secs(30), relay.delivered_at_least(1))
            .await
            .context("the WAL relay did not deliver its warm-up event within 30 s")?;
        let (mut emits, mut acks) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let ev = bench.template.instance(&format!("agg-{i}"));
            let t0 = Instant::now();
            let mut tx = pool.begin().await?;
            wal::emit(&mut tx, stream, &ev).await?;
            let t1 = Instant::now();
            tx.commit().await?;
            emits.push(t0.elapsed());
            tokio::time::timeout(
                Duration::from_secs(30),
                relay.delivered_at_least(i as u64 + 2),
            )
            .await
            .context("a WAL event was not delivered within 30 s")?;
            acks.push(t1.elapsed());
        }
        anyhow::Ok((Latency::of(emits), Latency::of(acks)))
    }
    .await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    result
}

/// Emits `events` over `keys` keys with the relay process stopped, then times it from
/// SIGCONT until the slot confirmed the backlog's end. Returns the rate and the relay's
/// peak RSS in kB.
async fn drain(
    bench: &Bench<'_>,
    pg: &PrivatePostgres,
    pool: &PgPool,
    stream: &WalStream,
    events: usize,
    keys: usize,
) -> anyhow::Result<(f64, u64)> {
    let exe = std::env::current_exe().context("cannot find the outpost binary")?;
    let mut cmd = Command::new(&exe);
    cmd.args(["--database-url", &pg.url()])
        .args(["--brokers", &bench.cli.brokers])
        .args(["--schema", stream.name(), "--service", stream.name()])
        .args(["--environment", "testing"]);
    for opt in &bench.cli.kafka_options {
        cmd.args(["--kafka-option", opt]);
    }
    let mut relay: Child = cmd
        .args(["wal", "relay"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start `outpost wal relay`")?;
    let pid = relay.id().context("the WAL relay exited at once")?;
    let result = async {
        // Warm: leading, producer id obtained, one event delivered and confirmed.
        emit_backlog(bench, pool, stream, 1, 1).await?;
        let end = current_lsn(pool).await?;
        wait_confirmed(pool, stream, &end, Duration::from_secs(30)).await?;
        signal(&[&relay], "-STOP")?;
        let emitted = Instant::now();
        emit_backlog(bench, pool, stream, events, keys).await?;
        let end = current_lsn(pool).await?;
        bench.say(&format!(
            "WAL: emitted {events} events in {:.1} s",
            emitted.elapsed().as_secs_f64()
        ));
        let t0 = Instant::now();
        signal(&[&relay], "-CONT")?;
        wait_confirmed(pool, stream, &end, Duration::from_secs(600)).await?;
        let rate = events as f64 / t0.elapsed().as_secs_f64();
        anyhow::Ok((rate, peak_rss_kb(pid)))
    }
    .await;
    let _ = signal(&[&relay], "-CONT");
    let _ = relay.kill().await;
    result
}

/// Emits `events` events (1 KiB payloads of the bench template, fresh ids) over `keys`
/// keys, `PER_TRANSACTION` per transaction, with the bytes `wal::emit` would write.
async fn emit_backlog(
    bench: &Bench<'_>,
    pool: &PgPool,
    stream: &WalStream,
    events: usize,
    keys: usize,
) -> anyhow::Result<()> {
    let (payload, headers) = bench.template.payload_sql();
    let mut done = 0;
    while done < events {
        let n = PER_TRANSACTION.min(events - done);
        sqlx::query(
            "SELECT pg_logical_emit_message(true, $1, \
               convert_to(jsonb_build_object('id', id, 'topic', $4::text, 'key', key, \
                 'headers', jsonb_set($6::jsonb, '{event_id}', to_jsonb(id::text)))::text, 'UTF8') \
               || '\\x00'::bytea || convert_to(replace($5, $7, id::text), 'UTF8')) \
             FROM (SELECT gen_random_uuid() AS id, 'bench-' || ((i + $2) % $3) AS key \
                   FROM generate_series(1, $8::bigint) i) g",
        )
        .bind(stream.prefix())
        .bind(done as i64)
        .bind(keys as i64)
        .bind(&bench.topic)
        .bind(&payload)
        .bind(&headers)
        .bind(bench.template.event.event_id.to_string())
        .bind(n as i64)
        .execute(pool)
        .await
        .context("emitting the WAL backlog")?;
        done += n;
    }
    Ok(())
}

async fn current_lsn(pool: &PgPool) -> anyhow::Result<String> {
    Ok(sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await?)
}

async fn wait_confirmed(
    pool: &PgPool,
    stream: &WalStream,
    end: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let done: Option<bool> = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots \
             WHERE slot_name = $1",
        )
        .bind(stream.slot())
        .bind(end)
        .fetch_one(pool)
        .await?;
        if done == Some(true) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the WAL relay did not confirm {end} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
