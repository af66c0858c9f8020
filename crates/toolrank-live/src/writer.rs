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
use crate::sinks::Turn;
use crate::stages::{lease_scope, Stages};
use crate::summary::Summary;
use crate::units::{apply_deltas, log_copy, restore, BaseRead, LogCatchUp};
use std::time::{Duration, Instant};
use toolrank_engine::{Cuts, Engine, ScoreCensus, Shards};
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
    /// The sink stage's shards: each one's lease and sinks.
    stages: Stages,
    /// Where the shards' censuses are kept (`{scope}/censuses-of-{count}`), and the census of each
    /// held shard as last published.
    censuses: (String, Vec<Option<Vec<u8>>>),
    /// The recommendation cuts agreed from every shard's census (a split stage only;
    /// `None` inside: no pattern anywhere), once they are, and when the censuses were
    /// last exchanged.
    cuts: Option<Option<Cuts>>,
    censuses_at: Instant,
    /// The sum of every unit, with the patterns of the shards held: what the sinks show.
    merged: Merged,
    /// Whether a copy of another consumer's unit may lag its log or be missing (the last
    /// refresh failed or dropped one): the sinks are not written from such a sum.
    copies_behind: bool,
    /// Checkpoint saves and the state's size.
    checkpoints: Checkpointer,
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

/// How often a split sink stage's holders exchange their shards' censuses (once they
/// agreed on the cuts): each exchange writes a census of tens of kilobytes per shard held
/// (a write unit per kilobyte) and reads everybody's, while the cuts move little from one
/// second to the next.
const CENSUS_INTERVAL: Duration = Duration::from_secs(10);

/// How long a stopping holder tries to bring the sinks up to date ([`SinkWriter::finish`]).
const FINAL_WRITE_LIMIT: Duration = Duration::from_secs(180);

impl SinkWriter {
    /// A writer contending for the sink leases under `scope`: one sink stage per consumer
    /// group (or poller application). `sinks` holds each shard's sinks (one shard unless
    /// the stage is split), written in order.
    pub fn new(config: WriterConfig, scope: String, sinks: Vec<Vec<Wired>>) -> Result<SinkWriter, Error> {
        // One worker: DynamoDB sink writes run on it while the consumer's loop goes on.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("a tokio runtime");
        let client = rt.block_on(toolrank_dynamodb::client());
        let lease = |shard, count| {
            let lease = Lease::new(client.clone(), config.state_table.clone(), lease_scope(&scope, shard, count), config.owner.clone(), config.lease);
            SinkLease::new(lease, config.lease)
        };
        let stages = Stages::new(sinks, lease);
        // Under the shard count: a group split another way splits the users another way.
        let censuses = (format!("{scope}/censuses-of-{}", stages.count()), vec![None; stages.count() as usize]);
        // A single writer keeps every pattern; a shard's, those of the shards it takes.
        let shards = if stages.count() == 1 { Shards::all(1) } else { Shards::none(stages.count()) };
        Ok(SinkWriter {
            checkpoints: Checkpointer::new(CheckpointStore::new(client.clone(), config.state_table.clone()), &config),
            stages,
            censuses,
            cuts: None,
            censuses_at: Instant::now(),
            client,
            rt,
            summary: Summary::default(),
            config,
            merged: Merged::new(shards),
            copies_behind: false,
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

    /// Whether this writer holds a shard of the sink stage.
    pub fn holds_lease(&self) -> bool {
        self.stages.any_held()
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
        self.stages.has_sinks()
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
        if self.stages.any_held() {
            self.visibility.push(created_ms, wall);
        }
    }

    /// Takes or renews this writer's shards of the sink stage, up to its share of them
    /// ([`share`]), and gives up those above it; on taking one, its sinks are compared in
    /// full. A holder loads the latest checkpoints of `others`, the scopes of units it
    /// does not own; `units` are the engines of those it owns.
    pub fn refresh_lease(&mut self, others: &[String], units: &mut [&mut Engine]) {
        let share = share(self.stages.count(), units.len(), others.len());
        self.take_and_refresh(share, others, units, false);
    }

    /// In a split sink stage, every [`CENSUS_INTERVAL`] (with `now`, and until the cuts
    /// are agreed, at once): publishes the census of each shard held (when it changed)
    /// and reads the others', and takes the recommendation cuts from their sum; when they
    /// moved, the held shards' paced sinks (DynamoDB, which applies them) write again.
    /// Holding every shard, the cuts are the merged view's own. A census a holder has not
    /// published yet counts once it is: the cuts converge as the shards' figures settle.
    fn agree_on_cuts(&mut self, now: bool) -> Result<(), toolrank_dynamodb::Error> {
        let count = self.stages.count();
        if count == 1 || !self.stages.any_held() || self.copies_behind {
            return Ok(());
        }
        // Every interval: each change of the cuts makes every held shard's DynamoDB sink
        // rank its patterns again. At the exit (`now`) the cuts must be the final ones.
        let exchange = now || self.cuts.is_none() || self.censuses_at.elapsed() >= CENSUS_INTERVAL;
        if !exchange {
            return Ok(());
        }
        let today = self.config.today.unwrap_or_else(Day::today_utc);
        let mut sum = ScoreCensus::default();
        for (shard, census) in (0..count).zip(self.merged.figures().census_by_shard(count)) {
            if !self.stages.get(shard).lease.held() {
                continue;
            }
            let bytes = census.to_bytes();
            if self.censuses.1[shard as usize].as_ref() != Some(&bytes) {
                self.call("publishing a sink shard's census", self.store().put_value(&self.censuses.0, &shard.to_string(), bytes.clone()))?;
                self.censuses.1[shard as usize] = Some(bytes);
            }
            sum.merge(&census);
        }
        self.censuses_at = Instant::now();
        if !self.stages.all_held() {
            for (sk, bytes) in self.call("reading the sink shards' censuses", self.store().values(&self.censuses.0))? {
                let held = sk.parse::<u32>().is_ok_and(|shard| shard >= count || self.stages.get(shard).lease.held());
                if held {
                    continue;
                }
                match ScoreCensus::from_bytes(&bytes) {
                    Ok(census) => sum.merge(&census),
                    Err(e) => warn!(shard = sk, error = %e, "a sink shard's census does not decode; the cuts leave it out"),
                }
            }
        }
        let cuts = Some(sum.cuts(today));
        if cuts != self.cuts {
            self.cuts = cuts;
            for shard in 0..count {
                self.stages.get_mut(shard).sinks.recut();
            }
        }
        Ok(())
    }

    /// Takes or renews up to `share` shards' leases, gives up those held above it, and
    /// keeps the merged view to the patterns of the shards held; whether any is held. On
    /// taking a shard after another writer, its sinks are fenced (they compare in full
    /// at their next write); every write they make carries the lease's fencing token (its
    /// generation). Once none is held, the copies of others' units are dropped.
    fn take_leases(&mut self, share: usize, units: &mut [&mut Engine]) -> bool {
        let (was, count) = (self.stages.any_held(), self.stages.count());
        // Counted before any is taken: a shard is tried (a conditional write, billed when
        // it fails) only while fewer than the share are held, wherever those are.
        let mut held = self.stages.held();
        for shard in 0..count {
            let before = self.stages.get(shard).lease.held();
            if !before && held >= share {
                continue;
            }
            self.turn(shard);
            let stage = self.stages.get_mut(shard);
            let after = stage.lease.held();
            held = held + usize::from(after) - usize::from(before);
            if after && !self.merged.holds(shard) {
                // Its patterns join the view: the own units' now, the others' as their
                // copies are read again (the sinks wait for that).
                self.merged.take_shard(shard, units);
                self.copies_behind = true;
            }
        }
        for shard in (0..count).rev() {
            if held <= share {
                break;
            }
            let stage = self.stages.get_mut(shard);
            if stage.lease.held() {
                // Its running write ends first: its successor need not fence it off.
                stage.sinks.collect_all(&self.rt, &mut self.visibility, &mut self.summary.retried_errors);
                stage.lease.release(&self.rt);
                info!(shard, share, "gave a sink shard up: this consumer holds more than its share");
                self.merged.give_up_shard(shard);
                held -= 1;
            }
        }
        for shard in (0..count).filter(|&s| !self.stages.get(s).lease.held()) {
            // Its next holder publishes it; if that is this writer again, anew.
            self.censuses.1[shard as usize] = None;
        }
        if was && held == 0 {
            // Another consumer makes these visible; their latency is not ours to measure.
            self.visibility.clear();
            self.merged.drop_copies();
        }
        toolrank_metrics::gauge!("toolrank_sink_lease_held").set(held as f64);
        held > 0
    }

    /// Renews the leases held (taking none); whether any is still held.
    fn renew(&mut self) -> bool {
        for shard in 0..self.stages.count() {
            if self.stages.get_mut(shard).lease.held() {
                self.turn(shard);
            }
        }
        self.stages.any_held()
    }

    /// Takes or renews shard `shard`'s lease, fencing its sinks when another writer held
    /// it since; one lost leaves the merged view (unless it is the only shard).
    fn turn(&mut self, shard: u32) {
        let count = self.stages.count();
        let stage = self.stages.get_mut(shard);
        match stage.lease.turn(&self.rt, &mut self.summary.retried_errors) {
            Held::Taken => {
                info!(shard, "took the sink lease");
                stage.sinks.fence();
            }
            Held::Lost => {
                info!(shard, "lost the sink lease");
                if count > 1 {
                    self.merged.give_up_shard(shard);
                }
            }
            Held::Still | Held::No => {}
        }
        let stage = self.stages.get_mut(shard);
        if let Some(generation) = stage.lease.generation().filter(|_| stage.lease.held()) {
            stage.sinks.hold(generation);
        }
    }

    /// Brings the merged copies of the units other consumers own (`others`) to their
    /// logs' heads: by the deltas after a copy's position, or from the base when there
    /// is no copy or a new base replaced those deltas. Copies of units not among
    /// `others` any more are dropped. Returns the records the logs hold.
    fn refresh_remotes(&mut self, others: &[String]) -> Result<u64, Error> {
        self.merged.keep_copies(others);
        self.copies_behind = true;
        let mut records = 0;
        let heads = self.call("reading the log heads", self.store().log_heads(others))?;
        for (i, (scope, head)) in others.iter().zip(heads).enumerate() {
            // Loading copies can take longer than a lease: it is renewed beside the loop,
            // looked at between them, and once lost the rest are not loaded.
            if i > 0 && !self.renew() {
                return Ok(records);
            }
            let Some(head) = head else { continue };
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
            let shards = self.merged.shards();
            let copied = log_copy(scope, &log, shards).or_else(|e| match log.figures_only {
                // A base of another version may need its sessions to be read at all.
                true => self.call("reading a log", self.store().load_log(scope)).map_err(Error::from).and_then(|log| log_copy(scope, &log, shards)),
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
        if !now && self.stages.resting(self.backlog()) {
            // No sink writes yet (a backlog stretches their intervals): the changes
            // coalesce in the units meanwhile, where forwarding them costs nothing.
            return true;
        }
        for engine in units {
            self.merged.forward(engine);
        }
        if !self.stages.any_held() {
            return true;
        }
        if self.copies_behind || (self.stages.count() > 1 && self.cuts.is_none()) {
            // A sum missing part of another consumer's units would show too little, and
            // DynamoDB items chosen without the other shards' cuts the wrong ones: the
            // changes wait for the next refresh. The write is owed, not made.
            return false;
        }
        let changes = self.merged.take_changes();
        if !changes.is_empty() {
            self.summary.sink_writes += 1;
        }
        let (backlog, events) = (self.backlog(), self.log_events.unwrap_or(self.summary.messages));
        let today = self.config.today.unwrap_or_else(Day::today_utc);
        let scores = std::cell::OnceCell::new();
        let mut ok = true;
        for (shard, changes) in self.stages.split(changes, self.merged.figures()).into_iter().enumerate() {
            let stage = self.stages.get_mut(shard as u32);
            // A shard not held has no patterns in the view; the agents' changes wait for
            // shard 0's holder, who compares them in full.
            if !stage.lease.held() {
                continue;
            }
            let mut turn = Turn {
                global: self.merged.figures(),
                rt: &self.rt,
                today,
                cuts: self.cuts.flatten(),
                scores: &scores,
                backlog,
                events,
                visibility: &mut self.visibility,
                retried: &mut self.summary.retried_errors,
            };
            ok &= stage.sinks.write(&changes, now, &mut turn);
        }
        ok
    }

    /// `interval`, or while a backlog is read, as long as its records are late, up to
    /// `max`: work whose result is stale anyway (DynamoDB rounds, checkpoints of a
    /// catch-up's fast-growing state) is not paid for at every interval.
    pub fn stretched(&self, interval: Duration, max: Duration) -> Duration {
        stretch(interval, max, self.backlog())
    }

    /// The last consumer to finish must write what all others saved: waits for every
    /// shard's lease (taking or renewing them loads the others' latest checkpoints; a
    /// shard another consumer keeps holding is left to it), writes until the sinks
    /// acknowledge (up to [`FINAL_WRITE_LIMIT`], renewing the leases; lost meanwhile,
    /// their new holders write them), and releases the leases.
    pub fn finish(&mut self, others: &[String], units: &mut [&mut Engine]) {
        let deadline = Instant::now() + self.config.lease * 3;
        let every = self.stages.count() as usize;
        loop {
            self.take_and_refresh(every, others, units, true);
            if self.stages.all_held() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if !self.stages.any_held() {
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
            let held = self.stages.held();
            self.take_and_refresh(held, others, units, true);
            if self.stages.held() < held {
                warn!("lost the sink lease while writing before exiting; its holder writes the sinks");
                return;
            }
        }
        self.release_all();
    }

    /// [`refresh_lease`](Self::refresh_lease) with a share of `share` shards; `exiting`,
    /// the cuts are agreed anew. A failed refresh leaves `copies_behind` set: the sinks
    /// wait for the next one.
    fn take_and_refresh(&mut self, share: usize, others: &[String], units: &mut [&mut Engine], exiting: bool) {
        if !self.take_leases(share, units) {
            return;
        }
        if let Err(e) = self.refresh_remotes(others) {
            self.summary.retried_errors += 1;
            warn!(error = %e, "reading other consumers' checkpoints failed; retrying");
        }
        if let Err(e) = self.agree_on_cuts(exiting) {
            self.summary.retried_errors += 1;
            warn!(error = %e, "exchanging the sink shards' censuses failed; retrying");
        }
    }

    /// Gives up every shard held.
    fn release_all(&mut self) {
        for shard in 0..self.stages.count() {
            let stage = self.stages.get_mut(shard);
            if stage.lease.held() {
                stage.lease.release(&self.rt);
            }
        }
        toolrank_metrics::gauge!("toolrank_sink_lease_held").set(0.0);
    }

    /// When any writer last wrote the sinks with [`write_once`](Self::write_once) (ms
    /// since the epoch, 0 if never).
    pub fn last_written(&self) -> Result<i64, toolrank_dynamodb::Error> {
        self.stages.get(0).lease.last_released(&self.rt).map(|ms| ms as i64)
    }

    /// Writes the sinks once, as lease holder, from the heads of the delta logs `logs`,
    /// and gives the lease up: for writers that come and go (Lambda invocations). Waits
    /// for the lease up to `wait`; `false` if it was not taken or a read or write failed.
    /// Unless `now`, DynamoDB keeps to the write budget, counting the records appended to
    /// the logs (its changes wait in this writer for its next turn with the lease).
    pub fn write_once(&mut self, logs: &[String], wait: Duration, now: bool) -> bool {
        let deadline = Instant::now() + wait;
        let every = self.stages.count() as usize;
        while !self.take_leases(every, &mut []) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.stages.any_held() {
            return false;
        }
        let ok = match self.refresh_remotes(logs) {
            // Lost while the logs were read: its new holder writes them.
            Ok(_) if !self.stages.any_held() => false,
            Ok(records) => {
                self.log_events = Some(records);
                // Both writes end before the lease is given up.
                let flushed = self.flush(std::iter::empty(), now);
                flushed & self.stages.collect_all(&self.rt, &mut self.visibility, &mut self.summary.retried_errors)
            }
            Err(e) => {
                self.summary.retried_errors += 1;
                warn!(error = %e, "reading the bucket logs failed");
                false
            }
        };
        self.release_all();
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
            state_writes: self.store().write_requests() + self.stages.iter().map(|s| s.lease.writes().0).sum::<u64>(),
            state_write_units: self.store().write_units() + self.stages.iter().map(|s| s.lease.writes().1).sum::<f64>(),
            read_ms: self.first_applied.map_or(0, |first| self.behind.0.saturating_duration_since(first).as_millis() as u64),
            finish_ms: self.finishing.map_or(0, |at| at.elapsed().as_millis() as u64),
            ..self.summary
        };
        self.stages.iter().for_each(|s| s.sinks.add_to(&mut summary));
        summary
    }
}

/// A writer's share of `shards` shards when it owns `owned` of the units and others own
/// `others`: the shards in proportion to the units, rounded up, and at least one (a
/// writer that owns no unit stands in for one that stopped).
fn share(shards: u32, owned: usize, others: usize) -> usize {
    let units = owned + others;
    match units {
        0 => shards as usize,
        _ => (shards as usize * owned).div_ceil(units).max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn a_writer_takes_shards_in_proportion_to_its_units_and_at_least_one() {
        // One shard: every writer contends for it, as the one sink lease.
        assert_eq!([share(1, 0, 4), share(1, 4, 0), share(1, 1, 7)], [1, 1, 1]);
        // Four shards over two members of eight partitions: two each; a lone writer all.
        assert_eq!([share(4, 4, 4), share(4, 8, 0), share(4, 0, 0)], [2, 4, 4]);
        // Rounded up, so that the members' shares cover every shard.
        assert_eq!([share(3, 2, 2), share(3, 1, 3), share(3, 3, 1)], [2, 1, 3]);
    }
}
