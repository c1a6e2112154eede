//! Outbox store against real PostgreSQL: staging in the caller's transaction, commit order
//! per key, key leases (one owner per key), settling, requeue, retention.

mod support;

use std::time::Duration;

use outpost::outbox::store::{ClaimedKey, KeyLock, KeyRelease, Recorded, Settlement};
use outpost::{OutboxStore, OutboxTable};
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

fn published() -> Settlement {
    Settlement::Published {
        partition: 0,
        offset: 0,
    }
}

fn ids(keys: &[ClaimedKey]) -> Vec<i64> {
    keys.iter()
        .flat_map(|k| k.rows.iter().map(|r| r.id))
        .collect()
}

/// Publishes every claimed row and hands the keys back as drained.
async fn publish_all(store: &OutboxStore, owner: Uuid, keys: &[ClaimedKey]) {
    let rows: Vec<_> = ids(keys).into_iter().map(|id| (id, published())).collect();
    store.settle(owner, &rows, &[]).await.unwrap();
    let names: Vec<String> = keys.iter().map(|k| k.key.clone()).collect();
    store.release_drained(owner, &names).await.unwrap();
}

async fn key_rows(store: &OutboxStore) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {}", store.table().keys()))
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn rollback_stages_nothing_and_commit_stores_exact_bytes() {
    let store = support::store().await;
    let rolled_back = support::event("t", "k", 0);
    let mut tx = store.pool().begin().await.unwrap();
    store.stage(&mut tx, &rolled_back).await.unwrap();
    tx.rollback().await.unwrap();

    let committed = support::event("t", "k", 1);
    let mut tx = store.pool().begin().await.unwrap();
    store.stage(&mut tx, &committed).await.unwrap();
    tx.commit().await.unwrap();

    let claimed = store.claim(Uuid::new_v4(), 10, 10, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let rows = &claimed[0].rows;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].event_id, committed.event_id);
    assert_eq!(rows[0].payload, committed.payload);
    assert_eq!(rows[0].headers, committed.headers);
}

#[tokio::test]
async fn staging_is_idempotent_on_event_id() {
    let store = support::store().await;
    let ev = support::event("t", "k", 0);
    let mut tx = store.pool().begin().await.unwrap();
    assert!(store.stage(&mut tx, &ev).await.unwrap().is_some());
    assert!(store.stage(&mut tx, &ev).await.unwrap().is_none());
    tx.commit().await.unwrap();
    assert_eq!(support::count_status(&store, "pending").await, 1);
}

#[tokio::test]
async fn a_key_has_one_owner_until_it_is_handed_back() {
    let store = support::store().await;
    support::stage_committed(&store, "t", 2, 10).await; // k0: 5 rows, k1: 5 rows
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());

    let first = store.claim(a, 1, 3, LEASE).await.unwrap();
    assert_eq!(first.len(), 1);
    let mine = &first[0];
    assert_eq!(mine.rows.len(), 3, "the first rows of the key");
    assert!(mine.rows.windows(2).all(|w| w[0].id < w[1].id));

    // The other key is free; the first key is held entirely by `a`.
    let second = store.claim(b, 10, 10, LEASE).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].key, mine.key);
    assert_eq!(second[0].rows.len(), 5);
    assert!(store.claim(b, 10, 10, LEASE).await.unwrap().is_empty());

    // Settling some rows does not free the key; `a` reads further rows of it.
    store
        .settle(a, &[(mine.rows[0].id, published())], &[])
        .await
        .unwrap();
    assert!(store.claim(b, 10, 10, LEASE).await.unwrap().is_empty());
    let more = store
        .fetch(a, &[(mine.key.clone(), mine.rows[2].id)], 10)
        .await
        .unwrap();
    assert_eq!(more[0].rows.len(), 2);
    // Another owner reads nothing of a key it does not hold.
    assert!(store
        .fetch(b, &[(mine.key.clone(), 0)], 10)
        .await
        .unwrap()
        .is_empty());

    // Handing the key back makes it claimable again, from its oldest pending row.
    store
        .settle(a, &[], &[KeyRelease::done(mine.key.clone())])
        .await
        .unwrap();
    let again = store.claim(b, 10, 10, LEASE).await.unwrap();
    assert_eq!(again[0].rows.first().map(|e| e.id), Some(mine.rows[1].id));
    assert_eq!(again[0].rows.len(), 4);
}

/// A claim leases its keys in one statement and reads their rows in another: when the
/// read fails, the keys come back without rows, to be handed back as drained ones, not
/// as an error that left them leased to nobody until the lease lapsed.
#[tokio::test]
async fn a_claim_whose_read_fails_hands_its_keys_back() {
    let store = support::store().await;
    support::stage_committed(&store, "t", 3, 3).await;
    let payloads = store.table().payloads();
    let away = format!("{}_away", store.table().table());
    let rename = |sql: String| {
        let store = store.clone();
        async move { sqlx::query(&sql).execute(store.pool()).await.unwrap() }
    };
    // The read joins the payloads; the lease does not touch them.
    rename(format!("ALTER TABLE {payloads} RENAME TO \"{away}\"")).await;
    let owner = Uuid::new_v4();
    let unread = store.claim(owner, 10, 10, LEASE).await.unwrap();
    rename(format!(
        "ALTER TABLE \"{}\".\"{away}\" RENAME TO \"{}_payloads\"",
        store.table().schema(),
        store.table().table()
    ))
    .await;
    assert_eq!(unread.len(), 3, "the keys leased");
    assert!(
        unread.iter().all(|k| k.rows.is_empty()),
        "none of their rows"
    );
    let names: Vec<String> = unread.into_iter().map(|k| k.key).collect();
    store.release_drained(owner, &names).await.unwrap();
    let leased: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE lease_owner IS NOT NULL",
        store.table().keys()
    ))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(leased, 0, "keys handed back");
    let again = store.claim(Uuid::new_v4(), 10, 10, LEASE).await.unwrap();
    assert_eq!(ids(&again).len(), 3, "claimable at once by anyone");
}

/// Every replica migrates when it starts: on a table that is already migrated that must not
/// wait for transactions that staged events (nor hold new staging back meanwhile).
#[tokio::test]
async fn migrating_a_migrated_table_does_not_wait_for_open_staging_transactions() {
    let store = support::store().await;
    let mut open = store.pool().begin().await.unwrap();
    store
        .stage(&mut open, &support::event("t", "k", 0))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), store.migrate())
        .await
        .expect("migrate waited for the open transaction")
        .unwrap();
    open.commit().await.unwrap();
}

#[tokio::test]
async fn concurrent_claims_never_overlap_and_drained_keys_are_deleted() {
    let store = support::store().await;
    support::stage_committed(&store, "t", 50, 400).await;
    let mut tasks = Vec::new();
    for task in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let owner = Uuid::new_v4();
            let mut mine = Vec::new();
            loop {
                // From both ends of the due order, as a relay's two claims at once do.
                let got = if task % 2 == 0 {
                    store.claim(owner, 5, 3, LEASE).await.unwrap()
                } else {
                    store.claim_newest(owner, 5, 3, LEASE).await.unwrap()
                };
                if got.is_empty() {
                    break;
                }
                publish_all(&store, owner, &got).await;
                mine.extend(ids(&got));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: std::collections::HashSet<_> = all.iter().copied().collect();
    assert_eq!(all.len(), 400, "every row claimed");
    assert_eq!(unique.len(), 400, "no row claimed twice");
    assert_eq!(key_rows(&store).await, 0, "drained keys leave no key row");
}

#[tokio::test]
async fn claims_from_the_two_ends_of_the_due_order_take_the_oldest_and_the_newest_keys() {
    let store = support::store().await;
    // One key per transaction: each key row is due from its own commit on.
    support::stage_committed(&store, "t", 6, 6).await;
    let keys = |claimed: Vec<ClaimedKey>| {
        let mut keys: Vec<String> = claimed.into_iter().map(|k| k.key).collect();
        keys.sort();
        keys
    };
    let newest = store
        .claim_newest(Uuid::new_v4(), 2, 1, LEASE)
        .await
        .unwrap();
    assert_eq!(keys(newest), ["k4", "k5"]);
    let oldest = store.claim(Uuid::new_v4(), 2, 1, LEASE).await.unwrap();
    assert_eq!(keys(oldest), ["k0", "k1"]);
    let rest = store
        .claim_newest(Uuid::new_v4(), 6, 1, LEASE)
        .await
        .unwrap();
    assert_eq!(
        keys(rest),
        ["k2", "k3"],
        "leased keys are not claimed again"
    );
}

#[tokio::test]
async fn lapsed_lease_makes_a_key_claimable_again_and_its_old_owner_powerless() {
    let store = support::store().await;
    support::stage_committed(&store, "t", 1, 2).await;
    let crashed = Uuid::new_v4();
    let got = store
        .claim(crashed, 10, 10, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(ids(&got).len(), 2);
    let survivor = Uuid::new_v4();
    assert!(store
        .claim(survivor, 10, 10, LEASE)
        .await
        .unwrap()
        .is_empty());
    let again = support::eventually(Duration::from_secs(10), "lease lapses", || {
        let store = store.clone();
        async move {
            let keys = store.claim(survivor, 10, 10, LEASE).await.unwrap();
            (!keys.is_empty()).then_some(keys)
        }
    })
    .await;
    let again = ids(&again);
    assert_eq!(again.len(), 2);
    // The crashed owner can no longer record a failure, back its key off, or renew; what
    // it tries is not reported as recorded (metrics count what is).
    let recorded = store
        .settle(
            crashed,
            &[(
                again[0],
                Settlement::Retry {
                    delay: Duration::from_secs(60),
                    error: "late".into(),
                    budgeted: true,
                    transient: false,
                    attempts: 0,
                },
            )],
            &[KeyRelease {
                key: "k0".into(),
                backoff: Some(Duration::from_secs(60)),
                transient: false,
            }],
        )
        .await
        .unwrap();
    assert_eq!(recorded, Recorded::default());
    assert_eq!(
        store.renew(crashed, &["k0".into()], LEASE).await.unwrap(),
        Vec::<String>::new()
    );
    let failures: i32 = sqlx::query_scalar(&format!(
        "SELECT failures FROM {} WHERE id = $1",
        store.table()
    ))
    .bind(again[0])
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(failures, 0);
    assert_eq!(
        store
            .renew(survivor, &["k0".into(), "k1".into()], LEASE)
            .await
            .unwrap(),
        vec!["k0".to_owned()]
    );
    // An ack is recorded whoever holds the key, once: the second owner's ack of the same
    // row (both sent it) records nothing more.
    let first = store
        .settle(crashed, &[(again[0], published())], &[])
        .await
        .unwrap();
    assert_eq!(first.published, [again[0]].into());
    let second = store
        .settle(survivor, &[(again[0], published())], &[])
        .await
        .unwrap();
    assert_eq!(second, Recorded::default());
}

/// A failure's settle that runs twice (its first answer was lost, or the relay gave up on
/// the statement while the server still ran it) counts the attempt once: the second finds
/// the row's attempts moved past what was read.
#[tokio::test]
async fn a_failure_settled_twice_counts_once() {
    let store = support::store().await;
    support::stage_committed(&store, "t", 1, 1).await;
    let owner = Uuid::new_v4();
    let keys = store.claim(owner, 10, 10, LEASE).await.unwrap();
    let row = &keys[0].rows[0];
    let failed = [(
        row.id,
        Settlement::Retry {
            delay: Duration::from_secs(60),
            error: "unknown".into(),
            budgeted: true,
            transient: false,
            attempts: row.attempts,
        },
    )];
    let first = store.settle(owner, &failed, &[]).await.unwrap();
    assert_eq!(first.failed, [row.id].into());
    let again = store.settle(owner, &failed, &[]).await.unwrap();
    assert_eq!(again, Recorded::default());
    let (attempts, failures): (i32, i32) = sqlx::query_as(&format!(
        "SELECT attempts, failures FROM {} WHERE id = $1",
        store.table()
    ))
    .bind(row.id)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((attempts, failures), (1, 1));
}

#[tokio::test]
async fn retry_holds_back_only_its_key_and_dead_rows_are_never_claimed() {
    let store = support::store().await;
    support::stage_committed(&store, "t", 2, 4).await;
    let owner = Uuid::new_v4();
    let keys = store.claim(owner, 10, 10, LEASE).await.unwrap();
    let k0 = keys.iter().find(|k| k.key == "k0").unwrap();
    let k1 = keys.iter().find(|k| k.key == "k1").unwrap();
    let rows = vec![
        (
            k0.rows[0].id,
            Settlement::Retry {
                delay: Duration::from_secs(60),
                error: "broker down".into(),
                budgeted: false,
                transient: true,
                attempts: 0,
            },
        ),
        (
            k1.rows[0].id,
            Settlement::Dead {
                error: "too large".into(),
                budgeted: false,
                attempts: 0,
            },
        ),
    ];
    let release = vec![
        KeyRelease {
            key: "k0".into(),
            backoff: Some(Duration::from_secs(60)),
            transient: true,
        },
        KeyRelease::done("k1".into()),
    ];
    store.settle(owner, &rows, &release).await.unwrap();
    let next = store.claim(owner, 10, 10, LEASE).await.unwrap();
    assert_eq!(next.len(), 1, "k0 waits for its retry");
    assert_eq!(
        ids(&next),
        vec![k1.rows[1].id],
        "k1 continues past its dead row"
    );
    assert_eq!(support::count_status(&store, "dead").await, 1);

    // Once the broker answers, keys backing off after a transient failure are due at once.
    assert_eq!(store.pull_forward_transient().await.unwrap(), 1);
    store
        .settle(owner, &[], &[KeyRelease::done("k1".into())])
        .await
        .unwrap();
    let due = store.claim(owner, 10, 10, LEASE).await.unwrap();
    assert_eq!(due.len(), 2);
    store
        .settle(
            owner,
            &[],
            &due.iter()
                .map(|k| KeyRelease::done(k.key.clone()))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();

    // Requeue puts the dead row back at its original position, ahead of its key.
    assert_eq!(store.requeue(None).await.unwrap(), 1);
    let after = store.claim(owner, 10, 10, LEASE).await.unwrap();
    let k1 = after.iter().find(|k| k.key == "k1").unwrap();
    assert_eq!(k1.rows.first().map(|e| e.id), Some(rows[1].0));
}

/// Two writers stage the same key without locking anything of their own: the one that
/// starts second waits for the first to commit, so row ids follow commit order.
#[tokio::test]
async fn writers_of_one_key_commit_in_id_order() {
    let store = support::store().await;
    let first = support::event("t", "k", 0);
    let second = support::event("t", "k", 1);
    let mut t1 = store.pool().begin().await.unwrap();
    let id1 = store.stage(&mut t1, &first).await.unwrap().unwrap();
    let writer = {
        let store = store.clone();
        let second = second.clone();
        tokio::spawn(async move {
            let mut t2 = store.pool().begin().await.unwrap();
            let id2 = store.stage(&mut t2, &second).await.unwrap().unwrap();
            t2.commit().await.unwrap();
            id2
        })
    };
    // The second writer is blocked on the key while the first is open.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!writer.is_finished(), "second writer waits for the first");
    assert_eq!(support::count_status(&store, "pending").await, 0);
    t1.commit().await.unwrap();
    let id2 = writer.await.unwrap();
    assert!(id1 < id2);
}

/// Staging many events in one statement: rows in the order given, exact bytes, an event
/// id staged before (or twice in the call) inserted once, and every key locked until the
/// commit, as one-by-one staging does.
#[tokio::test]
async fn staging_many_at_once_keeps_their_order_and_holds_every_key() {
    let store = support::store().await;
    let before = support::event("t", "b", 9);
    let mut tx = store.pool().begin().await.unwrap();
    store.stage(&mut tx, &before).await.unwrap();
    tx.commit().await.unwrap();

    let events: Vec<_> = (0..6)
        .map(|i| support::event("t", ["b", "a", "c"][i % 3], i))
        .collect();
    let mut all = events.clone();
    all.insert(2, before.clone());
    all.push(events[4].clone());
    let mut tx = store.pool().begin().await.unwrap();
    let inserted = store.stage_all(&mut tx, &all).await.unwrap();
    assert_eq!(
        inserted,
        vec![true, true, false, true, true, true, true, false]
    );
    // A writer of any of those keys waits for this transaction.
    for key in ["a", "b", "c"] {
        let mut other = store.pool().begin().await.unwrap();
        let waiting = tokio::time::timeout(
            Duration::from_millis(300),
            store.stage(&mut other, &support::event("t", key, 100)),
        )
        .await;
        assert!(waiting.is_err(), "a writer of {key} waits for the commit");
    }
    tx.commit().await.unwrap();

    let claimed = store.claim(Uuid::new_v4(), 10, 10, LEASE).await.unwrap();
    let mut rows: Vec<_> = claimed.iter().flat_map(|k| k.rows.iter()).collect();
    rows.sort_by_key(|r| r.id);
    let staged: Vec<Uuid> = rows
        .iter()
        .filter(|r| r.event_id != before.event_id)
        .map(|r| r.event_id)
        .collect();
    let expected: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    assert_eq!(staged, expected, "ids follow the order given");
    for row in rows {
        let event = all.iter().find(|e| e.event_id == row.event_id).unwrap();
        assert_eq!(row.payload, event.payload);
        assert_eq!(row.headers, event.headers);
    }
}

/// With shared key locks (for callers that serialize on their own), an older row can
/// commit after a younger one is already in flight: it still never gets a second owner.
#[tokio::test]
async fn a_late_commit_of_an_older_row_waits_for_the_key_owner() {
    let store = support::store().await.with_key_lock(KeyLock::Shared);
    // The key already has its key row (earlier events), so neither writer waits on it.
    sqlx::query(&format!(
        "INSERT INTO {} (event_key) VALUES ('k')",
        store.table().keys()
    ))
    .execute(store.pool())
    .await
    .unwrap();
    let older = support::event("t", "k", 0);
    let younger = support::event("t", "k", 1);
    let mut late = store.pool().begin().await.unwrap();
    let older_id = store.stage(&mut late, &older).await.unwrap().unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    store.stage(&mut tx, &younger).await.unwrap();
    tx.commit().await.unwrap();

    let (x, y) = (Uuid::new_v4(), Uuid::new_v4());
    let held = store.claim(x, 10, 10, LEASE).await.unwrap();
    assert_eq!(held[0].rows.len(), 1, "only the younger row is committed");
    late.commit().await.unwrap();
    assert!(
        store.claim(y, 10, 10, LEASE).await.unwrap().is_empty(),
        "the key is in flight at x: y must not get the older row"
    );
    // x finishes; the key is not deleted (a row is pending) and goes to the next owner.
    publish_all(&store, x, &held).await;
    let next = store.claim(y, 10, 10, LEASE).await.unwrap();
    assert_eq!(ids(&next), vec![older_id]);
}

/// A writer staging into a key while its owner finds it drained: the key row survives.
#[tokio::test]
async fn a_drained_key_is_kept_while_a_writer_stages_into_it() {
    let store = support::store().await;
    support::stage_committed(&store, "t", 1, 1).await;
    let owner = Uuid::new_v4();
    let held = store.claim(owner, 10, 10, LEASE).await.unwrap();
    let mut writer = store.pool().begin().await.unwrap();
    store
        .stage(&mut writer, &support::event("t", "k0", 9))
        .await
        .unwrap();
    publish_all(&store, owner, &held).await;
    assert_eq!(
        key_rows(&store).await,
        1,
        "key row kept for the open writer"
    );
    writer.commit().await.unwrap();
    let next = store.claim(owner, 10, 10, LEASE).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].rows.len(), 1, "the writer's row is claimable");
}

/// Requeueing a parked row while its key is in flight elsewhere does not give the key a
/// second owner; the row goes out once the key is handed back.
#[tokio::test]
async fn requeue_while_its_key_is_in_flight_waits_for_the_owner() {
    let store = support::store().await;
    support::stage_committed(&store, "t", 1, 3).await;
    let (x, y) = (Uuid::new_v4(), Uuid::new_v4());
    let keys = store.claim(x, 10, 1, LEASE).await.unwrap();
    let parked = keys[0].rows[0].id;
    store
        .settle(
            x,
            &[(
                parked,
                Settlement::Dead {
                    error: "rejected".into(),
                    budgeted: false,
                    attempts: 0,
                },
            )],
            &[],
        )
        .await
        .unwrap();
    let rest = store.fetch(x, &[("k0".into(), parked)], 10).await.unwrap();
    assert_eq!(rest[0].rows.len(), 2, "x goes on with the key");
    assert_eq!(store.requeue(Some(&[parked])).await.unwrap(), 1);
    assert!(store.claim(y, 10, 10, LEASE).await.unwrap().is_empty());
    publish_all(&store, x, &rest).await;
    let next = store.claim(y, 10, 10, LEASE).await.unwrap();
    assert_eq!(ids(&next), vec![parked]);
}

#[tokio::test]
async fn backlog_and_retention() {
    let store = support::store().await;
    assert_eq!(store.backlog().await.unwrap().pending, 0);
    support::stage_committed(&store, "t", 3, 6).await;
    let b = store.backlog().await.unwrap();
    assert_eq!(b.pending, 6);
    assert!(b.oldest_pending > Duration::ZERO);
    let owner = Uuid::new_v4();
    let keys = store.claim(owner, 10, 10, LEASE).await.unwrap();
    publish_all(&store, owner, &keys).await;
    let b = store.backlog().await.unwrap();
    assert_eq!((b.pending, b.oldest_pending), (0, Duration::ZERO));

    assert_eq!(
        store.cleanup(Duration::from_secs(3600), 100).await.unwrap(),
        0
    );
    assert_eq!(store.cleanup(Duration::ZERO, 4).await.unwrap(), 4);
    assert_eq!(store.cleanup(Duration::ZERO, 4).await.unwrap(), 2);
    assert_eq!(support::count_status(&store, "published").await, 0);
    let payloads: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}",
        store.table().payloads()
    ))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(payloads, 0, "retention leaves no payload behind");
}

#[tokio::test]
async fn a_table_made_before_the_payload_table_keeps_its_pending_rows() {
    let pool = support::pool().await;
    let schema = support::unique("legacy");
    let table = OutboxTable::new(&schema).unwrap();
    // The layout of earlier releases: payload and headers in the row itself.
    for ddl in [
        format!("CREATE SCHEMA \"{schema}\""),
        format!(
            "CREATE TABLE {table} ( \
               id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
               event_id UUID NOT NULL UNIQUE, aggregate_type TEXT NOT NULL, \
               aggregate_id TEXT NOT NULL, event_type TEXT NOT NULL, topic TEXT NOT NULL, \
               event_key TEXT NOT NULL, payload BYTEA NOT NULL, \
               headers JSONB NOT NULL DEFAULT '{{}}', correlation_id UUID, \
               status TEXT NOT NULL DEFAULT 'pending', attempts INT NOT NULL DEFAULT 0, \
               failures INT NOT NULL DEFAULT 0, last_error TEXT, \
               created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(), \
               published_at TIMESTAMPTZ)"
        ),
        format!(
            "INSERT INTO {table} (event_id, aggregate_type, aggregate_id, event_type, topic, \
               event_key, payload, headers) \
             VALUES (gen_random_uuid(), 'a', '1', 'e.v1', 't', 'k', '\\x0102'::bytea, \
                     '{{\"h\": \"v\"}}')"
        ),
    ] {
        sqlx::query(&ddl).execute(&pool).await.unwrap();
    }
    let store = outpost::OutboxStore::new(pool.clone(), table);
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    let claimed = store.claim(Uuid::new_v4(), 10, 10, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 1, "the pending row's key is claimable");
    let row = &claimed[0].rows[0];
    assert_eq!(row.payload, vec![1u8, 2]);
    assert_eq!(row.headers.get("h").as_deref(), Some("v"));
    let mut tx = pool.begin().await.unwrap();
    store
        .stage(&mut tx, &support::event("t", "k", 1))
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_payload_table_made_before_it_held_event_ids_keeps_staging_idempotent() {
    let store = support::store().await;
    let (t, p) = (store.table().clone(), store.table().payloads());
    // The layout before the payload table held the event ids: the events table's
    // unique constraint kept staging idempotent.
    for ddl in [
        format!("ALTER TABLE {p} DROP COLUMN event_id"),
        format!("ALTER TABLE {t} ADD CONSTRAINT \"event_outbox_event_id_key\" UNIQUE (event_id)"),
    ] {
        sqlx::query(&ddl).execute(store.pool()).await.unwrap();
    }
    let old = support::event("t", "k", 0);
    let id: i64 = sqlx::query_scalar(&format!(
        "INSERT INTO {t} (event_id, aggregate_type, aggregate_id, event_type, topic, event_key) \
         VALUES ($1, 'a', '1', 'e.v1', 't', 'k') RETURNING id"
    ))
    .bind(old.event_id)
    .fetch_one(store.pool())
    .await
    .unwrap();
    sqlx::query(&format!(
        "INSERT INTO {p} (id, payload) VALUES ($1, '\\x0102'::bytea)"
    ))
    .bind(id)
    .execute(store.pool())
    .await
    .unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();

    let newer = support::event("t", "k", 1);
    let mut tx = store.pool().begin().await.unwrap();
    assert_eq!(
        store.stage(&mut tx, &old).await.unwrap(),
        None,
        "staged before the move"
    );
    let again = [old.clone(), newer.clone(), newer.clone()];
    let staged = store.stage_all(&mut tx, &again).await.unwrap();
    assert_eq!(
        staged,
        vec![false, true, false],
        "inserted by its first occurrence only"
    );
    tx.commit().await.unwrap();
    let claimed = store.claim(Uuid::new_v4(), 10, 10, LEASE).await.unwrap();
    let rows = &claimed[0].rows;
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].id, rows[0].payload.as_slice()),
        (id, &[1u8, 2][..])
    );
    assert_eq!(rows[1].event_id, newer.event_id);
    let unique_on_events: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'u')",
    )
    .bind(t.to_string())
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert!(
        !unique_on_events,
        "a settle no longer updates a unique index"
    );
}

#[tokio::test]
async fn migrate_is_idempotent_and_concurrent_safe() {
    let pool = support::pool().await;
    let table = OutboxTable::new(&support::unique("m")).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let store = outpost::OutboxStore::new(pool.clone(), table.clone());
        tasks.push(tokio::spawn(async move { store.migrate().await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // Keys compare as bytes, whatever the database's collation.
    let collations: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT collation_name::text FROM information_schema.columns \
         WHERE table_schema = $1 AND column_name = 'event_key' ORDER BY table_name",
    )
    .bind(table.schema())
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(collations, vec![Some("C".to_owned()); 2]);
}

#[tokio::test]
async fn handing_back_deletes_drained_keys_and_frees_those_with_rows_left() {
    let store = support::store().await;
    support::stage_committed(&store, "t", 2, 4).await; // k0: 2 rows, k1: 2 rows
    let owner = Uuid::new_v4();
    let claimed = store.claim(owner, 10, 10, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let k0 = claimed.iter().find(|k| k.key == "k0").unwrap();
    let rows: Vec<_> = k0.rows.iter().map(|r| (r.id, published())).collect();
    store.settle(owner, &rows, &[]).await.unwrap();

    let names = vec!["k0".to_owned(), "k1".to_owned()];
    assert_eq!(store.release_drained(owner, &names).await.unwrap(), 1);
    assert_eq!(key_rows(&store).await, 1, "k0's key row is gone");
    // k1 still has both rows pending: it is free again, not deleted and not left leased.
    let other = store.claim(Uuid::new_v4(), 10, 10, LEASE).await.unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].key, "k1");
    assert_eq!(other[0].rows.len(), 2);
}

/// Handing back more keys than PostgreSQL's lock table holds (sized for 64 locks a
/// connection by default; 50,000 in one transaction ran out on this server's defaults):
/// every key is locked while its row is deleted, so one transaction for all of them failed
/// with "out of shared memory", and so did every retry.
#[tokio::test]
async fn handing_back_more_keys_than_the_lock_table_holds_deletes_them_all() {
    let store = support::store().await;
    let owner = Uuid::new_v4();
    let (locks, connections): (String, String) = sqlx::query_as(
        "SELECT current_setting('max_locks_per_transaction'), current_setting('max_connections')",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    let keys = 10 * locks.parse::<usize>().unwrap() * connections.parse::<usize>().unwrap();
    // Key rows left behind by the eager path: leased, nothing pending.
    sqlx::query(&format!(
        "INSERT INTO {} (event_key, lease_owner, lease_until, next_attempt_at) \
         SELECT 'k' || i, $1, now() + interval '1 minute', now() + interval '1 minute' \
         FROM generate_series(1, $2) i",
        store.table().keys()
    ))
    .bind(owner)
    .bind(keys as i64)
    .execute(store.pool())
    .await
    .unwrap();
    let names: Vec<String> = (1..=keys).map(|i| format!("k{i}")).collect();
    let deleted = store.release_drained(owner, &names).await.unwrap();
    assert_eq!(deleted, keys as u64);
    assert_eq!(key_rows(&store).await, 0);
}

/// Rows the scans of `relation` in an `EXPLAIN (ANALYZE, FORMAT JSON)` plan read: what
/// they returned and what their filters removed, over all their loops.
fn rows_read(plan: &serde_json::Value, relation: &str) -> f64 {
    let scan = plan["Node Type"]
        .as_str()
        .is_some_and(|node| node.ends_with("Scan"));
    let here = if scan && plan["Relation Name"] == relation {
        let n = |k: &str| plan[k].as_f64().unwrap_or(0.0);
        (n("Actual Rows") + n("Rows Removed by Filter") + n("Rows Removed by Index Recheck"))
            * n("Actual Loops")
    } else {
        0.0
    };
    let below: f64 = plan["Plans"]
        .as_array()
        .map(|plans| plans.iter().map(|p| rows_read(p, relation)).sum())
        .unwrap_or(0.0);
    here + below
}

/// `items` as a quoted array literal, `'{a,b}'`.
fn pg_array<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("'{{{}}}'", items.join(","))
}

/// A store over `t` on a pool of one connection, whose prepared statements
/// [`prepared_statements`] reads back.
async fn probe_store(t: &OutboxTable) -> (OutboxStore, sqlx::PgPool) {
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&support::database_url())
        .await
        .unwrap();
    (OutboxStore::new(one.clone(), t.clone()), one)
}

/// The statements a store prepared on a one-connection pool, read back from
/// `pg_prepared_statements`.
async fn prepared_statements(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT statement FROM pg_prepared_statements WHERE NOT from_sql")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn settling_and_handing_back_read_the_rows_they_name_not_the_backlog() {
    // Statistics older than the backlog, as after a burst that came before autovacuum
    // looked again: the events table was last analyzed when every row was published, the
    // keys table never. And statements planned for their values, as PostgreSQL plans the
    // first five executions of a statement prepared on each connection.
    const BACKLOG: usize = 20_000;
    const SETTLED: usize = 300;
    let store = support::store().await;
    let t = store.table().clone();
    sqlx::raw_sql(&format!(
        "ALTER TABLE {t} SET (autovacuum_enabled = false); \
         ALTER TABLE {k} SET (autovacuum_enabled = false); \
         WITH staged AS (INSERT INTO {t} (event_id, aggregate_type, aggregate_id, event_type, \
             topic, event_key, status) SELECT gen_random_uuid(), 'a', 'a', 'e', 't', 'k-' || i, \
             'published' FROM generate_series(1, {BACKLOG}) i RETURNING id, event_id) \
         INSERT INTO {p} (id, event_id, payload) SELECT id, event_id, '\\x00' FROM staged; \
         ANALYZE {t}; \
         UPDATE {t} SET status = 'pending'; \
         INSERT INTO {k} (event_key) SELECT 'k-' || i FROM generate_series(1, {BACKLOG}) i",
        k = t.keys(),
        p = t.payloads(),
    ))
    .execute(store.pool())
    .await
    .unwrap();
    let owner = Uuid::new_v4();
    let claimed = store.claim(owner, SETTLED, 1, LEASE).await.unwrap();
    assert_eq!(claimed.len(), SETTLED);
    let ids = pg_array(ids(&claimed));
    let keys = pg_array(claimed.iter().map(|k| format!("\"{}\"", k.key)));
    let zeros = pg_array(std::iter::repeat_n(0, SETTLED));
    let nulls = pg_array(std::iter::repeat_n("NULL", SETTLED));
    let falses = pg_array(std::iter::repeat_n(false, SETTLED));
    // As many free keys, for the eager path's claim of named keys.
    let taken: std::collections::HashSet<&str> = claimed.iter().map(|k| k.key.as_str()).collect();
    let free = pg_array(
        (1..=BACKLOG)
            .map(|i| format!("k-{i}"))
            .filter(|k| !taken.contains(k.as_str()))
            .take(SETTLED)
            .map(|k| format!("\"{k}\"")),
    );

    // The statements as the store sends them.
    let (probe, one) = probe_store(&t).await;
    let nobody = Uuid::new_v4();
    probe.settle(nobody, &[], &[]).await.unwrap();
    probe
        .renew(nobody, &["none".to_owned()], LEASE)
        .await
        .unwrap();
    probe
        .claim_keys(nobody, &["none".to_owned()], 1, LEASE)
        .await
        .unwrap();
    probe
        .release_drained(nobody, &["none".to_owned()])
        .await
        .unwrap();
    let statements = prepared_statements(&one).await;
    one.close().await;
    let find = |pick: &dyn Fn(&str) -> bool| {
        statements
            .iter()
            .find(|s| pick(s))
            .cloned()
            .unwrap_or_else(|| panic!("statement not found among {statements:?}"))
    };
    let settle = find(&|s| s.starts_with("WITH published AS"));
    let delete = find(&|s| s.starts_with("DELETE FROM") && s.contains("NOT EXISTS"));
    let release = find(&|s| s.starts_with("UPDATE") && s.contains("lease_owner = NULL"));
    let renew = find(&|s| s.starts_with("UPDATE") && s.contains("RETURNING event_key"));
    let claim_keys = find(&|s| s.contains("FOR UPDATE OF e"));

    // Explained with the claimed rows published and their keys handed back, then the
    // drained keys deleted; all rolled back.
    let mut conn = store.pool().acquire().await.unwrap();
    sqlx::raw_sql(&format!(
        "SET plan_cache_mode = force_custom_plan; \
         PREPARE probe_settle AS {settle}; PREPARE probe_delete AS {delete}; \
         PREPARE probe_release AS {release}; PREPARE probe_renew AS {renew}; \
         PREPARE probe_claim_keys AS {claim_keys}"
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    let mut explain = async |sql: String| -> serde_json::Value {
        let plan: serde_json::Value =
            sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, FORMAT JSON) {sql}"))
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        plan[0]["Plan"].clone()
    };
    let renewed = explain(format!("EXECUTE probe_renew('{owner}', 30, {keys})")).await;
    let released = explain(format!("EXECUTE probe_release({keys}, '{owner}')")).await;
    let claimed_named = explain(format!(
        "EXECUTE probe_claim_keys('{nobody}', {SETTLED}, 30, 2, {free})"
    ))
    .await;
    let settled = explain(format!(
        "EXECUTE probe_settle({ids}, {zeros}, {zeros}, '{{}}', '{{}}', '{{}}', '{{}}', \
         {keys}, {nulls}, {falses}, '{owner}', '{{}}')"
    ))
    .await;
    let deleted = explain(format!("EXECUTE probe_delete({keys}, '{owner}')")).await;
    tx.rollback().await.unwrap();
    sqlx::raw_sql("DEALLOCATE ALL; RESET plan_cache_mode")
        .execute(&mut *conn)
        .await
        .unwrap();

    let table = t.table();
    let keys_table = format!("{table}_keys");
    let bound = 2.0 * SETTLED as f64;
    for (what, plan, relation) in [
        ("settle, rows", &settled, table),
        ("settle, keys", &settled, keys_table.as_str()),
        ("key-row delete, keys", &deleted, keys_table.as_str()),
        ("key-row delete, rows", &deleted, table),
        ("renewal, keys", &renewed, keys_table.as_str()),
        ("hand-back, keys", &released, keys_table.as_str()),
        (
            "claim of named keys, keys",
            &claimed_named,
            keys_table.as_str(),
        ),
        ("claim of named keys, rows", &claimed_named, table),
    ] {
        let read = rows_read(plan, relation);
        assert!(
            read <= bound,
            "{what}: read {read} rows of {relation} for {SETTLED} named (a {BACKLOG}-row \
             backlog): {plan:#}"
        );
    }
}

#[tokio::test]
async fn a_claim_steps_over_no_key_in_flight() {
    // Keys leased by other relays wait in the keys table for their acks; a claim must find
    // the free ones without reading past each of them (a relay keeps thousands in flight).
    const IN_FLIGHT: usize = 2_000;
    const ASKED: usize = 100;
    let store = support::store().await;
    let t = store.table().clone();
    let all = IN_FLIGHT + 2 * ASKED;
    sqlx::raw_sql(&format!(
        "WITH staged AS (INSERT INTO {t} (event_id, aggregate_type, aggregate_id, event_type, \
             topic, event_key) SELECT gen_random_uuid(), 'a', 'a', 'e', 't', 'k-' || i \
             FROM generate_series(1, {all}) i RETURNING id, event_id) \
         INSERT INTO {p} (id, event_id, payload) SELECT id, event_id, '\\x00' FROM staged; \
         INSERT INTO {k} (event_key) SELECT 'k-' || i FROM generate_series(1, {all}) i; \
         ANALYZE {k}",
        k = t.keys(),
        p = t.payloads(),
    ))
    .execute(store.pool())
    .await
    .unwrap();
    let busy = store
        .claim(Uuid::new_v4(), IN_FLIGHT, 1, LEASE)
        .await
        .unwrap();
    assert_eq!(busy.len(), IN_FLIGHT);

    // The claim statement as the store sends it (this probe leases one key more).
    let (probe, one) = probe_store(&t).await;
    assert_eq!(
        probe
            .claim(Uuid::new_v4(), 1, 1, LEASE)
            .await
            .unwrap()
            .len(),
        1
    );
    let statements = prepared_statements(&one).await;
    one.close().await;
    let claim = statements
        .iter()
        .find(|s| s.starts_with("WITH free") && !s.contains("FOR UPDATE OF e"))
        .unwrap_or_else(|| panic!("no claim statement among {statements:?}"))
        .clone();

    let mut conn = store.pool().acquire().await.unwrap();
    sqlx::raw_sql(&format!("PREPARE probe_claim AS {claim}"))
        .execute(&mut *conn)
        .await
        .unwrap();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    let plan: serde_json::Value = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE probe_claim('{}', {ASKED}, 30)",
        Uuid::new_v4()
    ))
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    sqlx::raw_sql("DEALLOCATE ALL")
        .execute(&mut *conn)
        .await
        .unwrap();
    let plan = &plan[0]["Plan"];
    let keys_table = format!("{}_keys", t.table());
    // The scan for free keys and the lease's look-up of the same keys.
    let read = rows_read(plan, &keys_table);
    assert!(
        read <= 2.0 * ASKED as f64 + 10.0,
        "a claim of {ASKED} keys read {read} key rows beside {IN_FLIGHT} keys in flight: {plan:#}"
    );
}
