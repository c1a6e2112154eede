//! The drain's raw limit: the least work any outbox relay does per event, on this machine,
//! in the same run as Outpost's drains.
//!
//! A plain table of the same 1 KiB events (one key each) is read in id order by one
//! process, every row produced with the plain librdkafka producer (as many in flight as
//! it takes), and marked published with its partition and offset as its ack arrives,
//! batched, while the reads and sends go on. Nothing else: no ownership (one reader on a
//! static backlog, a cursor on the id), no per-key order, no retries, no second table, no
//! lease to renew. Outpost's drain of the same backlog pays for all of those, so this is
//! the reference its rate is compared with, beside the broker's alone. A reference, not a
//! ceiling: one reader and one settler, each waiting on its statements, leave part of the
//! machine idle.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use chrono::{DateTime, Utc};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureRecord;
use serde::Serialize;
use sqlx::postgres::PgPool;
use sqlx::types::Json;
use sqlx::{Executor, Row};
use tokio::sync::mpsc;

use super::{
    busy_since, cpu_busy, delivered, kafka_headers, seconds_between, Bench, Delivery, RawKafka,
};

/// Rows read per statement.
const READ: i64 = 1_000;
/// Most rows produced and not acked yet.
const IN_FLIGHT: usize = 5_000;
/// Most acks written per statement.
const SETTLE: usize = 2_000;

/// What the raw drain measured.
#[derive(Debug, Clone, Serialize)]
pub(super) struct RawDrain {
    events: usize,
    /// Commit of the backlog to the last row's `published_at` (database clock).
    seconds: f64,
    pub(super) rate: f64,
    /// How busy the whole machine was meanwhile (every core, every process).
    machine_busy_pct: f64,
}

/// Stages `events` rows of one key each in a plain table and drains them as described in
/// the module doc; every row must end published with the broker's offset.
pub(super) async fn measure(bench: &Bench<'_>, events: usize) -> anyhow::Result<RawDrain> {
    let pool = &bench.pool;
    let schema = format!("bench_{}_raw_drain", bench.run_id);
    let table = format!("\"{schema}\".events");
    pool.execute(format!("CREATE SCHEMA \"{schema}\"").as_str())
        .await?;
    pool.execute(
        format!(
            "CREATE TABLE {table} ( \
               id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
               event_key      TEXT NOT NULL, \
               payload        BYTEA NOT NULL, \
               headers        JSONB NOT NULL, \
               status         TEXT NOT NULL DEFAULT 'pending', \
               published_at   TIMESTAMPTZ, \
               kafka_partition INT, \
               kafka_offset   BIGINT)"
        )
        .as_str(),
    )
    .await?;
    pool.execute(format!("CREATE INDEX ON {table} (id) WHERE status = 'pending'").as_str())
        .await?;
    bench.checkpoint().await;
    let busy = cpu_busy();
    let raw = RawKafka::new(bench.settings, false)?;
    // The idempotent producer's first send waits for its producer id: not counted.
    raw.send(&bench.template.instance("warm-up")).await?;
    let started = stage(bench, &table, events).await?;
    let (acks, settled) = mpsc::unbounded_channel();
    let settler = tokio::spawn(settle(pool.clone(), table.clone(), settled));
    let sent = send(bench, &raw, &table, acks).await;
    let written = settler.await.context("raw drain settler")??;
    sent?;
    let row = sqlx::query(&format!(
        "SELECT count(*) FILTER (WHERE status = 'published' AND kafka_offset IS NOT NULL) \
                AS acked, max(published_at) AS last FROM {table}"
    ))
    .fetch_one(pool)
    .await?;
    let acked: i64 = row.get("acked");
    ensure!(
        acked as usize == events && written == events,
        "raw drain: {acked} of {events} rows published ({written} acks written)"
    );
    let seconds = seconds_between(started, row.get("last"));
    Ok(RawDrain {
        events,
        seconds,
        rate: events as f64 / seconds,
        machine_busy_pct: busy_since(busy),
    })
}

/// Stages the backlog in one statement (the same envelopes as Outpost's drains, a key per
/// row); returns the commit time on the database clock.
async fn stage(bench: &Bench<'_>, table: &str, events: usize) -> anyhow::Result<DateTime<Utc>> {
    let (payload, headers) = bench.template.payload_sql();
    let mut tx = bench.pool.begin().await?;
    sqlx::query(&format!(
        "INSERT INTO {table} (event_key, payload, headers) \
         SELECT 'bench-' || i, convert_to(replace($2, $3, id::text), 'UTF8'), \
                jsonb_set($4::jsonb, '{{event_id}}', to_jsonb(id::text)) \
         FROM (SELECT i, gen_random_uuid() AS id FROM generate_series(1, $1::bigint) i) g"
    ))
    .bind(events as i64)
    .bind(&payload)
    .bind(bench.template.event.event_id.to_string())
    .bind(&headers)
    .execute(&mut *tx)
    .await
    .context("staging the raw drain's backlog")?;
    // Statistics the planner can use from the first statement on.
    sqlx::query(&format!("ANALYZE {table}"))
        .execute(&mut *tx)
        .await?;
    let committed = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(committed)
}

/// Reads the backlog in id order and produces every row, at most [`IN_FLIGHT`] unacked;
/// each ack goes to the settler as (id, partition, offset).
async fn send(
    bench: &Bench<'_>,
    raw: &RawKafka,
    table: &str,
    acks: mpsc::UnboundedSender<(i64, i32, i64)>,
) -> anyhow::Result<()> {
    let read = format!(
        "SELECT id, event_key, payload, headers FROM {table} \
         WHERE status = 'pending' AND id > $1 ORDER BY id LIMIT $2"
    );
    let mut in_flight = FuturesUnordered::new();
    let mut after = 0i64;
    let mut exhausted = false;
    loop {
        if !exhausted && in_flight.len() + READ as usize <= IN_FLIGHT {
            let rows = sqlx::query(&read)
                .bind(after)
                .bind(READ)
                .fetch_all(&bench.pool)
                .await?;
            // One reader over a backlog that does not grow: a short read is the end.
            exhausted = (rows.len() as i64) < READ;
            for row in rows {
                let id: i64 = row.get("id");
                let key: String = row.get("event_key");
                let payload: Vec<u8> = row.get("payload");
                let Json(headers): Json<BTreeMap<String, String>> = row.get("headers");
                after = id;
                let mut record = FutureRecord::to(&bench.topic)
                    .key(key.as_str())
                    .payload(payload.as_slice())
                    .headers(kafka_headers(&headers));
                loop {
                    match raw.producer.send_result(record) {
                        Ok(delivery) => {
                            in_flight.push(delivery.map(move |d| (id, d)));
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            let Some(acked) = in_flight.next().await else {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                continue;
                            };
                            forward(&acks, acked)?;
                        }
                        Err((e, _)) => return Err(e).context("raw drain: produce failed"),
                    }
                }
            }
            continue;
        }
        match in_flight.next().await {
            Some(acked) => forward(&acks, acked)?,
            None => return Ok(()),
        }
    }
}

fn forward(
    acks: &mpsc::UnboundedSender<(i64, i32, i64)>,
    (id, delivery): (i64, Delivery),
) -> anyhow::Result<()> {
    let (partition, offset) = delivered(delivery)?;
    acks.send((id, partition, offset))
        .context("raw drain settler gone")
}

/// Writes acks as they come, whatever arrived during the previous statement in the next
/// (at most [`SETTLE`]); returns how many it wrote.
async fn settle(
    pool: PgPool,
    table: String,
    mut acks: mpsc::UnboundedReceiver<(i64, i32, i64)>,
) -> anyhow::Result<usize> {
    let update = format!(
        "UPDATE {table} t SET status = 'published', published_at = clock_timestamp(), \
             kafka_partition = u.p, kafka_offset = u.o \
         FROM UNNEST($1::bigint[], $2::int[], $3::bigint[]) AS u(id, p, o) \
         WHERE t.id = u.id"
    );
    let mut written = 0;
    let started = Instant::now();
    while let Some(first) = acks.recv().await {
        let (mut ids, mut partitions, mut offsets) = (vec![first.0], vec![first.1], vec![first.2]);
        while ids.len() < SETTLE {
            let Ok((id, p, o)) = acks.try_recv() else {
                break;
            };
            ids.push(id);
            partitions.push(p);
            offsets.push(o);
        }
        let done = sqlx::query(&update)
            .bind(&ids)
            .bind(&partitions)
            .bind(&offsets)
            .execute(&pool)
            .await
            .with_context(|| format!("raw drain settle after {:?}", started.elapsed()))?;
        written += done.rows_affected() as usize;
    }
    Ok(written)
}
