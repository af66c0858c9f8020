//! `toolrank consume kafka`: a consumer group feeding the engine, then the sinks, with
//! an exactly-once effect.
//!
//! How (also in the README):
//! - **State per partition.** Each assigned partition has its own [`Engine`]. Every
//!   checkpoint interval its snapshot and the next offset are saved together, atomically,
//!   in the state table ([`CheckpointStore`]). On assignment the partition's checkpoint is
//!   claimed and restored, and messages below its offset are skipped: whatever Kafka
//!   redelivers after a crash, a restart or a rebalance is applied exactly once to a
//!   state that did not contain it. Partitions move between consumers with their state.
//! - **Fencing.** Claiming a partition makes this consumer its checkpoint's only writer; a
//!   consumer that lost it (a zombie after a rebalance) gets `Fenced` and lets go.
//! - **Sinks.** Partition engines forward their deltas into one merged engine. One
//!   consumer of the group holds the sink lease and writes the sinks from its own
//!   partitions plus the latest checkpoints of the others, so the sinks always show
//!   the sum over all partitions. Sink writes are absolute values (counts, dates, rank
//!   keys), so rewriting after a restart converges instead of double counting.
//! - **Offsets.** Kafka offsets are committed after the checkpoint (and, for the lease
//!   holder, after the sinks acknowledged the write); they serve lag monitoring, while
//!   the checkpoint is what a restart resumes from.

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use toolrank_dynamodb::{CheckpointStore, Lease};
use toolrank_engine::{Applied, Changes, Engine};
use toolrank_events::{decode_line, Day};
use toolrank_sink_dynamodb::DynamoSink;
use toolrank_sink_valkey::ValkeySink;
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    State(#[from] toolrank_dynamodb::Error),
    #[error("checkpoint of {scope}: {source}")]
    Snapshot { scope: String, source: toolrank_engine::StateError },
    #[error("topic {0} not found")]
    NoTopic(String),
}

/// What `consume kafka` needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub dead_letter_topic: String,
    /// Exit after this long without a message.
    pub until_idle: Option<Duration>,
    /// How often deltas reach Valkey (and the merged engine).
    pub flush_interval: Duration,
    /// How often changes reach DynamoDB: every write costs money, so it coalesces longer.
    pub dynamodb_interval: Duration,
    /// How often partition state is checkpointed.
    pub checkpoint_interval: Duration,
    /// The pipeline's state table (checkpoints, leases).
    pub state_table: String,
    /// The DynamoDB sink's table; `None` disables the sink.
    pub table: Option<String>,
    /// Valkey URL; `None` disables the sink.
    pub valkey_url: Option<String>,
    pub valkey_prefix: String,
    /// Scores are written for this date; `None` is the UTC date at each write.
    pub today: Option<Day>,
    /// This consumer's identity in leases and checkpoints.
    pub owner: String,
    /// How long the sink lease lasts without renewal.
    pub lease: Duration,
}

/// Counters of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub messages: u64,
    pub skipped_redeliveries: u64,
    pub changes: u64,
    pub stale: u64,
    pub ignored: u64,
    pub dead_letters: u64,
    pub checkpoints: u64,
    pub sink_writes: u64,
    pub dynamodb_requests: u64,
    pub valkey_commands: u64,
    /// Failed sink writes, checkpoints and lease renewals (all retried).
    pub retried_errors: u64,
    /// Milliseconds from a message's Kafka timestamp to its effect being visible in
    /// Valkey (DynamoDB without Valkey), measured by the sink writer.
    pub latency_p50_ms: Option<u64>,
    pub latency_p99_ms: Option<u64>,
    pub latency_max_ms: Option<u64>,
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
        self.buckets.iter().position(|&n| {
            seen += n;
            seen >= rank
        }).filter(|_| self.count > 0).map(|i| i as u64)
    }
}

struct Partition {
    engine: Engine,
    next_offset: i64,
    generation: u64,
    /// Offsets consumed since the last checkpoint.
    dirty: bool,
}

/// A partition owned by another consumer, as of its latest checkpoint (lease holder only).
struct Remote {
    engine: Engine,
    generation: u64,
}

struct Consumer_ {
    config: Config,
    rt: tokio::runtime::Runtime,
    consumer: BaseConsumer,
    dead_letters: BaseProducer,
    store: CheckpointStore,
    lease: Lease,
    holds_lease: bool,
    parts: BTreeMap<i32, Partition>,
    remotes: BTreeMap<i32, Remote>,
    global: Engine,
    dynamodb: Option<DynamoSink>,
    valkey: Option<ValkeySink>,
    summary: Summary,
    partition_count: i32,
    /// When the sink lease was last renewed.
    lease_renewed: Instant,
    /// Changes not yet written to DynamoDB, and when it was last written.
    dynamodb_changes: Changes,
    last_dynamodb: Instant,
    /// Kafka timestamps (ms) of the messages applied since the last visible sink write.
    unseen: Vec<i64>,
    latencies: Latencies,
}

fn scope(config: &Config, partition: i32) -> String {
    format!("kafka/{}/{}/{partition}", config.group, config.topic)
}

/// Runs the consumer until `stop` is set or, with `until_idle`, the topic is drained.
pub fn run(config: Config, stop: Arc<AtomicBool>) -> Result<Summary, Error> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let client = rt.block_on(toolrank_dynamodb::client());
    let consumer: BaseConsumer = toolrank_kafka::client_config(&config.brokers)
        .set("group.id", &config.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // Also the rebalance timeout: how long a rebalance may wait for members.
        .set("max.poll.interval.ms", "60000")
        .create()?;
    consumer.subscribe(&[&config.topic])?;
    let metadata = consumer.fetch_metadata(Some(&config.topic), Duration::from_secs(10))?;
    let partition_count = metadata.topics().iter().find(|t| t.name() == config.topic).map_or(0, |t| t.partitions().len() as i32);
    if partition_count == 0 {
        return Err(Error::NoTopic(config.topic.clone()));
    }
    let dead_letters: BaseProducer = toolrank_kafka::client_config(&config.brokers).set("compression.type", "none").set("linger.ms", "5").create()?;
    let lease_scope = format!("kafka/{}/{}/sink-writer", config.group, config.topic);
    let mut global = Engine::new();
    global.track_changes();
    let dynamodb = config.table.as_ref().map(|t| DynamoSink::new(client.clone(), t.clone()));
    let valkey = match &config.valkey_url {
        Some(url) => Some(ValkeySink::new(url, config.valkey_prefix.clone()).map_err(|e| toolrank_dynamodb::Error::Input(e.to_string()))?),
        None => None,
    };
    let mut c = Consumer_ {
        store: CheckpointStore::new(client.clone(), config.state_table.clone()),
        lease: Lease::new(client, config.state_table.clone(), lease_scope, config.owner.clone(), config.lease),
        config,
        rt,
        consumer,
        dead_letters,
        holds_lease: false,
        parts: BTreeMap::new(),
        remotes: BTreeMap::new(),
        global,
        dynamodb,
        valkey,
        summary: Summary::default(),
        partition_count,
        lease_renewed: Instant::now(),
        dynamodb_changes: Changes::default(),
        last_dynamodb: Instant::now(),
        unseen: Vec::new(),
        latencies: Latencies::new(),
    };
    c.run(&stop)?;
    c.summary.latency_p50_ms = c.latencies.quantile(0.5);
    c.summary.latency_p99_ms = c.latencies.quantile(0.99);
    c.summary.latency_max_ms = c.latencies.quantile(1.0);
    Ok(c.summary)
}

impl Consumer_ {
    fn run(&mut self, stop: &AtomicBool) -> Result<(), Error> {
        let mut last_message = Instant::now();
        let mut last_flush = Instant::now();
        let mut last_checkpoint = Instant::now();
        let mut last_refresh = Instant::now() - Duration::from_secs(3600);
        loop {
            if stop.load(Ordering::Relaxed) {
                info!("stopping: finishing the batch");
                break;
            }
            match self.consumer.poll(Duration::from_millis(20)) {
                Some(Ok(msg)) => {
                    let msg = msg.detach();
                    last_message = Instant::now();
                    self.sync_assignment()?;
                    self.handle(&msg);
                }
                Some(Err(e)) => warn!(error = %e, "kafka consumer error"),
                None => self.sync_assignment()?,
            }
            self.dead_letters.poll(Duration::ZERO);
            if last_flush.elapsed() >= self.config.flush_interval {
                last_flush = Instant::now();
                if last_refresh.elapsed() >= Duration::from_secs(1) {
                    last_refresh = Instant::now();
                    self.refresh_lease()?;
                }
                self.flush_sinks(false)?;
            }
            if last_checkpoint.elapsed() >= self.config.checkpoint_interval {
                last_checkpoint = Instant::now();
                self.checkpoint()?;
            }
            if self.config.until_idle.is_some_and(|idle| last_message.elapsed() >= idle) {
                if self.drained() {
                    info!("idle: the topic is drained");
                    break;
                }
                // Messages are waiting (a slow broker, a rebalance): not idle.
                last_message = Instant::now();
            }
        }
        self.finish()
    }

    /// Final checkpoint, then the sinks from everybody's latest checkpoints.
    fn finish(&mut self) -> Result<(), Error> {
        // Exiting without the last checkpoint loses no data, but a restart would redo it.
        for _ in 0..10 {
            self.checkpoint()?;
            if self.parts.values().all(|p| !p.dirty) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // The last consumer to finish must write what all others saved: wait for the lease.
        // Taking or renewing it also loads the others' latest checkpoints.
        let deadline = Instant::now() + self.config.lease * 3;
        loop {
            self.refresh_lease()?;
            if self.holds_lease || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if self.holds_lease {
            // The last write must land: retry what failed (a sink keeps its pending keys).
            // The offsets it covers were committed by the checkpoint above.
            let deadline = Instant::now() + Duration::from_secs(180);
            while !self.flush_sinks(true)? && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
            if let Err(e) = within(&self.rt, "releasing the sink lease", self.lease.release()) {
                warn!(error = %e, "could not release the sink lease; it lapses by itself");
            }
        } else {
            warn!("could not take the sink lease before exiting; its holder writes the sinks");
        }
        self.consumer.unsubscribe();
        Ok(())
    }

    /// Adopts newly assigned partitions (claiming their checkpoints) and drops revoked ones.
    fn sync_assignment(&mut self) -> Result<(), Error> {
        let assigned: Vec<i32> = self.consumer.assignment()?.elements().iter().filter(|e| e.topic() == self.config.topic).map(|e| e.partition()).collect();
        let gone: Vec<i32> = self.parts.keys().filter(|p| !assigned.contains(p)).copied().collect();
        for p in gone {
            self.release(p);
            info!(partition = p, "partition revoked");
        }
        for p in assigned {
            if self.parts.contains_key(&p) {
                continue;
            }
            let scope = scope(&self.config, p);
            let ck = self.retrying(&format!("claiming {scope}"), |c| within(&c.rt, "claiming a checkpoint", c.store.claim(&scope, &c.config.owner)))?;
            let mut engine = if ck.state.is_empty() { Engine::new() } else { Engine::restore(&ck.state).map_err(|source| Error::Snapshot { scope: scope.clone(), source })? };
            let next_offset = ck.position.as_deref().and_then(|p| p.parse().ok()).unwrap_or(0);
            if let Some(mut remote) = self.remotes.remove(&p) {
                self.global.unabsorb(&mut remote.engine);
            }
            self.global.absorb(&mut engine);
            info!(partition = p, generation = ck.generation, next_offset, "partition assigned");
            self.parts.insert(p, Partition { engine, next_offset, generation: ck.generation, dirty: false });
        }
        Ok(())
    }

    /// Runs `f` until it succeeds: the messages of a partition cannot be applied before
    /// its state is claimed. Gives up after 30 s (within the poll interval).
    fn retrying<T>(&mut self, what: &str, mut f: impl FnMut(&mut Self) -> Result<T, toolrank_dynamodb::Error>) -> Result<T, Error> {
        let mut delay = Duration::from_millis(100);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match f(self) {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() < deadline => {
                    self.summary.retried_errors += 1;
                    warn!(error = %e, "{what} failed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether the group has read the whole topic: every owned partition up to its high
    /// watermark, and every other one committed up to it by its owner. A consumer that
    /// owns nothing yet (a rebalance in progress) is not done.
    fn drained(&self) -> bool {
        let mut others = TopicPartitionList::new();
        for p in (0..self.partition_count).filter(|p| !self.parts.contains_key(p)) {
            others.add_partition(&self.config.topic, p);
        }
        let committed = match others.count() {
            0 => others,
            _ => match self.consumer.committed_offsets(others, Duration::from_secs(5)) {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "could not read the group's committed offsets");
                    return false;
                }
            },
        };
        (0..self.partition_count).all(|p| {
            let position = match self.parts.get(&p) {
                Some(part) => part.next_offset,
                None => match committed.find_partition(&self.config.topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                },
            };
            match self.consumer.fetch_watermarks(&self.config.topic, p, Duration::from_secs(5)) {
                Ok((_, high)) => position >= high,
                Err(e) => {
                    warn!(partition = p, error = %e, "could not read the high watermark");
                    false
                }
            }
        })
    }

    /// Drops an owned partition and takes its share out of the merged engine. Its
    /// pending deltas are forwarded first: the merged engine must hold exactly what is
    /// taken out.
    fn release(&mut self, p: i32) {
        let mut part = self.parts.remove(&p).expect("owned");
        part.engine.flush_into(&mut self.global);
        self.global.unabsorb(&mut part.engine);
    }

    fn handle(&mut self, msg: &OwnedMessage) {
        self.summary.messages += 1;
        let (p, offset) = (msg.partition(), msg.offset());
        let Some(part) = self.parts.get_mut(&p) else {
            debug!(partition = p, offset, "message of a partition not owned");
            return;
        };
        if offset < part.next_offset {
            self.summary.skipped_redeliveries += 1;
            return;
        }
        part.next_offset = offset + 1;
        part.dirty = true;
        if self.holds_lease {
            if let Some(ts) = msg.timestamp().to_millis() {
                self.unseen.push(ts);
            }
        }
        let payload = msg.payload().unwrap_or_default();
        let mut bad: Vec<(String, Option<String>)> = Vec::new();
        let summary = &mut self.summary;
        let engine = &mut part.engine;
        let result = decode_line(payload, &mut |rec| match rec.result {
            Ok(change) => match engine.apply(&change) {
                Applied::Changed | Applied::Unchanged => summary.changes += 1,
                Applied::Stale => summary.stale += 1,
                Applied::Ignored => summary.ignored += 1,
            },
            Err(e) => bad.push((format!("record {}: {e}", rec.index.unwrap_or(0)), rec.raw.map(str::to_owned))),
        });
        if let Err(e) = result {
            bad.push((e.to_string(), None));
        }
        for (reason, raw) in bad {
            self.dead_letter(msg, &reason, raw.as_deref().map(str::as_bytes).unwrap_or(payload));
        }
    }

    /// Sends a bad record to the dead-letter topic with the reason and its source position.
    fn dead_letter(&mut self, msg: &OwnedMessage, reason: &str, payload: &[u8]) {
        self.summary.dead_letters += 1;
        warn!(partition = msg.partition(), offset = msg.offset(), reason, "dead-lettered");
        let (partition, offset) = (msg.partition().to_string(), msg.offset().to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: "toolrank-reason", value: Some(reason) })
            .insert(Header { key: "toolrank-source-topic", value: Some(self.config.topic.as_str()) })
            .insert(Header { key: "toolrank-source-partition", value: Some(partition.as_str()) })
            .insert(Header { key: "toolrank-source-offset", value: Some(offset.as_str()) });
        let mut record = BaseRecord::<[u8], [u8]>::to(&self.config.dead_letter_topic).payload(payload).headers(headers);
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        let mut record = Some(record);
        while let Some(r) = record.take() {
            if let Err((e, r)) = self.dead_letters.send(r) {
                if matches!(e, rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull)) {
                    self.dead_letters.poll(Duration::from_millis(10));
                    record = Some(r);
                } else {
                    warn!(error = %e, "could not dead-letter a record");
                }
            }
        }
    }

    /// Takes or renews the sink lease; on taking it, the sinks are compared in full.
    fn refresh_lease(&mut self) -> Result<(), Error> {
        let held = match within(&self.rt, "renewing the sink lease", self.lease.acquire()) {
            Ok(held) => {
                self.lease_renewed = Instant::now();
                held
            }
            Err(e) => {
                // Unknown: keep writing only while the last renewal surely still holds.
                self.summary.retried_errors += 1;
                warn!(error = %e, "renewing the sink lease failed");
                self.holds_lease && self.lease_renewed.elapsed() < self.config.lease / 2
            }
        };
        if held && !self.holds_lease {
            info!("took the sink lease");
            if let Some(d) = &mut self.dynamodb {
                d.reset();
            }
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
        if held {
            if let Err(e) = self.refresh_remotes() {
                self.summary.retried_errors += 1;
                warn!(error = %e, "reading other consumers' checkpoints failed; retrying");
            }
        }
        Ok(())
    }

    /// Loads the latest checkpoints of the partitions other consumers own.
    fn refresh_remotes(&mut self) -> Result<(), Error> {
        for p in 0..self.partition_count {
            if self.parts.contains_key(&p) {
                continue;
            }
            let scope = scope(&self.config, p);
            let generation = within(&self.rt, "reading a checkpoint generation", self.store.generation(&scope))?;
            if generation == 0 || self.remotes.get(&p).is_some_and(|r| r.generation == generation) {
                continue;
            }
            let ck = within(&self.rt, "reading a checkpoint", self.store.peek(&scope))?;
            let mut engine = Engine::restore(&ck.state).map_err(|source| Error::Snapshot { scope: scope.clone(), source })?;
            if let Some(mut old) = self.remotes.remove(&p) {
                self.global.unabsorb(&mut old.engine);
            }
            self.global.absorb(&mut engine);
            debug!(partition = p, generation = ck.generation, "merged another consumer's checkpoint");
            self.remotes.insert(p, Remote { engine, generation: ck.generation });
        }
        Ok(())
    }

    /// Forwards partition deltas into the merged engine and, as lease holder, writes
    /// what changed to the sinks. `false` when a sink write failed (it is retried).
    /// `now` writes DynamoDB even before its interval is up.
    fn flush_sinks(&mut self, now: bool) -> Result<bool, Error> {
        for part in self.parts.values_mut() {
            part.engine.flush_into(&mut self.global);
        }
        if !self.holds_lease {
            return Ok(true);
        }
        let mut ok = true;
        let changes = self.global.take_changes();
        let today = self.config.today.unwrap_or_else(Day::today_utc);
        self.dynamodb_changes.merge(&changes);
        let mut visible = false;
        if let Some(d) = &mut self.dynamodb {
            let due = now || self.last_dynamodb.elapsed() >= self.config.dynamodb_interval;
            if due && (!self.dynamodb_changes.is_empty() || d.needs_write()) {
                self.last_dynamodb = Instant::now();
                let written = within(&self.rt, "writing the dynamodb sink", d.write(&self.global, &self.dynamodb_changes, today));
                if let Err(toolrank_dynamodb::Error::Timeout(_)) = written {
                    // Cut off mid-write: the sink's own record of what it wrote is unknown.
                    // (Other failures leave it exact, with the failed keys pending.)
                    d.reset();
                }
                match written {
                    Ok(()) => visible = self.valkey.is_none(),
                    Err(e) => {
                        warn!(error = %e, "dynamodb sink write failed; retrying at the next flush");
                        self.summary.retried_errors += 1;
                        ok = false;
                    }
                }
                // A failed or partial write keeps its keys pending inside the sink.
                self.dynamodb_changes = Changes::default();
                ok = ok && !d.needs_write();
                self.summary.dynamodb_requests = d.stats.requests;
            }
        }
        if let Some(v) = &mut self.valkey {
            if !changes.is_empty() || v.needs_resync() {
                match v.write(&self.global, &changes) {
                    Ok(()) => visible = true,
                    Err(e) => {
                        warn!(error = %e, "valkey sink write failed; resynchronizing when it is back");
                        self.summary.retried_errors += 1;
                        ok = false;
                    }
                }
                self.summary.valkey_commands = v.commands;
            }
        }
        if visible {
            let now = now_ms();
            for ts in self.unseen.drain(..) {
                self.latencies.record(now - ts);
            }
        }
        if !changes.is_empty() {
            self.summary.sink_writes += 1;
        }
        Ok(ok)
    }

    /// Saves every changed partition's state with its offset, then commits the offsets.
    fn checkpoint(&mut self) -> Result<(), Error> {
        self.flush_sinks(false)?;
        self.dead_letters.flush(Duration::from_secs(30))?;
        let mut fenced = Vec::new();
        for (&p, part) in self.parts.iter_mut().filter(|(_, part)| part.dirty) {
            let scope = scope(&self.config, p);
            let state = part.engine.snapshot();
            match within(&self.rt, "saving a checkpoint", self.store.save(&scope, &self.config.owner, part.generation, &part.next_offset.to_string(), &state)) {
                Ok(g) => {
                    part.generation = g;
                    part.dirty = false;
                    self.summary.checkpoints += 1;
                    debug!(partition = p, generation = g, next_offset = part.next_offset, bytes = state.len(), "checkpoint");
                }
                Err(toolrank_dynamodb::Error::Fenced(_)) => fenced.push(p),
                Err(e) => {
                    // Kept dirty: saved at the next interval; its offset is not committed.
                    self.summary.retried_errors += 1;
                    warn!(partition = p, error = %e, "checkpoint failed; retrying at the next interval");
                }
            }
        }
        for p in fenced {
            warn!(partition = p, "another consumer owns this partition now; letting go");
            self.release(p);
        }
        self.commit()
    }

    /// Commits the offsets of the checkpointed partitions.
    fn commit(&mut self) -> Result<(), Error> {
        let mut tpl = TopicPartitionList::new();
        for (&p, part) in &self.parts {
            if part.next_offset > 0 && !part.dirty {
                tpl.add_partition_offset(&self.config.topic, p, Offset::Offset(part.next_offset))?;
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync) {
                // The checkpoint, not the committed offset, is where a restart resumes.
                warn!(error = %e, "committing offsets failed");
            }
        }
        Ok(())
    }
}

/// The longest a DynamoDB call may block the poll loop: well inside the group's poll
/// interval, so that a stalled request cannot cost the consumer its partitions.
const CALL_DEADLINE: Duration = Duration::from_secs(40);

/// Runs `call` on the runtime, cut off after [`CALL_DEADLINE`].
fn within<T, E: Into<toolrank_dynamodb::Error>>(rt: &tokio::runtime::Runtime, what: &str, call: impl std::future::Future<Output = Result<T, E>>) -> Result<T, toolrank_dynamodb::Error> {
    // The timer must be made inside the runtime.
    match rt.block_on(async { tokio::time::timeout(CALL_DEADLINE, call).await }) {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(toolrank_dynamodb::Error::Timeout(format!("{what} (after {} s)", CALL_DEADLINE.as_secs()))),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Reads the dead-letter headers of a message (for tests and tools).
pub fn dead_letter_headers<M: Message>(msg: &M) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(h) = msg.headers() {
        for i in 0..h.count() {
            let header = h.get(i);
            out.insert(header.key.to_owned(), header.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default());
        }
    }
    out
}
