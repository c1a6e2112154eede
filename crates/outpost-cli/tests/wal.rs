//! `outpost wal ...` end to end: `doctor` says what to change on a server without logical
//! decoding; on a private PostgreSQL with `wal_level=logical`, `init` sets the stream up and
//! a `wal relay` process killed with SIGKILL mid-stream and started again loses nothing,
//! keeps each key's order, and resumes from the slot.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use outpost::testkit::postgres::PrivatePostgres;
use outpost::testkit::{Collector, Consumed};
use outpost::wal::WalStream;
use outpost::{Aggregate, EventEnvelope, OutboxEvent};
use sqlx::postgres::PgPoolOptions;
use tokio::process::{Child, Command};
use uuid::Uuid;

mod support;

use support::{brokers, database_url, eventually, outpost_std, unique, BIN, SETTING_VARS};

#[test]
fn doctor_names_the_setting_to_change_and_fails() {
    let out = outpost_std()
        .args(["--database-url", &database_url(), "--schema", &unique("w")])
        .args(["wal", "doctor"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The shared server runs with wal_level=replica.
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("FAIL wal_level")
            && stdout.contains("ALTER SYSTEM SET wal_level = logical"),
        "{stdout}"
    );
    assert!(
        stderr.starts_with("error: WAL mode is not ready"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

struct WalRelayProcess {
    child: Child,
    log: PathBuf,
}

impl WalRelayProcess {
    fn spawn(url: &str, schema: &str, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        for var in SETTING_VARS {
            cmd.env_remove(var);
        }
        let child = cmd
            .env("OUTPOST_LOG", "info")
            .args(["--database-url", url, "--brokers", &brokers()])
            .args(["--schema", schema, "--service", schema])
            .args(["--environment", "testing"])
            .args(["wal", "relay"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn event(topic: &str, key: &str, seq: usize) -> OutboxEvent {
    let env = EventEnvelope::new(
        "outpost.test.v1",
        "outpost-tests",
        serde_json::json!({ "key": key, "seq": seq }),
    );
    OutboxEvent::from_envelope(&env, topic, Aggregate::new("test", key)).unwrap()
}

fn seq(c: &Consumed) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&c.payload).unwrap();
    v["data"]["seq"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wal_relay_killed_mid_stream_resumes_from_the_slot_and_loses_nothing() {
    const KEYS: usize = 10;
    const EVENTS: usize = 4000;
    let pg =
        tokio::task::spawn_blocking(|| PrivatePostgres::start_with(&[("wal_level", "logical")]))
            .await
            .unwrap()
            .unwrap();
    let schema = unique("w");
    let init = outpost_std()
        .args(["--database-url", &pg.url(), "--schema", &schema])
        .args(["wal", "init"])
        .output()
        .unwrap();
    let init_out = String::from_utf8_lossy(&init.stdout);
    assert!(
        init.status.success(),
        "{init_out}{}",
        String::from_utf8_lossy(&init.stderr)
    );
    assert!(
        init_out.contains(&format!("\"{schema}\".emit(")),
        "{init_out}"
    );

    let brokers = brokers();
    let topic = unique("outpost.cli.wal").replace('_', ".");
    outpost::kafka::producer::create_topic(&brokers, &topic, 4, Duration::from_secs(10))
        .await
        .unwrap();
    let collector = Collector::start(&brokers, &topic, 4).unwrap();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let mut first = WalRelayProcess::spawn(&pg.url(), &schema, tmp.join(format!("{schema}.1.log")));

    // One writer emits 10 events per transaction while the relay runs.
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url())
        .await
        .unwrap();
    let stream = WalStream::new(&schema).unwrap();
    let writer = {
        let (pool, topic) = (pool.clone(), topic.clone());
        tokio::spawn(async move {
            let mut all = Vec::new();
            for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(10) {
                let events: Vec<OutboxEvent> = chunk
                    .iter()
                    .map(|i| event(&topic, &format!("k{}", i % KEYS), i / KEYS))
                    .collect();
                let mut tx = pool.begin().await.unwrap();
                outpost::wal::emit::emit_all(&mut tx, &stream, &events)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                all.extend(events.iter().map(|e| e.event_id));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            all
        })
    };

    // Kill it once part of the stream was delivered.
    eventually(
        Duration::from_secs(60),
        || {
            format!(
                "the first relay delivers something; log:\n{}",
                std::fs::read_to_string(tmp.join(format!("{schema}.1.log"))).unwrap_or_default()
            )
        },
        || async { (collector.snapshot().len() >= 300).then_some(()) },
    )
    .await;
    first.child.start_kill().unwrap();
    let status = first.child.wait().await.unwrap();
    assert_eq!(status.signal(), Some(9));
    let at_kill: HashSet<Uuid> = collector.snapshot().iter().map(|c| c.event_id).collect();
    assert!(
        first.log().contains("leading the WAL stream"),
        "{}",
        first.log()
    );

    let _second = WalRelayProcess::spawn(&pg.url(), &schema, tmp.join(format!("{schema}.2.log")));
    let ids = writer.await.unwrap();
    assert!(
        at_kill.len() < ids.len(),
        "the kill landed after everything was delivered"
    );
    let consumed = collector
        .wait_for(&ids, Duration::from_secs(120))
        .await
        .unwrap_or_else(|missing| panic!("{missing} of {} events lost", ids.len()));
    // Per key, first deliveries in emit order.
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_seen = HashSet::new();
    for c in &consumed {
        if first_seen.insert(c.event_id) {
            let s = seq(c);
            if let Some(prev) = last.insert(c.key.clone(), s) {
                assert!(s > prev, "key {} delivered {s} after {prev}", c.key);
            }
        }
    }
    assert_eq!(first_seen.len(), ids.len());
    let confirmed: Option<String> = sqlx::query_scalar(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(format!("outpost_{schema}"))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(confirmed.is_some());

    // The operator's view: ready, and nothing dead.
    let cli = |args: &[&str]| {
        outpost_std()
            .args(["--database-url", &pg.url(), "--schema", &schema])
            .args(args)
            .output()
            .unwrap()
    };
    let doctor = cli(&["wal", "doctor"]);
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(doctor.status.success(), "{report}");
    assert!(
        report.contains(&format!("outpost_{schema}: plugin pgoutput")) && !report.contains("FAIL"),
        "{report}"
    );
    let dead = cli(&["wal", "dead", "list", "--json"]);
    assert!(dead.status.success());
    assert_eq!(String::from_utf8_lossy(&dead.stdout).trim(), "[]");
    drop(_second);
    pool.close().await;
    drop(pg);
}
