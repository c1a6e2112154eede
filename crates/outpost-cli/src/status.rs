//! `outpost status`: each service's pending count, oldest pending age, parked count and
//! publications in the last minute.

use outpost::{OutboxAdmin, OutboxStatus, OutboxStore};
use serde::Serialize;
use sqlx::PgPool;

use crate::settings::Settings;

/// One service's line in the report.
#[derive(Debug, Serialize)]
struct ServiceStatus {
    service: String,
    table: String,
    #[serde(flatten)]
    status: OutboxStatus,
}

/// Prints the status of every selected service, as text or one JSON object.
pub async fn run(settings: &Settings, pool: &PgPool, json: bool) -> anyhow::Result<()> {
    let mut services = Vec::with_capacity(settings.services.len());
    for service in &settings.services {
        let store = OutboxStore::new(pool.clone(), service.table.clone());
        services.push(ServiceStatus {
            service: service.name.clone(),
            table: service.table.to_string(),
            status: OutboxAdmin::new(&store).status().await?,
        });
    }
    if json {
        println!("{}", serde_json::json!({ "services": services }));
        return Ok(());
    }
    for s in &services {
        println!(
            "{} {}: pending {} (oldest {:.3} s), dead {}, published in the last minute {}",
            s.service,
            s.table,
            s.status.pending,
            s.status.oldest_pending.as_secs_f64(),
            s.status.dead,
            s.status.published_last_minute
        );
    }
    Ok(())
}
