//! What the `outpost` binary's tests share: where the services are, running the binary
//! with nothing inherited, a relay daemon child, HTTP reads and deadline-bounded waits.

#![allow(dead_code)] // each test crate uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use outpost::{Aggregate, EventEnvelope, OutboxEvent, OutboxStore};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::process::{Child, Command};
use uuid::Uuid;

pub const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// Settings the tests pass explicitly; removed from the inherited environment so a
/// developer's shell cannot change what a test checks.
pub const SETTING_VARS: &[&str] = &[
    "OUTPOST_SCHEMA",
    "OUTPOST_SERVICE",
    "OUTPOST_ENVIRONMENT",
    "OUTPOST_WAKE",
    "OUTPOST_POLL_MAX_MS",
    "OUTPOST_POLL_MIN_MS",
    "OUTPOST_ERROR_BACKOFF_MS",
    "OUTPOST_DELIVERY_TIMEOUT_MS",
    "OUTPOST_LEASE_MS",
    "OUTPOST_BATCH_SIZE",
    "OUTPOST_MAX_IN_FLIGHT",
    "OUTPOST_RETENTION_SECS",
    "OUTPOST_CONFIG",
    "OUTPOST_HTTP_ADDR",
    "OUTPOST_LOG_FORMAT",
    "OUTPOST_LOG",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
];

pub fn database_url() -> String {
    std::env::var("OUTPOST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn brokers() -> String {
    std::env::var("OUTPOST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn redis_url() -> String {
    std::env::var("OUTPOST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// `outpost` with valid database and broker settings and nothing else inherited.
pub fn outpost_std() -> StdCommand {
    let mut cmd = StdCommand::new(BIN);
    for var in SETTING_VARS {
        cmd.env_remove(var);
    }
    cmd.env("OUTPOST_DATABASE_URL", database_url())
        .env("OUTPOST_BROKERS", brokers())
        .env("OUTPOST_REDIS_URL", redis_url())
        .stdin(Stdio::null());
    cmd
}

/// Runs `outpost args...`, expecting success; returns stdout.
pub fn outpost_ok(args: &[&str]) -> String {
    let out = outpost_std().args(args).output().expect("run outpost");
    assert!(
        out.status.success(),
        "outpost {args:?}: {:?}\n--- stderr ---\n{}--- stdout ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

pub async fn pool() -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&database_url())
        .await
        .expect("PostgreSQL must be reachable at OUTPOST_DATABASE_URL (run `make services`)")
}

/// Stages one event with `data` on `key` in its own transaction.
pub async fn stage_one(
    store: &OutboxStore,
    topic: &str,
    key: &str,
    data: serde_json::Value,
) -> OutboxEvent {
    let env = EventEnvelope::new("outpost.ops-test.v1", "outpost-cli-tests", data);
    let ev =
        OutboxEvent::from_envelope(&env, topic, Aggregate::new("test", key)).expect("serialize");
    let mut tx = store.pool().begin().await.expect("begin");
    store
        .stage(&mut tx, &ev)
        .await
        .expect("stage")
        .expect("new row");
    tx.commit().await.expect("commit");
    ev
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: impl Fn() -> String, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {}",
            what()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A scratch directory removed at the end of the test.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("outpost-ops"));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `--service S --schema S --environment testing`: one outbox named after its schema.
pub fn single_service(service: &str) -> Vec<&str> {
    vec![
        "--service",
        service,
        "--schema",
        service,
        "--environment",
        "testing",
    ]
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// GET `url`: status and body, or the connection error as text.
pub async fn http_get(url: &str) -> Result<(u16, String), String> {
    let response = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// An `outpost relay` child process with stderr in a file; killed if the test ends
/// while it runs.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `outpost <args> relay` with `env` on top of [`outpost_std`]'s settings; an
    /// empty value removes the variable (so a config file's value applies).
    pub fn spawn(args: &[&str], env: &[(&str, &str)], log: &Path) -> Self {
        let file = std::fs::File::create(log).expect("relay log file");
        Self::start(args, env, file.into(), log)
    }

    /// Like [`Self::spawn`], with stderr a pipe whose reading end is closed at once (an
    /// operator's `| head`, a log shipper gone): every log line fails to write.
    pub fn spawn_with_stderr_closed(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut daemon = Self::start(args, env, Stdio::piped(), Path::new("/dev/null"));
        drop(daemon.child.stderr.take());
        daemon
    }

    fn start(args: &[&str], env: &[(&str, &str)], stderr: Stdio, log: &Path) -> Self {
        let mut cmd = Command::from(outpost_std());
        cmd.env("OUTPOST_LOG", "info");
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        cmd.args(args)
            .arg("relay")
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        let child = cmd.spawn().expect("spawn outpost relay");
        Self {
            child,
            log: log.to_owned(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test if the relay already exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("relay exited early with {status:?}; log:\n{}", self.log());
        }
    }

    /// Waits until `collector` read every id in `ids`; fails with the relay's log.
    pub async fn delivered(
        &self,
        collector: &outpost::testkit::Collector,
        ids: &[Uuid],
    ) -> Vec<outpost::testkit::Consumed> {
        collector
            .wait_for(ids, Duration::from_secs(60))
            .await
            .unwrap_or_else(|missing| {
                panic!("{missing} events never reached Kafka; log:\n{}", self.log())
            })
    }

    /// SIGTERM, then waits (deadline-bounded) for a clean exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("relay still running");
        StdCommand::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill -TERM");
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("relay did not stop within 60 s; log:\n{}", self.log()))
            .expect("wait for relay")
    }
}

/// Runs `outpost` with `args` (plus `env`), expecting it to fail within `within` with exactly
/// one stderr line that contains every string of `mentions`.
/// Returns the exit code.
pub fn assert_bad_setting(
    args: &[&str],
    env: &[(&str, &str)],
    mentions: &[&str],
    within: Duration,
) -> i32 {
    let mut cmd = outpost_std();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let out = cmd.output().expect("run outpost");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let context = format!(
        "outpost {args:?} env {env:?}: status {:?}, took {took:?}\n--- stderr ---\n{stderr}--- stdout ---\n{stdout}",
        out.status
    );
    assert!(!out.status.success(), "expected failure; {context}");
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "expected a non-zero exit code, not a signal; {context}"
    );
    assert!(!stderr.contains("panicked"), "panic; {context}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "panic note; {context}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one stderr line; {context}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "expected no blank lines either; {context}"
    );
    for m in mentions {
        assert!(
            lines[0].contains(m),
            "stderr should mention {m:?}; {context}"
        );
    }
    assert!(
        took < within,
        "took {took:?}, expected under {within:?}; {context}"
    );
    println!(
        "outpost {args:?} {env:?} -> {:?} in {took:?}: {}",
        out.status.code(),
        lines[0]
    );
    out.status.code().unwrap_or_default()
}
