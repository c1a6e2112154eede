//! `outpost faults`: fault scenarios under load, each judged against its promise.
//!
//! Every scenario runs on a private tansu broker (the testkit's, so pausing it hurts no
//! one else), a private Redis, and the configured PostgreSQL (a private one, made with
//! `initdb`, for the scenario that crashes it), in a schema of its own. It starts
//! `outpost relay` processes, runs `outpost load` as a process, injects its fault while
//! the load runs, then reads the topic back with `outpost verify` and judges the figures.
//! Processes, not tasks: a relay is killed with SIGKILL like a crashed pod.

mod process;
mod redis;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use outpost::testkit::postgres::PrivatePostgres;
use outpost::testkit::TansuBroker;
use serde_json::{json, Value};
use tokio::process::Child;
use uuid::Uuid;

use crate::verify;

use process::Outpost;
use redis::PrivateRedis;

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
    /// Crash the scenario's own PostgreSQL (`pg_ctl stop -m immediate`), start it again later.
    PostgresCrash,
    /// SIGKILL the publishing process (`outpost load`) mid-stream.
    PublisherKill,
    /// SIGKILL the broker and start an empty one on its port later.
    BrokerKill,
}

const SCENARIOS: [Scenario; 10] = [
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
        name: "broker-kill-transactional",
        mode: "transactional",
        relays: 1,
        fault: Fault::BrokerKill,
        promise: "0 missing, 0 order violations, counting what the killed broker had served before it died (its storage is memory)",
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
    Scenario {
        name: "postgres-crash",
        mode: "transactional",
        relays: 1,
        fault: Fault::PostgresCrash,
        promise: "0 missing, 0 order violations (commits that failed while it was down are not in the ledger)",
    },
    Scenario {
        name: "publisher-kill-transactional",
        mode: "transactional",
        relays: 1,
        fault: Fault::PublisherKill,
        promise: "0 missing, 0 in doubt, 0 order violations (the ledger row commits with the event)",
    },
    Scenario {
        name: "publisher-kill-kafka-first",
        mode: "kafka-first",
        relays: 1,
        fault: Fault::PublisherKill,
        promise: "0 missing, 0 order violations; at most 1 publish in doubt per kill (the one in flight: Kafka-first's documented window); duplicates possible (a direct send slower than its deadline is stored in the outbox, and may land too)",
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
        "{:<30} committed {:>6}  delivered {:>6}  missing {:>3}  duplicates {:>4}  order {:>2}  parked {:>4}  in doubt {:>2}  recovery {:>6} ms  {}",
        r["scenario"].as_str().unwrap_or_default(),
        v["committed"],
        v["delivered"],
        v["missing"],
        v["duplicates"],
        v["order_violations"],
        v["parked"],
        v["in_doubt"],
        r["recovery_ms"],
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
    let mut redis = PrivateRedis::start()?;
    let postgres = match scenario.fault {
        Fault::PostgresCrash => Some(PrivatePostgres::start()?),
        _ => None,
    };
    let poison = matches!(scenario.fault, Fault::Poison);
    // A broker killed comes back empty: the kit makes the topic, so it can make it again.
    let topic = match scenario.fault {
        Fault::BrokerKill => Some(make_topic(&brokers, &format!("faults.{schema}")).await?),
        _ => None,
    };
    let read_first = logs.join("read-before-kill.json");
    let outpost = Outpost {
        exe: std::env::current_exe()?,
        schema: schema.clone(),
        brokers: brokers.clone(),
        redis_url: redis.url(),
        database_url: postgres.as_ref().map(PrivatePostgres::url),
        topic: topic.clone(),
        relay_max_bytes: poison.then_some(RELAY_MAX_BYTES),
    };
    outpost.output(&["migrate"]).await?;
    let mut relays = Vec::new();
    for i in 0..scenario.relays {
        relays.push(outpost.relay(&logs, i)?);
    }
    let started = Instant::now();
    let mut load = outpost.spawn_load(&logs, scenario.mode, sizes, sizes.load, poison)?;
    tokio::time::sleep(sizes.fault_at).await;
    let fault_started = started.elapsed();
    let mut kills = 0u32;
    match scenario.fault {
        Fault::BrokerPause => {
            broker.pause()?;
            tokio::time::sleep(sizes.pause).await;
            broker.resume()?;
        }
        Fault::RelayKills => {
            let until = Instant::now() + sizes.load.saturating_sub(sizes.fault_at);
            while Instant::now() < until {
                tokio::time::sleep(sizes.kill_every).await;
                let victim = kills as usize % relays.len();
                relays[victim].start_kill()?;
                relays[victim].wait().await?;
                relays[victim] = outpost.relay(&logs, victim)?;
                kills += 1;
            }
        }
        Fault::RedisDown => {
            redis.kill();
            tokio::time::sleep(sizes.pause).await;
            redis.restart()?;
        }
        Fault::PostgresCrash => {
            let pg = postgres.as_ref().expect("the scenario's PostgreSQL");
            pg.crash()?;
            tokio::time::sleep(sizes.pause).await;
            pg.start_again()?;
        }
        Fault::PublisherKill => {
            // Killed and started again, like a crashing pod; the last one runs to its end.
            let until = started + sizes.load;
            loop {
                load.start_kill()?;
                load.wait().await?;
                kills += 1;
                let left = until.saturating_duration_since(Instant::now());
                load = outpost.spawn_load(&logs, scenario.mode, sizes, left, poison)?;
                if left <= sizes.kill_every {
                    break;
                }
                tokio::time::sleep(sizes.kill_every).await;
            }
        }
        Fault::BrokerKill => {
            // Its storage is memory: what it served dies with it. Freeze every publisher,
            // read all the broker holds (acked means written, so nothing acked is left
            // unread), then kill it and let the publishers run on into the outage.
            let topic = topic.as_deref().expect("the scenario's topic");
            let mut publishers: Vec<&Child> = relays.iter().collect();
            publishers.push(&load);
            signal(&publishers, "-STOP")?;
            let served = verify::read_ids(&brokers, topic, Duration::from_secs(1)).await;
            broker.kill();
            signal(&publishers, "-CONT")?;
            std::fs::write(&read_first, serde_json::to_vec(&served?)?)?;
            tokio::time::sleep(sizes.pause).await;
            broker.restart().await?;
            make_topic(&brokers, topic).await?;
        }
        Fault::Poison => {}
    }
    let fault_ended = started.elapsed();
    let fault_ended_ms = unix_ms();
    let out = load.wait_with_output().await?;
    anyhow::ensure!(
        out.status.success(),
        "outpost load failed; see {}",
        logs.join("load.log").display()
    );
    // After publisher kills, this is the last publisher's report; verify judges the
    // whole ledger.
    let load: Value = serde_json::from_slice(&out.stdout).context("outpost load output")?;
    let ledger = format!("{schema}.outpost_load_ledger");
    // Long enough for a killed relay's lease to lapse and its keys to be delivered.
    let wait = format!("{}ms", LEASE_MS * 2);
    let ended = fault_ended_ms.to_string();
    let mut args = vec!["verify", "--ledger", &ledger, "--wait", &wait];
    if !poison {
        args.extend(["--fault-ended-ms", &ended]);
    }
    let read_first = read_first.display().to_string();
    if matches!(scenario.fault, Fault::BrokerKill) {
        args.extend(["--read-first", &read_first]);
    }
    let verify = outpost.verdict(&args).await?;
    let verify: Value = serde_json::from_slice(&verify).context("outpost verify output")?;
    for mut relay in relays {
        relay.start_kill()?;
        relay.wait().await?;
    }
    broker.kill();
    redis.kill();
    drop(postgres);
    let clean = verify["missing"] == 0 && verify["order_violations"] == 0;
    let kept = match scenario.fault {
        // The parked events are the missing ones, and exactly the poison ones.
        Fault::Poison => {
            let poisoned = load["poisoned"].as_u64().unwrap_or(0);
            poisoned > 0
                && verify["parked"] == poisoned
                && verify["missing"] == poisoned
                && verify["order_violations"] == 0
        }
        Fault::PublisherKill if scenario.mode == "kafka-first" => {
            clean
                && verify["in_doubt"]
                    .as_u64()
                    .is_some_and(|n| n <= u64::from(kills))
        }
        Fault::PublisherKill => clean && verify["in_doubt"] == 0,
        _ => clean,
    };
    Ok(json!({
        "scenario": scenario.name,
        "mode": scenario.mode,
        "relays": scenario.relays,
        "promise": scenario.promise,
        "fault_started_ms": fault_started.as_millis() as u64,
        "fault_ended_ms": fault_ended.as_millis() as u64,
        "recovery_ms": verify["recovery_ms"],
        "kills": kills,
        "load": load,
        "verify": verify,
        "kept": kept,
        "logs": logs,
    }))
}

/// Creates `topic` with the partitions `outpost load` gives its own; one that exists
/// already (a producer's metadata request may have made it) is fine.
async fn make_topic(brokers: &str, topic: &str) -> anyhow::Result<String> {
    outpost::kafka::producer::create_topic(
        brokers,
        topic,
        crate::load::PARTITIONS,
        Duration::from_secs(10),
    )
    .await
    .with_context(|| format!("cannot create topic {topic}"))?;
    Ok(topic.to_owned())
}

/// Sends `signal` (`-STOP`, `-CONT`) to each process.
pub(crate) fn signal(processes: &[&Child], signal: &str) -> anyhow::Result<()> {
    for pid in processes.iter().filter_map(|p| p.id()) {
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
    }
    Ok(())
}

/// Now, in Unix milliseconds (what message timestamps are in).
fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
