//! Which writes wait for the WAL flush. Staged events are committed with the caller's
//! transaction, durably, and so are claims and renewals: a lease lost in a server crash
//! while its holder still sends would give the key a second owner. The rest of the
//! bookkeeping (settles, hand-backs, drained key rows) commits without waiting for the
//! flush, since losing the last of it only makes rows pending again (store.rs,
//! `NO_FLUSH_WAIT`).
//!
//! A file of its own: it counts the server's WAL syncs, which the other tests of a binary
//! would add to while running beside it (test binaries run one at a time).

mod support;

use std::time::Duration;

use outpost::outbox::store::Settlement;
use outpost::{OutboxStore, OutboxTable};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);
const ROUNDS: usize = 100;

/// The server's WAL syncs so far, with this connection's own counted (a backend reports its
/// statistics when idle, at most once a second unless told to).
async fn wal_syncs(pool: &PgPool) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query_scalar("SELECT wal_sync FROM pg_stat_wal")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn settles_do_not_wait_for_the_flush_and_staging_and_leases_do() {
    support::init_logging();
    // One connection: a setting leaking out of a bookkeeping statement would reach the next
    // business transaction on it.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&support::database_url())
        .await
        .unwrap();
    let store = OutboxStore::new(
        pool.clone(),
        OutboxTable::new(&support::unique("t")).unwrap(),
    );
    store.migrate().await.unwrap();
    let fsync: String = sqlx::query_scalar("SHOW fsync")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        fsync, "on",
        "this test counts WAL syncs: the server needs fsync = on"
    );

    let before = wal_syncs(&pool).await;
    support::stage_committed(&store, "t", 1, ROUNDS).await;
    let staging = wal_syncs(&pool).await - before;
    assert!(
        staging >= ROUNDS as i64,
        "{ROUNDS} staging commits waited for {staging} WAL syncs"
    );

    // Each round: a claim, a renew, a settle; the drained key's row goes at the end.
    let owner = Uuid::new_v4();
    let keys = vec!["k0".to_owned()];
    let before = wal_syncs(&pool).await;
    for round in 0..ROUNDS {
        let claimed = store.claim_keys(owner, &keys, 1, LEASE).await.unwrap();
        let row = &claimed[0].rows[0];
        assert_eq!(store.renew(owner, &keys, LEASE).await.unwrap(), keys);
        let published = Settlement::Published {
            partition: 0,
            offset: round as i64,
        };
        store
            .settle(owner, &[(row.id, published)], &[])
            .await
            .unwrap();
    }
    assert_eq!(store.release_drained(owner, &keys).await.unwrap(), 1);
    let syncs = wal_syncs(&pool).await - before;
    // A statement that waits for the flush takes a sync of its own: the claims and renewals
    // take 2 × ROUNDS; the settles and the delete, had they waited, ROUNDS + 1 more (the
    // WAL writer flushes on its own every 200 ms or so).
    let leases = 2 * ROUNDS as i64;
    assert!(
        syncs >= leases,
        "{leases} claims and renewals waited for {syncs} WAL syncs"
    );
    assert!(
        syncs < leases + ROUNDS as i64 / 2,
        "{leases} claims and renewals and {} settles waited for {syncs} WAL syncs",
        ROUNDS + 1
    );
    assert_eq!(
        support::count_status(&store, "published").await,
        ROUNDS as i64
    );

    // Nothing leaked to the connection: a business transaction on it waits as before.
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(setting, "on");
    let before = wal_syncs(&pool).await;
    support::stage_committed(&store, "t", 1, 20).await;
    let after = wal_syncs(&pool).await - before;
    assert!(
        after >= 20,
        "20 staging commits after the bookkeeping waited for {after} syncs"
    );
}
