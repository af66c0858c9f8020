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

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::DeliveryResult;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use toolrank_engine::Engine;
use toolrank_kafka::Connection;
use toolrank_live::Backoff;
pub use toolrank_live::Summary;
use toolrank_live::{apply_line, LiveConfig, LogHead, OnGap, Saving, SinkWriter, Source, Wired};
use tracing::{debug, error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Live(#[from] toolrank_live::Error),
    #[error("kafka: no OAUTHBEARER token: {0}")]
    Token(String),
    #[error("topic {0} not found")]
    NoTopic(String),
    /// Partitions stopped at a gap or at a broken checkpoint, each with why and what to do.
    #[error("partitions stopped: {0}")]
    Stopped(String),
}

/// What `consume kafka` needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub kafka: Connection,
    pub topic: String,
    pub group: String,
    pub dead_letter_topic: String,
    /// How long a fetch that finds nothing new waits on the broker ([`toolrank_kafka::FETCH_WAIT_MS`]).
    pub fetch_wait: Duration,
    /// The sinks and the loop's pacing, as every live consumer has them.
    pub live: LiveConfig,
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
    /// Where the consumer must seek before reading on (the checkpoint's position, which
    /// the group's committed offset need not be); messages meanwhile are dropped.
    seek: Option<i64>,
    /// Why the partition stopped (a gap under `--on-gap stop`, a checkpoint that does not
    /// restore): it is paused and read no more, its share left out of the rankings.
    stopped: Option<String>,
}

impl Partition {
    /// A partition claimed at `next_offset`; unless `stopped`, it seeks there first.
    fn new(engine: Engine, next_offset: i64, at: LogHead, stopped: Option<String>) -> Partition {
        Partition {
            engine,
            next_offset,
            at,
            dirty: false,
            saving: None,
            saving_offset: next_offset,
            saved_offset: next_offset,
            save_started: Instant::now(),
            seek: stopped.is_none().then_some(next_offset),
            stopped,
        }
    }
}

/// The group member as the runtime's [`Source`]: a unit per assigned partition.
struct Kafka {
    config: Config,
    /// Shared so that a polled message can borrow it while the source changes.
    consumer: Arc<BaseConsumer<Rebalances>>,
    /// What the loop's state-table calls may take in all between two polls ([`poll_budget`]).
    poll_budget: Duration,
    /// The rebalance events already acted on.
    rebalances_seen: u64,
    dead_letters: BaseProducer<Deliveries>,
    parts: BTreeMap<i32, Partition>,
    partition_count: i32,
    /// Whether partitions this consumer does not own lag with no progress.
    stranded: Stranded,
    /// When an idle turn last looked at whether the group reads every partition.
    group_checked: Instant,
    /// Partitions let go after a fence, and when, until a rebalance or `RECLAIM_AFTER`.
    fenced: BTreeMap<i32, Instant>,
    /// Assigned partitions whose checkpoint could not be claimed yet (the state table
    /// failed): paused, claimed again when their backoff is over, while the others go on.
    unclaimed: BTreeMap<i32, (Instant, Backoff)>,
    /// Records (partition, offset) the engine panicked on, already dead-lettered: read
    /// again after their partition is restored, they are passed over.
    poisoned: BTreeSet<(i32, i64)>,
    /// Partitions whose engine panicked mid-change: restored from their checkpoints at
    /// the next read.
    restore: BTreeSet<i32>,
    /// Partitions this consumer paused and has not resumed. librdkafka keeps a pause
    /// through rebalances, so this outlives assignments: a successful claim resumes the
    /// partition if it is here, and leaves the others alone.
    paused: BTreeSet<i32>,
}

/// Records the group's rebalances as rdkafka reports them (see `sync_assignment`).
struct Rebalances {
    kafka: toolrank_kafka::Context,
    /// Bumped at every revocation and assignment.
    events: AtomicU64,
    /// Partitions revoked since the consumer last looked.
    revoked: Mutex<Vec<i32>>,
}

toolrank_kafka::delegate_client_context!(Rebalances);

/// The dead letters that were not delivered: by source partition, the lowest source
/// offset. A checkpoint must not cover them (`save`).
struct Deliveries {
    kafka: toolrank_kafka::Context,
    failed: Mutex<BTreeMap<i32, i64>>,
}

impl Deliveries {
    fn fail(&self, partition: i32, offset: i64) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let lowest = failed.entry(partition).or_insert(offset);
        *lowest = (*lowest).min(offset);
    }

    fn take(&self) -> BTreeMap<i32, i64> {
        std::mem::take(&mut *self.failed.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

toolrank_kafka::delegate_client_context!(Deliveries);

impl ProducerContext for Deliveries {
    /// The source partition and offset of the letter.
    type DeliveryOpaque = Box<(i32, i64)>;

    fn delivery(&self, result: &DeliveryResult<'_>, source: Box<(i32, i64)>) {
        if let Err((e, _)) = result {
            warn!(partition = source.0, offset = source.1, error = %e, "a dead letter was not delivered");
            self.fail(source.0, source.1);
        }
    }
}

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

    /// The outcome of an offset commit (see `Kafka::commit`).
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
/// rejoins the group, at least: a member that left during a coordinator restart can
/// strand them, and so can a coordinator that ends a rebalance with a partition assigned
/// to no live member (the local stack's broker does, after consumers are killed in quick
/// succession). See [`stranded_after`].
const STRANDED_AFTER: Duration = Duration::from_secs(30);

/// How long partitions this consumer does not own may lag with no progress before it
/// rejoins the group: their owners commit only at their checkpoints, which wait up to
/// `checkpoint_max` while a backlog is read, so a shorter wait would take a busy owner
/// for a missing one (and every rejoin sets its catch-up back to its last checkpoint).
fn stranded_after(pacing: &toolrank_live::Pacing) -> Duration {
    STRANDED_AFTER.max(pacing.checkpoint_max * 2)
}

/// How often a consumer with nothing to read looks at whether its group reads every
/// partition (one committed-offsets request and a watermark request per partition).
const GROUP_CHECK: Duration = Duration::from_secs(15);

/// How long after letting a fenced partition go it is claimed again if Kafka still
/// assigns it here: longer than the group's session timeout, so that a rebalance that
/// gave it to another member has reached this one by then.
const RECLAIM_AFTER: Duration = Duration::from_secs(15);

/// The most messages one [`Source::read`] applies: a few milliseconds of work, so that the
/// loop's sink and checkpoint turns keep their pace.
const READ_BATCH: usize = 256;

/// How long leaving the group may take at exit (see `leave_group`).
const LEAVE_WAIT: Duration = Duration::from_secs(15);

/// How far the group has read the topic.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Drain {
    Done,
    /// This consumer's partitions lag, or the broker did not tell.
    Own,
    /// Only partitions it does not own lag; their committed positions.
    Others(Vec<(i32, i64)>),
}

/// Since when only partitions this consumer does not own have lagged, at which
/// committed positions: they are stranded if those do not move for `after`.
#[derive(Debug)]
struct Stranded {
    after: Duration,
    seen: Option<(Instant, Vec<(i32, i64)>)>,
}

impl Stranded {
    fn new(after: Duration) -> Stranded {
        Stranded { after, seen: None }
    }

    /// Takes in how far the group has read at `now`; returns the stranded partitions'
    /// positions once the same ones have lagged at the same positions for `after` (and
    /// starts over).
    fn observe(&mut self, drain: Drain, now: Instant) -> Option<Vec<(i32, i64)>> {
        match drain {
            Drain::Done | Drain::Own => self.seen = None,
            Drain::Others(positions) => match &self.seen {
                Some((since, seen)) if *seen == positions => {
                    if now.duration_since(*since) >= self.after {
                        self.seen = None;
                        return Some(positions);
                    }
                }
                _ => self.seen = Some((now, positions)),
            },
        }
        None
    }
}

/// One partition's turn: each is saved once per `interval`.
fn turn(interval: Duration, partitions: usize) -> Duration {
    interval / partitions.max(1) as u32
}

/// How far the group has read, from the partitions that still lag (with their
/// positions) and which of them this consumer `owns`.
fn drain_of(lagging: Vec<(i32, i64)>, owns: impl Fn(i32) -> bool) -> Drain {
    if lagging.is_empty() {
        Drain::Done
    } else if lagging.iter().any(|&(p, _)| owns(p)) {
        Drain::Own
    } else {
        Drain::Others(lagging)
    }
}

/// Why a partition whose checkpoint reads on from `next` no longer holds what follows it,
/// given its oldest offset `low` and its end `high`; `None`: it does.
fn gap_of(next: i64, low: i64, high: i64) -> Option<String> {
    if next < low {
        Some(format!("the checkpoint reads on from offset {next} but the partition starts at {low}: {} records were deleted before they were read", low - next))
    } else if next > high {
        Some(format!("the checkpoint reads on from offset {next} but the partition ends at {high}: the topic holds less than the checkpoint covers"))
    } else {
        None
    }
}

fn scope(config: &Config, partition: i32) -> String {
    format!("kafka/{}/{}/{partition}", config.group, config.topic)
}

/// Runs the consumer, writing `sinks` while it holds the sink lease, until `stop` is set
/// or, with `until_idle`, the topic is drained.
pub fn run(config: Config, sinks: Vec<Vec<Wired>>, stop: Arc<AtomicBool>) -> Result<Summary, Error> {
    let context = config.kafka.context();
    let mut client = config.kafka.client_config_over(&[
        ("session.timeout.ms", "10000"),
        ("heartbeat.interval.ms", "1000"),
        // Also the rebalance timeout: how long a rebalance may wait for members.
        ("max.poll.interval.ms", "60000"),
    ]);
    let poll_budget = poll_budget(&client);
    let consumer: BaseConsumer<Rebalances> = client
        .set("group.id", &config.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", config.fetch_wait.as_millis().to_string())
        .create_with_context(Rebalances { kafka: context.clone(), events: AtomicU64::new(0), revoked: Mutex::default() })?;
    // Its first OAUTHBEARER token before the metadata request (later ones come as it polls).
    context.give_token(consumer.client()).map_err(Error::Token)?;
    consumer.subscribe(&[&config.topic])?;
    let metadata = consumer.fetch_metadata(Some(&config.topic), Duration::from_secs(10))?;
    let partition_count = metadata.topics().iter().find(|t| t.name() == config.topic).map_or(0, |t| t.partitions().len() as i32);
    if partition_count == 0 {
        return Err(Error::NoTopic(config.topic.clone()));
    }
    let dead_letters: BaseProducer<Deliveries> = config
        .kafka
        .client_config()
        .set("compression.type", "none")
        .set("linger.ms", "5")
        // Within a checkpoint's wait for them (`save`): a letter not delivered by then failed.
        .set("message.timeout.ms", "20000")
        .create_with_context(Deliveries { kafka: context, failed: Mutex::default() })?;
    let mut writer = SinkWriter::new(config.live.writer.clone(), format!("kafka/{}/{}/sink-writer", config.group, config.topic), sinks)?;
    let pacing = config.live.pacing.clone();
    let mut source = Kafka {
        config,
        consumer: Arc::new(consumer),
        poll_budget,
        rebalances_seen: 0,
        dead_letters,
        parts: BTreeMap::new(),
        partition_count,
        stranded: Stranded::new(stranded_after(&pacing)),
        group_checked: Instant::now(),
        fenced: BTreeMap::new(),
        unclaimed: BTreeMap::new(),
        poisoned: BTreeSet::new(),
        restore: BTreeSet::new(),
        paused: BTreeSet::new(),
    };
    let result = toolrank_live::run(&mut source, &mut writer, &pacing, &stop);
    let stopped = source.stopped();
    leave_group(source.consumer);
    result?;
    if !stopped.is_empty() {
        return Err(Error::Stopped(stopped.join("; ")));
    }
    Ok(writer.into_summary())
}

/// Half of `max.poll.interval.ms`: what the loop's state-table calls may take in all
/// between two polls ([`toolrank_live::polled`]), so that a stalled state table costs
/// failed calls, retried after the next poll, rather than the member's partitions (the
/// reading and the sinks' planning of the same turn fit in the other half).
fn poll_budget(client: &ClientConfig) -> Duration {
    let ms = client.get("max.poll.interval.ms").and_then(|v| v.parse::<u64>().ok()).unwrap_or(300_000);
    Duration::from_millis(ms / 2)
}

/// Leaves the group within `LEAVE_WAIT`. rdkafka's close on drop waits as long as the
/// group coordinator takes to answer, without end (seen after a broker restart), so the
/// drop runs on a thread of its own: past the wait the process goes on without it, and
/// the coordinator drops the member when its session times out. Offsets were committed
/// before: nothing is lost either way.
fn leave_group(consumer: Arc<BaseConsumer<Rebalances>>) {
    let (done, left) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(consumer);
        let _ = done.send(());
    });
    if left.recv_timeout(LEAVE_WAIT).is_err() {
        warn!("the group coordinator did not confirm the leave within {} s; exiting without it (the member's session times out)", LEAVE_WAIT.as_secs());
    }
}

impl Source for Kafka {
    type Error = Error;

    fn read(&mut self, writer: &mut SinkWriter) -> Result<usize, Error> {
        for p in std::mem::take(&mut self.restore) {
            warn!(partition = p, "the engine panicked mid-change: restoring the partition from its checkpoint");
            self.reread(writer, p)?;
        }
        self.seek_pending();
        // Up to READ_BATCH messages that are already fetched, the first waited for: the
        // loop's own steps (its clocks, the dead letters' delivery reports) then run once
        // per batch, not once per message.
        let mut read = 0;
        let mut wait = Duration::from_millis(20);
        // Messages are applied where rdkafka holds them, not copied out first.
        let consumer = self.consumer.clone();
        while read < READ_BATCH {
            let polled = consumer.poll(wait);
            if !wait.is_zero() {
                // The batch's other polls follow within milliseconds: the budget given at
                // its first holds for the calls of the whole batch.
                toolrank_live::polled(Some(self.poll_budget));
                wait = Duration::ZERO;
            }
            match polled {
                Some(Ok(msg)) => {
                    self.sync_assignment(writer)?;
                    self.handle(writer, &msg);
                    read += 1;
                }
                Some(Err(e)) => {
                    warn!(error = %e, "kafka consumer error");
                    break;
                }
                None => {
                    self.sync_assignment(writer)?;
                    break;
                }
            }
            // A partition to restore or to seek is seen to before reading on.
            if !self.restore.is_empty() || self.parts.values().any(|p| p.seek.is_some()) {
                break;
            }
        }
        self.dead_letters.poll(Duration::ZERO);
        Ok(read)
    }

    fn engines(&mut self) -> Vec<&mut Engine> {
        self.parts.values_mut().map(|p| &mut p.engine).collect()
    }

    /// The scopes of the partitions other consumers own.
    fn others(&self) -> Vec<String> {
        (0..self.partition_count).filter(|p| !self.parts.contains_key(p)).map(|p| scope(&self.config, p)).collect()
    }

    /// Not before the group has assigned this consumer its partitions.
    fn settled(&self) -> bool {
        self.rebalances_seen > 0
    }

    fn before_flush(&mut self, writer: &mut SinkWriter) {
        let lag = self.lag();
        metrics::gauge!("toolrank_source_lag_records").set(lag as f64);
        if lag < CAUGHT_UP_LAG {
            writer.caught_up();
        }
    }

    /// The partitions take turns (see `checkpoint`): each is saved once per interval.
    fn checkpoint_every(&self, interval: Duration) -> Duration {
        turn(interval, self.parts.len())
    }

    fn checkpoint(&mut self, writer: &mut SinkWriter, all: bool) -> Result<(), Error> {
        self.save(writer, all)
    }

    fn dirty(&self) -> bool {
        self.parts.values().any(|p| p.dirty)
    }

    fn drained(&mut self, writer: &mut SinkWriter) -> Result<bool, Error> {
        let drain = self.drain(Duration::from_secs(5));
        let done = drain == Drain::Done;
        self.rejoin_if_stranded(writer, drain)?;
        Ok(done)
    }

    /// Every `GROUP_CHECK` of idle turns, whether the group reads every partition: a
    /// broker's coordinator may leave one assigned to nobody (see `STRANDED_AFTER`), and
    /// nothing else would ever show it to the group.
    fn idle(&mut self, writer: &mut SinkWriter) -> Result<(), Error> {
        if self.group_checked.elapsed() >= GROUP_CHECK && self.settled() {
            self.group_checked = Instant::now();
            // Short waits: the loop writes the sinks and checkpoints while the broker is
            // away, and the check holds it up.
            let drain = self.drain(Duration::from_secs(1));
            self.rejoin_if_stranded(writer, drain)?;
        }
        Ok(())
    }
}

impl Kafka {
    /// Rejoins the group once partitions this consumer does not own have lagged with no
    /// progress for the stranded wait ([`stranded_after`]).
    fn rejoin_if_stranded(&mut self, writer: &mut SinkWriter, drain: Drain) -> Result<(), Error> {
        if let Some(positions) = self.stranded.observe(drain, Instant::now()) {
            let secs = self.stranded.after.as_secs();
            warn!(?positions, "partitions this consumer does not own have lagged for {secs} s with no progress: rejoining the group");
            toolrank_live::checkpoint(self, writer, true)?;
            self.consumer.unsubscribe();
            self.consumer.subscribe(&[&self.config.topic])?;
        }
        Ok(())
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

    /// Adopts newly assigned partitions (claiming their checkpoints) and drops revoked ones.
    fn sync_assignment(&mut self, writer: &mut SinkWriter) -> Result<(), Error> {
        // Asking rdkafka for the assignment is a round trip to its main thread: only after
        // a rebalance (its callbacks run inside `poll`, before any message it lets through).
        let events = self.consumer.context().events.load(Ordering::SeqCst);
        if events == self.rebalances_seen {
            self.claim_due(writer)?;
            return self.reclaim_fenced(writer);
        }
        self.rebalances_seen = events;
        // The new assignment decides: what is still assigned here is claimed below.
        self.fenced.clear();
        // A partition revoked and assigned again since the last look is not kept: another
        // consumer may have moved its checkpoint on meanwhile, so it is claimed anew.
        let revoked = std::mem::take(&mut *self.consumer.context().revoked.lock().unwrap_or_else(|e| e.into_inner()));
        let assigned: Vec<i32> = self.consumer.assignment()?.elements().iter().filter(|e| e.topic() == self.config.topic).map(|e| e.partition()).collect();
        let gone: Vec<i32> = self.parts.keys().filter(|p| revoked.contains(p) || !assigned.contains(p)).copied().collect();
        self.unclaimed.retain(|p, _| assigned.contains(p));
        for p in gone {
            self.release(writer, p);
            info!(partition = p, "partition revoked");
        }
        for p in assigned {
            if !self.parts.contains_key(&p) && !self.unclaimed.contains_key(&p) {
                info!(partition = p, "partition assigned");
                self.adopt(writer, p)?;
            }
        }
        Ok(())
    }

    /// Claims the assigned partitions whose last claim failed and whose backoff is over.
    fn claim_due(&mut self, writer: &mut SinkWriter) -> Result<(), Error> {
        let due: Vec<i32> = self.unclaimed.iter().filter(|(_, (at, _))| Instant::now() >= *at).map(|(&p, _)| p).collect();
        for p in due {
            self.adopt(writer, p)?;
        }
        Ok(())
    }

    /// Pauses or resumes fetching partition `p` (a resume only if it was paused here).
    fn pause(&mut self, p: i32, on: bool) -> Result<(), Error> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.config.topic, p);
        match on {
            true => {
                self.consumer.pause(&tpl)?;
                self.paused.insert(p);
            }
            false if self.paused.remove(&p) => self.consumer.resume(&tpl)?,
            false => {}
        }
        Ok(())
    }

    /// Claims partition `p`'s checkpoint and owns it from the checkpoint's position on:
    /// the consumer seeks there (the group's committed offset may lie before or after it),
    /// unless the partition no longer holds it (a gap, see [`gap_of`]). A claim the state
    /// table failed leaves the partition paused, to be claimed again after a jittered
    /// backoff: the consumer reads its other partitions meanwhile and stays in the group.
    fn adopt(&mut self, writer: &mut SinkWriter, p: i32) -> Result<(), Error> {
        let claimed = match writer.claim(&scope(&self.config, p)) {
            Err(e) if e.is_broken_checkpoint() => return self.stop_broken(p, e),
            claimed => claimed?,
        };
        let Some((engine, position, at)) = claimed else {
            let (next, backoff) =
                self.unclaimed.entry(p).or_insert_with(|| (Instant::now(), Backoff::new(Duration::from_millis(200), Duration::from_secs(10))));
            *next = Instant::now() + backoff.next_delay();
            return self.pause(p, true);
        };
        // Resumed if it was paused here, whether or not this claim follows a failed one:
        // librdkafka keeps a partition's pause through a rebalance, so one paused while
        // its claim failed, then revoked (its retry forgotten) and assigned again, would
        // otherwise never be read.
        self.unclaimed.remove(&p);
        self.pause(p, false)?;
        let mut next_offset = position.as_deref().and_then(|p| p.parse().ok()).unwrap_or(0);
        info!(partition = p, generation = at.generation, deltas = at.head.saturating_sub(at.base_at), next_offset, "checkpoint claimed");
        let mut stopped = None;
        match self.consumer.fetch_watermarks(&self.config.topic, p, Duration::from_secs(5)) {
            Ok((low, high)) => {
                if let Some(gap) = position.as_ref().and_then(|_| gap_of(next_offset, low, high)) {
                    let at = format!("partition {p} of {}: {gap}", self.config.topic);
                    match self.config.live.on_gap {
                        OnGap::Stop => {
                            error!(partition = p, checkpoint = next_offset, low, high, "{at}; the partition is stopped");
                            stopped = Some(format!("{at} ({})", toolrank_live::GAP_HINT));
                        }
                        OnGap::Skip => {
                            let skipped = if next_offset < low { low - next_offset } else { next_offset - high };
                            warn!(partition = p, checkpoint = next_offset, low, high, skipped, "{at}; reading on from offset {low} (--on-gap skip)");
                            toolrank_live::count_gap(skipped as u64);
                            next_offset = low;
                        }
                    }
                }
            }
            // Unknown now: the partition reads from its checkpoint as always.
            Err(e) => warn!(partition = p, error = %e, "could not read the watermarks to check the checkpoint's position"),
        }
        if stopped.is_some() {
            self.pause(p, true)?;
        }
        self.parts.insert(p, Partition::new(engine, next_offset, at, stopped));
        Ok(())
    }

    /// Stops partition `p`, whose checkpoint cannot be restored (`broken`): it stays
    /// assigned here, paused, so that no other member crash-loops on it, while the other
    /// partitions go on.
    fn stop_broken(&mut self, p: i32, broken: toolrank_live::Error) -> Result<(), Error> {
        error!(partition = p, error = %broken, "the partition is stopped");
        self.unclaimed.remove(&p);
        self.pause(p, true)?;
        self.parts.insert(p, Partition::new(Engine::new(), 0, LogHead::default(), Some(broken.to_string())));
        Ok(())
    }

    /// Seeks the partitions that must read from their checkpoints, waiting up to a second
    /// for librdkafka to take each seek: only then does it report one it refuses (a seek
    /// sent without waiting fails silently, and the partition would read on from the
    /// group's committed offset instead). A partition that does not take it yet
    /// (librdkafka starts its fetcher meanwhile) is tried again at the next read.
    fn seek_pending(&mut self) {
        for (&p, part) in self.parts.iter_mut().filter(|(_, part)| part.seek.is_some()) {
            let offset = part.seek.expect("filtered");
            let to = if offset > 0 { Offset::Offset(offset) } else { Offset::Beginning };
            match self.consumer.seek(&self.config.topic, p, to, Duration::from_secs(1)) {
                Ok(()) => {
                    debug!(partition = p, offset, "reading from the checkpoint's position");
                    part.seek = None;
                }
                Err(e) => debug!(partition = p, error = %e, "the partition does not take a seek yet"),
            }
        }
    }

    /// The partitions stopped, each with why.
    fn stopped(&self) -> Vec<String> {
        self.parts.values().filter_map(|p| p.stopped.clone()).collect()
    }

    /// Claims again the partitions let go after a fence that Kafka still assigns here
    /// `RECLAIM_AFTER` later, reading on from their checkpoints' positions (rdkafka's
    /// fetch position went on meanwhile: the consumer seeks back).
    fn reclaim_fenced(&mut self, writer: &mut SinkWriter) -> Result<(), Error> {
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
            // rdkafka's fetch position went on meanwhile: the adoption seeks back.
            self.adopt(writer, p)?;
        }
        Ok(())
    }
    /// Whether the group has read the whole topic: every owned partition up to its high
    /// watermark, and every other one committed up to it by its owner, each request
    /// waiting at most `wait`. A consumer that owns nothing yet (a rebalance in progress)
    /// is not done, nor is one that could not ask (`Drain::Own`).
    fn drain(&self, wait: Duration) -> Drain {
        let mut others = TopicPartitionList::new();
        for p in (0..self.partition_count).filter(|p| !self.parts.contains_key(p)) {
            others.add_partition(&self.config.topic, p);
        }
        let committed = match others.count() {
            0 => others,
            _ => match self.consumer.committed_offsets(others, wait) {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "could not read the group's committed offsets");
                    return Drain::Own;
                }
            },
        };
        let mut lagging = Vec::new();
        for p in 0..self.partition_count {
            let position = match self.parts.get(&p) {
                // A stopped partition reads no more: the rest of the input decides.
                Some(part) if part.stopped.is_some() => continue,
                Some(part) => part.next_offset,
                None => match committed.find_partition(&self.config.topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                },
            };
            match self.consumer.fetch_watermarks(&self.config.topic, p, wait) {
                Ok((_, high)) if position < high => lagging.push((p, position)),
                Ok(_) => {}
                // Not known, so not done; and the broker is slow or away: no more asking.
                Err(e) => {
                    warn!(partition = p, error = %e, "could not read the high watermark");
                    return Drain::Own;
                }
            }
        }
        drain_of(lagging, |p| self.parts.contains_key(&p))
    }

    /// Restores owned partition `p` from its checkpoint and reads on from its position.
    fn reread(&mut self, writer: &mut SinkWriter, p: i32) -> Result<(), Error> {
        let Some(part) = self.parts.get_mut(&p) else { return Ok(()) };
        // A save in flight covers only what was read before it: it may land.
        writer.saved(&mut part.saving, true);
        self.release(writer, p);
        self.adopt(writer, p)
    }

    /// Drops an owned partition and takes its share out of the merged engine.
    fn release(&mut self, writer: &mut SinkWriter, p: i32) {
        let mut part = self.parts.remove(&p).expect("owned");
        writer.release(&mut part.engine);
    }

    fn handle(&mut self, writer: &mut SinkWriter, msg: &impl Message) {
        let (p, offset) = (msg.partition(), msg.offset());
        let Some(part) = self.parts.get_mut(&p) else {
            writer.tally().messages += 1;
            debug!(partition = p, offset, "message of a partition not owned");
            return;
        };
        if part.seek.is_some() || part.stopped.is_some() {
            // Fetched before the seek to the checkpoint: read again after it.
            return;
        }
        writer.tally().messages += 1;
        if offset < part.next_offset {
            writer.tally().skipped_redeliveries += 1;
            return;
        }
        part.next_offset = offset + 1;
        part.dirty = true;
        if self.poisoned.contains(&(p, offset)) {
            return;
        }
        if let Some(ts) = msg.timestamp().to_millis() {
            writer.observe(ts);
        }
        let payload = msg.payload().unwrap_or_default();
        if let Some(reason) = toolrank_live::oversized(payload.len(), self.config.live.max_record_bytes) {
            self.dead_letter(writer, msg, &reason, payload);
            return;
        }
        match toolrank_live::guard(|| apply_line(&mut part.engine, payload, writer.tally())) {
            Ok(bad) => {
                for (reason, raw) in bad {
                    self.dead_letter(writer, msg, &reason, raw.as_deref().map(str::as_bytes).unwrap_or(payload));
                }
            }
            // The message goes whole to the dead letters, so none of its records may
            // count: the partition is restored to before it (a line may hold several
            // records, some applied before the panic) and passes over it.
            Err(panicked) => {
                self.dead_letter(writer, msg, &panicked.reason(), payload);
                self.poisoned.insert((p, offset));
                self.restore.insert(p);
            }
        }
    }
    /// Sends a bad record to the dead-letter topic with the reason and its source position.
    fn dead_letter(&mut self, writer: &mut SinkWriter, msg: &impl Message, reason: &str, payload: &[u8]) {
        writer.tally().dead_letters += 1;
        warn!(partition = msg.partition(), offset = msg.offset(), reason, "dead-lettered");
        let (partition, offset) = (msg.partition().to_string(), msg.offset().to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: "toolrank-reason", value: Some(reason) })
            .insert(Header { key: "toolrank-source-topic", value: Some(self.config.topic.as_str()) })
            .insert(Header { key: "toolrank-source-partition", value: Some(partition.as_str()) })
            .insert(Header { key: "toolrank-source-offset", value: Some(offset.as_str()) });
        let source = Box::new((msg.partition(), msg.offset()));
        let mut record = BaseRecord::<[u8], [u8], Box<(i32, i64)>>::with_opaque_to(&self.config.dead_letter_topic, source).payload(payload).headers(headers);
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
                    warn!(partition = msg.partition(), offset = msg.offset(), error = %e, "could not dead-letter a record");
                    self.dead_letters.context().fail(msg.partition(), msg.offset());
                }
            }
        }
    }

    /// Saves a changed partition's state with its offset (every changed one with
    /// `wait`), then commits the offsets saved. Saves run on the runtime's worker: one
    /// started at a round is collected at a later one, or at once with `wait`.
    fn save(&mut self, writer: &mut SinkWriter, wait: bool) -> Result<(), Error> {
        // The dead letters of the offsets a checkpoint covers are delivered before it: a
        // partition whose letter failed is read again from its checkpoint instead, so the
        // letter is sent again.
        if let Err(e) = self.dead_letters.flush(Duration::from_secs(30)) {
            warn!(error = %e, "dead letters are still in flight; checkpointing at the next turn");
            return Ok(());
        }
        for (p, offset) in self.dead_letters.context().take() {
            warn!(partition = p, offset, "a dead letter of this partition was not delivered: reading it again from its checkpoint");
            self.reread(writer, p)?;
        }
        let mut fenced = Vec::new();
        // One new save per round unless `wait`: the one saved longest ago. Serializing a
        // partition's changes (now and then its whole state) takes milliseconds to tens
        // of them; spread over the interval, no record waits for all partitions' at once.
        let next = self.parts.iter().filter(|(_, part)| part.dirty && part.saving.is_none()).min_by_key(|(_, part)| part.save_started).map(|(&p, _)| p);
        for (&p, part) in self.parts.iter_mut() {
            let mut started = false;
            loop {
                match writer.saved(&mut part.saving, wait) {
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
                part.saving = Some(writer.start_save(&scope(&self.config, p), part.at, &part.next_offset.to_string(), &mut part.engine));
                (part.saving_offset, part.dirty, started) = (part.next_offset, false, true);
            }
        }
        for p in fenced {
            warn!(partition = p, "another consumer owns this partition now; letting go");
            self.release(writer, p);
            self.fenced.insert(p, Instant::now());
        }
        self.commit()
    }

    /// Commits the offsets of the checkpointed partitions. The checkpoint, not the
    /// committed offset, is where a restart resumes: the commit only shows the group's
    /// progress to Kafka tools, so it is never waited for: librdkafka's synchronous commit
    /// has no timeout and waits as long as the group has no coordinator. The last one is
    /// delivered by leaving the group, which waits for outstanding commits within
    /// `LEAVE_WAIT`.
    fn commit(&mut self) -> Result<(), Error> {
        let mut tpl = TopicPartitionList::new();
        for (&p, part) in &self.parts {
            if part.saved_offset > 0 {
                tpl.add_partition_offset(&self.config.topic, p, Offset::Offset(part.saved_offset))?;
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stranded_once_they_lag_at_the_same_positions_for_long_enough() {
        let (t0, mut stranded) = (Instant::now(), Stranded::new(Duration::from_secs(30)));
        let at = |s| t0 + Duration::from_secs(s);
        let lag = |offset| Drain::Others(vec![(2, offset)]);
        assert_eq!(stranded.observe(lag(100), at(0)), None);
        assert_eq!(stranded.observe(lag(100), at(29)), None);
        assert_eq!(stranded.observe(lag(100), at(30)), Some(vec![(2, 100)]));
        assert_eq!(stranded.observe(lag(100), at(31)), None, "after a rejoin the wait starts over");
        assert_eq!(stranded.observe(lag(150), at(45)), None, "progress starts it over too");
        assert_eq!(stranded.observe(lag(150), at(74)), None);
        assert_eq!(stranded.observe(Drain::Own, at(75)), None);
        assert_eq!(stranded.observe(lag(150), at(106)), None, "its own lag in between starts it over");
        assert_eq!(stranded.observe(lag(150), at(136)), Some(vec![(2, 150)]));
    }

    #[test]
    fn owners_get_twice_their_longest_checkpoint_wait_before_their_partitions_count_as_stranded() {
        let pacing = |max| toolrank_live::Pacing {
            until_idle: None,
            flush_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(5),
            checkpoint_max: Duration::from_secs(max),
        };
        assert_eq!(stranded_after(&pacing(60)), Duration::from_secs(120));
        assert_eq!(stranded_after(&pacing(5)), STRANDED_AFTER);
    }

    #[test]
    fn a_checkpoint_outside_the_partition_is_a_gap() {
        assert_eq!(gap_of(5, 0, 10), None);
        assert_eq!(gap_of(10, 0, 10), None, "at the end: nothing waiting yet");
        assert_eq!(gap_of(3, 3, 3), None);
        assert!(gap_of(2, 5, 10).is_some_and(|g| g.contains("3 records were deleted before they were read")));
        assert!(gap_of(12, 0, 10).is_some_and(|g| g.contains("ends at 10")));
    }

    #[test]
    fn the_group_is_drained_only_when_no_partition_lags() {
        let owns = |p: i32| p < 2;
        assert_eq!(drain_of(vec![], owns), Drain::Done);
        // Any lagging partition of its own keeps a consumer reading.
        assert_eq!(drain_of(vec![(1, 10), (3, 7)], owns), Drain::Own);
        // Only others' lag: their positions, to tell progress from a stranded partition.
        assert_eq!(drain_of(vec![(2, 5), (3, 7)], owns), Drain::Others(vec![(2, 5), (3, 7)]));
    }

    #[test]
    fn partitions_take_turns_over_the_checkpoint_interval() {
        assert_eq!(turn(Duration::from_secs(4), 0), Duration::from_secs(4));
        assert_eq!(turn(Duration::from_secs(4), 4), Duration::from_secs(1));
    }

    #[test]
    fn each_partition_has_a_scope_of_its_own_per_group_and_topic() {
        let config = Config {
            kafka: Connection::plain(""),
            topic: "events".into(),
            group: "g".into(),
            dead_letter_topic: String::new(),
            fetch_wait: Duration::ZERO,
            live: toolrank_live::LiveConfig {
                writer: toolrank_live::WriterConfig {
                    state_table: String::new(),
                    today: None,
                    owner: String::new(),
                    lease: Duration::ZERO,
                    tombstone_horizon: Duration::ZERO,
                },
                pacing: toolrank_live::Pacing {
                    until_idle: None,
                    flush_interval: Duration::ZERO,
                    checkpoint_interval: Duration::ZERO,
                    checkpoint_max: Duration::ZERO,
                },
                max_record_bytes: 0,
                on_gap: toolrank_live::OnGap::Stop,
            },
        };
        assert_eq!(scope(&config, 3), "kafka/g/events/3");
    }
}
