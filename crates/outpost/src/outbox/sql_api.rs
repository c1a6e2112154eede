//! The pieces every SQL staging function shares (`"schema".stage` in table mode,
//! `"schema".emit` in WAL mode), so both accept and refuse the same arguments and send the
//! same headers.

/// PL/pgSQL declarations: the event id (given or new) and the event type (argument, else
/// the `event_type` header, else empty).
pub(crate) const DECLARE: &str = "eid uuid := coalesce(event_id, gen_random_uuid()); \
     kind text := coalesce(event_type, headers->>'event_type', '');";

/// The headers sent: the caller's, with `event_id` and (when known) `event_type` set from
/// the arguments, as the Rust envelope does.
pub(crate) const HEADERS: &str = "headers || jsonb_build_object('event_id', eid::text) \
     || CASE WHEN kind = '' THEN '{}'::jsonb ELSE jsonb_build_object('event_type', kind) END";

/// Argument checks of function `f`: topic, key and payload are required (SQLSTATE 22004);
/// headers must be a JSON object of strings (22023).
pub(crate) fn checks(f: &str) -> String {
    format!(
        "IF topic IS NULL OR topic = '' OR event_key IS NULL OR payload IS NULL THEN \
           RAISE EXCEPTION '{f}: topic, event_key and payload are required' \
             USING ERRCODE = '22004'; \
         END IF; \
         IF headers IS NULL OR jsonb_typeof(headers) <> 'object' OR EXISTS ( \
              SELECT 1 FROM jsonb_each(headers) h WHERE jsonb_typeof(h.value) <> 'string') THEN \
           RAISE EXCEPTION '{f}: headers must be a JSON object of strings, got %', headers \
             USING ERRCODE = '22023'; \
         END IF;"
    )
}
