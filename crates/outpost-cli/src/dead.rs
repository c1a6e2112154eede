//! `outpost dead`: list, show, requeue and purge parked events.

use anyhow::bail;
use outpost::{Error, OutboxAdmin, OutboxStore, ParkedEvent};
use sqlx::PgPool;

use crate::cli::DeadCommand;
use crate::settings::{ServiceSettings, Settings};

/// Runs one dead-letter subcommand.
pub async fn run(settings: &Settings, pool: &PgPool, command: DeadCommand) -> anyhow::Result<()> {
    let store_of = |s: &ServiceSettings| OutboxStore::new(pool.clone(), s.table.clone());
    match command {
        DeadCommand::List { json, limit } => {
            let mut listed = Vec::new();
            for service in &settings.services {
                for event in OutboxAdmin::new(&store_of(service)).parked(limit).await? {
                    listed.push((service.name.as_str(), event));
                }
            }
            if json {
                let rows = listed
                    .iter()
                    .map(|(service, e)| {
                        let mut v = serde_json::to_value(e)?;
                        v["service"] = (*service).into();
                        Ok(v)
                    })
                    .collect::<serde_json::Result<Vec<_>>>()?;
                println!("{}", serde_json::Value::Array(rows));
            } else if listed.is_empty() {
                println!("no parked events");
            } else {
                for (service, e) in &listed {
                    println!(
                        "{service} id={} event_id={} type={} topic={} key={} attempts={} staged={} reason={}",
                        e.id,
                        e.event_id,
                        e.event_type,
                        e.topic,
                        e.event_key,
                        e.attempts,
                        e.created_at.to_rfc3339(),
                        e.reason.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        DeadCommand::Show { id, json } => {
            let service = one_service(settings)?;
            let Some(event) = OutboxAdmin::new(&store_of(service)).show(id).await? else {
                bail!("no parked event with id {id} in {}", service.table);
            };
            if json {
                let mut v = serde_json::to_value(&event)?;
                v["service"] = service.name.clone().into();
                v["payload"] = payload_value(&event.payload);
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_event(&service.name, &event);
            }
        }
        DeadCommand::Requeue { ids, all } => {
            let service = one_service(settings)?;
            let store = store_of(service);
            let n = store.requeue(if all { None } else { Some(&ids) }).await?;
            println!(
                "requeued {n} event(s) in {} ({})",
                service.name, service.table
            );
        }
        DeadCommand::Purge { ids, older_than } => {
            let service = one_service(settings)?;
            let admin = OutboxAdmin::new(&store_of(service));
            let n = match older_than {
                Some(age) => admin.purge_older_than(age).await?,
                None => admin.purge(&ids).await?,
            };
            println!(
                "purged {n} parked event(s) in {} ({})",
                service.name, service.table
            );
        }
    }
    Ok(())
}

/// Row ids belong to one table: with several services, `--service` must say which.
pub(crate) fn one_service(settings: &Settings) -> Result<&ServiceSettings, Error> {
    match settings.services.as_slice() {
        [one] => Ok(one),
        many => Err(Error::config(
            "OUTPOST_SERVICE (--service)",
            format!(
                "one of {} (row ids are per service)",
                many.iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "",
        )),
    }
}

/// The payload as JSON when it is JSON, else as (lossy) text.
fn payload_value(payload: &[u8]) -> serde_json::Value {
    serde_json::from_slice(payload)
        .unwrap_or_else(|_| String::from_utf8_lossy(payload).into_owned().into())
}

fn print_event(service: &str, e: &ParkedEvent) {
    println!("service:        {service}");
    println!("id:             {}", e.id);
    println!("event_id:       {}", e.event_id);
    println!("event_type:     {}", e.event_type);
    println!("aggregate:      {} {}", e.aggregate_type, e.aggregate_id);
    println!("topic:          {}", e.topic);
    println!("key:            {}", e.event_key);
    println!("attempts:       {} ({} counted)", e.attempts, e.failures);
    println!("staged:         {}", e.created_at.to_rfc3339());
    println!("reason:         {}", e.reason.as_deref().unwrap_or("-"));
    println!("headers:");
    for (k, v) in &e.headers {
        println!("  {k}: {v}");
    }
    println!("payload ({} bytes):", e.payload.len());
    match serde_json::from_slice::<serde_json::Value>(&e.payload) {
        Ok(v) => println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        ),
        Err(_) => println!("{}", String::from_utf8_lossy(&e.payload)),
    }
}
