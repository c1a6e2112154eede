//! `outpost demo`: the HuleEdu batch pipeline rebuilt on Outpost (the `huleedu` crate), run
//! end to end: a batch of essays through registration, upload and validation, slot
//! assignment, readiness, the spellcheck phase and completion. It prints progress while it
//! runs, then each hop's latency (staging to consumption) and the total; then the same
//! pipeline in the relay-only baseline HuleEdu had (5 s polling, no wake-ups).
//!
//! `--outage` runs on a private tansu broker and pauses it mid-run; `--json` prints one
//! JSON object instead of the tables.
//!
//! Every message a run put on Kafka is read back and checked against HuleEdu's wire
//! contract (`huleedu::contract`); the summary ends with how many were valid.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use huleedu::contract::{self, ContractReport};
use huleedu::corpus::{self, CorpusFile, CORPUS_DIR};
use huleedu::events::Topics;
use huleedu::{Outage, Pipeline, PipelineConfig, RunMode, RunReport};
use outpost::testkit::TansuBroker;
use serde_json::{json, Map, Value};

use crate::cli::{Cli, Command};

/// How long `--outage` keeps the broker paused.
const PAUSE: Duration = Duration::from_secs(5);

/// How long reading a run's messages back for the contract check may take.
const READ_BACK: Duration = Duration::from_secs(60);

/// Runs the demo as `cli`'s `demo` subcommand asks.
///
/// # Errors
/// When a service cannot be reached, or a run loses events or never completes its batch.
pub async fn run(cli: &Cli) -> anyhow::Result<()> {
    let Command::Demo {
        essays,
        baseline,
        no_baseline,
        outage,
        json,
        ref corpus,
        partitions,
    } = cli.command
    else {
        unreachable!("demo::run is only called for the demo subcommand");
    };
    anyhow::ensure!(essays > 0, "--essays must be positive");
    let dir = corpus.clone().unwrap_or_else(|| PathBuf::from(CORPUS_DIR));
    let files = corpus::load(&dir, essays)?;
    let mut modes = vec![RunMode::Instant];
    if baseline || (!no_baseline && !outage) {
        modes.push(RunMode::Baseline);
    }
    let mut reports = Vec::new();
    let mut contracts = Vec::new();
    for mode in modes {
        let (report, contract) = run_mode(cli, mode, &files, outage, partitions).await?;
        if !json {
            print_report(&report);
        }
        reports.push(report);
        contracts.push(contract);
    }
    let contract = ContractReport::merged(&contracts);
    if json {
        let mut out = to_json(&reports);
        out["contract_valid"] = json!(contract.valid);
        out["contract_checked"] = json!(contract.checked);
        println!("{out}");
    } else {
        if let [instant, baseline] = reports.as_slice() {
            print_comparison(instant, baseline);
        }
        println!();
        for v in contract.violations.iter().take(10) {
            println!("  invalid: {v}");
        }
        for (topic, n) in &contract.unread {
            println!("  not read back: {n} on {topic}");
        }
        println!("{}", contract.summary());
    }
    anyhow::ensure!(
        contract.is_clean(),
        "{} of {} messages break the wire contract, {} expected events not read back",
        contract.checked - contract.valid,
        contract.checked,
        contract.unread.values().sum::<usize>()
    );
    let lost: usize = reports.iter().map(|r| r.lost).sum();
    anyhow::ensure!(lost == 0, "{lost} events never reached their consumer");
    for r in &reports {
        anyhow::ensure!(
            r.batch_state.as_deref() == Some("completed"),
            "{}: the batch ended {:?}, not completed",
            r.mode.as_str(),
            r.batch_state
        );
    }
    Ok(())
}

async fn run_mode(
    cli: &Cli,
    mode: RunMode,
    files: &[CorpusFile],
    outage: bool,
    partitions: Option<i32>,
) -> anyhow::Result<(RunReport, ContractReport)> {
    let label = mode.as_str();
    let say =
        move |t: Duration, line: &str| eprintln!("[{label:>8} {:6.2} s] {line}", t.as_secs_f64());
    eprintln!("{label}: {}", mode.describe());
    let broker = if outage {
        let broker = TansuBroker::start()
            .await
            .context("--outage runs on a private tansu broker")?;
        eprintln!("{label}: private tansu broker on {}", broker.brokers());
        Some(broker)
    } else {
        None
    };
    let mut config = PipelineConfig::new(mode);
    if let Some(partitions) = partitions {
        config.partitions = partitions;
    }
    config.database_url = cli.database_url.clone();
    config.redis_url = cli.redis_url.clone();
    config.brokers = broker
        .as_ref()
        .map_or_else(|| cli.brokers.clone(), TansuBroker::brokers);
    // A fresh private broker carries HuleEdu's exact topic names; on the shared broker
    // each run keeps the default, the names followed by its run id, because its new
    // consumer groups read from the beginning.
    if broker.is_some() {
        config.topics = Topics::huleedu();
        // Consumers that outlast the pause keep their partitions, so they carry on as soon
        // as the broker is back instead of rejoining their groups (at the price of a
        // slower start: tansu takes half the session timeout to let a consumer join).
        config.session_timeout = PAUSE + Duration::from_secs(3);
    }
    let pipeline = Pipeline::start(config)
        .await
        .with_context(|| format!("cannot start the {label} pipeline"))?;
    eprintln!(
        "{label}: services up in {:.2} s (5 schemas, 4 consumer groups joined)",
        pipeline.started_in().as_secs_f64()
    );
    let outage = broker.as_ref().map(|broker| Outage {
        broker,
        after_files: files.len() / 2,
        pause_for: PAUSE,
    });
    // Checked before the shutdown, which deletes the run's topics.
    let checked = match pipeline.run_batch(files, outage, &say).await {
        Ok(report) => contract::check_run(&pipeline, &report, READ_BACK)
            .await
            .map(|c| (report, c)),
        Err(e) => Err(e),
    };
    pipeline.shutdown().await?;
    Ok(checked?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A key short enough for a table column.
fn short(key: &str) -> String {
    if key.chars().count() > 13 {
        format!("{}…", key.chars().take(12).collect::<String>())
    } else {
        key.to_owned()
    }
}

fn print_report(r: &RunReport) {
    println!();
    println!("{} — {}", r.mode.as_str(), r.mode.describe());
    println!(
        "  {:>9} {:>9}  {:<48} {:<13} {:<14} {:>6} {:>9} {:>9} {:>9}",
        "first at",
        "last at",
        "hop (topic)",
        "consumer",
        "key",
        "events",
        "p50 ms",
        "p99 ms",
        "handle ms"
    );
    for hop in &r.hops {
        let key = hop
            .key
            .as_deref()
            .map_or_else(|| format!("{} keys", hop.keys), short);
        println!(
            "  {:>6.0} ms {:>6.0} ms  {:<48} {:<13} {:<14} {:>6} {:>9.1} {:>9.1} {:>9.1}",
            ms(hop.first_received),
            ms(hop.last_handled),
            hop.topic,
            hop.consumer,
            key,
            hop.count,
            ms(hop.p50),
            ms(hop.p99),
            ms(hop.handling_p50)
        );
    }
    let total = r.total.map_or_else(
        || "never".to_owned(),
        |t| {
            format!(
                "{:.0} ms ({:.0} events/s)",
                ms(t),
                r.consumed as f64 / t.as_secs_f64()
            )
        },
    );
    println!(
        "  total: {} essays ({} valid, {} invalid), {} partitions per topic, registration → batch {}: {total}",
        r.essays,
        r.valid,
        r.invalid,
        r.partitions,
        r.batch_state.as_deref().unwrap_or("unknown"),
    );
    println!(
        "  events: {} of {} consumed, {} lost, {} redeliveries skipped, {} duplicates applied, {} outbox rows pending",
        r.consumed,
        r.expected.total(),
        r.lost,
        r.duplicates_skipped,
        r.duplicates_applied,
        r.pending_outbox_rows
    );
    if !r.missing.is_empty() {
        println!("  missing: {:?}", r.missing);
    }
    if r.mode == RunMode::Instant {
        let n = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
        println!(
            "  paths: {} produced right after commit, {} left to the relay, {} Kafka-first fallbacks to the outbox; relays delivered {}",
            n(r.paths.eager_hits),
            n(r.paths.eager_misses),
            r.paths.kafka_first_fallbacks,
            n(r.paths.relay_deliveries)
        );
    }
    if let Some(o) = r.outage {
        println!(
            "  outage: broker paused at {:.2} s, resumed at {:.2} s; nothing lost: {}",
            o.paused_at.as_secs_f64(),
            o.resumed_at.as_secs_f64(),
            if r.lost == 0 { "yes" } else { "NO" }
        );
    }
}

fn print_comparison(instant: &RunReport, baseline: &RunReport) {
    let (Some(i), Some(b)) = (instant.total, baseline.total) else {
        return;
    };
    println!();
    println!(
        "instant {:.0} ms vs relay-only baseline {:.1} s: {:.0}× faster, same consumers, same {} events",
        ms(i),
        b.as_secs_f64(),
        b.as_secs_f64() / i.as_secs_f64().max(1e-9),
        instant.expected.total()
    );
}

fn to_json(reports: &[RunReport]) -> Value {
    let mut modes = Map::new();
    for r in reports {
        let per_hop: Map<String, Value> = r
            .hops
            .iter()
            .map(|h| {
                let stats = json!({
                    "p50_ms": round(ms(h.p50)),
                    "p99_ms": round(ms(h.p99)),
                    "first_received_ms": round(ms(h.first_received)),
                    "last_handled_ms": round(ms(h.last_handled)),
                    "handling_p50_ms": round(ms(h.handling_p50)),
                    "count": h.count,
                    "consumer": h.consumer,
                });
                (h.topic.clone(), stats)
            })
            .collect();
        let mut mode = json!({
            "total_ms": r.total.map(|t| round(ms(t))),
            // Events through the whole pipeline per second of registration → completed.
            "events_per_second": r.total.map(|t| round(r.consumed as f64 / t.as_secs_f64())),
            "batch_state": r.batch_state,
            "events_consumed": r.consumed,
            "lost": r.lost,
            "duplicates_skipped": r.duplicates_skipped,
            "duplicates_applied": r.duplicates_applied,
            "pending_outbox_rows": r.pending_outbox_rows,
            "per_hop": per_hop,
        });
        if r.mode == RunMode::Instant {
            mode["paths"] = json!({
                "eager_hits": r.paths.eager_hits,
                "eager_misses": r.paths.eager_misses,
                "kafka_first_fallbacks": r.paths.kafka_first_fallbacks,
                "relay_deliveries": r.paths.relay_deliveries,
            });
        }
        if let Some(o) = r.outage {
            mode["outage"] = json!({
                "paused_at_ms": round(ms(o.paused_at)),
                "resumed_at_ms": round(ms(o.resumed_at)),
            });
        }
        modes.insert(r.mode.as_str().to_owned(), mode);
    }
    let first = reports.first();
    json!({
        "essays": first.map_or(0, |r| r.essays),
        "partitions": first.map_or(0, |r| r.partitions),
        "valid": first.map_or(0, |r| r.valid),
        "invalid": first.map_or(0, |r| r.invalid),
        "events": first.map_or(0, |r| r.expected.total()),
        "modes": modes,
        "lost": reports.iter().map(|r| r.lost).sum::<usize>(),
        "duplicates_applied": reports.iter().map(|r| r.duplicates_applied).sum::<usize>(),
    })
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_are_shortened() {
        assert_eq!(short("batch-1"), "batch-1");
        assert_eq!(short("0123456789abcdef"), "0123456789ab…");
        assert!(std::path::Path::new(CORPUS_DIR).is_dir());
    }
}
