//! A unit's engine: records applied to it, and its state restored from a checkpoint.

use crate::clock::now_secs;
use crate::error::Error;
use crate::summary::Summary;
use toolrank_engine::Engine;
use toolrank_events::{decode_line, Change};
use toolrank_state::Log;

/// Decodes a line (a Kafka payload, a Kinesis record's data) into `engine`, counting in
/// `summary`. Returns the rejected records as (reason, the record's own text when it was
/// one of several).
pub fn apply_line(engine: &mut Engine, line: &[u8], summary: &mut Summary) -> Vec<(String, Option<String>)> {
    engine.set_clock(now_secs());
    let mut bad = Vec::new();
    let result = decode_line(line, &mut |rec| match rec.result {
        Ok(change) => summary.count(engine.apply(&change)),
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
    summary.count(engine.apply(change));
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

/// How a copy of a delta-log unit catches up ([`SinkWriter::log_catch_up`]).
pub enum LogCatchUp {
    /// It is at the head.
    Current,
    /// Apply these deltas to it.
    Deltas(Vec<Vec<u8>>),
    /// Replace it with this log's engine ([`log_engine`]).
    Log(Log),
}
