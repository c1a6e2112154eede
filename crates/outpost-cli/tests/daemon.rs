//! `outpost relay` as operators run it: one daemon for several services from a config
//! file (environment and flags winning over the file), /healthz, /readyz and /metrics,
//! JSON logs, and no secret in anything it prints or serves.
//!
//! Needs PostgreSQL, Redis and a Kafka broker; run `make services` first.

mod support;

use std::time::Duration;

use outpost::testkit::Collector;
use outpost::{OutboxStore, OutboxTable};
use serde_json::{json, Value};
use support::{
    assert_bad_setting, brokers, database_url, eventually, free_port, http_get, outpost_std, pool,
    single_service, stage_one, unique, Daemon, Scratch,
};
use uuid::Uuid;

const FAST: Duration = Duration::from_secs(10);

/// Polls `url` until it answers `status`; returns the body.
async fn wait_http(url: &str, status: u16, daemon: &mut Daemon) -> String {
    let got = eventually(
        Duration::from_secs(60),
        || {
            format!(
                "{url} to answer {status}; log:\n{}",
                std::fs::read_to_string(&daemon.log).unwrap_or_default()
            )
        },
        || {
            let url = url.to_owned();
            async move { http_get(&url).await.ok().filter(|(s, _)| *s == status) }
        },
    )
    .await;
    daemon.assert_running();
    got.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_relays_every_configured_service() {
    let scratch = Scratch::new();
    let (els, bos) = (unique("ops_els"), unique("ops_bos"));
    let bos_schema = unique("ops_bos_schema");
    let topic = unique("ops_daemon");
    // Never created: without the override the relay would produce elsewhere.
    let staged = format!("{topic}.staged");
    outpost::kafka::producer::create_topic(&brokers(), &topic, 2, FAST)
        .await
        .unwrap();
    // The file's broker list is wrong on purpose: OUTPOST_BROKERS must win.
    let config = scratch.write(
        "outpost.toml",
        &format!(
            r#"
brokers = "127.0.0.1:1"
environment = "testing"
poll_max_ms = 300
batch_size = 50

[[service]]
name = "{els}"
wake = "notify"

[[service]]
name = "{bos}"
schema = "{bos_schema}"
wake = "redis"
poll_max_ms = 200

[service.topics]                 # this service stages under another name
"{staged}" = "{topic}"
"#
        ),
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let log = scratch.0.join("relay.log");
    let mut daemon = Daemon::spawn(
        &[
            "--config",
            &config,
            "--http-addr",
            &addr,
            "--log-format",
            "json",
        ],
        &[],
        &log,
    );
    assert_eq!(
        wait_http(&format!("http://{addr}/healthz"), 200, &mut daemon).await,
        "ok\n"
    );
    let ready = wait_http(&format!("http://{addr}/readyz"), 200, &mut daemon).await;
    for part in [
        "database: ok",
        &format!("broker {}: ok", brokers()),
        "redis",
    ] {
        assert!(
            ready.contains(part),
            "{part:?} missing from /readyz:\n{ready}"
        );
    }

    let pool = pool().await;
    let collector = Collector::start(&brokers(), &topic, 2).unwrap();
    let mut ids = Vec::new();
    for (schema, staged_topic) in [(&els, &topic), (&bos_schema, &staged)] {
        let store = OutboxStore::new(pool.clone(), OutboxTable::new(schema).unwrap());
        // The daemon migrated both tables at start.
        for n in 0..5 {
            ids.push(
                stage_one(&store, staged_topic, &format!("k{n}"), json!({"n": n}))
                    .await
                    .event_id,
            );
        }
    }
    let got = daemon.delivered(&collector, &ids).await;
    let unique_ids: std::collections::HashSet<Uuid> = got.iter().map(|c| c.event_id).collect();
    assert_eq!(unique_ids.len(), ids.len());

    // The broker may hand the messages to the collector before the relay has processed
    // their delivery reports; the counters follow shortly.
    let wanted: Vec<String> = [&els, &bos]
        .iter()
        .map(|service| {
            format!("outpost_events_published_total{{service=\"{service}\",topic=\"{topic}\"}} 5")
        })
        .collect();
    let metrics = eventually(
        Duration::from_secs(30),
        || format!("/metrics to count {wanted:?}"),
        || async {
            let (status, body) = http_get(&format!("http://{addr}/metrics")).await.ok()?;
            (status == 200 && wanted.iter().all(|w| body.contains(w))).then_some(body)
        },
    )
    .await;
    for service in [&els, &bos] {
        assert!(
            metrics.contains(&format!("outpost_backlog{{service=\"{service}\"}}")),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains("outpost_publish_latency_seconds_bucket{"),
        "histograms have buckets:\n{metrics}"
    );

    // `status` reads the same file: both services, by name.
    let out = outpost_std()
        .args(["--config", &config, "status", "--json"])
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    let names: Vec<&str> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    assert_eq!(names, [els.as_str(), bos.as_str()]);

    let exit = daemon.terminate().await;
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(exit.success(), "relay exited with {exit:?}; log:\n{log}");
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    let stopped = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "relay stopped")
        .count();
    assert_eq!(stopped, 2, "each service's relay drains and stops:\n{log}");
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["timestamp"].is_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_what_is_unreachable() {
    let scratch = Scratch::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let (dead_broker, dead_redis) = (
        format!("127.0.0.1:{}", free_port()),
        format!("redis://127.0.0.1:{}", free_port()),
    );
    let service = unique("ops_ready");
    let mut daemon = Daemon::spawn(
        &[
            "--service",
            &service,
            "--schema",
            &service,
            "--wake",
            "redis",
            "--http-addr",
            &addr,
        ],
        &[
            ("OUTPOST_BROKERS", &dead_broker),
            ("OUTPOST_REDIS_URL", &dead_redis),
        ],
        &scratch.0.join("relay.log"),
    );
    assert_eq!(
        wait_http(&format!("http://{addr}/healthz"), 200, &mut daemon).await,
        "ok\n"
    );
    let body = wait_http(&format!("http://{addr}/readyz"), 503, &mut daemon).await;
    assert!(body.contains("database: ok"), "{body}");
    assert!(
        body.contains(&format!("broker {dead_broker}: failing")),
        "{body}"
    );
    assert!(
        body.contains(&format!("redis {dead_redis}: failing")),
        "{body}"
    );
    assert!(daemon.terminate().await.success());
}

#[test]
fn bad_config_files_fail_with_one_line_naming_the_key() {
    let scratch = Scratch::new();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown.toml",
            "pol_max_ms = 5\n",
            &["pol_max_ms", "unknown.toml", "poll_max_ms"],
        ),
        (
            "wake.toml",
            "[[service]]\nname = \"a\"\n[[service]]\nname = \"b\"\nwake = \"redi\"\n",
            &["service[1].wake", "`redis`, `notify`", "wake.toml"],
        ),
        (
            "type.toml",
            "poll_max_ms = \"soon\"\n",
            &["poll_max_ms", "u64"],
        ),
        (
            "schema.toml",
            "[[service]]\nname = \"a\"\nschema = \"Bad-Schema\"\n",
            &["service[0].schema", "lowercase SQL identifier"],
        ),
        (
            "name.toml",
            "[[service]]\nname = \"a b\"\n",
            &["service[0].name", "[A-Za-z0-9_.-]"],
        ),
        (
            "twice.toml",
            "[[service]]\nname = \"a\"\n[[service]]\nname = \"a\"\n",
            &["service[1].name", "used once"],
        ),
        (
            "syntax.toml",
            "[[service]\nname = 1\n",
            &["line 1", "valid TOML"],
        ),
        (
            "env.toml",
            "environment = \"staging\"\n",
            &["environment in", "testing, development, production"],
        ),
        (
            "topic.toml",
            "[[service]]\nname = \"a\"\n[service.topics]\n\"x\" = \"bad topic\"\n",
            &["service[0].topics.\"x\"", "Kafka topic name", "topic.toml"],
        ),
        (
            "batch.toml",
            "batch_size = 0\n",
            &["batch_size", "positive integer"],
        ),
        (
            "addr.toml",
            "http_addr = \"localhost\"\n",
            &["http_addr in", "ip:port"],
        ),
    ];
    for (name, text, mentions) in cases {
        let path = scratch.write(name, text);
        let code = assert_bad_setting(&["--config", &path, "status"], &[], mentions, FAST);
        assert_eq!(code, 2, "{name}");
    }
    let missing = scratch.0.join("missing.toml").display().to_string();
    assert_eq!(
        assert_bad_setting(
            &["--config", &missing, "status"],
            &[],
            &["OUTPOST_CONFIG (--config)", "readable TOML"],
            FAST
        ),
        2
    );

    let two = scratch.write(
        "two.toml",
        "[[service]]\nname = \"a\"\n[[service]]\nname = \"b\"\n",
    );
    let code = assert_bad_setting(
        &["--config", &two, "--service", "c", "status"],
        &[],
        &["OUTPOST_SERVICE (--service)", "a, b"],
        FAST,
    );
    assert_eq!(code, 2);
    let code = assert_bad_setting(
        &["--config", &two, "dead", "show", "1"],
        &[],
        &["OUTPOST_SERVICE (--service)", "row ids are per service"],
        FAST,
    );
    assert_eq!(code, 2);
    // WAL mode's letter ids are per stream too: a requeue without --service touched every
    // service's letter of that id.
    let code = assert_bad_setting(
        &["--config", &two, "wal", "dead", "requeue", "1"],
        &[],
        &["OUTPOST_SERVICE (--service)", "row ids are per service"],
        FAST,
    );
    assert_eq!(code, 2);
    let code = assert_bad_setting(
        &["--config", &two, "--topic", "no-equals-sign", "status"],
        &[],
        &["--topic", "STAGED=PRODUCED"],
        FAST,
    );
    assert_eq!(code, 2);
    // A flag still wins over the file and is named as the flag.
    let env = scratch.write("envok.toml", "environment = \"testing\"\n");
    let code = assert_bad_setting(
        &["--config", &env, "--environment", "staging", "status"],
        &[],
        &["OUTPOST_ENVIRONMENT (--environment)"],
        FAST,
    );
    assert_eq!(code, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_ever_printed_or_served() {
    const DB_SECRET: &str = "pw-Db5ecret";
    const SASL_SECRET: &str = "sasl-5ecret";
    let scratch = Scratch::new();
    // Trust auth ignores the password, so the relay really runs with it in its URL.
    let url_with_password =
        database_url().replacen("postgres@", &format!("postgres:{DB_SECRET}@"), 1);
    assert!(
        url_with_password.contains(DB_SECRET),
        "expected a user in {}",
        database_url()
    );
    let service = unique("ops_secret");
    let config = scratch.write(
        "outpost.toml",
        &format!(
            "database_url = \"{url_with_password}\"\nenvironment = \"testing\"\n\
             [kafka_options]\n\"sasl.username\" = \"outpost\"\n\"sasl.password\" = \"{SASL_SECRET}\"\n\
             [[service]]\nname = \"{service}\"\nwake = \"redis\"\n"
        ),
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let mut seen = String::new();
    for format in ["json", "text"] {
        let log = scratch.0.join(format!("relay-{format}.log"));
        let mut daemon = Daemon::spawn(
            &[
                "--config",
                &config,
                "--http-addr",
                &addr,
                "--log-format",
                format,
            ],
            &[("OUTPOST_LOG", "debug"), ("OUTPOST_DATABASE_URL", "")],
            &log,
        );
        wait_http(&format!("http://{addr}/readyz"), 200, &mut daemon).await;
        for path in ["/metrics", "/healthz", "/readyz"] {
            seen.push_str(&http_get(&format!("http://{addr}{path}")).await.unwrap().1);
        }
        assert!(daemon.terminate().await.success());
        seen.push_str(&std::fs::read_to_string(&log).unwrap());
    }
    // Failures that quote settings.
    let bad_url = database_url()
        .replacen("postgres@", &format!("postgres:{DB_SECRET}@"), 1)
        .replacen("5432", "notaport", 1);
    // A keyword/value connection string; properties librdkafka itself refuses (its message
    // quotes the value).
    let keywords = format!("host=127.0.0.1 user=postgres password={DB_SECRET} dbname=test");
    let jaas = format!("sasl.jaas.config={SASL_SECRET}");
    let pem = format!("ssl.key.pem={SASL_SECRET}");
    for args in [
        vec!["--database-url", bad_url.as_str(), "status"],
        vec!["--kafka-option", "sasl.password", "status"],
        vec!["--database-url", keywords.as_str(), "status"],
        vec!["--kafka-option", jaas.as_str(), "status"],
        vec!["--kafka-option", pem.as_str(), "status"],
    ] {
        let out = outpost_std().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        seen.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    // --help shows settings' environment values, except these.
    let help = outpost_std()
        .arg("--help")
        .env("OUTPOST_DATABASE_URL", &url_with_password)
        .env(
            "OUTPOST_REDIS_URL",
            format!("redis://:{DB_SECRET}@127.0.0.1:6379"),
        )
        .output()
        .unwrap();
    assert!(help.status.success());
    seen.push_str(&String::from_utf8_lossy(&help.stdout));
    let bad_file = scratch.write(
        "bad.toml",
        &format!("database_url = \"{url_with_password}\"\nredis_url = 5\n[kafka_options]\n\"sasl.password\" = \"{SASL_SECRET}\"\n"),
    );
    let out = outpost_std()
        .args(["--config", &bad_file, "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    seen.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(
        seen.contains("debug") || seen.contains("DEBUG"),
        "debug logging was on:\n{seen}"
    );
    for secret in [DB_SECRET, SASL_SECRET] {
        assert!(
            !seen.contains(secret),
            "{secret} printed or served:\n{seen}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_stderr_is_closed_keeps_delivering() {
    let service = unique("ops_nostderr");
    let topic = unique("ops_nostderr");
    outpost::kafka::producer::create_topic(&brokers(), &topic, 1, FAST)
        .await
        .unwrap();
    let mut args = single_service(&service);
    args.extend(["--wake", "none"]);
    // Debug logging: a line to write (and fail to) on every turn, from every thread.
    let mut daemon = Daemon::spawn_with_stderr_closed(&args, &[("OUTPOST_LOG", "debug")]);
    let pool = pool().await;
    let table = format!("{service}.event_outbox");
    eventually(
        Duration::from_secs(30),
        || format!("the relay to migrate {table}"),
        || async {
            sqlx::query_scalar::<_, Option<String>>("SELECT to_regclass($1)::text")
                .bind(&table)
                .fetch_one(&pool)
                .await
                .ok()
                .flatten()
        },
    )
    .await;
    let store = OutboxStore::new(pool.clone(), OutboxTable::new(&service).unwrap());
    let collector = Collector::start(&brokers(), &topic, 1).unwrap();
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            stage_one(&store, &topic, &format!("k{n}"), json!({ "n": n }))
                .await
                .event_id,
        );
    }
    daemon.delivered(&collector, &ids).await;
    daemon.assert_running();
    assert!(daemon.terminate().await.success());
}

#[tokio::test]
async fn settings_refused_at_start_leave_the_database_untouched() {
    let schema = unique("ops_untouched");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for args in [
        vec!["--schema", &schema, "--redis-url", "redis://:pw@", "relay"],
        vec![
            "--schema",
            &schema,
            "--wake",
            "none",
            "--http-addr",
            &addr,
            "relay",
        ],
    ] {
        let out = outpost_std().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}: {out:?}");
    }
    let created: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&schema)
            .fetch_one(&pool().await)
            .await
            .unwrap();
    assert!(
        !created,
        "schema {schema} was created by a relay that refused to start"
    );
}
