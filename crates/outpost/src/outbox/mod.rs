//! The outbox store: the events, payloads and keys tables of one service, and all SQL
//! against them (staging in the caller's transaction, key leases, settling, operator views).

pub mod admin;
pub(crate) mod bounded;
pub(crate) mod ddl;
pub mod headers;
pub(crate) mod sql_api;
pub mod store;
pub mod table;
