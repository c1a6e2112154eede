//! `outpost faults`: fault scenarios under load, each judged against its promise.
//!
//! Every scenario runs on a private tansu broker (the testkit's, so pausing it hurts no
//! one else) and the configured PostgreSQL and Redis, in a schema of its own. It starts
//! `outpost relay` processes, runs `outpost load` as a process, injects its fault while
//! the load runs, then reads the topic back with `outpost verify` and judges the figures.
//! Processes, not tasks: a relay is killed with SIGKILL like a crashed pod.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use outpost::testkit::TansuBroker;
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// One scenario: its name, the promise it checks, and its fault.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    name: &'static str,
    mode: &'static str,
    relays: usize,
    fault: Fault,
    promise: &'static str,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGSTOP the broker for a while.
    BrokerPause,
    /// SIGKILL one relay at a time, on a period, and start it again.
    RelayKills,
    /// SIGKILL the Redis the wake-ups go through (a private one), start it again later.
    RedisDown,
    /// Every tenth event is larger than the relays' producer accepts.
    Poison,
}

const SCENARIOS: [Scenario; 6] = [
    Scenario {
        name: "broker-pause-transactional",
        mode: "transactional",
        relays: 1,
        fault: Fault::BrokerPause,
        promise: "0 missing, 0 order violations",
    },
    Scenario {
        name: "broker-pause-kafka-first",
        mode: "kafka-first",
        relays: 1,
        fault: Fault::BrokerPause,
        promise: "0 missing, 0 order violations (duplicates possible: a direct send that timed out may still land)",
    },
    Scenario {
        name: "broker-pause-outbox-only",
        mode: "outbox-only",
        relays: 1,
        fault: Fault::BrokerPause,
        promise: "0 missing, 0 order violations",
    },
    Scenario {
        name: "relay-kills",
        mode: "outbox-only",
        relays: 3,
        fault: Fault::RelayKills,
        promise: "0 missing, 0 order violations (duplicates possible: rows acked but not recorded by a killed relay)",
    },
    Scenario {
        name: "redis-down",
        mode: "outbox-only",
        relays: 1,
        fault: Fault::RedisDown,
        promise: "0 missing, 0 order violations (wake-ups lost: the relay polls)",
    },
    Scenario {
        name: "poison",
        mode: "outbox-only",
        relays: 1,
        fault: Fault::Poison,
        promise: "every poison event parked, every other event delivered, 0 order violations",
    },
];

/// `--poison-every` of the poison scenario, and the largest message its relays accept.
const POISON_EVERY: u32 = 10;
const RELAY_MAX_BYTES: usize = 4_000;

/// The relays' lease (twice the 3 s delivery timeout, twice).
const LEASE_MS: u64 = 12_000;

/// Durations of one run.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    load: Duration,
    rate: u32,
    fault_at: Duration,
    pause: Duration,
    kill_every: Duration,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                load: Duration::from_secs(6),
                rate: 100,
                fault_at: Duration::from_secs(2),
                pause: Duration::from_secs(3),
                kill_every: Duration::from_millis(1500),
            }
        } else {
            Self {
                load: Duration::from_secs(90),
                rate: 200,
                fault_at: Duration::from_secs(10),
                pause: Duration::from_secs(60),
                kill_every: Duration::from_secs(3),
            }
        }
    }
}

/// Runs the scenarios named in `only` (all when empty); fails when a promise is broken.
pub async fn run(quick: bool, json_out: bool, only: &[String]) -> anyhow::Result<()> {
    for name in only {
        anyhow::ensure!(
            SCENARIOS.iter().any(|s| s.name == name),
            "unknown scenario {name:?}; expected one of: {}",
            SCENARIOS.map(|s| s.name).join(", ")
        );
    }
    let sizes = Sizes::new(quick);
    let mut results = Vec::new();
    let mut broken = Vec::new();
    for scenario in SCENARIOS
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|n| n == s.name))
    {
        if !json_out {
            eprintln!("faults: {} …", scenario.name);
        }
        let result = run_one(scenario, sizes)
            .await
            .with_context(|| format!("scenario {}", scenario.name))?;
        if result["kept"] != true {
            broken.push(scenario.name);
        }
        if !json_out {
            print_result(&result);
        }
        results.push(result);
    }
    if json_out {
        println!("{}", json!({ "quick": quick, "scenarios": results }));
    }
    anyhow::ensure!(broken.is_empty(), "promises broken: {}", broken.join(", "));
    Ok(())
}

fn print_result(r: &Value) {
    let v = &r["verify"];
    println!(
        "{:<28} committed {:>6}  delivered {:>6}  missing {:>3}  duplicates {:>4}  order {:>2}  parked {:>2}  via outbox {:>5}  {}",
        r["scenario"].as_str().unwrap_or_default(),
        v["committed"],
        v["delivered"],
        v["missing"],
        v["duplicates"],
        v["order_violations"],
        v["parked"],
        r["load"]["via_outbox"],
        if r["kept"] == true { "kept" } else { "BROKEN" },
    );
}

async fn run_one(scenario: &Scenario, sizes: Sizes) -> anyhow::Result<Value> {
    let mut broker = TansuBroker::start()
        .await
        .context("faults run on a private tansu broker (set OUTPOST_TANSU_BIN)")?;
    let brokers = broker.brokers();
    let schema = format!("faults_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let logs = std::env::temp_dir().join(&schema);
    std::fs::create_dir_all(&logs)?;
    // Wake-ups go through a Redis of the scenario's own, so stopping it hurts no one else.
    let mut redis = PrivateRedis::start()?;
    let poison = matches!(scenario.fault, Fault::Poison);
    let outpost = Outpost {
        exe: std::env::current_exe()?,
        schema: schema.clone(),
        brokers: brokers.clone(),
        redis_url: redis.url(),
        relay_max_bytes: poison.then_some(RELAY_MAX_BYTES),
    };
    outpost.output(&["migrate"]).await?;
    let mut relays = Vec::new();
    for i in 0..scenario.relays {
        relays.push(outpost.relay(&logs, i)?);
    }
    let started = Instant::now();
    let load = outpost.spawn_load(&logs, scenario.mode, sizes, poison)?;
    tokio::time::sleep(sizes.fault_at).await;
    let fault_started = started.elapsed();
    match scenario.fault {
        Fault::BrokerPause => {
            broker.pause()?;
            tokio::time::sleep(sizes.pause).await;
            broker.resume()?;
        }
        Fault::RelayKills => {
            let until = Instant::now() + sizes.load.saturating_sub(sizes.fault_at);
            let mut next = 0;
            while Instant::now() < until {
                tokio::time::sleep(sizes.kill_every).await;
                let victim = next % relays.len();
                relays[victim].start_kill()?;
                relays[victim].wait().await?;
                relays[victim] = outpost.relay(&logs, victim)?;
                next += 1;
            }
        }
        Fault::RedisDown => {
            redis.kill();
            tokio::time::sleep(sizes.pause).await;
            redis.restart()?;
        }
        Fault::Poison => {}
    }
    let fault_ended = started.elapsed();
    let out = load.wait_with_output().await?;
    anyhow::ensure!(
        out.status.success(),
        "outpost load failed; see {}",
        logs.join("load.log").display()
    );
    let load: Value = serde_json::from_slice(&out.stdout).context("outpost load output")?;
    let ledger = load["ledger"].as_str().unwrap_or_default().to_owned();
    // Long enough for a killed relay's lease to lapse and its keys to be delivered.
    let wait = format!("{}ms", LEASE_MS * 2);
    let verify = outpost
        .output(&["verify", "--ledger", &ledger, "--wait", &wait])
        .await?;
    let verify: Value = serde_json::from_slice(&verify).context("outpost verify output")?;
    for mut relay in relays {
        relay.start_kill()?;
        relay.wait().await?;
    }
    broker.kill();
    redis.kill();
    let kept = if poison {
        // The parked events are the missing ones, and exactly the poison ones.
        let poisoned = load["poisoned"].as_u64().unwrap_or(0);
        poisoned > 0
            && verify["parked"] == poisoned
            && verify["missing"] == poisoned
            && verify["order_violations"] == 0
    } else {
        verify["missing"] == 0 && verify["order_violations"] == 0
    };
    Ok(json!({
        "scenario": scenario.name,
        "mode": scenario.mode,
        "relays": scenario.relays,
        "promise": scenario.promise,
        "fault_started_ms": fault_started.as_millis() as u64,
        "fault_ended_ms": fault_ended.as_millis() as u64,
        "load": load,
        "verify": verify,
        "kept": kept,
        "logs": logs,
    }))
}

/// Runs the `outpost` binary on one scenario's schema and broker; the database and Redis
/// come from the environment, as for this process.
struct Outpost {
    exe: PathBuf,
    schema: String,
    brokers: String,
    redis_url: String,
    /// `message.max.bytes` of the relays' producer (the poison scenario).
    relay_max_bytes: Option<usize>,
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
        cmd
    }

    async fn output(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        let out = self.command(args).output().await?;
        anyhow::ensure!(
            out.status.success(),
            "outpost {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out.stdout)
    }

    fn relay(&self, logs: &std::path::Path, i: usize) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("relay-{i}.log")))?;
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

    fn spawn_load(
        &self,
        logs: &std::path::Path,
        mode: &str,
        sizes: Sizes,
        poison: bool,
    ) -> anyhow::Result<Child> {
        // Its warnings go to a file: a pipe nobody reads during the fault would fill and
        // stall the load.
        let log = std::fs::File::create(logs.join("load.log"))?;
        let duration = format!("{}ms", sizes.load.as_millis());
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
        Ok(self
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?)
    }
}

/// A `redis-server` of one scenario's own, on a free port, without persistence.
struct PrivateRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut redis = Self { port, child: None };
        redis.restart()?;
        Ok(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        let port = self.port.to_string();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "faults start a redis-server of their own (is it installed? run `make services`)",
            )?;
        self.child = Some(child);
        // Ready once it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
