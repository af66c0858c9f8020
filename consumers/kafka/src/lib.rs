//! `toolrank consume kafka`: a consumer group feeding the engine, then the sinks, with
//! an exactly-once effect.
//!
//! How (also in docs/architecture.md):
//! - **State per partition.** Each assigned partition has its own [`Engine`]. Every
//!   checkpoint interval what changed in it since the last checkpoint (the sessions and
//!   Agent items touched) and the next offset are saved together, atomically, in the
//!   state table ([`CheckpointStore`]): one transaction appending to the partition's
//!   delta log and moving its position; once the log adds up to the state's size, the
//!   whole state is saved as a new base instead. On assignment the partition's
//!   checkpoint is claimed and restored (base and deltas), and messages below its offset
//!   are skipped: whatever Kafka redelivers after a crash, a restart or a rebalance is
//!   applied exactly once to a state that did not contain it. Partitions move between
//!   consumers with their state.
//! - **Fencing.** Claiming a partition makes this consumer its checkpoint's only writer; a
//!   consumer that lost it (a zombie after a rebalance) gets `Fenced` and lets go. If Kafka
//!   still assigns it the partition once a rebalance would have reached it, the fence was
//!   not a rebalance's (a save that landed but reported a failure, a stray claim): it
//!   claims the checkpoint again and reads on from its position.
//! - **Sinks.** One consumer of the group holds the sink lease and writes the sinks
//!   ([`toolrank_live::SinkWriter`]).
//! - **Offsets.** Kafka offsets are committed once the checkpoint covering them is saved
//!   (uploads run on the sink writer's worker thread); they serve lag monitoring, while
//!   the checkpoint is what a restart resumes from.

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use toolrank_engine::Engine;
use toolrank_events::Day;
pub use toolrank_live::Summary;
use toolrank_live::{apply_line, LogHead, Saving, SinkWriter, WriterConfig};
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Live(#[from] toolrank_live::Error),
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
    /// How long a fetch that finds nothing new waits on the broker ([`toolrank_kafka::FETCH_WAIT_MS`]).
    pub fetch_wait: Duration,
    /// How often deltas reach Valkey (and the merged engine).
    pub flush_interval: Duration,
    /// How often changes reach DynamoDB: every write costs money, so it coalesces longer.
    pub dynamodb_interval: Duration,
    /// How long DynamoDB writes may wait while a backlog is read.
    pub dynamodb_max_defer: Duration,
    /// The DynamoDB write budget (items per event), if any.
    pub dynamodb_writes_per_event: Option<f64>,
    /// The DynamoDB sink's write capacity budget per second, if any ([`WriterConfig`]).
    pub dynamodb_max_wcu: Option<f64>,
    /// How often partition state is checkpointed.
    pub checkpoint_interval: Duration,
    /// How long checkpoints may wait while a backlog is read ([`SinkWriter::stretched`]).
    pub checkpoint_max: Duration,
    /// The pipeline's state table (checkpoints, leases).
    pub state_table: String,
    /// The DynamoDB sink's table; `None` disables the sink.
    pub table: Option<String>,
    /// Valkey URL; `None` disables the sink.
    pub valkey_url: Option<String>,
    pub valkey_prefix: String,
    /// Where the DynamoDB rankings go: the live items, or a shadow namespace's.
    pub dynamodb_namespace: toolrank_live::Namespace,
    /// Scores are written for this date; `None` is the UTC date at each write.
    pub today: Option<Day>,
    /// This consumer's identity in leases and checkpoints.
    pub owner: String,
    /// How long the sink lease lasts without renewal.
    pub lease: Duration,
    /// How long a removed item's tombstone is kept.
    pub tombstone_horizon: Duration,
}

struct Partition {
    engine: Engine,
    next_offset: i64,
    /// Where its checkpoint's log stands.
    at: LogHead,
    /// Offsets consumed since the last checkpoint was started.
    dirty: bool,
    /// The checkpoint being saved, and the offset it covers.
    saving: Option<Saving>,
    saving_offset: i64,
    /// When its last save started: the one longest ago is saved next.
    save_started: Instant,
    /// The offset the last saved checkpoint covers (what may be committed).
    saved_offset: i64,
}

struct Consumer_ {
    config: Config,
    writer: SinkWriter,
    consumer: BaseConsumer<Rebalances>,
    /// The rebalance events already acted on.
    rebalances_seen: u64,
    dead_letters: BaseProducer,
    parts: BTreeMap<i32, Partition>,
    partition_count: i32,
    /// Since when only partitions this consumer does not own have lagged, at which
    /// committed positions (they are stranded if those do not move).
    stranded: Option<(Instant, Vec<(i32, i64)>)>,
    /// Partitions let go after a fence, and when, until a rebalance or `RECLAIM_AFTER`.
    fenced: BTreeMap<i32, Instant>,
}

/// Records the group's rebalances as rdkafka reports them (see `sync_assignment`).
#[derive(Default)]
struct Rebalances {
    /// Bumped at every revocation and assignment.
    events: AtomicU64,
    /// Partitions revoked since the consumer last looked.
    revoked: Mutex<Vec<i32>>,
}

impl ClientContext for Rebalances {}

impl ConsumerContext for Rebalances {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.revoked.lock().unwrap_or_else(|e| e.into_inner()).extend(tpl.elements().iter().map(|e| e.partition()));
        }
        self.events.fetch_add(1, Ordering::SeqCst);
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        self.events.fetch_add(1, Ordering::SeqCst);
    }

    /// The outcome of an offset commit sent without waiting (see `Consumer_::commit`).
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, _: &TopicPartitionList) {
        if let Err(e) = result {
            warn!(error = %e, "committing offsets failed");
        }
    }
}

/// Fewer messages than this waiting on the broker: the consumer reads as records arrive,
/// so their lateness is the producer's and the broker's, not a backlog (see
/// [`SinkWriter::caught_up`]).
const CAUGHT_UP_LAG: i64 = 1000;

/// How long partitions this consumer does not own may lag with no progress before it
/// rejoins the group: a member that left during a coordinator restart can strand them.
const STRANDED_AFTER: Duration = Duration::from_secs(30);

/// How long after letting a fenced partition go it is claimed again if Kafka still
/// assigns it here: longer than the group's session timeout, so that a rebalance that
/// gave it to another member has reached this one by then.
const RECLAIM_AFTER: Duration = Duration::from_secs(15);

/// How long leaving the group may take at exit (see `leave_group`).
const LEAVE_WAIT: Duration = Duration::from_secs(15);

/// How far the group has read the topic.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Drain {
    Done,
    /// This consumer's partitions lag.
    Own,
    /// Only partitions it does not own lag; their committed positions.
    Others(Vec<(i32, i64)>),
}

fn scope(config: &Config, partition: i32) -> String {
    format!("kafka/{}/{}/{partition}", config.group, config.topic)
}

/// Runs the consumer until `stop` is set or, with `until_idle`, the topic is drained.
pub fn run(config: Config, stop: Arc<AtomicBool>) -> Result<Summary, Error> {
    let consumer: BaseConsumer<Rebalances> = toolrank_kafka::client_config(&config.brokers)
        .set("group.id", &config.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // Also the rebalance timeout: how long a rebalance may wait for members.
        .set("max.poll.interval.ms", "60000")
        .set("fetch.wait.max.ms", config.fetch_wait.as_millis().to_string())
        .create_with_context(Rebalances::default())?;
    consumer.subscribe(&[&config.topic])?;
    let metadata = consumer.fetch_metadata(Some(&config.topic), Duration::from_secs(10))?;
    let partition_count = metadata.topics().iter().find(|t| t.name() == config.topic).map_or(0, |t| t.partitions().len() as i32);
    if partition_count == 0 {
        return Err(Error::NoTopic(config.topic.clone()));
    }
    let dead_letters: BaseProducer = toolrank_kafka::client_config(&config.brokers).set("compression.type", "none").set("linger.ms", "5").create()?;
    let writer = SinkWriter::new(WriterConfig {
        state_table: config.state_table.clone(),
        table: config.table.clone(),
        dynamodb_namespace: config.dynamodb_namespace.clone(),
        valkey_url: config.valkey_url.clone(),
        valkey_prefix: config.valkey_prefix.clone(),
        today: config.today,
        owner: config.owner.clone(),
        lease: config.lease,
        lease_scope: format!("kafka/{}/{}/sink-writer", config.group, config.topic),
        dynamodb_interval: config.dynamodb_interval,
        dynamodb_max_defer: config.dynamodb_max_defer,
        dynamodb_writes_per_event: config.dynamodb_writes_per_event,
        dynamodb_max_wcu: config.dynamodb_max_wcu,
        tombstone_horizon: config.tombstone_horizon,
    })?;
    let mut c = Consumer_ {
        config,
        writer,
        consumer,
        rebalances_seen: 0,
        dead_letters,
        parts: BTreeMap::new(),
        partition_count,
        stranded: None,
        fenced: BTreeMap::new(),
    };
    let result = c.run(&stop);
    let Consumer_ { consumer, writer, .. } = c;
    leave_group(consumer);
    result?;
    Ok(writer.into_summary())
}

/// Leaves the group within `LEAVE_WAIT`. rdkafka's close on drop waits as long as the
/// group coordinator takes to answer, without end (seen after a broker restart), so the
/// drop runs on a thread of its own: past the wait the process goes on without it, and
/// the coordinator drops the member when its session times out. Offsets were committed
/// before: nothing is lost either way.
fn leave_group(consumer: BaseConsumer<Rebalances>) {
    let (done, left) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(consumer);
        let _ = done.send(());
    });
    if left.recv_timeout(LEAVE_WAIT).is_err() {
        warn!("the group coordinator did not confirm the leave within {} s; exiting without it (the member's session times out)", LEAVE_WAIT.as_secs());
    }
}

/// Logs (at debug) a step of the loop that held up reading for long enough to show in
/// the latency's tail.
fn slow(step: &str, started: Instant) {
    let took = started.elapsed();
    if took >= Duration::from_millis(20) {
        debug!(step, ms = took.as_millis() as u64, "the loop was held up");
    }
}

impl Consumer_ {
    fn run(&mut self, stop: &AtomicBool) -> Result<(), Error> {
        let mut last_message = Instant::now();
        let mut last_flush = Instant::now();
        let mut last_checkpoint = Instant::now();
        let mut last_refresh = Instant::now() - Duration::from_secs(3600);
        // The partitions take turns (see `checkpoint`): each is saved once per interval,
        // which a backlog stretches. Judged at each flush, not at every message.
        let mut checkpoint_every = self.config.checkpoint_interval;
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
                if self.lag() < CAUGHT_UP_LAG {
                    self.writer.caught_up();
                }
                checkpoint_every = self.writer.stretched(self.config.checkpoint_interval, self.config.checkpoint_max) / self.parts.len().max(1) as u32;
                // Not before the group has assigned this consumer its partitions: a lease
                // taken earlier loads them all as other consumers' copies, and claiming
                // them moments later rewrites the sinks a second time.
                if last_refresh.elapsed() >= Duration::from_secs(1) && self.rebalances_seen > 0 {
                    last_refresh = Instant::now();
                    self.writer.refresh_lease(&self.others());
                    slow("renewing the sink lease", last_refresh);
                }
                let started = Instant::now();
                self.flush_sinks(false);
                slow("flushing the sinks", started);
            }
            if last_checkpoint.elapsed() >= checkpoint_every {
                last_checkpoint = Instant::now();
                self.checkpoint(false)?;
                slow("checkpointing", last_checkpoint);
            }
            if self.config.until_idle.is_some_and(|idle| last_message.elapsed() >= idle) {
                match self.drained() {
                    Drain::Done => {
                        info!("idle: the topic is drained");
                        break;
                    }
                    Drain::Own => self.stranded = None,
                    Drain::Others(positions) => match &self.stranded {
                        Some((since, seen)) if *seen == positions => {
                            if since.elapsed() >= STRANDED_AFTER {
                                warn!(
                                    ?positions,
                                    "partitions this consumer does not own have lagged for {} s with no progress: rejoining the group",
                                    STRANDED_AFTER.as_secs()
                                );
                                self.checkpoint(true)?;
                                self.consumer.unsubscribe();
                                self.consumer.subscribe(&[&self.config.topic])?;
                                self.stranded = None;
                            }
                        }
                        _ => self.stranded = Some((Instant::now(), positions)),
                    },
                }
                // Messages are waiting (a slow broker, a rebalance): not idle.
                last_message = Instant::now();
            }
        }
        self.finish()
    }

    /// Messages on the broker past the owned partitions' positions, by the high watermarks
    /// librdkafka caches from its fetch responses (asking costs no request).
    fn lag(&self) -> i64 {
        let Ok(topic) = std::ffi::CString::new(self.config.topic.as_str()) else { return 0 };
        self.parts
            .iter()
            .map(|(&p, part)| {
                let (mut low, mut high) = (0i64, 0i64);
                // SAFETY: the client pointer lives as long as `self.consumer`; the topic is a
                // valid C string; the outputs are plain integers.
                let err =
                    unsafe { rdkafka::bindings::rd_kafka_get_watermark_offsets(self.consumer.client().native_ptr(), topic.as_ptr(), p, &mut low, &mut high) };
                match err {
                    rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR if high >= 0 => (high - part.next_offset).max(0),
                    _ => 0,
                }
            })
            .sum()
    }

    /// The scopes of the partitions other consumers own.
    fn others(&self) -> Vec<String> {
        (0..self.partition_count).filter(|p| !self.parts.contains_key(p)).map(|p| scope(&self.config, p)).collect()
    }

    fn flush_sinks(&mut self, now: bool) -> bool {
        self.writer.flush(self.parts.values_mut().map(|p| &mut p.engine), now)
    }

    /// Final checkpoint, then the sinks from everybody's latest checkpoints.
    fn finish(&mut self) -> Result<(), Error> {
        self.writer.finishing();
        // Exiting without the last checkpoint loses no data, but a restart would redo it.
        for _ in 0..10 {
            self.checkpoint(true)?;
            if self.parts.values().all(|p| !p.dirty) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // The offsets the final sink write covers were committed by the checkpoint above.
        let others = self.others();
        let mut units: Vec<&mut Engine> = self.parts.values_mut().map(|p| &mut p.engine).collect();
        self.writer.finish(&others, &mut units);
        Ok(())
    }

    /// Adopts newly assigned partitions (claiming their checkpoints) and drops revoked ones.
    fn sync_assignment(&mut self) -> Result<(), Error> {
        // Asking rdkafka for the assignment is a round trip to its main thread: only after
        // a rebalance (its callbacks run inside `poll`, before any message it lets through).
        let events = self.consumer.context().events.load(Ordering::SeqCst);
        if events == self.rebalances_seen {
            return self.reclaim_fenced();
        }
        self.rebalances_seen = events;
        // The new assignment decides: what is still assigned here is claimed below.
        self.fenced.clear();
        // A partition revoked and assigned again since the last look is not kept: another
        // consumer may have moved its checkpoint on meanwhile, so it is claimed anew.
        let revoked = std::mem::take(&mut *self.consumer.context().revoked.lock().unwrap_or_else(|e| e.into_inner()));
        let assigned: Vec<i32> = self.consumer.assignment()?.elements().iter().filter(|e| e.topic() == self.config.topic).map(|e| e.partition()).collect();
        let gone: Vec<i32> = self.parts.keys().filter(|p| revoked.contains(p) || !assigned.contains(p)).copied().collect();
        for p in gone {
            self.release(p);
            info!(partition = p, "partition revoked");
        }
        for p in assigned {
            if !self.parts.contains_key(&p) {
                self.adopt(p)?;
                info!(partition = p, "partition assigned");
            }
        }
        Ok(())
    }

    /// Claims partition `p`'s checkpoint and owns it from the checkpoint's position on.
    fn adopt(&mut self, p: i32) -> Result<i64, Error> {
        let (engine, position, at) = self.writer.claim(&scope(&self.config, p))?;
        let next_offset = position.as_deref().and_then(|p| p.parse().ok()).unwrap_or(0);
        info!(partition = p, generation = at.generation, deltas = at.head.saturating_sub(at.base_at), next_offset, "checkpoint claimed");
        self.parts.insert(
            p,
            Partition {
                engine,
                next_offset,
                at,
                dirty: false,
                saving: None,
                saving_offset: next_offset,
                saved_offset: next_offset,
                save_started: Instant::now(),
            },
        );
        Ok(next_offset)
    }

    /// Claims again the partitions let go after a fence that Kafka still assigns here
    /// `RECLAIM_AFTER` later, reading on from their checkpoints' positions (rdkafka's
    /// fetch position went on meanwhile: the consumer seeks back).
    fn reclaim_fenced(&mut self) -> Result<(), Error> {
        let due: Vec<i32> = self.fenced.iter().filter(|(_, at)| at.elapsed() >= RECLAIM_AFTER).map(|(&p, _)| p).collect();
        if due.is_empty() {
            return Ok(());
        }
        let assigned = self.consumer.assignment()?;
        for p in due {
            self.fenced.remove(&p);
            if assigned.find_partition(&self.config.topic, p).is_none() || self.parts.contains_key(&p) {
                continue;
            }
            warn!(partition = p, "still assigned here {} s after its checkpoint was claimed elsewhere: claiming it again", RECLAIM_AFTER.as_secs());
            let next_offset = self.adopt(p)?;
            let offset = if next_offset > 0 { Offset::Offset(next_offset) } else { Offset::Beginning };
            if let Err(e) = self.consumer.seek(&self.config.topic, p, offset, Duration::from_secs(10)) {
                warn!(partition = p, error = %e, "could not seek back to the checkpoint; letting the partition go again");
                self.release(p);
                self.fenced.insert(p, Instant::now());
            }
        }
        Ok(())
    }
    /// Whether the group has read the whole topic: every owned partition up to its high
    /// watermark, and every other one committed up to it by its owner. A consumer that
    /// owns nothing yet (a rebalance in progress) is not done.
    fn drained(&self) -> Drain {
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
                    return Drain::Own;
                }
            },
        };
        let lagging: Vec<(i32, i64)> = (0..self.partition_count)
            .filter_map(|p| {
                let position = match self.parts.get(&p) {
                    Some(part) => part.next_offset,
                    None => match committed.find_partition(&self.config.topic, p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o,
                        _ => 0,
                    },
                };
                let lags = match self.consumer.fetch_watermarks(&self.config.topic, p, Duration::from_secs(5)) {
                    Ok((_, high)) => position < high,
                    Err(e) => {
                        warn!(partition = p, error = %e, "could not read the high watermark");
                        true
                    }
                };
                lags.then_some((p, position))
            })
            .collect();
        match lagging.iter().any(|(p, _)| self.parts.contains_key(p)) {
            _ if lagging.is_empty() => Drain::Done,
            true => Drain::Own,
            false => Drain::Others(lagging),
        }
    }

    /// Drops an owned partition and takes its share out of the merged engine.
    fn release(&mut self, p: i32) {
        let mut part = self.parts.remove(&p).expect("owned");
        self.writer.release(&mut part.engine);
    }

    fn handle(&mut self, msg: &OwnedMessage) {
        self.writer.summary.messages += 1;
        let (p, offset) = (msg.partition(), msg.offset());
        let Some(part) = self.parts.get_mut(&p) else {
            debug!(partition = p, offset, "message of a partition not owned");
            return;
        };
        if offset < part.next_offset {
            self.writer.summary.skipped_redeliveries += 1;
            return;
        }
        part.next_offset = offset + 1;
        part.dirty = true;
        if let Some(ts) = msg.timestamp().to_millis() {
            self.writer.observe(ts);
        }
        let payload = msg.payload().unwrap_or_default();
        for (reason, raw) in apply_line(&mut part.engine, payload, &mut self.writer.summary) {
            self.dead_letter(msg, &reason, raw.as_deref().map(str::as_bytes).unwrap_or(payload));
        }
    }
    /// Sends a bad record to the dead-letter topic with the reason and its source position.
    fn dead_letter(&mut self, msg: &OwnedMessage, reason: &str, payload: &[u8]) {
        self.writer.summary.dead_letters += 1;
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

    /// Saves a changed partition's state with its offset (every changed one with
    /// `wait`), then commits the offsets saved. Saves run on the runtime's worker: one
    /// started at a round is collected at a later one, or at once with `wait`.
    fn checkpoint(&mut self, wait: bool) -> Result<(), Error> {
        self.flush_sinks(false);
        // The dead letters of the offsets a checkpoint covers are delivered before it.
        self.dead_letters.flush(Duration::from_secs(30))?;
        let mut fenced = Vec::new();
        // One new save per round unless `wait`: the one saved longest ago. Serializing a
        // partition's changes (now and then its whole state) takes milliseconds to tens
        // of them; spread over the interval, no record waits for all partitions' at once.
        let next = self.parts.iter().filter(|(_, part)| part.dirty && part.saving.is_none()).min_by_key(|(_, part)| part.save_started).map(|(&p, _)| p);
        for (&p, part) in self.parts.iter_mut() {
            let mut started = false;
            loop {
                match self.writer.saved(&mut part.saving, wait) {
                    Some(Ok(Some(at))) => {
                        part.at = at;
                        part.saved_offset = part.saving_offset;
                    }
                    // Saved again at the next interval.
                    Some(Ok(None)) => part.dirty = true,
                    Some(Err(_)) => {
                        fenced.push(p);
                        break;
                    }
                    None => {}
                }
                if started || !part.dirty || part.saving.is_some() || (!wait && next != Some(p)) {
                    break;
                }
                part.save_started = Instant::now();
                part.saving = Some(self.writer.start_save(&scope(&self.config, p), part.at, &part.next_offset.to_string(), &mut part.engine));
                (part.saving_offset, part.dirty, started) = (part.next_offset, false, true);
            }
        }
        for p in fenced {
            warn!(partition = p, "another consumer owns this partition now; letting go");
            self.release(p);
            self.fenced.insert(p, Instant::now());
        }
        self.writer.record_state(self.parts.values().map(|p| &p.engine), wait);
        self.commit(wait)
    }

    /// Commits the offsets of the checkpointed partitions. The checkpoint, not the
    /// committed offset, is where a restart resumes: the commit only shows the group's
    /// progress to Kafka tools, so the loop does not wait for it (a round trip to the
    /// broker, up to tens of milliseconds) unless `wait` (the last).
    fn commit(&mut self, wait: bool) -> Result<(), Error> {
        let mut tpl = TopicPartitionList::new();
        for (&p, part) in &self.parts {
            if part.saved_offset > 0 {
                tpl.add_partition_offset(&self.config.topic, p, Offset::Offset(part.saved_offset))?;
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, if wait { CommitMode::Sync } else { CommitMode::Async }) {
                warn!(error = %e, "committing offsets failed");
            }
        }
        Ok(())
    }
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
