//! End-to-end tests of the `outpost` binary: bad settings fail with one clear line, and a
//! relay killed mid-batch and restarted loses nothing (duplicates carry the same event id
//! and bytes).
//!
//! Needs PostgreSQL (`OUTPOST_DATABASE_URL`) and a Kafka broker (`OUTPOST_BROKERS`); run
//! `make services` (or `bash scripts/services.sh`) first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use outpost::testkit::{Collector, Consumed};
use outpost::{Aggregate, EventEnvelope, OutboxEvent, OutboxStore, OutboxTable};
use tokio::process::{Child, Command};
use uuid::Uuid;

mod support;

use support::{
    assert_bad_setting, brokers, database_url, eventually, outpost_std, pool, unique, BIN,
    SETTING_VARS,
};

// ---------------------------------------------------------------------------------------
// Bad settings
// ---------------------------------------------------------------------------------------

const FAST: Duration = Duration::from_secs(5);

#[test]
fn malformed_broker_list_names_outpost_brokers() {
    assert_bad_setting(
        &["--brokers", "nonsense", "migrate"],
        &[],
        &["OUTPOST_BROKERS", "host:port", "nonsense"],
        FAST,
    );
}

#[test]
fn malformed_broker_list_from_env_names_outpost_brokers() {
    assert_bad_setting(
        &["relay"],
        &[("OUTPOST_BROKERS", "kafka:notaport")],
        &["OUTPOST_BROKERS", "host:port"],
        FAST,
    );
}

#[test]
fn invalid_schema_names_outpost_schema() {
    assert_bad_setting(
        &["--schema", "Bad-Name", "migrate"],
        &[],
        &["OUTPOST_SCHEMA", "[a-z_][a-z0-9_]*", "Bad-Name"],
        FAST,
    );
}

#[test]
fn malformed_database_url_names_outpost_database_url() {
    assert_bad_setting(
        &["--database-url", "mysql://x", "migrate"],
        &[],
        &["OUTPOST_DATABASE_URL", "postgres://", "mysql://x"],
        FAST,
    );
}

#[test]
fn database_url_password_is_not_printed() {
    assert_bad_setting(
        &["--database-url", "mysql://u:hunter2@x/db", "migrate"],
        &[],
        &["OUTPOST_DATABASE_URL", "postgres://"],
        FAST,
    );
    let out = outpost_std()
        .args(["--database-url", "mysql://u:hunter2@x/db", "migrate"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
}

#[test]
fn a_password_in_the_database_urls_query_is_not_printed() {
    let url = "postgres://postgres@127.0.0.1:1/test?password=hunter2";
    assert_bad_setting(
        &["--database-url", url, "migrate"],
        &[],
        &["OUTPOST_DATABASE_URL", "127.0.0.1:1", "password=****"],
        Duration::from_secs(10),
    );
    let out = outpost_std()
        .args(["--database-url", url, "migrate"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
}

#[test]
fn unreachable_database_fails_fast_naming_outpost_database_url() {
    assert_bad_setting(
        &[
            "--database-url",
            "postgres://postgres@127.0.0.1:1/test",
            "migrate",
        ],
        &[],
        &["OUTPOST_DATABASE_URL", "127.0.0.1:1"],
        Duration::from_secs(10),
    );
}

#[test]
fn bad_environment_names_outpost_environment() {
    assert_bad_setting(
        &["migrate"],
        &[("OUTPOST_ENVIRONMENT", "staging")],
        &[
            "OUTPOST_ENVIRONMENT",
            "testing",
            "development",
            "production",
        ],
        FAST,
    );
    assert_bad_setting(
        &["--environment", "qa", "relay"],
        &[],
        &[
            "OUTPOST_ENVIRONMENT",
            "testing",
            "development",
            "production",
        ],
        FAST,
    );
}

#[test]
fn lease_too_short_names_outpost_lease_ms() {
    assert_bad_setting(
        &["--lease-ms", "10", "relay"],
        &[],
        &[
            "OUTPOST_LEASE_MS",
            "twice the delivery plus request timeout",
        ],
        FAST,
    );
    assert_bad_setting(
        &["relay"],
        &[
            ("OUTPOST_LEASE_MS", "1500"),
            ("OUTPOST_DELIVERY_TIMEOUT_MS", "1000"),
        ],
        &[
            "OUTPOST_LEASE_MS",
            "twice the delivery plus request timeout",
        ],
        FAST,
    );
}

#[test]
fn statement_timeout_out_of_range_names_outpost_statement_timeout_ms() {
    assert_bad_setting(
        &["--statement-timeout-ms", "0", "relay"],
        &[],
        &["OUTPOST_STATEMENT_TIMEOUT_MS", "a positive duration"],
        FAST,
    );
    assert_bad_setting(
        &["relay"],
        &[("OUTPOST_STATEMENT_TIMEOUT_MS", "3000000000")],
        &["OUTPOST_STATEMENT_TIMEOUT_MS", "at most 24 days"],
        FAST,
    );
}

#[test]
fn kafka_option_that_breaks_key_order_names_the_option() {
    assert_bad_setting(
        &["--kafka-option", "enable.idempotence=false", "relay"],
        &[],
        &[
            "--kafka-option enable.idempotence",
            "enable.idempotence=true",
            "enable.idempotence=false",
        ],
        FAST,
    );
    assert_bad_setting(
        &["--kafka-option", "message.timeout.ms=600000", "relay"],
        &[],
        &["--kafka-option message.timeout.ms", "--delivery-timeout-ms"],
        FAST,
    );
}

#[test]
fn request_timeout_is_checked_and_counts_in_the_lease() {
    assert_bad_setting(
        &["--request-timeout-ms", "50", "relay"],
        &[],
        &["--request-timeout-ms", "at least 100 ms"],
        FAST,
    );
    // The lease must cover two sends of 10 s delivery plus 3 s request: 26 s.
    assert_bad_setting(
        &["relay"],
        &[
            ("OUTPOST_LEASE_MS", "25000"),
            ("OUTPOST_DELIVERY_TIMEOUT_MS", "10000"),
            ("OUTPOST_REQUEST_TIMEOUT_MS", "3000"),
        ],
        &[
            "OUTPOST_LEASE_MS",
            "twice the delivery plus request timeout (13s)",
        ],
        FAST,
    );
}

// ---------------------------------------------------------------------------------------
// Crash and restart
// ---------------------------------------------------------------------------------------

/// One staged event, as the test remembers it.
#[derive(Debug, Clone)]
struct Staged {
    key: String,
    payload: Vec<u8>,
}

/// Stages `n` events round-robin over `keys` keys, continuing each key's sequence from
/// `next_seq`, committing every `per_tx` events.
async fn stage(
    store: &OutboxStore,
    topic: &str,
    keys: usize,
    n: usize,
    next_seq: &mut BTreeMap<String, u64>,
    staged: &mut HashMap<Uuid, Staged>,
) {
    // One transaction: a relay already running sees the whole backlog at once (committed
    // 250 at a time, it drained them as they came, and the kill never found a backlog).
    let mut i = 0;
    while i < n {
        let mut tx = store.pool().begin().await.expect("begin");
        for _ in 0..n - i {
            let key = format!("k{:02}", i % keys);
            let seq = next_seq.entry(key.clone()).or_default();
            let env = EventEnvelope::new(
                "outpost.cli-test.v1",
                "outpost-cli-tests",
                serde_json::json!({ "key": key, "seq": *seq }),
            );
            *seq += 1;
            let ev = OutboxEvent::from_envelope(&env, topic, Aggregate::new("test", key.as_str()))
                .expect("serialize");
            store
                .stage(&mut tx, &ev)
                .await
                .expect("stage")
                .expect("new row");
            staged.insert(
                ev.event_id,
                Staged {
                    key,
                    payload: ev.payload,
                },
            );
            i += 1;
        }
        tx.commit().await.expect("commit");
    }
}

/// Row counts by status.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    pending: i64,
    /// Pending rows whose key is under a live lease: in some relay's hands.
    leased: i64,
    published: i64,
    dead: i64,
}

async fn counts(store: &OutboxStore) -> Counts {
    // Leases are held per key, in the keys table.
    let (pending, leased, published, dead): (i64, i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*) FILTER (WHERE status = 'pending'), \
                count(*) FILTER (WHERE status = 'pending' AND k.lease_until > now()), \
                count(*) FILTER (WHERE status = 'published'), \
                count(*) FILTER (WHERE status = 'dead') \
         FROM {} e LEFT JOIN {} k ON k.event_key = e.event_key",
        store.table(),
        store.table().keys()
    ))
    .fetch_one(store.pool())
    .await
    .expect("count rows");
    Counts {
        pending,
        leased,
        published,
        dead,
    }
}

/// The per-key sequence number the test events carry in `data.seq`.
fn seq(c: &Consumed) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&c.payload).expect("json payload");
    v["data"]["seq"].as_u64().expect("data.seq")
}

/// A relay child process; killed (SIGKILL) if the test ends while it runs.
struct RelayProcess {
    child: Child,
    log: PathBuf,
}

impl RelayProcess {
    fn spawn(schema: &str, service: &str, log: PathBuf, extra: &[&str]) -> Self {
        let file = std::fs::File::create(&log).expect("relay log file");
        let mut cmd = Command::new(BIN);
        for var in SETTING_VARS {
            cmd.env_remove(var);
        }
        cmd.env("OUTPOST_LOG", "info")
            .args(["--database-url", &database_url(), "--brokers", &brokers()])
            .args(["--schema", schema, "--service", service])
            .args(["--environment", "testing", "--wake", "none"])
            .args(["--delivery-timeout-ms", "1000", "--lease-ms", "4000"])
            .args(extra)
            .arg("relay")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true);
        let child = cmd.spawn().expect("spawn outpost relay");
        Self { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("relay still running")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test if the relay already exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("relay exited early with {status:?}; log:\n{}", self.log());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_killed_mid_batch_and_restarted_loses_nothing() {
    const PARTITIONS: i32 = 4;
    const KEYS: usize = 20;
    const EVENTS: usize = 3000;
    let started = Instant::now();
    let brokers = brokers();
    let schema = unique("crash");
    let service = unique("cli_crash");
    let topic = unique("outpost.cli.crash").replace('_', ".");
    outpost::kafka::producer::create_topic(&brokers, &topic, PARTITIONS, Duration::from_secs(10))
        .await
        .expect("create topic");
    let store = OutboxStore::new(pool().await, OutboxTable::new(&schema).expect("schema"));
    store.migrate().await.expect("migrate");

    let mut next_seq = BTreeMap::new();
    let mut staged: HashMap<Uuid, Staged> = HashMap::new();
    stage(&store, &topic, KEYS, EVENTS, &mut next_seq, &mut staged).await;
    let collector = Collector::start(&brokers, &topic, PARTITIONS).expect("collector");
    println!("staged {} events in {:?}", staged.len(), started.elapsed());

    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    // A relay with a few rows in flight at a time, so that the kill lands mid-backlog
    // rather than after a full-speed relay has already drained it.
    let mut first = RelayProcess::spawn(
        &schema,
        &service,
        tmp.join(format!("{schema}.1.log")),
        &["--batch-size", "4", "--max-in-flight", "40"],
    );

    // Kill the first relay mid-batch: some rows published, a batch leased, and part of
    // that batch already acknowledged by the broker but not yet marked published. Should
    // it drain everything before we catch it there, stage more and try again.
    let kill_deadline = Instant::now() + Duration::from_secs(60);
    let mut rounds = 0;
    let (at_kill, consumed_at_kill) = loop {
        assert!(
            Instant::now() < kill_deadline,
            "first relay never caught mid-batch; log:\n{}",
            first.log()
        );
        first.assert_running();
        let c = counts(&store).await;
        let consumed: HashSet<Uuid> = collector.snapshot().iter().map(|c| c.event_id).collect();
        let in_hand_acked = i64::try_from(consumed.len()).expect("count") > c.published;
        // A third of the backlog still pending: the relay drains a few rows a millisecond,
        // and this task may wait tens of milliseconds for a core between the count and the
        // kill on a loaded machine (with a margin of 100 rows it once drained them all).
        // Rows acked and not yet marked are looked for in the first two rounds only: the
        // collector has to read them before their settle, and on a loaded machine it lagged
        // behind every settle for five rounds.
        let acked_wanted = rounds < 2;
        if c.published > 0 && c.leased > 0 && (in_hand_acked || !acked_wanted) && c.pending > 1000 {
            first.child.start_kill().expect("SIGKILL relay");
            break (c, consumed.len());
        }
        if c.pending == 0 {
            rounds += 1;
            assert!(
                rounds <= 5,
                "relay drained every round before it could be killed"
            );
            println!(
                "relay drained {} rows before the kill; staging more",
                c.published
            );
            stage(&store, &topic, KEYS, EVENTS, &mut next_seq, &mut staged).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let status = tokio::time::timeout(Duration::from_secs(5), first.child.wait())
        .await
        .expect("killed relay reaped")
        .expect("wait");
    assert_eq!(
        status.signal(),
        Some(9),
        "first relay should die by SIGKILL, got {status:?}"
    );
    let after_kill = counts(&store).await;
    println!(
        "killed first relay at {at_kill:?} with {consumed_at_kill} distinct events consumed; \
         after exit {after_kill:?}"
    );
    assert!(
        after_kill.pending > 0,
        "the relay must be killed while rows are still pending: {after_kill:?}"
    );

    // The second relay finishes the job, including the killed relay's leased rows once
    // their lease lapses.
    let restarted = Instant::now();
    let mut second =
        RelayProcess::spawn(&schema, &service, tmp.join(format!("{schema}.2.log")), &[]);
    let ids: Vec<Uuid> = staged.keys().copied().collect();
    let consumed = eventually(
        Duration::from_secs(90),
        || {
            let got: HashSet<Uuid> = collector.snapshot().iter().map(|c| c.event_id).collect();
            let missing = ids.iter().filter(|id| !got.contains(id)).count();
            format!(
                "{missing} of {} events not consumed; log:\n{}",
                ids.len(),
                second.log()
            )
        },
        || {
            let store = &store;
            let collector = &collector;
            let ids = &ids;
            async move {
                let seen = collector.snapshot();
                let got: HashSet<Uuid> = seen.iter().map(|c| c.event_id).collect();
                if !ids.iter().all(|id| got.contains(id)) {
                    return None;
                }
                let c = counts(store).await;
                (c.pending == 0).then_some((seen, c))
            }
        },
    )
    .await;
    let (consumed, final_counts) = consumed;
    println!(
        "second relay drained the rest in {:?}: {final_counts:?}",
        restarted.elapsed()
    );
    second.assert_running();
    assert_eq!(final_counts.dead, 0, "no event should be parked");
    assert_eq!(final_counts.published, staged.len() as i64);

    // Graceful shutdown on SIGTERM, once the relay is up (the first one may have
    // delivered everything before the second finished starting).
    eventually(
        Duration::from_secs(60),
        || format!("the second relay to start; log:\n{}", second.log()),
        || {
            let started = second.log().contains("relay started");
            async move { started.then_some(()) }
        },
    )
    .await;
    let pid = second.pid().to_string();
    let term = StdCommand::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(term.success(), "kill -TERM {pid}");
    let stopping = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), second.child.wait())
        .await
        .unwrap_or_else(|_| panic!("relay ignored SIGTERM; log:\n{}", second.log()))
        .expect("wait");
    let stop_took = stopping.elapsed();
    assert!(
        status.success(),
        "relay should exit 0 on SIGTERM, got {status:?}; log:\n{}",
        second.log()
    );
    assert!(
        stop_took < Duration::from_secs(6),
        "graceful shutdown took {stop_took:?}"
    );
    println!("second relay stopped on SIGTERM in {stop_took:?}");

    // Every staged event arrived; every copy is byte-identical to what was staged.
    let mut copies: HashMap<Uuid, usize> = HashMap::new();
    for c in &consumed {
        let s = staged
            .get(&c.event_id)
            .unwrap_or_else(|| panic!("consumed an event that was never staged: {}", c.event_id));
        assert_eq!(c.key, s.key, "key of {}", c.event_id);
        assert!(
            c.payload == s.payload,
            "payload of {} differs from the staged bytes",
            c.event_id
        );
        *copies.entry(c.event_id).or_default() += 1;
    }
    assert_eq!(copies.len(), staged.len(), "every staged event consumed");
    let duplicates: usize = copies.values().map(|n| n - 1).sum();
    let duplicated_events = copies.values().filter(|n| **n > 1).count();

    // First deliveries of each key arrive in the order they were staged (and committed).
    let mut first_seen = HashSet::new();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for c in &consumed {
        if !first_seen.insert(c.event_id) {
            continue;
        }
        let seq = seq(c);
        if let Some(prev) = last.get(&c.key) {
            assert!(
                seq > *prev,
                "key {} delivered seq {seq} after {prev}",
                c.key
            );
        }
        last.insert(c.key.clone(), seq);
    }

    println!(
        "crash test: staged {}, consumed {} messages, duplicates {duplicates} \
         ({duplicated_events} events delivered more than once), total {:?}",
        staged.len(),
        consumed.len(),
        started.elapsed()
    );

    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(store.pool())
        .await
        .expect("drop schema");
    let _ = std::fs::remove_file(&first.log);
    let _ = std::fs::remove_file(&second.log);
}
