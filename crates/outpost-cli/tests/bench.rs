//! `outpost bench --quick --json` runs in the test suite so the command cannot rot: it must
//! finish, and its one JSON object must carry every figure with its raw limit and ratio.
//! The figures themselves are not checked (a quick run on a shared machine says nothing
//! about performance); BENCHMARKS.md has a full run's.
//!
//! Needs PostgreSQL, Redis and a Kafka broker; run `make services` first.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

fn outpost(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    for (var, _) in std::env::vars() {
        // The services come from the environment; nothing else may change what runs.
        let service = [
            "OUTPOST_DATABASE_URL",
            "OUTPOST_BROKERS",
            "OUTPOST_REDIS_URL",
        ];
        if var.starts_with("OUTPOST_") && !service.contains(&var.as_str()) {
            cmd.env_remove(var);
        }
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run outpost")
}

fn number(v: &Value, path: &str) -> f64 {
    let mut at = v;
    for part in path.split('.') {
        at = match part.parse::<usize>() {
            Ok(i) => &at[i],
            Err(_) => &at[part],
        };
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {at}"))
}

#[test]
fn quick_bench_prints_every_figure_with_its_ratio() {
    let started = Instant::now();
    let out = outpost(&["bench", "--quick", "--json"]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    let report: Value = serde_json::from_str(&stdout).expect("bench prints JSON");
    println!("quick bench took {took:?}\n{stdout}");
    assert!(took < Duration::from_secs(120), "quick bench took {took:?}");

    assert_eq!(report["quick"], true);
    for path in [
        "raw.produce_sequential.p50_ms",
        "raw.produce_sequential.p99_ms",
        "raw.produce_pipelined_ev_per_s",
        "raw.insert_commit.p99_ms",
        "raw.drain.rate",
        "kafka_first.latency.p99_ms",
        "kafka_first.raw.p99_ms",
        "kafka_first.check.p99_ms",
        "fallback.p99_ms",
        "peak_relay_rss_mb",
        "machine.cpus",
    ] {
        assert!(number(&report, path) > 0.0, "{path} should be positive");
    }
    let tx = report["transactional"].as_array().expect("transactional");
    let writers: Vec<f64> = (0..tx.len())
        .map(|i| number(&report, &format!("transactional.{i}.writers")))
        .collect();
    assert_eq!(writers, [1.0, 4.0, 16.0]);
    for t in tx {
        assert!(t["latency"]["p999_ms"].as_f64().is_some(), "{t}");
        assert!(t["eager_hits"].as_u64().is_some(), "{t}");
        // The raw counterpart, measured with as many writers, interleaved.
        assert!(t["raw"]["p99_ms"].as_f64().unwrap_or(0.0) > 0.0, "{t}");
    }
    // Keys 1, 16 and one per event, then one per event with published rows deleted, each
    // drained by 1, 3, 3 and 1 relays; every event acked.
    let drains = report["drain"].as_array().expect("drain");
    assert_eq!(drains.len(), 16, "{drains:?}");
    let relays: Vec<u64> = drains.iter().filter_map(|d| d["relays"].as_u64()).collect();
    assert_eq!(relays, [1, 3, 3, 1].repeat(4), "{drains:?}");
    let deleted: Vec<bool> = drains
        .iter()
        .filter_map(|d| d["published_rows_deleted"].as_bool())
        .collect();
    assert_eq!(deleted, [[false; 12].as_slice(), &[true; 4]].concat());
    for d in drains {
        assert_eq!(d["acked"], d["events"], "{d}");
        assert!(d["rate"].as_f64().unwrap_or(0.0) > 0.0, "{d}");
    }
    // Claim cost: three backlog sizes, one key and many keys, each with both plans; and
    // the smallest many-key backlog again over every row published before it.
    let costs = report["backlog_scaling"]["claim_cost"]
        .as_array()
        .expect("claim_cost");
    assert_eq!(costs.len(), 7, "{costs:?}");
    assert!(
        costs[6]["published_rows"].as_u64().unwrap() > 0,
        "{costs:?}"
    );
    for c in costs {
        assert!(c["claim_ms"].as_f64().is_some(), "{c}");
        assert!(c["fetch_ms"].as_f64().is_some(), "{c}");
        assert!(
            c["claim_plan"]
                .as_str()
                .is_some_and(|p| p.contains("Execution Time")),
            "{c}"
        );
        assert_eq!(c["claimed_keys"], c["expected_keys"], "{c}");
    }
    // Every Outpost figure has its raw limit and ratio; every target says met or not.
    let lines = report["lines"].as_array().expect("lines");
    for line in lines {
        if line["raw"].is_number() {
            assert!(line["ratio"].as_f64().is_some_and(f64::is_finite), "{line}");
        }
        if line["target"].is_string() {
            assert!(line["met"].is_boolean(), "{line}");
        }
    }
    let targets = lines.iter().filter(|l| l["target"].is_string()).count();
    // commit→ack ×3, Kafka-first, fallback, eight drains, the large backlog, the claim over
    // published rows, RSS; WAL mode's two drains and its RSS.
    assert_eq!(targets, 19, "{lines:?}");
    // WAL mode, on a PostgreSQL of its own: latencies and one drain of one key and one of
    // a key per event, each confirmed by the slot.
    for path in [
        "wal.produce_pipelined_ev_per_s",
        "wal.insert_commit.p99_ms",
        "wal.emit_commit.p99_ms",
        "wal.commit_to_ack.p99_ms",
        "wal.peak_relay_rss_mb",
    ] {
        assert!(number(&report, path) > 0.0, "{path} should be positive");
    }
    let wal = report["wal"]["drain"].as_array().expect("wal.drain");
    assert_eq!(wal.len(), 2, "{wal:?}");
    for d in wal {
        assert!(d["rate"].as_f64().unwrap_or(0.0) > 0.0, "{d}");
    }
}

#[test]
fn bench_rejects_an_unknown_flag_with_one_line() {
    let out = outpost(&["bench", "--fast"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--fast"), "{stderr}");
}
