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

/// A statement by its kind and the table it works on (`INSERT INTO toolrank_staging`,
/// `SELECT FROM agent_score_summary`), without its literals: what an error may show.
pub fn statement_name(sql: &str) -> String {
    let words: Vec<&str> = sql
        .split(|c: char| c.is_whitespace() || c == '(' || c == ',' || c == ';')
        .filter(|w| !w.is_empty() && !["IF", "NOT", "EXISTS"].contains(&w.to_ascii_uppercase().as_str()))
        .collect();
    let Some(verb) = words.first() else { return "(empty statement)".to_owned() };
    let target = words.windows(2).find(|w| ["INTO", "FROM", "TABLE", "UPDATE", "VIEW"].contains(&w[0].to_ascii_uppercase().as_str()));
    let target = target.map(|w| (w[0], w[1])).filter(|(_, name)| !name.starts_with('\''));
    match target {
        Some((keyword, name)) if keyword.eq_ignore_ascii_case(verb) => format!("{} {name}", verb.to_ascii_uppercase()),
        Some((keyword, name)) => format!("{} {} {name}", verb.to_ascii_uppercase(), keyword.to_ascii_uppercase()),
        None => verb.to_ascii_uppercase(),
    }
}

/// Why a warehouse call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Data API refused or failed a request (after the SDK's retries).
    #[error("Data API {call}: {message}")]
    Api { call: &'static str, message: String },
    /// The statement ran and failed: the database's message, and the statement by name
    /// ([`statement_name`]): its text carries the rows' values, which stay out of errors
    /// and logs.
    #[error("statement failed: {message}\n  in: {statement}")]
    Failed { message: String, statement: String },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_is_named_by_its_kind_and_table_never_by_its_values() {
        let cases = [
            ("INSERT INTO toolrank_staging (pk, sk) VALUES ('USR000001', 'secret prompt')", "INSERT INTO toolrank_staging"),
            ("  select a, b from agent_score_summary where x = 'v'", "SELECT FROM agent_score_summary"),
            ("DELETE FROM \"AgentTable\" WHERE \"PK\" = 'U1'", "DELETE FROM \"AgentTable\""),
            ("CREATE TABLE IF NOT EXISTS t (x INT)", "CREATE TABLE t"),
            ("UPDATE t SET v = 'x'", "UPDATE t"),
            ("BEGIN", "BEGIN"),
            ("", "(empty statement)"),
        ];
        for (sql, name) in cases {
            assert_eq!(statement_name(sql), name, "{sql}");
        }
        let e = Error::Failed { message: "duplicate key".into(), statement: statement_name(cases[0].0) };
        assert!(!e.to_string().contains("secret prompt"), "{e}");
    }
}
