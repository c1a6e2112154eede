//! The Spellchecker's handler against real PostgreSQL and without Kafka, called directly:
//! requests handled together in one transaction, as a consumer settles a unit of them,
//! with the repeats and the missing text a unit can hold.

mod support;

use huleedu::content::{ContentKind, ContentStore};
use huleedu::els::essay_state;
use huleedu::events::{
    topic, EntityRef, ProcessingStage, SpellcheckCompleted, SpellcheckRequested,
    SystemProcessingMetadata, Topics,
};
use huleedu::spellchecker::Spellchecker;
use huleedu::spelling::Dictionary;
use outpost::{EventEnvelope, Publisher, PublishingHandler, Received};
use uuid::Uuid;

/// The Spellchecker and its content store in a schema of their own, publishing to the
/// outbox only (the test reads the outbox).
async fn spellchecker() -> (Spellchecker, ContentStore, Publisher) {
    let publisher = support::outbox_only("spell", "spellchecker-test", 4).await;
    let content = ContentStore::new(publisher.store().pool().clone());
    content.migrate().await.unwrap();
    let dictionary = Dictionary::parse("the\nquick\nbrown\nfox\njumps\nover\nlazy\ndog");
    let checker = Spellchecker::new(
        publisher.clone(),
        content.clone(),
        dictionary,
        Topics::huleedu(),
    );
    checker.migrate().await.unwrap();
    (checker, content, publisher)
}

fn request(essay: &str, text_storage_id: &str) -> (EventEnvelope<serde_json::Value>, Received) {
    let entity = EntityRef {
        entity_id: essay.into(),
        entity_type: "essay".into(),
        parent_id: Some("batch-1".into()),
    };
    let event_name = "essay.spellcheck.requested";
    let data = SpellcheckRequested {
        event_name: event_name.into(),
        system_metadata: SystemProcessingMetadata::new(
            entity.clone(),
            ProcessingStage::Pending,
            event_name,
        ),
        entity_ref: entity,
        timestamp: chrono::Utc::now(),
        status: essay_state::AWAITING_SPELLCHECK.into(),
        text_storage_id: text_storage_id.into(),
        language: "en".into(),
    };
    support::delivered(topic::ESSAY_SPELLCHECK_REQUESTED, &data)
}

/// The result events in the outbox, in the order they were staged.
async fn results_staged(publisher: &Publisher) -> Vec<SpellcheckCompleted> {
    let store = publisher.store();
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(&format!(
        "SELECT p.payload FROM {} e JOIN {} p USING (id) WHERE e.event_type = $1 ORDER BY id",
        store.table(),
        store.table().payloads()
    ))
    .bind(topic::ESSAY_SPELLCHECK_COMPLETED)
    .fetch_all(store.pool())
    .await
    .unwrap();
    payloads
        .iter()
        .map(|p| {
            let envelope: EventEnvelope<SpellcheckCompleted> = serde_json::from_slice(p).unwrap();
            envelope.data
        })
        .collect()
}

/// A unit holding a request checked before, one repeated, and one whose text is gone:
/// each essay is checked once, in order, its corrected text stored under the result's id,
/// and the missing text reported as that essay's failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_handled_together_check_each_text_once_in_order() {
    let (checker, content, publisher) = spellchecker().await;
    let texts: [&[u8]; 4] = [
        b"the quikc brown fox",
        b"jumps ovr the lazy dog",
        b"the lazzy dog",
        b"brwn fox jumps",
    ];
    let ids = content
        .store_many(ContentKind::ExtractedText, &texts)
        .await
        .unwrap();
    let gone = Uuid::new_v4().to_string();

    // e0 was checked before the unit arrived (its request is redelivered in it).
    let (first, received) = request("e0", &ids[0]);
    let mut tx = publisher.begin().await.unwrap();
    checker.handle(&first, &received, &mut tx).await.unwrap();
    tx.commit_and_dispatch_later().await.unwrap();

    let unit = [
        request("e0", &ids[0]),
        request("e1", &ids[1]),
        request("e2", &ids[2]),
        request("e1", &ids[1]),
        request("e3", &ids[3]),
        request("e4", &gone),
    ];
    let unit: Vec<(EventEnvelope<serde_json::Value>, &Received)> =
        unit.iter().map(|(e, r)| (e.clone(), r)).collect();
    let mut tx = publisher.begin().await.unwrap();
    checker.handle_together(&unit, &mut tx).await.unwrap();
    tx.commit_and_dispatch_later().await.unwrap();

    let results = checker.results().await.unwrap();
    let checked: Vec<(&str, &str, i32)> = results
        .iter()
        .map(|r| (r.essay_id.as_str(), r.status.as_str(), r.corrections))
        .collect();
    let ok = essay_state::SPELLCHECKED_SUCCESS;
    assert_eq!(
        checked,
        [
            ("e0", ok, 1),
            ("e1", ok, 1),
            ("e2", ok, 1),
            ("e3", ok, 1),
            ("e4", essay_state::SPELLCHECK_FAILED, 0)
        ]
    );
    let staged = results_staged(&publisher).await;
    let announced: Vec<(&str, Option<&str>)> = staged
        .iter()
        .map(|r| {
            (
                r.entity_ref.entity_id.as_str(),
                r.corrected_text_storage_id(),
            )
        })
        .collect();
    let recorded: Vec<(&str, Option<&str>)> = results
        .iter()
        .map(|r| (r.essay_id.as_str(), r.corrected_text_storage_id.as_deref()))
        .collect();
    assert_eq!(announced, recorded, "one result event per check, in order");
    let corrected_ids: Vec<&str> = recorded.iter().filter_map(|(_, id)| *id).collect();
    let corrected = content.fetch_texts(&corrected_ids).await.unwrap();
    let bodies: Vec<&str> = corrected_ids
        .iter()
        .map(|id| corrected[*id].as_str())
        .collect();
    assert_eq!(
        bodies,
        [
            "the quick brown fox",
            "jumps over the lazy dog",
            "the lazy dog",
            "brown fox jumps"
        ]
    );
}
