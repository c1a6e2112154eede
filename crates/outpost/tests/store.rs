//! Outbox store against real PostgreSQL: staging in the caller's transaction, claiming,
//! leases, per-key heads, settling, retention.

mod support;

use std::time::Duration;

use outpost::store::Settlement;
use outpost::OutboxTable;
use uuid::Uuid;

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

    let owner = Uuid::new_v4();
    let claimed = store
        .claim(owner, 10, 10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].event_id, committed.event_id);
    assert_eq!(claimed[0].payload, committed.payload);
    assert_eq!(claimed[0].headers, committed.headers);
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
async fn claims_only_key_heads_and_the_rows_behind_them() {
    let store = support::store().await;
    support::stage_committed(&store, "t", 2, 10).await; // k0: 5 rows, k1: 5 rows
    let a = Uuid::new_v4();
    let b = Uuid::new_v4();
    let lease = Duration::from_secs(30);

    let first = store.claim(a, 1, 3, lease).await.unwrap();
    assert_eq!(first.len(), 3);
    assert!(first.iter().all(|e| e.event_key == first[0].event_key));
    assert!(first.windows(2).all(|w| w[0].id < w[1].id));

    // The other key is free; the first key is held entirely by `a`.
    let second = store.claim(b, 10, 10, lease).await.unwrap();
    assert_eq!(second.len(), 5);
    assert!(second.iter().all(|e| e.event_key != first[0].event_key));
    assert!(store.claim(b, 10, 10, lease).await.unwrap().is_empty());

    // Publishing the head of a's chain does not free the rest of the key for b.
    store
        .settle(a, &[(first[0].id, Settlement::Published)])
        .await
        .unwrap();
    assert!(store.claim(b, 10, 10, lease).await.unwrap().is_empty());

    // Releasing the remainder makes the key claimable again, from its new head.
    let rest: Vec<_> = first[1..]
        .iter()
        .map(|e| (e.id, Settlement::Released))
        .collect();
    store.settle(a, &rest).await.unwrap();
    let again = store.claim(b, 10, 10, lease).await.unwrap();
    assert_eq!(again.first().map(|e| e.id), Some(first[1].id));
    assert_eq!(again.len(), 4);
}

#[tokio::test]
async fn concurrent_claims_never_overlap() {
    let store = support::store().await;
    support::stage_committed(&store, "t", 50, 400).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let owner = Uuid::new_v4();
            let mut mine = Vec::new();
            loop {
                let got = store
                    .claim(owner, 5, 3, Duration::from_secs(30))
                    .await
                    .unwrap();
                if got.is_empty() {
                    break;
                }
                let done: Vec<_> = got.iter().map(|e| (e.id, Settlement::Published)).collect();
                store.settle(owner, &done).await.unwrap();
                mine.extend(got.into_iter().map(|e| e.id));
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
}

#[tokio::test]
async fn lapsed_lease_makes_rows_claimable_again() {
    let store = support::store().await;
    support::stage_committed(&store, "t", 1, 2).await;
    let crashed = Uuid::new_v4();
    let got = store
        .claim(crashed, 10, 10, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    let survivor = Uuid::new_v4();
    assert!(store
        .claim(survivor, 10, 10, Duration::from_secs(5))
        .await
        .unwrap()
        .is_empty());
    let again = support::eventually(Duration::from_secs(5), "lease lapses", || {
        let store = store.clone();
        async move {
            let rows = store
                .claim(survivor, 10, 10, Duration::from_secs(5))
                .await
                .unwrap();
            (!rows.is_empty()).then_some(rows)
        }
    })
    .await;
    assert_eq!(again.len(), 2);
    // The crashed owner can no longer schedule a retry on rows it lost.
    store
        .settle(
            crashed,
            &[(
                again[0].id,
                Settlement::Retry {
                    delay: Duration::from_secs(60),
                    error: "late".into(),
                    budgeted: true,
                },
            )],
        )
        .await
        .unwrap();
    let failures: i32 = sqlx::query_scalar(&format!(
        "SELECT failures FROM {} WHERE id = $1",
        store.table()
    ))
    .bind(again[0].id)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(failures, 0);
}

#[tokio::test]
async fn retry_waits_holds_back_only_its_key_and_dead_rows_are_never_claimed() {
    let store = support::store().await;
    support::stage_committed(&store, "t", 2, 4).await;
    let owner = Uuid::new_v4();
    let lease = Duration::from_secs(30);
    let rows = store.claim(owner, 10, 10, lease).await.unwrap();
    let k0: Vec<_> = rows.iter().filter(|e| e.event_key == "k0").collect();
    let k1: Vec<_> = rows.iter().filter(|e| e.event_key == "k1").collect();
    let outcomes = vec![
        (
            k0[0].id,
            Settlement::Retry {
                delay: Duration::from_secs(60),
                error: "broker down".into(),
                budgeted: false,
            },
        ),
        (k0[1].id, Settlement::Released),
        (
            k1[0].id,
            Settlement::Dead {
                error: "too large".into(),
                budgeted: false,
            },
        ),
        (k1[1].id, Settlement::Released),
    ];
    store.settle(owner, &outcomes).await.unwrap();
    let next = store.claim(owner, 10, 10, lease).await.unwrap();
    assert_eq!(
        next.len(),
        1,
        "k0 waits for its retry; k1 continues past its dead head"
    );
    assert_eq!(next[0].id, k1[1].id);
    assert_eq!(support::count_status(&store, "dead").await, 1);

    // Requeue puts the dead row back at its original position, ahead of its key.
    store
        .settle(owner, &[(next[0].id, Settlement::Released)])
        .await
        .unwrap();
    assert_eq!(store.requeue(None).await.unwrap(), 1);
    let after = store.claim(owner, 10, 10, lease).await.unwrap();
    assert_eq!(after.first().map(|e| e.id), Some(k1[0].id));
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
    let rows = store
        .claim(owner, 10, 10, Duration::from_secs(5))
        .await
        .unwrap();
    let done: Vec<_> = rows.iter().map(|e| (e.id, Settlement::Published)).collect();
    store.settle(owner, &done).await.unwrap();
    let b = store.backlog().await.unwrap();
    assert_eq!((b.pending, b.oldest_pending), (0, Duration::ZERO));

    assert_eq!(
        store.cleanup(Duration::from_secs(3600), 100).await.unwrap(),
        0
    );
    assert_eq!(store.cleanup(Duration::ZERO, 4).await.unwrap(), 4);
    assert_eq!(store.cleanup(Duration::ZERO, 4).await.unwrap(), 2);
    assert_eq!(support::count_status(&store, "published").await, 0);
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
}
