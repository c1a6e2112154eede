//! The `outpost` binary run as a child process on one scenario's schema and services.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{Sizes, LEASE_MS, POISON_EVERY};

/// Runs the `outpost` binary on one scenario's schema, broker, Redis and (when the
/// scenario has one) private PostgreSQL; otherwise the database comes from the
/// environment, as for this process.
pub(super) struct Outpost {
    pub exe: PathBuf,
    pub schema: String,
    pub brokers: String,
    pub redis_url: String,
    /// The scenario's own PostgreSQL, when it has one.
    pub database_url: Option<String>,
    /// The topic `load` publishes to, when the scenario made it (else load makes one).
    pub topic: Option<String>,
    /// `message.max.bytes` of the relays' producer (the poison scenario).
    pub relay_max_bytes: Option<usize>,
}

impl Outpost {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args(["--schema", &self.schema, "--service", &self.schema])
            .args(["--environment", "testing"])
            // A killed relay's keys come back when its lease lapses: a short one (the
            // least the delivery timeout allows) keeps the recovery within the run.
            .args([
                "--delivery-timeout-ms",
                "3000",
                "--lease-ms",
                &LEASE_MS.to_string(),
            ])
            .args(args)
            .env("OUTPOST_BROKERS", &self.brokers)
            .env("OUTPOST_REDIS_URL", &self.redis_url)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(url) = &self.database_url {
            cmd.env("OUTPOST_DATABASE_URL", url);
        }
        cmd
    }

    pub async fn output(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        self.output_with(args, &[0]).await
    }

    /// [`output`](Self::output) of a command whose verdict is its output, printed whether
    /// it holds (exit 0) or not (exit 1): `outpost verify`.
    pub async fn verdict(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        let out = self.output_with(args, &[0, 1]).await?;
        anyhow::ensure!(!out.is_empty(), "outpost {args:?} printed no verdict");
        Ok(out)
    }

    async fn output_with(&self, args: &[&str], codes: &[i32]) -> anyhow::Result<Vec<u8>> {
        let out = self.command(args).output().await?;
        anyhow::ensure!(
            out.status.code().is_some_and(|c| codes.contains(&c)),
            "outpost {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out.stdout)
    }

    pub fn relay(&self, logs: &Path, i: usize) -> anyhow::Result<Child> {
        let log = log_file(logs, &format!("relay-{i}.log"))?;
        let max_bytes = self
            .relay_max_bytes
            .map(|b| format!("message.max.bytes={b}"));
        let mut args = vec!["relay"];
        if let Some(option) = &max_bytes {
            args.extend(["--kafka-option", option]);
        }
        Ok(self
            .command(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?)
    }

    /// `outpost load` for `duration` (a restarted one continues the ledger).
    pub fn spawn_load(
        &self,
        logs: &Path,
        mode: &str,
        sizes: Sizes,
        duration: Duration,
        poison: bool,
    ) -> anyhow::Result<Child> {
        // Its warnings go to a file: a pipe nobody reads during the fault would fill and
        // stall the load.
        let log = log_file(logs, "load.log")?;
        let duration = format!("{}ms", duration.as_millis());
        let rate = sizes.rate.to_string();
        let every = POISON_EVERY.to_string();
        let mut args = vec![
            "load",
            "--mode",
            mode,
            "--rate",
            &rate,
            "--duration",
            &duration,
            "--keys",
            "8",
        ];
        if poison {
            args.extend(["--poison-every", &every]);
        }
        if let Some(topic) = &self.topic {
            args.extend(["--into", topic]);
        }
        Ok(self
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?)
    }
}

/// `logs/name`, opened for appending: a restarted process continues its predecessor's log.
fn log_file(logs: &Path, name: &str) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(name))
}
