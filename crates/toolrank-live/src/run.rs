//! The loop every long-running consumer runs: read and apply, flush the sinks, checkpoint,
//! each in its turn; then, at a stop or once the input is drained, the last checkpoints
//! and the sinks' final write from everybody's checkpoints.
//!
//! A consumer brings its input as a [`Source`]: the units it owns (a Kafka partition, a
//! shard lineage, a Lambda bucket), each an engine checkpointed with its input position.
//! The loop decides when each step runs; the source decides what a step means for its
//! input. A source whose input arrives in invocations (Lambda) runs the same steps once
//! per invocation ([`invoke`]).

use crate::config::Pacing;
use crate::error::Error;
use crate::writer::SinkWriter;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use toolrank_engine::Engine;
use tracing::{debug, info};

/// A live input as the loop sees it.
pub trait Source {
    type Error: From<Error>;

    /// Takes on and gives up units (a group's assignment, leases), claiming their
    /// checkpoints through `writer`. Called at every turn: the source paces itself.
    fn sync(&mut self, _writer: &mut SinkWriter) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Reads what is waiting into the owned units' engines; returns the records read.
    fn read(&mut self, writer: &mut SinkWriter) -> Result<usize, Self::Error>;

    /// The engines of the units this consumer owns.
    fn engines(&mut self) -> Vec<&mut Engine>;

    /// The checkpoint scopes of the units other consumers own.
    fn others(&self) -> Vec<String>;

    /// Whether this consumer knows its units yet: the sink lease waits for that, or the
    /// units it is about to claim would be loaded as other consumers' copies first.
    fn settled(&self) -> bool {
        true
    }

    /// Before each flush: tells the writer when the input has nothing waiting
    /// ([`SinkWriter::caught_up`]) if reading does not show it.
    fn before_flush(&mut self, _writer: &mut SinkWriter) {}

    /// Starts saving changed units with their positions and collects finished saves;
    /// with `all`, saves every changed unit and waits.
    fn checkpoint(&mut self, writer: &mut SinkWriter, all: bool) -> Result<(), Self::Error>;

    /// Whether a unit has changes its checkpoint lacks.
    fn dirty(&self) -> bool;

    /// The time between two checkpoint turns, given the interval a backlog stretched.
    fn checkpoint_every(&self, interval: Duration) -> Duration {
        interval
    }

    /// Asked once nothing was read for `until_idle`: whether every unit, including
    /// those other consumers own, is read to the input's end.
    fn drained(&mut self, writer: &mut SinkWriter) -> Result<bool, Self::Error>;

    /// After a turn that read nothing: where a source waits, or looks at what it does
    /// not read itself (the Kafka consumer, at whether its group reads every partition).
    fn idle(&mut self, _writer: &mut SinkWriter) -> Result<(), Self::Error> {
        Ok(())
    }

    /// After the sinks' final write: gives up what the source holds.
    fn release(&mut self, _writer: &mut SinkWriter) {}
}

/// Runs `source` until `stop` is set or, with `until_idle`, its input is drained; then
/// checkpoints it and writes the sinks a last time.
pub fn run<S: Source>(source: &mut S, writer: &mut SinkWriter, pacing: &Pacing, stop: &AtomicBool) -> Result<(), S::Error> {
    let long_ago = Instant::now() - Duration::from_secs(3600);
    let (mut last_record, mut last_flush, mut last_checkpoint, mut last_refresh) = (Instant::now(), Instant::now(), Instant::now(), long_ago);
    let mut checkpoint_every = pacing.checkpoint_interval;
    loop {
        if stop.load(Ordering::Relaxed) {
            info!("stopping: finishing the batch");
            break;
        }
        source.sync(writer)?;
        let read = source.read(writer)?;
        if read > 0 {
            last_record = Instant::now();
        }
        if last_flush.elapsed() >= pacing.flush_interval {
            last_flush = Instant::now();
            source.before_flush(writer);
            checkpoint_every = source.checkpoint_every(writer.stretched(pacing.checkpoint_interval, pacing.checkpoint_max));
            if last_refresh.elapsed() >= Duration::from_secs(1) && source.settled() {
                last_refresh = Instant::now();
                let others = source.others();
                writer.refresh_lease(&others, &mut source.engines());
                slow("renewing the sink lease", last_refresh);
            }
            let started = Instant::now();
            writer.flush(source.engines(), false);
            slow("flushing the sinks", started);
        }
        if last_checkpoint.elapsed() >= checkpoint_every {
            last_checkpoint = Instant::now();
            checkpoint(source, writer, false)?;
            slow("checkpointing", last_checkpoint);
        }
        if pacing.until_idle.is_some_and(|idle| last_record.elapsed() >= idle) {
            if source.drained(writer)? {
                info!("idle: the input is drained");
                break;
            }
            // Records are waiting (a slow broker, a rebalance, another consumer): not idle.
            last_record = Instant::now();
        }
        if read == 0 {
            source.idle(writer)?;
        }
    }
    finish(source, writer)
}

/// One invocation of a source whose input comes in batches and who keeps nothing it can
/// trust between them (a Lambda event): bring the units to their logs' heads, read the
/// batch into them, save them. Rounds repeat while a save lost a race with a concurrent
/// invocation (the next round's sync applies the winner's changes first), up to
/// `rounds`; returns whether every unit was saved. The sinks are the caller's to write
/// ([`SinkWriter::write_once`]): an invocation does not always hold their lease.
pub fn invoke<S: Source>(source: &mut S, writer: &mut SinkWriter, rounds: usize) -> Result<bool, S::Error> {
    for _ in 0..rounds {
        source.sync(writer)?;
        source.read(writer)?;
        source.checkpoint(writer, true)?;
        if !source.dirty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A checkpoint turn: the sinks take the units' changes first (a save takes what
/// changed since the last one out of each engine), then the state's size is measured.
pub fn checkpoint<S: Source>(source: &mut S, writer: &mut SinkWriter, all: bool) -> Result<(), S::Error> {
    writer.flush(source.engines(), false);
    source.checkpoint(writer, all)?;
    writer.record_state(source.engines().into_iter().map(|e| &*e), all);
    Ok(())
}

/// The last checkpoints, then the sinks from everybody's latest checkpoints.
fn finish<S: Source>(source: &mut S, writer: &mut SinkWriter) -> Result<(), S::Error> {
    // The input is not polled any more: the calls from here on have their own deadlines only.
    crate::deadline::polled(None);
    writer.finishing();
    // Each step is logged with its time: a stop that nears --shutdown-secs shows where.
    let started = Instant::now();
    // Exiting without the last checkpoint loses no data, but a restart would redo it.
    for _ in 0..10 {
        checkpoint(source, writer, true)?;
        if !source.dirty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    info!(secs = started.elapsed().as_secs_f64(), saved = !source.dirty(), "stopping: the last checkpoints are done");
    let started = Instant::now();
    let others = source.others();
    writer.finish(&others, &mut source.engines());
    info!(secs = started.elapsed().as_secs_f64(), "stopping: the sinks' last write is done");
    source.release(writer);
    Ok(())
}

/// Logs (at debug) a step of the loop that held up reading for long enough to show in
/// the latency's tail.
fn slow(step: &str, started: Instant) {
    let took = started.elapsed();
    if took >= Duration::from_millis(20) {
        debug!(step, ms = took.as_millis() as u64, "the loop was held up");
    }
}
