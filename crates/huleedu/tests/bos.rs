//! The Batch Orchestrator's registration against real PostgreSQL, publishing to the outbox
//! only: a course code outside the contract's `CourseCode` is refused, and nothing is
//! registered or announced for it.

mod support;

use huleedu::bos::{BatchOrchestrator, BatchRequest, COURSE_CODES};
use huleedu::events::{topic, Topics};
use serde_json::Value;

#[tokio::test]
async fn a_course_code_outside_the_contract_is_refused_and_nothing_is_announced() {
    let publisher = support::outbox_only("bos", "bos-test", 4).await;
    let bos = BatchOrchestrator::new(publisher.clone(), Topics::huleedu());
    bos.migrate().await.unwrap();
    let request = |course_code: &str| BatchRequest {
        expected_essay_count: 1,
        course_code: course_code.into(),
        essay_instructions: "Write.".into(),
        user_id: "teacher".into(),
    };
    let err = bos.register_batch(&request("ENG8")).await.unwrap_err();
    assert!(err.to_string().contains("course_code"), "{err}");
    bos.register_batch(&request("SV2")).await.unwrap();
    let staged: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE event_type = $1",
        publisher.store().table()
    ))
    .bind(topic::BATCH_ESSAYS_REGISTERED)
    .fetch_one(publisher.store().pool())
    .await
    .unwrap();
    assert_eq!(staged, 1, "only the valid registration is announced");
}

/// The codes BOS accepts are the contract's, no more and no fewer.
#[test]
fn the_accepted_course_codes_are_the_contracts() {
    let schema: Value = serde_json::from_str(include_str!(
        "../contract/huleedu/huleedu.batch.essays.registered.v1.schema.json"
    ))
    .unwrap();
    let codes: Vec<&str> = schema["$defs"]["CourseCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(codes, COURSE_CODES);
}
