//! A unit's engine: records applied to it, and its state restored from a checkpoint.

use crate::clock::now_secs;
use crate::error::Error;
use crate::summary::Summary;
use std::cell::Cell;
use toolrank_engine::{AggregateCopy, Engine, Shards};
use toolrank_events::{decode_line, Change};
use toolrank_state::Log;

/// Decodes a line (a Kafka payload, a Kinesis record's data) into `engine`, counting in
/// `summary`. Returns the rejected records as (reason, the record's own text when it was
/// one of several).
pub fn apply_line(engine: &mut Engine, line: &[u8], summary: &mut Summary) -> Vec<(String, Option<String>)> {
    engine.set_clock(now_secs());
    let mut bad = Vec::new();
    let result = decode_line(line, &mut |rec| match rec.result {
        Ok(change) => applying(|| summary.count(engine.apply(&change)), &change),
        Err(e) => bad.push((format!("record {}: {e}", rec.index.unwrap_or(0)), rec.raw.map(str::to_owned))),
    });
    if let Err(e) = result {
        bad.push((e.to_string(), None));
    }
    bad
}

/// Applies one already decoded change.
pub fn apply_change(engine: &mut Engine, change: &Change<'_>, summary: &mut Summary) {
    engine.set_clock(now_secs());
    applying(|| summary.count(engine.apply(change)), change);
}

thread_local! {
    /// Set while the engine applies a change (see [`guard`]).
    static APPLYING: Cell<bool> = const { Cell::new(false) };
}

/// Runs the engine's `apply` of `change`, noting it for [`guard`].
fn applying<T>(apply: impl FnOnce() -> T, change: &Change<'_>) -> T {
    APPLYING.set(true);
    injected::panic_on(change);
    let out = apply();
    APPLYING.set(false);
    out
}

/// A record whose decoding or applying panicked: a defect met by one record, which is
/// dead-lettered with [`reason`](Self::reason) while the consumer goes on.
#[derive(Debug)]
pub struct Panicked {
    /// The panic's message (at most 200 characters).
    pub message: String,
    /// The engine was applying the record's change when it panicked: the unit's state may
    /// be half changed, so its owner restores the unit from its checkpoint.
    pub engine_touched: bool,
}

impl Panicked {
    /// The dead letter's reason.
    pub fn reason(&self) -> String {
        format!("panicked while {}: {}", if self.engine_touched { "applying" } else { "decoding" }, self.message)
    }
}

/// Runs `work` on one record (decoding and applying it); a panic in it is caught and
/// counted (`toolrank_record_panics_total`), for the caller to dead-letter the record.
pub fn guard<T>(work: impl FnOnce() -> T) -> Result<T, Panicked> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|payload| {
        let engine_touched = APPLYING.replace(false);
        let message = payload.downcast_ref::<&str>().map(|s| (*s).to_owned()).or_else(|| payload.downcast_ref::<String>().cloned());
        let message: String = message.unwrap_or_else(|| "no message".into()).chars().take(200).collect();
        toolrank_metrics::counter!("toolrank_record_panics_total").increment(1);
        Panicked { message, engine_touched }
    })
}

/// A panic on purpose, for the tests of [`guard`]'s callers: with the `fault-injection`
/// feature, applying a change to the partition key in `TOOLRANK_FAULT_PANIC_PK` panics.
mod injected {
    use toolrank_events::Change;

    #[cfg(feature = "fault-injection")]
    pub(super) fn panic_on(change: &Change<'_>) {
        static PK: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        if PK.get_or_init(|| std::env::var("TOOLRANK_FAULT_PANIC_PK").ok()).as_deref() == Some(change.pk.as_ref()) {
            panic!("injected for a test (TOOLRANK_FAULT_PANIC_PK)");
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    pub(super) fn panic_on(_: &Change<'_>) {}
}

/// Restores a unit's engine from its checkpoint (empty: a new unit).
pub fn restore(scope: &str, state: &[u8]) -> Result<Engine, Error> {
    if state.is_empty() {
        return Ok(Engine::new());
    }
    Engine::restore(state).map_err(|source| Error::Snapshot { scope: scope.to_owned(), source })
}

/// Applies a log's `deltas` to `engine`, in order.
pub fn apply_deltas(scope: &str, engine: &mut Engine, deltas: &[Vec<u8>]) -> Result<(), Error> {
    deltas.iter().try_for_each(|d| engine.apply_delta(d)).map_err(|source| Error::Snapshot { scope: scope.to_owned(), source })
}

/// The engine a whole delta log holds: its base with its deltas applied.
pub fn log_engine(scope: &str, log: &Log) -> Result<Engine, Error> {
    let mut engine = restore(scope, &log.base)?;
    apply_deltas(scope, &mut engine, &log.deltas)?;
    Ok(engine)
}

/// The aggregates a whole delta log holds, without its sessions (a copy of a unit another
/// consumer owns), keeping the patterns of `shards`' users only.
pub fn log_copy(scope: &str, log: &Log, shards: Option<&Shards>) -> Result<AggregateCopy, Error> {
    AggregateCopy::from_log(&log.base, &log.deltas, shards).map_err(|source| Error::Snapshot { scope: scope.to_owned(), source })
}

/// What [`SinkWriter::log_catch_up`] reads of a base when it reads a whole log.
#[derive(Clone, Copy, Debug)]
pub enum BaseRead {
    /// All of it, sessions included: to restore the unit's engine ([`log_engine`]).
    Whole,
    /// Its catalog and aggregates alone, where its manifest says where they end: for a
    /// copy ([`log_copy`]), which keeps nothing else.
    Figures,
}

/// How a copy of a delta-log unit catches up ([`SinkWriter::log_catch_up`]).
pub enum LogCatchUp {
    /// It is at the head.
    Current,
    /// Apply these deltas to it.
    Deltas(Vec<Vec<u8>>),
    /// Replace it with this log's engine ([`log_engine`]; a copy's: [`log_copy`]).
    Log(Log),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_caught_and_says_whether_the_engine_was_touched() {
        let decoding = guard(|| -> u8 { panic!("bad input") }).unwrap_err();
        assert_eq!((decoding.engine_touched, decoding.reason()), (false, "panicked while decoding: bad input".to_owned()));
        let change_line = include_str!("../../../examples/seed-sample.jsonl").lines().next().unwrap().as_bytes();
        let mut engine = Engine::new();
        let mut summary = Summary::default();
        let applying_panic = guard(|| {
            decode_line(change_line, &mut |rec| applying(|| panic!("{}", "x".repeat(300)), &rec.result.expect("decodes"))).unwrap();
        })
        .unwrap_err();
        assert!(applying_panic.engine_touched && applying_panic.message.len() == 200, "{applying_panic:?}");
        // The flag does not outlive the panic: the next record is a fresh start.
        assert!(guard(|| apply_line(&mut engine, change_line, &mut summary)).unwrap().is_empty());
        assert!(!APPLYING.get());
        assert_eq!(guard(|| 7).unwrap(), 7);
    }
}
