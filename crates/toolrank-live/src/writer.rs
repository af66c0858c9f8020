//! The sink writer: the merged engine, the sink lease, checkpoints, and the sinks'
//! schedule (see the crate docs).

use crate::backlog::{reading_behind, stretch};
use crate::checkpointer::{Checkpointer, Saving};
use crate::clock::now_ms;
use crate::config::WriterConfig;
use crate::deadline::within;
use crate::error::Error;
use crate::latency::Visibility;
use crate::lease::{Held, SinkLease};
use crate::merged::Merged;
use crate::sinks::{Scheduler, Turn};
use crate::summary::Summary;
use crate::units::{apply_deltas, log_copy, restore, BaseRead, LogCatchUp};
use std::time::{Duration, Instant};
use toolrank_engine::Engine;
use toolrank_events::Day;
use toolrank_sink::Wired;
use toolrank_state::{CheckpointStore, Lease, LogHead};
use tracing::{debug, error, info, warn};

/// The merged engine, the sink lease and the sinks (see the crate docs).
pub struct SinkWriter {
    /// The runtime every blocking call of the consumer runs on.
    rt: tokio::runtime::Runtime,
    client: aws_sdk_dynamodb::Client,
    summary: Summary,
    config: WriterConfig,
    lease: SinkLease,
    /// The sum of every unit: what the sinks show.
    merged: Merged,
    /// Whether a copy of another consumer's unit may lag its log or be missing (the last
    /// refresh failed or dropped one): the sinks are not written from such a sum.
    copies_behind: bool,
    /// Checkpoint saves and the state's size.
    checkpoints: Checkpointer,
    /// The wired sinks and when each writes.
    sinks: Scheduler,
    /// The records the read delta logs hold, for a writer that only reads logs
    /// ([`write_once`](Self::write_once)): its events, where a consumer counts its own.
    log_events: Option<u64>,
    /// The records not yet visible, and the latencies of those that became visible.
    visibility: Visibility,
    /// When the latest record was applied, and how old it was then (ms).
    behind: (Instant, i64),
    /// When the first record was applied; when the exit began ([`SinkWriter::finishing`]).
    first_applied: Option<Instant>,
    finishing: Option<Instant>,
    /// When the input last had nothing waiting ([`SinkWriter::caught_up`]).
    drained: Instant,
    /// When the metrics were last published.
    published: Instant,
}

/// How many times a checkpoint is read before it counts as broken ([`SinkWriter::claim`]).
const BROKEN_READS: u32 = 3;

/// How long a stopping holder tries to bring the sinks up to date ([`SinkWriter::finish`]).
const FINAL_WRITE_LIMIT: Duration = Duration::from_secs(180);

impl SinkWriter {
    /// A writer contending for the sink lease of `lease_scope`: one writer per consumer
    /// group (or poller application).
    /// The `sinks` are written in order.
    pub fn new(config: WriterConfig, lease_scope: String, sinks: Vec<Wired>) -> Result<SinkWriter, Error> {
        // One worker: DynamoDB sink writes run on it while the consumer's loop goes on.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("a tokio runtime");
        let client = rt.block_on(toolrank_dynamodb::client());
        Ok(SinkWriter {
            checkpoints: Checkpointer::new(CheckpointStore::new(client.clone(), config.state_table.clone()), &config),
            lease: SinkLease::new(Lease::new(client.clone(), config.state_table.clone(), lease_scope, config.owner.clone(), config.lease), config.lease),
            client,
            rt,
            summary: Summary::default(),
            config,
            merged: Merged::new(),
            copies_behind: false,
            sinks: Scheduler::new(sinks),
            log_events: None,
            visibility: Visibility::new(),
            behind: (Instant::now(), 0),
            first_applied: None,
            finishing: None,
            drained: Instant::now(),
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

    /// Runs `future` to completion on the writer's runtime: a source's own calls (reading
    /// shards) share the runtime with the writer's.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.rt.block_on(future)
    }

    /// The DynamoDB client, for a source's own calls (a stream's clients share its
    /// configuration).
    pub fn client(&self) -> &aws_sdk_dynamodb::Client {
        &self.client
    }

    /// The run's counters, for what a source counts itself (records read, redeliveries
    /// skipped, dead letters, retries).
    pub fn tally(&mut self) -> &mut Summary {
        &mut self.summary
    }

    pub fn owner(&self) -> &str {
        &self.config.owner
    }

    pub fn holds_lease(&self) -> bool {
        self.lease.held()
    }

    /// Claims a unit's checkpoint for this consumer (fencing its previous owner) and
    /// returns its engine (added to the merged one, tracking what changes for the next
    /// save), its position, and where its log stands; `None` when the state table failed
    /// the claim (counted), for a caller that goes on with its other units and tries
    /// again later.
    pub fn claim(&mut self, scope: &str) -> Result<Option<(Engine, Option<String>, LogHead)>, Error> {
        let mut reads = 0;
        loop {
            reads += 1;
            let claimed = match self.call("claiming a checkpoint", self.store().claim(scope, &self.config.owner)) {
                Ok(ck) => self.adopt(scope, ck).map(Some),
                Err(toolrank_dynamodb::Error::Input(message)) => Err(Error::Unreadable { scope: scope.to_owned(), message }),
                Err(e) => {
                    self.summary.retried_errors += 1;
                    warn!(error = %e, "claiming {scope} failed; trying again later");
                    return Ok(None);
                }
            };
            match claimed {
                // A read that overlapped another writer's save can see part of it (a
                // Query is not isolated from a transaction): read again before calling
                // the checkpoint broken, which stops its unit.
                Err(e) if e.is_broken_checkpoint() && reads < BROKEN_READS => {
                    warn!(error = %e, "a checkpoint did not read back; reading it again");
                    std::thread::sleep(Duration::from_secs(1));
                }
                claimed => return claimed,
            }
        }
    }

    /// Restores a claimed checkpoint into a unit's engine and adds it to the merged one.
    fn adopt(&mut self, scope: &str, ck: toolrank_state::Checkpoint) -> Result<(Engine, Option<String>, LogHead), Error> {
        let mut engine = restore(scope, &ck.state)?;
        apply_deltas(scope, &mut engine, &ck.deltas)?;
        engine.track_deltas();
        self.checkpoints.claimed(scope);
        self.merged.adopt(scope, &mut engine);
        Ok((engine, ck.position, ck.at))
    }

    /// Whether any sink is configured.
    pub fn has_sinks(&self) -> bool {
        !self.sinks.is_empty()
    }

    /// Moves the merged copy of a delta-log unit (a Lambda bucket) from log position
    /// `from` to `to` by `deltas`, which this process just appended itself: that spares
    /// reading them back. A copy at another position is caught up by the next
    /// [`write_once`](Self::write_once).
    pub fn advance_log(&mut self, scope: &str, from: u64, to: u64, deltas: &[Vec<u8>]) -> Result<(), Error> {
        self.merged.advance_copy(scope, from, to, deltas)
    }

    /// Takes an owned unit's share out of the merged engine (it moved elsewhere). Its
    /// pending deltas are forwarded first: the merged engine must hold exactly what is
    /// taken out.
    pub fn release(&mut self, engine: &mut Engine) {
        self.merged.release(engine);
    }

    /// Saves a unit's checkpoint. `Ok(None)`: it failed and was counted (the unit stays
    /// dirty, its position must not be acknowledged); `Err(Fenced)`: another consumer
    /// owns the unit now.
    pub fn save(&mut self, scope: &str, at: LogHead, position: &str, engine: &mut Engine) -> Result<Option<LogHead>, toolrank_dynamodb::Error> {
        let mut saving = Some(self.start_save(scope, at, position, engine));
        self.saved(&mut saving, true).expect("waited for")
    }

    /// Starts saving a unit's checkpoint on the runtime's worker: what changed since the
    /// last save is taken now, the upload runs while the consumer goes on; collect it
    /// with [`saved`](Self::saved).
    pub fn start_save(&mut self, scope: &str, at: LogHead, position: &str, engine: &mut Engine) -> Saving {
        self.checkpoints.start(&self.rt, &mut self.merged, &mut self.summary, scope, at, position, engine)
    }

    /// The outcome of a started save once it finished (with `wait`, waiting for it), like
    /// [`save`](Self::save)'s; `None` while it runs or if there is none.
    pub fn saved(&mut self, saving: &mut Option<Saving>, wait: bool) -> Option<Result<Option<LogHead>, toolrank_dynamodb::Error>> {
        self.checkpoints.collect(&self.rt, &mut self.summary, saving, wait)
    }

    /// Records the size of the state of the units this consumer owns (after a checkpoint
    /// round), at most every half minute unless `now` (the final round).
    pub fn record_state<'a>(&mut self, units: impl IntoIterator<Item = &'a Engine>, now: bool) {
        self.checkpoints.measure(&mut self.summary, units, now);
    }

    /// Forgets the tombstones of a unit's `engine` older than the horizon, and the names
    /// nothing refers to any more, counting both.
    pub fn expire_tombstones(&mut self, engine: &mut Engine) {
        self.checkpoints.expire(&mut self.summary, engine);
    }

    /// The pipeline's state table.
    pub fn store(&self) -> &CheckpointStore {
        self.checkpoints.store()
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
        let (now, wall) = (Instant::now(), now_ms());
        self.first_applied.get_or_insert(now);
        self.behind = (now, wall - created_ms);
        if self.lease.held() {
            self.visibility.push(created_ms, wall);
        }
    }

    /// Takes or renews the sink lease; on taking it, the sinks are compared in full. The
    /// holder loads the latest checkpoints of `others`, the scopes of units it does not own.
    pub fn refresh_lease(&mut self, others: &[String]) {
        if self.take_lease() {
            // A failed refresh leaves `copies_behind` set: the sinks wait for the next one.
            if let Err(e) = self.refresh_remotes(others) {
                self.summary.retried_errors += 1;
                warn!(error = %e, "reading other consumers' checkpoints failed; retrying");
            }
        }
    }

    /// Takes or renews the sink lease; whether it is held. On taking it after another
    /// writer, the sinks are fenced (they compare in full at their next write); every
    /// write they make carries the lease's fencing token (its generation); on losing
    /// it, the copies of others' units are dropped.
    fn take_lease(&mut self) -> bool {
        match self.lease.turn(&self.rt, &mut self.summary.retried_errors) {
            Held::Taken => {
                info!("took the sink lease");
                self.sinks.fence();
            }
            Held::Lost => {
                info!("lost the sink lease");
                // Another consumer makes these visible; their latency is not ours to measure.
                self.visibility.clear();
                self.merged.drop_copies();
            }
            Held::Still | Held::No => {}
        }
        if let Some(generation) = self.lease.generation().filter(|_| self.lease.held()) {
            self.sinks.hold(generation);
        }
        self.lease.held()
    }

    /// Brings the merged copies of the units other consumers own (`others`) to their
    /// logs' heads: by the deltas after a copy's position, or from the base when there
    /// is no copy or a new base replaced those deltas. Copies of units not among
    /// `others` any more are dropped. Returns the records the logs hold.
    fn refresh_remotes(&mut self, others: &[String]) -> Result<u64, Error> {
        self.merged.keep_copies(others);
        self.copies_behind = true;
        let mut records = 0;
        for (i, scope) in others.iter().enumerate() {
            // Loading copies can take longer than a lease: it is renewed beside the loop,
            // looked at between them, and once lost the rest are not loaded.
            if i > 0 && !self.take_lease() {
                return Ok(records);
            }
            let Some(head) = self.call("reading a log head", self.store().log_head(scope))? else { continue };
            records += head.records;
            let at = self.merged.copy_at(scope);
            let log = match self.log_catch_up(scope, at, &head, BaseRead::Figures)? {
                LogCatchUp::Current => continue,
                LogCatchUp::Deltas(deltas) => {
                    if let Err(e) = self.merged.advance_copy(scope, at.expect("deltas follow a copy"), head.head, &deltas) {
                        // The copy is dropped; the next refresh reads the whole log.
                        warn!(error = %e, "another consumer's deltas do not apply");
                        return Ok(records);
                    }
                    continue;
                }
                LogCatchUp::Log(log) => log,
            };
            let copied = log_copy(scope, &log).or_else(|e| match log.figures_only {
                // A base of another version may need its sessions to be read at all.
                true => self.call("reading a log", self.store().load_log(scope)).map_err(Error::from).and_then(|log| log_copy(scope, &log)),
                false => Err(e),
            });
            let figures = match copied {
                Ok(figures) => figures,
                // Its owner stops it (or will, when it claims it): the others' copies go on.
                Err(e) if e.is_broken_checkpoint() => {
                    error!(error = %e, "another consumer's checkpoint does not restore; the rankings leave it out");
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.merged.hold_copy(scope, figures, log.at.head);
            debug!(scope, generation = log.at.generation, head = log.at.head, "merged another consumer's checkpoint");
        }
        self.copies_behind = false;
        Ok(records)
    }

    /// What brings a copy of a delta-log unit at log position `at` (`None`: no copy) to
    /// `head`: the deltas after it, or the whole log when there is no copy or a
    /// compaction deleted those deltas.
    pub fn log_catch_up(&self, scope: &str, at: Option<u64>, head: &LogHead, base: BaseRead) -> Result<LogCatchUp, toolrank_dynamodb::Error> {
        if at == Some(head.head) {
            return Ok(LogCatchUp::Current);
        }
        if let Some(at) = at.filter(|at| (head.base_at..head.head).contains(at)) {
            match self.call("reading a log's deltas", self.store().deltas(scope, at, head.head)) {
                Ok(deltas) => return Ok(LogCatchUp::Deltas(deltas)),
                // Compacted meanwhile: from the base.
                Err(toolrank_dynamodb::Error::Input(_)) => {}
                Err(e) => return Err(e),
            }
        }
        match base {
            BaseRead::Whole => self.call("reading a log", self.store().load_log(scope)),
            BaseRead::Figures => self.call("reading a log's figures", self.store().load_log_figures(scope)),
        }
        .map(LogCatchUp::Log)
    }

    /// Forwards the owned units' deltas into the merged engine and, as lease holder,
    /// writes what changed to the sinks. `false` when a sink write failed (it is
    /// retried). `now` writes every sink even before its interval is up.
    pub fn flush<'a>(&mut self, units: impl IntoIterator<Item = &'a mut Engine>, now: bool) -> bool {
        // Every consumer's counters, holder or not, resting or not.
        if self.published.elapsed() >= Duration::from_secs(1) {
            self.published = Instant::now();
            self.counters().publish();
            toolrank_metrics::gauge!("toolrank_source_age_seconds").set(self.behind.1.max(0) as f64 / 1000.0);
        }
        if !now && self.sinks.resting(self.backlog()) {
            // No sink writes yet (a backlog stretches their intervals): the changes
            // coalesce in the units meanwhile, where forwarding them costs nothing.
            return true;
        }
        for engine in units {
            self.merged.forward(engine);
        }
        if !self.lease.held() {
            return true;
        }
        if self.copies_behind {
            // A sum missing part of another consumer's units would show too little: the
            // changes wait for the next refresh. The write is owed, not made.
            return false;
        }
        let changes = self.merged.take_changes();
        let mut turn = Turn {
            global: self.merged.figures(),
            rt: &self.rt,
            today: self.config.today.unwrap_or_else(Day::today_utc),
            backlog: self.backlog(),
            events: self.log_events.unwrap_or(self.summary.messages),
            visibility: &mut self.visibility,
            retried: &mut self.summary.retried_errors,
        };
        let ok = self.sinks.write(&changes, now, &mut turn);
        if !changes.is_empty() {
            self.summary.sink_writes += 1;
        }
        ok
    }

    /// `interval`, or while a backlog is read, as long as its records are late, up to
    /// `max`: work whose result is stale anyway (DynamoDB rounds, checkpoints of a
    /// catch-up's fast-growing state) is not paid for at every interval.
    pub fn stretched(&self, interval: Duration, max: Duration) -> Duration {
        stretch(interval, max, self.backlog())
    }

    /// The last consumer to finish must write what all others saved: waits for the sink
    /// lease (taking or renewing it loads the others' latest checkpoints), writes until
    /// the sinks acknowledge (up to [`FINAL_WRITE_LIMIT`], renewing the lease; lost
    /// meanwhile, its new holder writes them), and releases the lease.
    pub fn finish(&mut self, others: &[String], units: &mut [&mut Engine]) {
        let deadline = Instant::now() + self.config.lease * 3;
        loop {
            self.refresh_lease(others);
            if self.lease.held() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if !self.lease.held() {
            warn!("could not take the sink lease before exiting; its holder writes the sinks");
            return;
        }
        let deadline = Instant::now() + FINAL_WRITE_LIMIT;
        while !self.flush(units.iter_mut().map(|e| &mut **e), true) {
            if Instant::now() >= deadline {
                // Nothing is lost: the checkpoints hold it, and the next holder writes it.
                warn!(
                    limit_secs = FINAL_WRITE_LIMIT.as_secs(),
                    "the sinks' last write did not finish in time; the next holder of the sink lease writes what is left"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
            // Renewed between tries: a lease that lapsed while a sink refused would pass to
            // another consumer, and this one's writes would be refused until the deadline.
            // Renewing also reads again the copies a failed refresh left behind.
            self.refresh_lease(others);
            if !self.lease.held() {
                warn!("lost the sink lease while writing before exiting; its holder writes the sinks");
                return;
            }
        }
        self.lease.release(&self.rt);
    }

    /// When any writer last wrote the sinks with [`write_once`](Self::write_once) (ms
    /// since the epoch, 0 if never).
    pub fn last_written(&self) -> Result<i64, toolrank_dynamodb::Error> {
        self.lease.last_released(&self.rt).map(|ms| ms as i64)
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
        if !self.lease.held() {
            return false;
        }
        let ok = match self.refresh_remotes(logs) {
            // Lost while the logs were read: its new holder writes them.
            Ok(_) if !self.lease.held() => false,
            Ok(records) => {
                self.log_events = Some(records);
                // Both writes end before the lease is given up.
                let flushed = self.flush(std::iter::empty(), now);
                flushed & self.sinks.collect_all(&self.rt, &mut self.visibility, &mut self.summary.retried_errors)
            }
            Err(e) => {
                self.summary.retried_errors += 1;
                warn!(error = %e, "reading the bucket logs failed");
                false
            }
        };
        self.lease.release(&self.rt);
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
        let mut summary = Summary {
            latency_p50_ms: self.visibility.latency(0.5),
            latency_p99_ms: self.visibility.latency(0.99),
            latency_max_ms: self.visibility.latency(1.0),
            own_latency_p50_ms: self.visibility.own_latency(0.5),
            own_latency_p99_ms: self.visibility.own_latency(0.99),
            state_writes: self.store().write_requests() + self.lease.writes().0,
            state_write_units: self.store().write_units() + self.lease.writes().1,
            read_ms: self.first_applied.map_or(0, |first| self.behind.0.saturating_duration_since(first).as_millis() as u64),
            finish_ms: self.finishing.map_or(0, |at| at.elapsed().as_millis() as u64),
            ..self.summary
        };
        self.sinks.add_to(&mut summary);
        summary
    }
}
