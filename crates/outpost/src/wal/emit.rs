//! Staging in WAL mode: the event becomes a transactional logical message of the caller's
//! transaction, so it exists exactly when the transaction commits.

use sqlx::{Postgres, Transaction};

use super::message::encode;
use super::WalStream;
use crate::error::{Error, EventContext, Result};
use crate::event::envelope::OutboxEvent;

/// Writes `event` into the WAL inside the caller's transaction. Nothing is sent to Kafka
/// and nothing is visible until the caller commits; a rollback leaves no trace. The
/// stream's [`WalRelay`](super::WalRelay) delivers it after the commit, after every event
/// of transactions that committed earlier.
///
/// Only `transactional => true` is ever used: a non-transactional message would survive a
/// rollback.
///
/// # Errors
/// [`Error::OutboxStorage`] (operation `emit`) when the statement fails; roll back.
pub async fn emit(
    tx: &mut Transaction<'_, Postgres>,
    stream: &WalStream,
    event: &OutboxEvent,
) -> Result<()> {
    emit_all(tx, stream, std::slice::from_ref(event)).await
}

/// Writes `events` into the WAL, in order, with one statement (see [`emit`]).
///
/// # Errors
/// [`Error::OutboxStorage`] (operation `emit`) when the statement fails; roll back.
pub async fn emit_all(
    tx: &mut Transaction<'_, Postgres>,
    stream: &WalStream,
    events: &[OutboxEvent],
) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let contents: Vec<Vec<u8>> = events.iter().map(encode).collect();
    // unnest yields in array order and the scan evaluates the call row by row, so the
    // messages follow the slice's order in the WAL.
    sqlx::query("SELECT pg_logical_emit_message(true, $1, c) FROM unnest($2::bytea[]) AS m(c)")
        .bind(stream.prefix())
        .bind(&contents)
        .execute(&mut **tx)
        .await
        .map_err(|e| {
            let first = &events[0];
            Error::storage_with(
                "emit",
                EventContext {
                    aggregate_type: Some(first.aggregate_type.clone()),
                    aggregate_id: Some(first.aggregate_id.clone()),
                    event_type: Some(first.event_type.clone()),
                    topic: Some(first.topic.clone()),
                    correlation_id: Some(first.correlation_id),
                },
                e,
            )
        })?;
    Ok(())
}
