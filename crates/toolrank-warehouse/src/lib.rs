//! The batch path next to the streaming one (SPEC §3 in SQL).
//!
//! Zero-ETL mirrors `AgentTable` into Redshift as `"AgentTable"("PK","SK","value" SUPER)`;
//! the seed's analysis runs there in SQL. This crate ships that SQL ([`sql`]), runs it
//! through the Redshift Data API ([`DataApi`]), reads the tables back as a [`Report`]
//! ([`results`]), keeps a mirror table current where there is no Zero-ETL ([`mirror`]),
//! and compares the warehouse with the streaming sinks ([`reconcile`]).
//!
//! [`Report`]: toolrank_engine::Report

mod data_api;
pub mod mirror;
pub mod reconcile;
pub mod results;
pub mod sql;

pub use data_api::{DataApi, Rows, Target, Value};

/// Why a warehouse call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Data API refused or failed a request (after the SDK's retries).
    #[error("Data API {call}: {message}")]
    Api { call: &'static str, message: String },
    /// The statement ran and failed: the database's message, and the statement.
    #[error("statement failed: {message}\n  in: {sql}")]
    Failed { message: String, sql: String },
    /// The statement was cancelled (by us on timeout, or by someone else).
    #[error("statement {id} aborted: {message}")]
    Aborted { id: String, message: String },
    /// It did not finish within the timeout; it was cancelled.
    #[error("statement {id} did not finish within {secs} s and was cancelled (raise --statement-timeout)")]
    Timeout { id: String, secs: u64 },
    /// A result did not have the columns or types the reader expects.
    #[error("unexpected result: {0}")]
    Shape(String),
}
