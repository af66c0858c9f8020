//! Checkpoint saves: a unit's changes since its last save appended to its log with the
//! position they reach, or its whole state when the log is due for a new base; uploads
//! run on the runtime's worker while the consumer reads on.

use crate::clock::now_secs;
use crate::config::WriterConfig;
use crate::deadline::CALL_DEADLINE;
use crate::merged::Merged;
use crate::summary::Summary;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use toolrank_engine::{Engine, StateStats};
use toolrank_state::{CheckpointStore, LogHead};
use tracing::{debug, warn};

/// How often the state's size is measured for the gauges.
const STATE_EVERY: Duration = Duration::from_secs(30);

/// A checkpoint save running on the runtime's worker ([`crate::SinkWriter::start_save`]).
pub struct Saving {
    task: tokio::task::JoinHandle<Result<LogHead, toolrank_dynamodb::Error>>,
    scope: String,
    /// The input position it covers.
    position: String,
    /// The changes an append carries, kept for the next save if this one fails.
    deltas: Arc<Vec<Vec<u8>>>,
    bytes: usize,
    /// The whole state, or an append of what changed.
    whole: bool,
    started: Instant,
}

pub(crate) struct Checkpointer {
    store: CheckpointStore,
    owner: String,
    /// How long a removed item's tombstone is kept.
    horizon: Duration,
    /// Owned units whose changes since their last save are not all tracked any more (a
    /// save failed after taking them): their next save is whole.
    untracked: HashSet<String>,
    /// The changes of appends that failed, by unit: the next save carries them before its
    /// own, so a state table that throttles costs the same appends again, not snapshots.
    unsaved: HashMap<String, Vec<Vec<u8>>>,
    /// When the state's size was last measured.
    state_recorded: Option<Instant>,
}

impl Checkpointer {
    pub(crate) fn new(store: CheckpointStore, config: &WriterConfig) -> Checkpointer {
        Checkpointer {
            store,
            owner: config.owner.clone(),
            horizon: config.tombstone_horizon,
            untracked: HashSet::new(),
            unsaved: HashMap::new(),
            state_recorded: None,
        }
    }

    pub(crate) fn store(&self) -> &CheckpointStore {
        &self.store
    }

    /// A unit just claimed: its changes are tracked from its checkpoint on.
    pub(crate) fn claimed(&mut self, scope: &str) {
        self.untracked.remove(scope);
        self.unsaved.remove(scope);
    }

    /// Starts saving a unit's checkpoint on the runtime's worker: what changed since the
    /// last save is taken now, the upload runs while the consumer goes on. A save
    /// appends those changes to the unit's log with the position (it costs what changed),
    /// unless the log is due for a new base or the changes do not fit one append: then
    /// the whole state is saved. See [`collect`](Self::collect).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        &mut self,
        rt: &tokio::runtime::Runtime,
        merged: &mut Merged,
        summary: &mut Summary,
        scope: &str,
        at: LogHead,
        position: &str,
        engine: &mut Engine,
    ) -> Saving {
        use toolrank_state::{COMPACT_MIN_BYTES, DELTAS_PER_APPEND, DELTA_BYTES};
        let started = Instant::now();
        self.expire(summary, engine);
        // Past this, the delta would not fit one append or would make the log due for a
        // new base: it is not even serialized.
        let limit = (DELTAS_PER_APPEND * DELTA_BYTES).min(at.base_bytes.max(COMPACT_MIN_BYTES).saturating_sub(at.log_bytes) as usize);
        // Deltas and snapshots flush the unit's pending changes into its own aggregates;
        // they are forwarded first, or the merged engine (and so the sinks) would never get
        // the ones the unit was still coalescing (see `flush`).
        merged.forward(engine);
        // A failed append's changes go first, in the order they were taken.
        let unsaved = self.unsaved.remove(scope).unwrap_or_default();
        let unsaved_bytes: usize = unsaved.iter().map(Vec::len).sum();
        let deltas = match self.untracked.contains(scope) {
            true => None,
            false => engine.delta_within(DELTA_BYTES, limit.saturating_sub(unsaved_bytes)).map(|new| unsaved.into_iter().chain(new).collect::<Vec<_>>()),
        };
        let bytes: usize = deltas.iter().flatten().map(Vec::len).sum();
        let deltas = deltas.filter(|d| d.len() <= DELTAS_PER_APPEND && !at.compaction_due(d.len(), bytes as u64, COMPACT_MIN_BYTES));
        let whole = deltas.is_none();
        let deltas = Arc::new(deltas.unwrap_or_default());
        let carried = deltas.clone();
        // Taken: a failed append hands its changes to the next save, a failed whole save
        // makes the next one whole (see `collect`).
        engine.delta_saved();
        let state = whole.then(|| engine.snapshot_split());
        let bytes = state.as_ref().map_or(bytes, |(state, _)| state.len());
        let (store, owner, scope_, position_) = (self.store.clone(), self.owner.clone(), scope.to_owned(), position.to_owned());
        let task = rt.spawn(async move {
            let save = async {
                match state {
                    Some((state, figures)) => store.save(&scope_, &owner, at.generation, &position_, &state, figures).await,
                    None => {
                        let head = store.append_owned(&scope_, &owner, &position_, at.head, &carried).await?;
                        Ok(LogHead { head, log_bytes: at.log_bytes + bytes as u64, ..at })
                    }
                }
            };
            match tokio::time::timeout(CALL_DEADLINE, save).await {
                Ok(result) => result,
                Err(_) => Err(toolrank_dynamodb::Error::Timeout(format!("saving the checkpoint of {scope_} (after {} s)", CALL_DEADLINE.as_secs()))),
            }
        });
        summary.checkpoint_ms += started.elapsed().as_millis() as u64;
        Saving { task, scope: scope.to_owned(), position: position.to_owned(), deltas, bytes, whole, started }
    }

    /// Records the size of the state of the units this consumer owns (after a
    /// checkpoint round): in the summary and as `toolrank_state_*` gauges. Measuring walks
    /// every session (tens of milliseconds on a large state, which the loop's latency
    /// would show), so it is done at most every [`STATE_EVERY`] unless `now` (the final
    /// round).
    pub(crate) fn measure<'a>(&mut self, summary: &mut Summary, units: impl IntoIterator<Item = &'a Engine>, now: bool) {
        if !now && self.state_recorded.is_some_and(|at| at.elapsed() < STATE_EVERY) {
            return;
        }
        self.state_recorded = Some(Instant::now());
        let mut total = StateStats::default();
        for st in units.into_iter().map(Engine::stats) {
            total.sessions += st.sessions;
            total.live_sessions += st.live_sessions;
            total.live_rows += st.live_rows;
            total.tombstones += st.tombstones;
            total.agents += st.agents;
            total.heap_bytes += st.heap_bytes;
        }
        summary.state = total;
    }

    /// Forgets the tombstones of a unit's `engine` older than the horizon (a save then
    /// carries that), and, when due, the names nothing refers to any more (the users of
    /// expired sessions), counting both. Units only: the merged engine's symbols are
    /// held by the sinks.
    pub(crate) fn expire(&self, summary: &mut Summary, engine: &mut Engine) {
        engine.set_clock(now_secs());
        let horizon = u32::try_from(self.horizon.as_secs()).unwrap_or(u32::MAX);
        summary.tombstones_expired += engine.expire_tombstones(horizon) as u64;
        summary.names_collected += engine.collect_names_if_due() as u64;
    }

    /// The outcome of a started save once it finished (with `wait`, waiting for it), like
    /// [`SinkWriter::save`](crate::SinkWriter::save)'s; `None` while it runs or if there is none.
    pub(crate) fn collect(
        &mut self,
        rt: &tokio::runtime::Runtime,
        summary: &mut Summary,
        saving: &mut Option<Saving>,
        wait: bool,
    ) -> Option<Result<Option<LogHead>, toolrank_dynamodb::Error>> {
        let s = saving.take_if(|s| wait || s.task.is_finished())?;
        let started = Instant::now();
        let result = rt.block_on(s.task).expect("a checkpoint save does not panic");
        summary.checkpoint_ms += started.elapsed().as_millis() as u64;
        Some(match result {
            Ok(at) => {
                summary.checkpoints += 1;
                toolrank_metrics::histogram!("toolrank_checkpoint_seconds").record(s.started.elapsed().as_secs_f64());
                if s.whole {
                    self.untracked.remove(&s.scope);
                }
                debug!(scope = s.scope, generation = at.generation, head = at.head, position = s.position, bytes = s.bytes, whole = s.whole, "checkpoint");
                Ok(Some(at))
            }
            Err(e @ toolrank_dynamodb::Error::Fenced(_)) => Err(e),
            Err(e) => {
                // Whether it was written is unknown. A failed append's changes go into the
                // next save; a failed whole save's are no longer tracked: the next is
                // whole. (A save that did land after all makes the next one fail as
                // `Fenced`: the log's head moved; the unit is claimed again from it.)
                match s.whole {
                    true => {
                        self.untracked.insert(s.scope.clone());
                    }
                    false => {
                        self.unsaved.insert(s.scope.clone(), Arc::unwrap_or_clone(s.deltas));
                    }
                }
                summary.retried_errors += 1;
                warn!(scope = s.scope, error = %e, "checkpoint failed; retrying at the next interval");
                Ok(None)
            }
        })
    }
}
