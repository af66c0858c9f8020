//! What every live consumer (Kafka, DynamoDB Streams, Kinesis) shares.
//!
//! A consumer divides its input into *units* (a Kafka partition, a shard lineage), each
//! with its own [`Engine`] checkpointed together with its input position under a *scope*
//! of the state table. Units move between consumers with their checkpoints. The rest is
//! here, in [`SinkWriter`]:
//! - **One writer.** One consumer holds the sink lease and writes the sinks from a merged
//!   engine: its own units' deltas plus the latest checkpoints of the units others own,
//!   so the sinks always show the sum over all units. Sink writes are absolute values
//!   (counts, dates, rank keys), so rewriting after a restart converges instead of double
//!   counting.
//! - **Deadlines.** Every DynamoDB call is cut off after [`CALL_DEADLINE`], so a stalled
//!   request cannot stall a consumer.
//! - **Counters and latency** of the run ([`Summary`]).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};
use toolrank_state::{CheckpointStore, Lease, Log};
mod run;
pub use run::{checkpoint, run, Pacing, Source};
pub use toolrank_backoff::Backoff;
use toolrank_engine::{Applied, Changes, Engine, PatternKey, StateStats, Sym};
use toolrank_events::{decode_line, Change, Day};
use toolrank_sink_dynamodb::DynamoSink;
pub use toolrank_sink_dynamodb::Namespace;
pub use toolrank_sink_valkey::Namespaces;
use toolrank_sink_valkey::ValkeySink;
pub use toolrank_state::LogHead;
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    State(#[from] toolrank_dynamodb::Error),
    #[error("checkpoint of {scope}: {source}")]
    Snapshot { scope: String, source: toolrank_engine::StateError },
    #[error("valkey: {0}")]
    Valkey(#[from] toolrank_sink_valkey::Error),
}

/// What the sink writer needs.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// The pipeline's state table (checkpoints, leases).
    pub state_table: String,
    /// The DynamoDB sink's table; `None` disables the sink.
    pub table: Option<String>,
    /// Where in the table: the live items, or a shadow namespace's.
    pub dynamodb_namespace: Namespace,
    /// Valkey URL; `None` disables the sink.
    pub valkey_url: Option<String>,
    pub valkey_prefix: String,
    /// Scores are written for this date; `None` is the UTC date at each write.
    pub today: Option<Day>,
    /// This consumer's identity in leases and checkpoints.
    pub owner: String,
    /// How long a lease lasts without renewal.
    pub lease: Duration,
    /// How often changes reach DynamoDB: every write costs money, so it coalesces longer
    /// than Valkey.
    pub dynamodb_interval: Duration,
    /// While a backlog is read, DynamoDB writes wait as long as its records are late, up
    /// to this: rankings that are stale anyway are not paid for at every interval. Zero
    /// disables. Also the longest a round waits for the write budget.
    pub dynamodb_max_defer: Duration,
    /// A DynamoDB round waits (up to `dynamodb_max_defer`) until it writes at most this
    /// many items per event read since the last round: coalescing longer where each
    /// interval would rewrite the same hot keys. `None`: every interval.
    pub dynamodb_writes_per_event: Option<f64>,
    /// Write capacity units per second the DynamoDB sink may spend (one per item written;
    /// its items are under 1 KB): a round is spread out instead of bursting. `None` or 0: no limit.
    pub dynamodb_max_wcu: Option<f64>,
    /// How long a removed item's tombstone is kept ([`Engine::expire_tombstones`]).
    pub tombstone_horizon: Duration,
}

/// The settings every long-running consumer shares.
#[derive(Clone, Debug)]
pub struct LiveConfig {
    pub writer: WriterConfig,
    pub pacing: Pacing,
}

/// A week: longer than DynamoDB Streams (24 h) or Kinesis (24 h by default) keep a
/// record, as long as Kafka keeps a topic's messages by default.
pub const DEFAULT_TOMBSTONE_HORIZON: Duration = Duration::from_secs(7 * 24 * 3600);

/// Counters of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    /// Messages or stream records read.
    pub messages: u64,
    /// Messages below a unit's checkpointed position (redelivered).
    pub skipped_redeliveries: u64,
    pub changes: u64,
    pub stale: u64,
    pub ignored: u64,
    pub dead_letters: u64,
    pub checkpoints: u64,
    /// Tombstones of removed items forgotten after the horizon.
    pub tombstones_expired: u64,
    /// Interned names (user IDs, ...) forgotten once nothing referred to them.
    pub names_collected: u64,
    /// The engine state of the units this consumer owned at its last checkpoint.
    pub state: StateStats,
    pub sink_writes: u64,
    pub dynamodb_requests: u64,
    /// DynamoDB sink writes started (each coalesces the changes of its interval).
    pub dynamodb_rounds: u64,
    /// Write requests to the state table: checkpoints, bucket logs, leases.
    pub state_writes: u64,
    /// Write capacity units DynamoDB reported consumed: by the sink, by the state table.
    pub dynamodb_write_units: f64,
    pub state_write_units: f64,
    pub valkey_commands: u64,
    /// Failed sink writes, checkpoints and lease renewals (all retried).
    pub retried_errors: u64,
    /// Milliseconds from a record's creation (Kafka timestamp, stream record time) to its
    /// effect being visible in Valkey (DynamoDB without Valkey), measured by the writer.
    pub latency_p50_ms: Option<u64>,
    pub latency_p99_ms: Option<u64>,
    pub latency_max_ms: Option<u64>,
    /// The part of it spent in this process: from reading the record to its effect being
    /// visible (what the broker or stream adds before is not toolrank's).
    pub own_latency_p50_ms: Option<u64>,
    pub own_latency_p99_ms: Option<u64>,
    /// Milliseconds the consumer's loop waited on each: where its wall time goes.
    pub dynamodb_ms: u64,
    pub valkey_ms: u64,
    pub checkpoint_ms: u64,
    /// Milliseconds from the first record applied to the last, and from the start of the
    /// exit (the last checkpoint, then the sinks) to its end: a run's wall time split
    /// into reading and the one-off writes after it.
    pub read_ms: u64,
    pub finish_ms: u64,
}

impl Summary {
    /// Copies the running totals into the process's Prometheus metrics.
    pub fn publish(&self) {
        use toolrank_metrics::{counter, gauge};
        let totals = [
            (counter("toolrank_messages_total", "Messages or stream records read.", &[]), self.messages),
            (counter("toolrank_redeliveries_skipped_total", "Records at or below a checkpointed position, skipped.", &[]), self.skipped_redeliveries),
            (counter("toolrank_changes_total", "Changes applied to the table state, by outcome.", &[("outcome", "applied")]), self.changes),
            (counter("toolrank_changes_total", "Changes applied to the table state, by outcome.", &[("outcome", "stale")]), self.stale),
            (counter("toolrank_changes_total", "Changes applied to the table state, by outcome.", &[("outcome", "ignored")]), self.ignored),
            (counter("toolrank_dead_letters_total", "Bad records dead-lettered.", &[]), self.dead_letters),
            (counter("toolrank_checkpoints_total", "Checkpoints saved.", &[]), self.checkpoints),
            (counter("toolrank_tombstones_expired_total", "Tombstones of removed items forgotten after the horizon.", &[]), self.tombstones_expired),
            (
                counter("toolrank_names_collected_total", "Interned names (user IDs, ...) of units forgotten once nothing referred to them.", &[]),
                self.names_collected,
            ),
            (counter("toolrank_sink_writes_total", "Sink write rounds.", &[]), self.sink_writes),
            (counter("toolrank_dynamodb_requests_total", "DynamoDB write requests of the sink.", &[]), self.dynamodb_requests),
            (counter("toolrank_state_writes_total", "DynamoDB write requests to the state table (checkpoints, bucket logs, leases).", &[]), self.state_writes),
            (counter("toolrank_valkey_commands_total", "Valkey commands of the sink.", &[]), self.valkey_commands),
            (counter("toolrank_retried_errors_total", "Failed sink writes, checkpoints and lease renewals (retried).", &[]), self.retried_errors),
        ];
        for (metric, value) in totals {
            metric.set(value as f64);
        }
        for (table, units) in [("sink", self.dynamodb_write_units), ("state", self.state_write_units)] {
            counter("toolrank_dynamodb_write_units_total", "Write capacity units DynamoDB reported consumed, by table.", &[("table", table)]).set(units);
        }
        for (on, ms) in [("dynamodb", self.dynamodb_ms), ("valkey", self.valkey_ms), ("checkpoint", self.checkpoint_ms)] {
            counter("toolrank_blocked_seconds_total", "Time the consumer's loop waited on a sink write or a checkpoint save.", &[("on", on)])
                .set(ms as f64 / 1000.0);
        }
        for (quantile, value) in [("0.5", self.latency_p50_ms), ("0.99", self.latency_p99_ms)] {
            if let Some(ms) = value {
                gauge("toolrank_visible_latency_ms", "Record creation to its effect in the sinks.", &[("quantile", quantile)]).set(ms as f64);
            }
        }
        for (quantile, value) in [("0.5", self.own_latency_p50_ms), ("0.99", self.own_latency_p99_ms)] {
            if let Some(ms) = value {
                gauge("toolrank_own_latency_ms", "Record read by this consumer to its effect in the sinks.", &[("quantile", quantile)]).set(ms as f64);
            }
        }
    }

    /// Counts what the engine did with one change.
    pub fn count(&mut self, applied: Applied) {
        match applied {
            Applied::Changed | Applied::Unchanged => self.changes += 1,
            Applied::Stale => self.stale += 1,
            Applied::Ignored => self.ignored += 1,
        }
    }
}

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

/// Milliseconds in 1 ms buckets up to a minute, the rest in the last.
struct Latencies {
    buckets: Vec<u64>,
    count: u64,
}

impl Latencies {
    const BUCKETS: usize = 60_001;

    fn new() -> Latencies {
        Latencies { buckets: vec![0; Self::BUCKETS], count: 0 }
    }

    fn record(&mut self, ms: i64) {
        self.buckets[(ms.max(0) as usize).min(Self::BUCKETS - 1)] += 1;
        self.count += 1;
    }

    fn quantile(&self, q: f64) -> Option<u64> {
        let rank = ((self.count as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        self.buckets
            .iter()
            .position(|&n| {
                seen += n;
                seen >= rank
            })
            .filter(|_| self.count > 0)
            .map(|i| i as u64)
    }
}

/// A unit owned by another consumer, as of its latest checkpoint (lease holder only).
struct Remote {
    engine: Engine,
    /// The log position it holds (the head it was read at).
    at: u64,
}

/// The longest a DynamoDB call may block a consumer's loop: well inside Kafka's poll
/// interval, so that a stalled request cannot cost a consumer its partitions.
pub const CALL_DEADLINE: Duration = Duration::from_secs(40);

/// Runs `call` on `rt`, cut off after [`CALL_DEADLINE`].
pub fn within<T, E: Into<toolrank_dynamodb::Error>>(
    rt: &tokio::runtime::Runtime,
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, toolrank_dynamodb::Error> {
    // The timer must be made inside the runtime.
    match rt.block_on(async { tokio::time::timeout(CALL_DEADLINE, call).await }) {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(toolrank_dynamodb::Error::Timeout(format!("{what} (after {} s)", CALL_DEADLINE.as_secs()))),
    }
}

/// How often the state's size is measured for the gauges.
const STATE_EVERY: Duration = Duration::from_secs(30);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// An identity for leases and checkpoints unique to this process start: `name`, the
/// process id and the start time, so that two sandboxes or containers reusing a process
/// id are still told apart.
pub fn unique_owner(name: &str) -> String {
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
    format!("{name}-{}-{started:x}", std::process::id())
}

/// Seconds since the Unix epoch: the clock tombstones are stamped with.
fn now_secs() -> u32 {
    (now_ms() / 1000) as u32
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

/// Changes taken from the merged engine and not yet written to a sink.
#[derive(Default)]
struct ChangeSet {
    agents: HashSet<Sym>,
    patterns: HashSet<PatternKey>,
}

impl ChangeSet {
    fn add(&mut self, c: &Changes) {
        self.agents.extend(&c.agents);
        self.patterns.extend(&c.patterns);
    }

    fn is_empty(&self) -> bool {
        self.agents.is_empty() && self.patterns.is_empty()
    }

    fn len(&self) -> usize {
        self.agents.len() + self.patterns.len()
    }

    fn take(&mut self) -> Changes {
        let mut agents: Vec<Sym> = self.agents.drain().collect();
        let mut patterns: Vec<PatternKey> = self.patterns.drain().collect();
        agents.sort_unstable();
        patterns.sort_unstable();
        Changes { agents, patterns }
    }
}

/// A checkpoint save running on the runtime's worker ([`SinkWriter::start_save`]).
pub struct Saving {
    task: tokio::task::JoinHandle<Result<LogHead, toolrank_dynamodb::Error>>,
    scope: String,
    /// The input position it covers.
    position: String,
    bytes: usize,
    /// The whole state, or an append of what changed.
    whole: bool,
}

/// What a DynamoDB sink write returns: the sink, its outcome unless it was cut off, and
/// when it ended (ms since the epoch: its records were visible from then, however late
/// the loop collects it).
type Written = (DynamoSink, Result<Result<(), toolrank_sink_dynamodb::Error>, tokio::time::error::Elapsed>, i64);

/// A Valkey sink write: the sink, the outcome and when it ended.
type ValkeyWritten = (ValkeySink, Result<(), toolrank_sink_valkey::Error>, i64);

/// A renewal of the sink lease: what [`Lease::take`] returns.
type Renewal = tokio::task::JoinHandle<Result<Option<bool>, toolrank_dynamodb::Error>>;

/// A sink write running on the runtime's threads while the consumer goes on.
struct Writing<T> {
    task: tokio::task::JoinHandle<T>,
    /// How many of the records not yet visible it covers.
    unseen: usize,
}

/// The merged engine, the sink lease and the sinks (see the crate docs).
pub struct SinkWriter {
    /// The runtime every blocking call of the consumer runs on.
    pub rt: tokio::runtime::Runtime,
    pub client: aws_sdk_dynamodb::Client,
    pub store: CheckpointStore,
    pub summary: Summary,
    config: WriterConfig,
    lease: Lease,
    holds_lease: bool,
    /// When the sink lease was last renewed (when that renewal was sent).
    lease_renewed: Instant,
    /// When the state's size was last measured ([`record_state`](Self::record_state)).
    state_recorded: Option<Instant>,
    /// A renewal of the held lease running beside the loop, and when it was sent.
    renewal: Option<(Instant, Renewal)>,
    remotes: BTreeMap<String, Remote>,
    /// Owned units whose changes since their last save are not all tracked any more (a
    /// save failed after taking them): their next save is whole.
    untracked: HashSet<String>,
    global: Engine,
    /// The DynamoDB sink while no write runs; the running write has it.
    dynamodb: Option<DynamoSink>,
    dynamodb_writing: Option<Writing<Written>>,
    valkey_writing: Option<Writing<ValkeyWritten>>,
    /// The DynamoDB sink must compare with the table again once its write returns.
    dynamodb_reset: bool,
    valkey: Option<ValkeySink>,
    /// Changes not yet written to each sink, and when each was last written.
    dynamodb_changes: ChangeSet,
    last_dynamodb: Instant,
    /// Events read when the last DynamoDB round started; when a round last waited for
    /// the write budget, and how long until it checks again (doubling: each check
    /// costs what planning a round costs).
    dynamodb_events: u64,
    /// The records the read delta logs hold, for a writer that only reads logs
    /// ([`write_once`](Self::write_once)): its events, where a consumer counts its own.
    log_events: Option<u64>,
    budget_waited: Instant,
    budget_wait: Duration,
    /// Items written per changed key in the last round planned: what a round of the
    /// keys changed since would write, estimated without planning it (a plan ranks every
    /// pattern and takes tens of milliseconds on a large state).
    writes_per_change: f64,
    valkey_changes: ChangeSet,
    last_valkey: Instant,
    /// Creation times (ms) of the records applied since the last visible sink write.
    /// Creation and read times (ms since the epoch) of the records not yet visible.
    unseen: Vec<(i64, i64)>,
    /// When the latest record was applied, and how old it was then (ms).
    behind: (Instant, i64),
    /// When the first record was applied; when the exit began ([`SinkWriter::finishing`]).
    first_applied: Option<Instant>,
    finishing: Option<Instant>,
    /// When the input last had nothing waiting ([`SinkWriter::caught_up`]).
    drained: Instant,
    latencies: Latencies,
    own_latencies: Latencies,
    /// When the metrics were last published.
    published: Instant,
}

impl SinkWriter {
    /// A writer contending for the sink lease of `lease_scope`: one writer per consumer
    /// group (or poller application).
    pub fn new(config: WriterConfig, lease_scope: String) -> Result<SinkWriter, Error> {
        // One worker: DynamoDB sink writes run on it while the consumer's loop goes on.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("a tokio runtime");
        let client = rt.block_on(toolrank_dynamodb::client());
        let mut global = Engine::new();
        global.track_changes();
        let dynamodb = config
            .table
            .as_ref()
            .map(|t| DynamoSink::in_namespace(client.clone(), t.clone(), config.dynamodb_namespace.clone()).with_max_wcu(config.dynamodb_max_wcu));
        let valkey = config.valkey_url.as_ref().map(|url| ValkeySink::new(url, config.valkey_prefix.clone())).transpose()?;
        Ok(SinkWriter {
            store: CheckpointStore::new(client.clone(), config.state_table.clone()),
            lease: Lease::new(client.clone(), config.state_table.clone(), lease_scope, config.owner.clone(), config.lease),
            client,
            rt,
            summary: Summary::default(),
            config,
            holds_lease: false,
            lease_renewed: Instant::now(),
            renewal: None,
            state_recorded: None,
            remotes: BTreeMap::new(),
            untracked: HashSet::new(),
            global,
            dynamodb,
            valkey,
            dynamodb_writing: None,
            valkey_writing: None,
            dynamodb_reset: false,
            dynamodb_changes: ChangeSet::default(),
            last_dynamodb: Instant::now(),
            dynamodb_events: 0,
            log_events: None,
            budget_waited: Instant::now(),
            budget_wait: Duration::ZERO,
            writes_per_change: 1.0,
            valkey_changes: ChangeSet::default(),
            last_valkey: Instant::now(),
            unseen: Vec::new(),
            behind: (Instant::now(), 0),
            first_applied: None,
            finishing: None,
            drained: Instant::now(),
            latencies: Latencies::new(),
            own_latencies: Latencies::new(),
            published: Instant::now(),
        })
    }

    /// Runs `call` on the runtime within [`CALL_DEADLINE`].
    pub fn call<T, E: Into<toolrank_dynamodb::Error>>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, toolrank_dynamodb::Error> {
        within(&self.rt, what, call)
    }

    pub fn owner(&self) -> &str {
        &self.config.owner
    }

    pub fn holds_lease(&self) -> bool {
        self.holds_lease
    }

    /// Runs `f` until it succeeds, counting failures; gives up after 30 s (within Kafka's
    /// poll interval). For what a consumer cannot go on without, like claiming a unit.
    pub fn retrying<T>(&mut self, what: &str, mut f: impl FnMut(&SinkWriter) -> Result<T, toolrank_dynamodb::Error>) -> Result<T, Error> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match f(self) {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() < deadline => {
                    self.summary.retried_errors += 1;
                    warn!(error = %e, "{what} failed; retrying");
                    std::thread::sleep(backoff.next_delay());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Claims a unit's checkpoint for this consumer (fencing its previous owner) and
    /// returns its engine (added to the merged one, tracking what changes for the next
    /// save), its position, and where its log stands.
    pub fn claim(&mut self, scope: &str) -> Result<(Engine, Option<String>, LogHead), Error> {
        let owner = self.config.owner.clone();
        let ck = self.retrying(&format!("claiming {scope}"), |w| w.call("claiming a checkpoint", w.store.claim(scope, &owner)))?;
        let mut engine = restore(scope, &ck.state)?;
        apply_deltas(scope, &mut engine, &ck.deltas)?;
        engine.track_deltas();
        self.untracked.remove(scope);
        if let Some(mut remote) = self.remotes.remove(scope) {
            self.global.unabsorb(&mut remote.engine);
        }
        self.global.absorb(&mut engine);
        Ok((engine, ck.position, ck.at))
    }

    /// Whether any sink is configured.
    pub fn has_sinks(&self) -> bool {
        self.dynamodb.is_some() || self.dynamodb_writing.is_some() || self.valkey.is_some() || self.valkey_writing.is_some()
    }

    /// Moves the merged copy of a delta-log unit (a Lambda bucket) from log position
    /// `from` to `to` by `deltas`, which this process just appended itself: that spares
    /// reading them back. A copy at another position is caught up by the next
    /// [`write_once`](Self::write_once).
    pub fn advance_log(&mut self, scope: &str, from: u64, to: u64, deltas: &[Vec<u8>]) -> Result<(), Error> {
        let Some(r) = self.remotes.get_mut(scope).filter(|r| r.at == from) else { return Ok(()) };
        let applied = apply_deltas(scope, &mut r.engine, deltas);
        r.engine.flush_into(&mut self.global);
        if applied.is_err() {
            // Half applied: no longer a copy of any position.
            let mut r = self.remotes.remove(scope).expect("present");
            self.global.unabsorb(&mut r.engine);
        } else {
            r.at = to;
        }
        applied
    }

    /// Takes an owned unit's share out of the merged engine (it moved elsewhere). Its
    /// pending deltas are forwarded first: the merged engine must hold exactly what is
    /// taken out.
    pub fn release(&mut self, engine: &mut Engine) {
        engine.flush_into(&mut self.global);
        self.global.unabsorb(engine);
    }

    /// Saves a unit's checkpoint. `Ok(None)`: it failed and was counted (the unit stays
    /// dirty, its position must not be acknowledged); `Err(Fenced)`: another consumer
    /// owns the unit now.
    pub fn save(&mut self, scope: &str, at: LogHead, position: &str, engine: &mut Engine) -> Result<Option<LogHead>, toolrank_dynamodb::Error> {
        let mut saving = Some(self.start_save(scope, at, position, engine));
        self.saved(&mut saving, true).expect("waited for")
    }

    /// Starts saving a unit's checkpoint on the runtime's worker: what changed since the
    /// last save is taken now, the upload runs while the consumer goes on. A save
    /// appends those changes to the unit's log with the position (it costs what changed),
    /// unless the log is due for a new base or the changes do not fit one append: then
    /// the whole state is saved. See [`saved`](Self::saved).
    pub fn start_save(&mut self, scope: &str, at: LogHead, position: &str, engine: &mut Engine) -> Saving {
        use toolrank_state::{COMPACT_MIN_BYTES, DELTAS_PER_APPEND, DELTA_BYTES};
        let started = Instant::now();
        self.expire_tombstones(engine);
        // Past this, the delta would not fit one append or would make the log due for a
        // new base: it is not even serialized.
        let limit = (DELTAS_PER_APPEND * DELTA_BYTES).min(at.base_bytes.max(COMPACT_MIN_BYTES).saturating_sub(at.log_bytes) as usize);
        let deltas = match self.untracked.contains(scope) {
            true => None,
            false => engine.delta_within(DELTA_BYTES, limit),
        };
        let bytes: usize = deltas.iter().flatten().map(Vec::len).sum();
        let deltas = deltas.filter(|d| d.len() <= DELTAS_PER_APPEND && !at.compaction_due(d.len(), bytes as u64, COMPACT_MIN_BYTES));
        let whole = deltas.is_none();
        let deltas = deltas.unwrap_or_default();
        // Taken: a failed save makes the next one whole (see `saved`).
        engine.delta_saved();
        let state = whole.then(|| {
            // A snapshot flushes the unit's pending changes into its own aggregates; they
            // are forwarded first, or the merged engine (and so the sinks) would never get
            // the ones the unit was still coalescing (see `flush`).
            engine.flush_into(&mut self.global);
            engine.snapshot()
        });
        let bytes = state.as_ref().map_or(bytes, Vec::len);
        let (store, owner, scope_, position_) = (self.store.clone(), self.config.owner.clone(), scope.to_owned(), position.to_owned());
        let task = self.rt.spawn(async move {
            let save = async {
                match state {
                    Some(state) => store.save(&scope_, &owner, at.generation, &position_, &state).await,
                    None => {
                        let head = store.append_owned(&scope_, &owner, &position_, at.head, &deltas).await?;
                        Ok(LogHead { head, log_bytes: at.log_bytes + bytes as u64, ..at })
                    }
                }
            };
            match tokio::time::timeout(CALL_DEADLINE, save).await {
                Ok(result) => result,
                Err(_) => Err(toolrank_dynamodb::Error::Timeout(format!("saving the checkpoint of {scope_} (after {} s)", CALL_DEADLINE.as_secs()))),
            }
        });
        self.summary.checkpoint_ms += started.elapsed().as_millis() as u64;
        Saving { task, scope: scope.to_owned(), position: position.to_owned(), bytes, whole }
    }

    /// Records the size of the state of the units this consumer owns (after a
    /// checkpoint round): in the summary and as `toolrank_state_*` gauges. Measuring walks
    /// every session (tens of milliseconds on a large state, which the loop's latency
    /// would show), so it is done at most every [`STATE_EVERY`] unless `now` (the final
    /// round).
    pub fn record_state<'a>(&mut self, units: impl IntoIterator<Item = &'a Engine>, now: bool) {
        use toolrank_metrics::gauge;
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
        for (name, help, value) in [
            ("toolrank_state_sessions", "Sessions held by the units this consumer owns (live ones and those holding only tombstones).", total.sessions),
            ("toolrank_state_live_rows", "Current executions held by the units this consumer owns.", total.live_rows),
            ("toolrank_state_tombstones", "Removed items remembered (until --tombstone-horizon-secs) by the units this consumer owns.", total.tombstones),
            ("toolrank_state_bytes", "Approximate heap bytes of the engine state of the units this consumer owns.", total.heap_bytes),
        ] {
            gauge(name, help, &[]).set(value as f64);
        }
        self.summary.state = total;
    }

    /// Forgets the tombstones of a unit's `engine` older than the horizon (a save then
    /// carries that), and, when due, the names nothing refers to any more (the users of
    /// expired sessions), counting both. Units only: the merged engine's symbols are
    /// held by the sinks.
    pub fn expire_tombstones(&mut self, engine: &mut Engine) {
        engine.set_clock(now_secs());
        let horizon = u32::try_from(self.config.tombstone_horizon.as_secs()).unwrap_or(u32::MAX);
        self.summary.tombstones_expired += engine.expire_tombstones(horizon) as u64;
        self.summary.names_collected += engine.collect_names_if_due() as u64;
    }

    /// The outcome of a started save once it finished (with `wait`, waiting for it), like
    /// [`save`](Self::save)'s; `None` while it runs or if there is none.
    pub fn saved(&mut self, saving: &mut Option<Saving>, wait: bool) -> Option<Result<Option<LogHead>, toolrank_dynamodb::Error>> {
        let s = saving.take_if(|s| wait || s.task.is_finished())?;
        let started = Instant::now();
        let result = self.rt.block_on(s.task).expect("a checkpoint save does not panic");
        self.summary.checkpoint_ms += started.elapsed().as_millis() as u64;
        Some(match result {
            Ok(at) => {
                self.summary.checkpoints += 1;
                if s.whole {
                    self.untracked.remove(&s.scope);
                }
                debug!(scope = s.scope, generation = at.generation, head = at.head, position = s.position, bytes = s.bytes, whole = s.whole, "checkpoint");
                Ok(Some(at))
            }
            Err(e @ toolrank_dynamodb::Error::Fenced(_)) => Err(e),
            Err(e) => {
                // Whether it was written is unknown, and the changes it carried are no
                // longer tracked: the next save is whole. (A whole save that did land
                // after all makes that one fail as `Fenced`, as before appends existed.)
                self.untracked.insert(s.scope.clone());
                self.summary.retried_errors += 1;
                warn!(scope = s.scope, error = %e, "checkpoint failed; retrying at the next interval");
                Ok(None)
            }
        })
    }

    /// Notes that the input has nothing waiting: the records just applied are as recent as
    /// the source delivers them, so their lateness is the source's, not a backlog.
    pub fn caught_up(&mut self) {
        self.drained = Instant::now();
    }

    /// How far behind the records applied are while a backlog is read (the input has not
    /// run dry for a second, and records still arrive); `None` otherwise.
    fn backlog(&self) -> Option<Duration> {
        let (applied, behind_ms) = self.behind;
        reading_behind(applied.elapsed(), self.drained.elapsed(), behind_ms)
    }

    /// Notes a record applied now, created at `created_ms`, for the latency figures.
    pub fn observe(&mut self, created_ms: i64) {
        let now = Instant::now();
        self.first_applied.get_or_insert(now);
        self.behind = (now, now_ms() - created_ms);
        if self.holds_lease {
            self.unseen.push((created_ms, now_ms()));
        }
    }

    /// Takes or renews the sink lease; on taking it, the sinks are compared in full. The
    /// holder loads the latest checkpoints of `others`, the scopes of units it does not own.
    pub fn refresh_lease(&mut self, others: &[String]) {
        if self.take_lease() {
            if let Err(e) = self.refresh_remotes(others) {
                self.summary.retried_errors += 1;
                warn!(error = %e, "reading other consumers' checkpoints failed; retrying");
            }
        }
    }

    /// Takes or renews the sink lease; whether it is held.
    fn take_lease(&mut self) -> bool {
        let Some((sent, taken)) = self.lease_outcome() else {
            // A renewal is on its way and the last one still holds.
            return self.holds_lease;
        };
        // Whether this writer's record of what the sinks hold is still exact: nobody else
        // wrote them since it last held the lease.
        let mut continued = true;
        let held = match taken {
            Ok(taken) => {
                self.lease_renewed = sent;
                continued = taken == Some(true);
                taken.is_some()
            }
            Err(e) => {
                // Unknown: keep writing only while the last renewal surely still holds.
                self.summary.retried_errors += 1;
                warn!(error = %e, "renewing the sink lease failed");
                self.holds_lease && self.lease_renewed.elapsed() < self.config.lease / 2
            }
        };
        if held && !self.holds_lease && !continued {
            info!("took the sink lease");
            self.reset_dynamodb();
            self.collect_valkey(true);
            if let Some(v) = &mut self.valkey {
                v.force_resync();
            }
        }
        if !held && self.holds_lease {
            info!("lost the sink lease");
            // Another consumer makes these visible; their latency is not ours to measure.
            self.unseen.clear();
            for (_, mut r) in std::mem::take(&mut self.remotes) {
                self.global.unabsorb(&mut r.engine);
            }
        }
        self.holds_lease = held;
        held
    }

    /// The outcome of a take or renewal of the lease, with when it was sent. A holder
    /// renews beside the loop (a slow state table must not hold up reading): it sends a
    /// renewal and collects it at a later call, and waits for it only once the last
    /// renewal is half a lease old. `None` while a renewal runs and need not be waited for.
    fn lease_outcome(&mut self) -> Option<(Instant, Result<Option<bool>, toolrank_dynamodb::Error>)> {
        if !self.holds_lease {
            self.settle_renewal();
            return Some((Instant::now(), self.call("taking the sink lease", self.lease.take())));
        }
        let due = self.lease_renewed.elapsed() >= self.config.lease / 2;
        if let Some((sent, task)) = self.renewal.take_if(|(_, task)| due || task.is_finished()) {
            return Some((sent, self.join_renewal(task)));
        }
        if due {
            return Some((Instant::now(), self.call("renewing the sink lease", self.lease.take())));
        }
        if self.renewal.is_none() {
            let lease = self.lease.clone();
            self.renewal = Some((Instant::now(), self.rt.spawn(async move { lease.take().await })));
        }
        None
    }

    /// Waits for a renewal still running (before the lease is released or taken anew:
    /// a late renewal must not take it back).
    fn settle_renewal(&mut self) {
        if let Some((_, task)) = self.renewal.take() {
            // Its outcome no longer matters: the caller takes or releases the lease anew.
            let _ = self.join_renewal(task);
        }
    }

    /// A renewal's outcome, waited for up to the call deadline; one still running then is
    /// aborted (a late one must not renew a lease given up meanwhile).
    fn join_renewal(&self, mut task: Renewal) -> Result<Option<bool>, toolrank_dynamodb::Error> {
        let joined = self.call("renewing the sink lease", async { (&mut task).await.expect("a lease renewal does not panic") });
        task.abort();
        joined
    }

    /// Brings the merged copies of the units other consumers own (`others`) to their
    /// logs' heads: by the deltas after a copy's position, or from the base when there
    /// is no copy or a new base replaced those deltas. Copies of units not among
    /// `others` any more are dropped. Returns the records the logs hold.
    fn refresh_remotes(&mut self, others: &[String]) -> Result<u64, Error> {
        let gone: Vec<String> = self.remotes.keys().filter(|s| !others.contains(s)).cloned().collect();
        for scope in gone {
            let mut r = self.remotes.remove(&scope).expect("listed");
            self.global.unabsorb(&mut r.engine);
        }
        let mut records = 0;
        for scope in others {
            let Some(head) = self.call("reading a log head", self.store.log_head(scope))? else { continue };
            records += head.records;
            let at = self.remotes.get(scope).map(|r| r.at);
            let log = match self.log_catch_up(scope, at, &head)? {
                LogCatchUp::Current => continue,
                LogCatchUp::Deltas(deltas) => {
                    self.advance_log(scope, at.expect("deltas follow a copy"), head.head, &deltas)?;
                    continue;
                }
                LogCatchUp::Log(log) => log,
            };
            let mut engine = log_engine(scope, &log)?;
            if let Some(mut old) = self.remotes.remove(scope) {
                self.global.unabsorb(&mut old.engine);
            }
            self.global.absorb(&mut engine);
            debug!(scope, generation = log.at.generation, head = log.at.head, "merged another consumer's checkpoint");
            self.remotes.insert(scope.clone(), Remote { engine, at: log.at.head });
        }
        Ok(records)
    }

    /// What brings a copy of a delta-log unit at log position `at` (`None`: no copy) to
    /// `head`: the deltas after it, or the whole log when there is no copy or a
    /// compaction deleted those deltas.
    pub fn log_catch_up(&self, scope: &str, at: Option<u64>, head: &LogHead) -> Result<LogCatchUp, toolrank_dynamodb::Error> {
        if at == Some(head.head) {
            return Ok(LogCatchUp::Current);
        }
        if let Some(at) = at.filter(|at| (head.base_at..head.head).contains(at)) {
            match self.call("reading a log's deltas", self.store.deltas(scope, at, head.head)) {
                Ok(deltas) => return Ok(LogCatchUp::Deltas(deltas)),
                // Compacted meanwhile: from the base.
                Err(toolrank_dynamodb::Error::Input(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.call("reading a log", self.store.load_log(scope)).map(LogCatchUp::Log)
    }

    /// Forwards the owned units' deltas into the merged engine and, as lease holder,
    /// writes what changed to the sinks. `false` when a sink write failed (it is
    /// retried). `now` writes DynamoDB even before its interval is up.
    pub fn flush<'a>(&mut self, units: impl IntoIterator<Item = &'a mut Engine>, now: bool) -> bool {
        let valkey_due = now || self.last_valkey.elapsed() >= self.valkey_interval();
        if !valkey_due && self.last_dynamodb.elapsed() < self.dynamodb_interval() {
            // Neither sink writes yet (a backlog stretches their intervals): the changes
            // coalesce in the units meanwhile, where forwarding them costs nothing.
            return true;
        }
        for engine in units {
            engine.flush_into(&mut self.global);
        }
        if !self.holds_lease {
            return true;
        }
        let changes = self.global.take_changes();
        let today = self.config.today.unwrap_or_else(Day::today_utc);
        self.dynamodb_changes.add(&changes);
        self.valkey_changes.add(&changes);
        let mut ok = self.write_dynamodb(now, today);
        ok &= self.collect_valkey(now);
        if let Some(mut sink) = self.valkey.take_if(|v| valkey_due && (!self.valkey_changes.is_empty() || v.needs_resync())) {
            // Built here (it reads the engine), sent on the runtime's blocking threads while
            // the consumer reads on; one write in flight at a time.
            self.last_valkey = Instant::now();
            let prepared = sink.prepare(&self.global, &self.valkey_changes.take());
            self.summary.valkey_ms += self.last_valkey.elapsed().as_millis() as u64;
            match prepared {
                Ok(prepared) => {
                    let task = self.rt.spawn_blocking(move || {
                        let result = sink.send(prepared);
                        (sink, result, now_ms())
                    });
                    self.valkey_writing = Some(Writing { task, unseen: self.unseen.len() });
                    if now {
                        ok &= self.collect_valkey(true);
                    }
                }
                Err(e) => {
                    self.valkey = Some(sink);
                    self.valkey_failed(&e);
                    ok = false;
                }
            }
        }
        if self.valkey.as_ref().is_some_and(|v| !v.needs_resync()) && self.valkey_changes.is_empty() {
            // Nothing is waiting to be written or being written: what the records read so
            // far did to the rankings (often nothing: a repeated Agent item, a stale copy)
            // is in Valkey.
            self.record_visible(self.unseen.len(), now_ms());
        }
        if !changes.is_empty() {
            self.summary.sink_writes += 1;
        }
        if self.published.elapsed() >= Duration::from_secs(1) {
            self.published = Instant::now();
            self.counters().publish();
        }
        ok
    }

    /// Records the latency of the first `n` records not yet visible, visible since `now`
    /// (ms since the epoch).
    fn record_visible(&mut self, n: usize, now: i64) {
        for (created, read) in self.unseen.drain(..n.min(self.unseen.len())) {
            self.latencies.record(now - created);
            self.own_latencies.record(now - read);
        }
    }

    /// Makes the DynamoDB sink compare with the table at its next write (now, or when
    /// its running write returns).
    fn reset_dynamodb(&mut self) {
        match &mut self.dynamodb {
            Some(d) => d.reset(),
            None => self.dynamodb_reset = self.dynamodb_writing.is_some(),
        }
    }

    /// Collects a finished DynamoDB write (waits for it with `now`), then starts the next
    /// one when it is due: the figures are taken from the merged engine here, the
    /// requests run on the runtime's worker. `false` if a collected write failed.
    fn write_dynamodb(&mut self, now: bool, today: Day) -> bool {
        let mut ok = self.collect_dynamodb(now);
        let interval = self.dynamodb_interval();
        let since = self.last_dynamodb.elapsed();
        let due = now || (since >= interval && (self.budget_waited.elapsed() >= self.budget_wait || since >= self.config.dynamodb_max_defer));
        let Some(mut sink) = self.dynamodb.take_if(|d| due && (!self.dynamodb_changes.is_empty() || d.needs_write())) else {
            return ok;
        };
        // A sink that does not know what the table holds, or has failed writes to redo
        // (planning takes those in), writes now.
        let unknown = sink.needs_write();
        if !now && !unknown && self.expected_over_budget() {
            // Not planned: another interval's events first.
            self.dynamodb = Some(sink);
            return ok;
        }
        let started = Instant::now();
        let changes = self.dynamodb_changes.take();
        let plan = sink.plan(&self.global, &changes, today);
        let writes = sink.writes(&plan).filter(|_| !unknown);
        if let Some(w) = writes.filter(|_| !changes.is_empty()) {
            self.writes_per_change = w as f64 / changes.len() as f64;
        }
        // Unknown (a first write, a retry): written now.
        if !now && writes.is_some_and(|w| self.budget_exceeded(w as f64)) {
            // The changes wait for a later round.
            self.dynamodb_changes.add(&changes);
            self.dynamodb = Some(sink);
            self.budget_waited = Instant::now();
            self.budget_wait = (self.budget_wait * 2).max(interval);
            self.summary.dynamodb_ms += started.elapsed().as_millis() as u64;
            return ok;
        }
        self.last_dynamodb = started;
        self.dynamodb_events = self.events_read();
        self.budget_wait = Duration::ZERO;
        self.summary.dynamodb_rounds += 1;
        let task = self.rt.spawn(async move {
            let result = tokio::time::timeout(CALL_DEADLINE, sink.execute(plan)).await;
            (sink, result, now_ms())
        });
        self.dynamodb_writing = Some(Writing { task, unseen: self.unseen.len() });
        self.summary.dynamodb_ms += self.last_dynamodb.elapsed().as_millis() as u64;
        if now {
            ok &= self.collect_dynamodb(true);
        }
        ok
    }

    /// Whether the keys changed since the last round, written at the last plan's rate of
    /// items per key, would exceed the write budget: then the round waits unplanned.
    fn expected_over_budget(&self) -> bool {
        self.budget_exceeded(self.writes_per_change * self.dynamodb_changes.len() as f64)
    }

    /// Whether a round of `writes` items writes more per event read since the last round
    /// than the write budget allows, and the round may still wait for that.
    fn budget_exceeded(&self, writes: f64) -> bool {
        let Some(budget) = self.config.dynamodb_writes_per_event else { return false };
        self.last_dynamodb.elapsed() < self.config.dynamodb_max_defer && writes > budget * self.events_read().saturating_sub(self.dynamodb_events) as f64
    }

    /// The events the merged state covers so far, as far as this writer can tell.
    fn events_read(&self) -> u64 {
        self.log_events.unwrap_or(self.summary.messages)
    }

    /// Takes the Valkey sink back from its write if it finished (or, with `wait`, once it
    /// finishes): its records are visible now. `false` if the write failed.
    fn collect_valkey(&mut self, wait: bool) -> bool {
        let Some(writing) = self.valkey_writing.take_if(|w| wait || w.task.is_finished()) else {
            return true;
        };
        let started = Instant::now();
        let (sink, result, ended) = self.rt.block_on(writing.task).expect("the Valkey sink write does not panic");
        self.summary.valkey_ms += started.elapsed().as_millis() as u64;
        self.summary.valkey_commands = sink.commands;
        self.valkey = Some(sink);
        match result {
            Ok(()) => {
                self.record_visible(writing.unseen, ended);
                true
            }
            Err(e) => {
                self.valkey_failed(&e);
                false
            }
        }
    }

    fn valkey_failed(&mut self, e: &toolrank_sink_valkey::Error) {
        warn!(error = %e, "valkey sink write failed; resynchronizing when it is back");
        self.summary.retried_errors += 1;
    }

    /// Takes the DynamoDB sink back from its write if it finished (or, with `wait`, once
    /// it finishes). `false` if the write failed (its keys stay pending in the sink).
    fn collect_dynamodb(&mut self, wait: bool) -> bool {
        let Some(writing) = self.dynamodb_writing.take_if(|w| wait || w.task.is_finished()) else {
            return true;
        };
        let started = Instant::now();
        let (mut sink, result, ended) = self.rt.block_on(writing.task).expect("the DynamoDB sink write does not panic");
        self.summary.dynamodb_ms += started.elapsed().as_millis() as u64;
        let mut ok = true;
        match result {
            Ok(Ok(())) if self.config.valkey_url.is_none() => self.record_visible(writing.unseen, ended),
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // What failed stays pending inside the sink.
                warn!(error = %e, "dynamodb sink write failed; retrying at the next flush");
                ok = false;
            }
            Err(_) => {
                // Cut off mid-write: what the table holds is unknown.
                warn!("dynamodb sink write cut off after {} s; comparing with the table at the next flush", CALL_DEADLINE.as_secs());
                sink.reset();
                ok = false;
            }
        }
        if std::mem::take(&mut self.dynamodb_reset) {
            sink.reset();
        }
        self.summary.retried_errors += u64::from(!ok);
        self.summary.dynamodb_requests = sink.stats.requests;
        self.summary.dynamodb_write_units = sink.units.get();
        let ok = ok && !sink.needs_write();
        self.dynamodb = Some(sink);
        ok
    }

    /// How long Valkey changes coalesce now: not at all, or while a backlog more than a
    /// second old is read, a tenth of its age (at most a second): a view that is behind
    /// anyway gets at most 10% staler, for far fewer commands.
    fn valkey_interval(&self) -> Duration {
        match self.backlog() {
            Some(behind) if behind >= Duration::from_secs(1) => (behind / 10).min(Duration::from_secs(1)),
            _ => Duration::ZERO,
        }
    }

    /// How long DynamoDB changes coalesce now (see [`SinkWriter::stretched`]).
    fn dynamodb_interval(&self) -> Duration {
        self.stretched(self.config.dynamodb_interval, self.config.dynamodb_max_defer)
    }

    /// `interval`, or while a backlog is read, as long as its records are late, up to
    /// `max`: work whose result is stale anyway (DynamoDB rounds, checkpoints of a
    /// catch-up's fast-growing state) is not paid for at every interval.
    pub fn stretched(&self, interval: Duration, max: Duration) -> Duration {
        stretch(interval, max, self.backlog())
    }

    /// The last consumer to finish must write what all others saved: waits for the sink
    /// lease (taking or renewing it loads the others' latest checkpoints), writes until
    /// the sinks acknowledge (up to 3 minutes), and releases the lease.
    pub fn finish(&mut self, others: &[String], units: &mut [&mut Engine]) {
        let deadline = Instant::now() + self.config.lease * 3;
        loop {
            self.refresh_lease(others);
            if self.holds_lease || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if !self.holds_lease {
            warn!("could not take the sink lease before exiting; its holder writes the sinks");
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(180);
        while !self.flush(units.iter_mut().map(|e| &mut **e), true) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        self.settle_renewal();
        if let Err(e) = self.call("releasing the sink lease", self.lease.release()) {
            warn!(error = %e, "could not release the sink lease; it lapses by itself");
        }
    }

    /// When any writer last wrote the sinks with [`write_once`](Self::write_once) (ms
    /// since the epoch, 0 if never).
    pub fn last_written(&self) -> Result<i64, toolrank_dynamodb::Error> {
        self.call("reading the sink lease", self.lease.last_released()).map(|ms| ms as i64)
    }

    /// Writes the sinks once, as lease holder, from the heads of the delta logs `logs`,
    /// and gives the lease up: for writers that come and go (Lambda invocations). Waits
    /// for the lease up to `wait`; `false` if it was not taken or a read or write failed.
    /// Unless `now`, DynamoDB keeps to the write budget, counting the records appended to
    /// the logs (its changes wait in this writer for its next turn with the lease).
    pub fn write_once(&mut self, logs: &[String], wait: Duration, now: bool) -> bool {
        let deadline = Instant::now() + wait;
        while !self.take_lease() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.holds_lease {
            return false;
        }
        let ok = match self.refresh_remotes(logs) {
            Ok(records) => {
                self.log_events = Some(records);
                // Both writes end before the lease is given up.
                let flushed = self.flush(std::iter::empty(), now);
                let dynamodb = self.collect_dynamodb(true);
                flushed & dynamodb & self.collect_valkey(true)
            }
            Err(e) => {
                self.summary.retried_errors += 1;
                warn!(error = %e, "reading the bucket logs failed");
                false
            }
        };
        self.settle_renewal();
        if let Err(e) = self.call("releasing the sink lease", self.lease.release()) {
            warn!(error = %e, "could not release the sink lease; it lapses by itself");
        }
        self.holds_lease = false;
        ok
    }

    /// Marks the start of the exit: the consumer's last checkpoint, then the sinks.
    pub fn finishing(&mut self) {
        self.finishing = Some(Instant::now());
    }

    /// The run's counters, with the latency percentiles.
    pub fn into_summary(self) -> Summary {
        let summary = self.counters();
        summary.publish();
        summary
    }

    /// The run's counters so far, with the latency percentiles.
    pub fn counters(&self) -> Summary {
        Summary {
            latency_p50_ms: self.latencies.quantile(0.5),
            latency_p99_ms: self.latencies.quantile(0.99),
            latency_max_ms: self.latencies.quantile(1.0),
            own_latency_p50_ms: self.own_latencies.quantile(0.5),
            own_latency_p99_ms: self.own_latencies.quantile(0.99),
            state_writes: self.store.write_requests() + self.lease.write_requests(),
            state_write_units: self.store.write_units() + self.lease.write_units(),
            read_ms: self.first_applied.map_or(0, |first| self.behind.0.saturating_duration_since(first).as_millis() as u64),
            finish_ms: self.finishing.map_or(0, |at| at.elapsed().as_millis() as u64),
            ..self.summary
        }
    }
}

/// How far behind the records applied are (`behind_ms`) if a backlog is being read: one
/// was applied within the last second, and the input has not run dry for a second.
fn reading_behind(since_applied: Duration, since_drained: Duration, behind_ms: i64) -> Option<Duration> {
    let reading = since_applied < Duration::from_secs(1) && since_drained >= Duration::from_secs(1);
    reading.then(|| Duration::from_millis(behind_ms.max(0) as u64))
}

/// `interval`, or during a backlog `behind` records, as long as that, up to `max`.
fn stretch(interval: Duration, max: Duration, backlog: Option<Duration>) -> Duration {
    match backlog {
        Some(behind) => interval.max(behind.min(max)),
        None => interval,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_backlog_being_read_counts_as_behind() {
        let s = Duration::from_secs;
        assert_eq!(reading_behind(s(0), s(5), 20_000), Some(s(20)));
        // Nothing applied for a second: not reading.
        assert_eq!(reading_behind(s(2), s(5), 20_000), None);
        // The input ran dry within the second: the records are as recent as it delivers them.
        assert_eq!(reading_behind(s(0), Duration::from_millis(500), 20_000), None);
        // A clock ahead of the records' creation time is no lateness.
        assert_eq!(reading_behind(s(0), s(5), -3), Some(s(0)));
    }

    #[test]
    fn a_backlog_stretches_an_interval_by_its_lateness_up_to_the_maximum() {
        let s = Duration::from_secs;
        assert_eq!(stretch(s(5), s(60), None), s(5));
        assert_eq!(stretch(s(5), s(60), Some(s(2))), s(5));
        assert_eq!(stretch(s(5), s(60), Some(s(20))), s(20));
        assert_eq!(stretch(s(5), s(60), Some(s(600))), s(60));
        // A maximum at or below the interval stretches nothing.
        assert_eq!(stretch(s(5), s(0), Some(s(600))), s(5));
    }
}
