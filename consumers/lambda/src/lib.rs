//! The Lambda handler: DynamoDB Streams events and Kinesis events carrying DynamoDB
//! changes, with exact results through retries, bisected batches and concurrency.
//!
//! Lambda keeps nothing between invocations that can be trusted, so (also in
//! docs/architecture.md):
//! - **State in DynamoDB, as delta logs.** Item keys hash into `TOOLRANK_BUCKETS` buckets
//!   (one by default; a session's items share their PK, so a session stays in one
//!   bucket). Each bucket is a log in the state table: a base checkpoint and numbered
//!   deltas after it, each delta the new state of the sessions and Agent items one batch
//!   changed. An invocation brings the bucket's engine to the log's head (a warm
//!   container reads only the deltas it has not seen), applies its records, and appends
//!   their delta as the log's next items, each one conditional put (no transaction:
//!   that would cost twice the units; the head is the last delta item). Of two concurrent
//!   invocations (other shards, or ParallelizationFactor > 1) one wins; the other applies
//!   the winner's delta over its unsaved changes, applies its records again and appends
//!   again. Once the deltas add up to the base's size the log is compacted into a new
//!   base. So a batch costs one small write, not a rewrite of the state.
//! - **Idempotency from sequence numbers.** The engine keeps each item's last applied
//!   sequence number (DynamoDB's `SequenceNumber`; Kinesis records use their
//!   `ApproximateCreationDateTime`), so a retried, bisected or duplicated batch finds
//!   its records stale and counts nothing twice.
//! - **batchItemFailures.** A bucket that cannot be appended to reports its earliest
//!   record: Lambda retries from there, and what follows (already applied elsewhere) is
//!   stale. A record that does not decode is not failed, or it would block its shard
//!   forever: it goes whole to the dead-letter queue (`TOOLRANK_DEAD_LETTER_QUEUE_URL`,
//!   SQS) with its reason and sequence number, and only those two reach the log. A
//!   failed send fails the batch from that record.
//! - **Sinks.** After appending, the invocation takes the sink lease, brings its copy of
//!   every bucket to the log heads, writes what changed to DynamoDB and Valkey, and gives
//!   the lease up. The last writer has seen every append before it, so the sinks end at
//!   the final state. A failed write does not fail the batch (its records are saved in
//!   the logs): the next write, a later invocation's or the scheduled flush's, catches up.

use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use base64::Engine as _;
use lambda_runtime::{service_fn, LambdaEvent};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::time::Duration;
use std::time::Instant;
use tokio::sync::oneshot;
use toolrank_engine::Engine;
use toolrank_events::{decode_kinesis_data, decode_line, Change};
use toolrank_live::{apply_change, apply_deltas, log_engine, BaseRead, LogCatchUp, SinkWriter, Source, WriterConfig};
pub use toolrank_state::COMPACT_MIN_BYTES;
use toolrank_state::{LogHead, DELTA_BYTES};
use tracing::{info, warn};

mod dead_letters;
mod settings;
mod telemetry;
pub use dead_letters::Rejected;
pub use settings::{Config, Settings, DEFAULT_WRITES_PER_EVENT};
pub use telemetry::{init_logging, MetricLine};

/// The owner name of every bucket checkpoint: invocations are told apart by generation.
const OWNER: &str = "lambda";

/// Why a handler could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Sinks(#[from] toolrank_sink_wiring::Error),
    #[error(transparent)]
    Live(#[from] toolrank_live::Error),
}

/// One record of an event, decoded.
pub struct Item<'a> {
    /// Its index in the event.
    pub index: usize,
    /// Its `itemIdentifier` for batchItemFailures: the sequence number.
    pub id: String,
    pub change: Change<'a>,
}

/// The records of an event, parsed, with Kinesis data base64-decoded so that changes
/// can borrow from it.
pub struct Batch<'a> {
    records: Vec<&'a RawValue>,
    heads: Vec<Head>,
    data: Vec<Vec<u8>>,
    /// The sequence number of the first record whose envelope does not parse: the batch
    /// ends before it and fails from it (Lambda retries it, then sends it to the event
    /// source's on-failure destination).
    unreadable: Option<String>,
}

impl<'a> Batch<'a> {
    /// Parses `{"Records": [...]}`; `None` for a JSON object without `Records` (a flush
    /// event, e.g. an EventBridge schedule's); `Err` when the event itself is unreadable.
    /// A record whose envelope does not parse ends the batch if it names its sequence
    /// number (the batch fails from it); without one it can only be a bad record, and is
    /// dead-lettered as such.
    pub fn parse(event: &'a [u8]) -> Result<Option<Batch<'a>>, String> {
        let text = std::str::from_utf8(event).map_err(|_| "event is not UTF-8".to_owned())?;
        let event: Event = serde_json::from_str(text).map_err(|e| format!("not a Records event: {e}"))?;
        let Some(mut records) = event.records else { return Ok(None) };
        let mut heads = Vec::with_capacity(records.len());
        let mut data = Vec::new();
        let mut unreadable = None;
        for (index, raw) in records.iter().enumerate() {
            let head: Head = match serde_json::from_str(raw.get()) {
                Ok(head) => head,
                Err(e) => match envelope_id(raw) {
                    Some(id) => {
                        warn!(index, sequence_number = id, error = %e, "a record's envelope does not parse: the batch fails from it");
                        unreadable = Some(id);
                        records.truncate(index);
                        break;
                    }
                    None => Head { kinesis: None, dynamodb: None },
                },
            };
            if let Some(k) = &head.kinesis {
                data.push(base64::engine::general_purpose::STANDARD.decode(&k.data).unwrap_or_default());
            }
            heads.push(head);
        }
        Ok(Some(Batch { records, heads, data, unreadable }))
    }

    /// The index of the record whose envelope does not parse (after every other), if any.
    fn unreadable_at(&self) -> Option<usize> {
        self.unreadable.as_ref().map(|_| self.records.len())
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The `itemIdentifier` of record `index`: its sequence number.
    fn id(&self, index: usize) -> String {
        let Some(head) = self.heads.get(index) else { return self.unreadable.clone().unwrap_or_default() };
        match (&head.kinesis, &head.dynamodb) {
            (Some(k), _) => k.sequence_number.clone(),
            (None, d) => d.as_ref().and_then(|d| d.sequence_number.clone()).unwrap_or_default(),
        }
    }

    /// The decodable records in order, their indices by bucket (of `buckets`), and the
    /// records that do not decode or are larger than `max_bytes`.
    pub fn decode(&self, buckets: u32, max_bytes: usize) -> (Vec<Item<'_>>, BTreeMap<u32, Vec<usize>>, Vec<Rejected<'a>>) {
        let mut items: Vec<Item> = Vec::with_capacity(self.heads.len());
        let mut rejected = Vec::new();
        let mut kinesis_data = self.data.iter();
        for (index, (raw, head)) in self.records.iter().zip(&self.heads).enumerate() {
            let (id, decoded) = match (&head.kinesis, &head.dynamodb) {
                (Some(k), _) => {
                    let data = kinesis_data.next().expect("decoded");
                    let decoded = match toolrank_live::oversized(data.len(), max_bytes) {
                        Some(reason) => Err(reason),
                        None => decode_kinesis_data(data).map(|(c, _)| c).map_err(|e| e.to_string()),
                    };
                    (k.sequence_number.clone(), decoded)
                }
                (None, d) => {
                    let decoded = match toolrank_live::oversized(raw.get().len(), max_bytes) {
                        Some(reason) => Err(reason),
                        None => decode_stream_record(raw.get()),
                    };
                    (d.as_ref().and_then(|d| d.sequence_number.clone()).unwrap_or_default(), decoded)
                }
            };
            match decoded {
                Ok(change) => items.push(Item { index, id, change }),
                Err(reason) => {
                    warn!(sequence_number = id, reason, "dead-lettered");
                    rejected.push(Rejected { index, id, reason, raw });
                }
            }
        }
        let mut by_bucket: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        let hasher = BuildHasherDefault::<DefaultHasher>::default();
        for (i, item) in items.iter().enumerate() {
            by_bucket.entry((hasher.hash_one(item.change.pk.as_ref()) % u64::from(buckets)) as u32).or_default().push(i);
        }
        (items, by_bucket, rejected)
    }
}

/// The sequence number of a record whose envelope does not parse, read leniently.
fn envelope_id(raw: &RawValue) -> Option<String> {
    let record: serde_json::Value = serde_json::from_str(raw.get()).ok()?;
    let id = record.pointer("/dynamodb/SequenceNumber").or_else(|| record.pointer("/kinesis/sequenceNumber"))?;
    id.as_str().filter(|id| !id.is_empty()).map(str::to_owned)
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "Records", borrow)]
    records: Option<Vec<&'a RawValue>>,
}

#[derive(Deserialize)]
struct Head {
    kinesis: Option<KinesisPart>,
    dynamodb: Option<DynamoPart>,
}

#[derive(Deserialize)]
struct KinesisPart {
    data: String,
    #[serde(rename = "sequenceNumber")]
    sequence_number: String,
}

#[derive(Deserialize)]
struct DynamoPart {
    #[serde(rename = "SequenceNumber")]
    sequence_number: Option<String>,
}

/// What one invocation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub records: usize,
    pub dead_letters: usize,
    /// Records to retry from (the earliest failed one).
    pub failures: Vec<String>,
}

impl Outcome {
    /// The batchItemFailures response (the same shape for Kinesis events).
    pub fn response(&self) -> DynamoDbEventResponse {
        let mut response = DynamoDbEventResponse::default();
        for id in &self.failures {
            let mut f = DynamoDbBatchItemFailure::default();
            f.item_identifier = Some(id.clone());
            response.batch_item_failures.push(f);
        }
        response
    }
}

/// A bucket's engine as a warm container keeps it, at `at` in the bucket's delta log
/// plus whatever a failed append left unsaved (tracked for the next delta).
struct Bucket {
    engine: Engine,
    at: u64,
}

/// The handler with what a warm container keeps: engines and the sink writer.
pub struct Handler {
    config: Config,
    writer: SinkWriter,
    buckets: HashMap<u32, Bucket>,
    scopes: Vec<String>,
    /// When this container last wrote the sinks (ms since the epoch: a frozen container's
    /// monotonic clock may not advance).
    last_sink_write: i64,
    /// Where records that do not decode go.
    dead_letters: Option<toolrank_dead_letters::Queue>,
}

impl Handler {
    pub fn new(config: Config) -> Result<Handler, SetupError> {
        let sinks = toolrank_sink_wiring::SinkSettings {
            table: config.table.clone(),
            // The active namespace is always the one on the live items.
            dynamodb_namespace: toolrank_sink_wiring::Namespace::Live,
            // Invocations judge the interval (`sinks_due`); the writer keeps the budget.
            dynamodb_interval: Duration::ZERO,
            dynamodb_max_defer: config.dynamodb_max_defer,
            dynamodb_writes_per_event: config.dynamodb_writes_per_event,
            dynamodb_max_wcu: config.dynamodb_max_wcu,
            valkey_url: config.valkey_url.clone(),
            valkey_prefix: config.valkey_prefix.clone(),
        }
        .wire()?;
        let writer = SinkWriter::new(
            WriterConfig {
                state_table: config.state_table.clone(),
                today: config.today,
                owner: toolrank_live::unique_owner("lambda"),
                lease: Duration::from_secs(10),
                tombstone_horizon: config.tombstone_horizon,
            },
            format!("lambda/{}/sink-writer", config.application),
            vec![sinks],
        )?;
        let scopes = (0..config.buckets).map(|b| format!("lambda/{}/bucket/{b:05}", config.application)).collect();
        let source = format!("lambda/{}", config.application);
        let dead_letters =
            config.dead_letter_queue_url.clone().map(|url| toolrank_dead_letters::Queue::new(&writer.block_on(toolrank_dynamodb::sdk_config()), url, source));
        Ok(Handler { config, writer, buckets: HashMap::new(), scopes, last_sink_write: 0, dead_letters })
    }

    /// The counters of this container's invocations so far.
    pub fn summary(&self) -> toolrank_live::Summary {
        self.writer.counters()
    }

    /// Handles one event (`{"Records": [...]}` of DynamoDB Streams or Kinesis; any other
    /// JSON object is a flush: the sinks are written from the log heads). `Err`: the event
    /// itself is unreadable (Lambda retries it, then sends it to the on-failure
    /// destination), or a flush failed.
    pub fn handle(&mut self, event: &[u8]) -> Result<Outcome, String> {
        let Some(batch) = Batch::parse(event)? else {
            if self.writer.has_sinks() && !self.write_sinks(true) {
                return Err("flush: the sinks were not written".into());
            }
            return Ok(Outcome::default());
        };
        let (items, by_bucket, rejected) = batch.decode(self.config.buckets, self.config.max_record_bytes);
        let mut outcome = Outcome { records: batch.len(), dead_letters: rejected.len(), ..Outcome::default() };
        self.writer.tally().dead_letters += rejected.len() as u64;
        // A letter not sent fails the batch from its record: the retry sends it again.
        let unsent = match (&self.dead_letters, rejected.is_empty()) {
            (Some(queue), false) => self.writer.block_on(dead_letters::send(queue, &rejected)).err().map(|(index, error)| {
                warn!(error, "dead letters were not sent; the batch is retried from the first one not sent");
                index
            }),
            _ => None,
        };
        let mut invocation = Invocation {
            buckets: &mut self.buckets,
            scopes: &self.scopes,
            compact_bytes: self.config.compact_bytes,
            items: &items,
            pending: by_bucket.iter().map(|(&bucket, indices)| (bucket, (indices.as_slice(), LogHead::default()))).collect(),
            failed: Vec::new(),
        };
        if !toolrank_live::invoke(&mut invocation, &mut self.writer, APPEND_ROUNDS).map_err(|e| e.to_string())? {
            invocation.give_up();
        }
        // Lambda retries from the earliest record reported, in the event's order.
        let earliest_failed = invocation.failed.iter().map(|&(_, first)| items[first].index).chain(unsent).chain(batch.unreadable_at()).min();
        // What was appended is saved: the sinks catch up at the next write (a later
        // invocation's, or the scheduled flush), so a sink outage does not retry the batch.
        if self.writer.has_sinks() && self.sinks_due() && !self.write_sinks(false) {
            warn!("the sinks were not written; the next write or the scheduled flush writes them");
        }
        if let Some(index) = earliest_failed {
            outcome.failures.push(batch.id(index));
        }
        Ok(outcome)
    }

    /// Whether the sink interval is up: since this container's last write (known without a
    /// request) and since anybody's (a read of the sink lease; unknown counts as up).
    fn sinks_due(&mut self) -> bool {
        let interval = self.config.sink_interval.as_millis() as i64;
        let now = toolrank_live::now_ms();
        if now - self.last_sink_write < interval {
            return false;
        }
        match self.writer.last_written() {
            // Never written: the first write too waits an interval, or it would cover the
            // first batch alone (this container has waited once it gets here again).
            Ok(0) if self.last_sink_write == 0 => {
                self.last_sink_write = now;
                false
            }
            Ok(ms) if now - ms < interval => {
                self.last_sink_write = ms;
                false
            }
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "could not read when the sinks were last written; writing them");
                true
            }
        }
    }

    /// Writes the sinks from the heads of every bucket log (DynamoDB within its write
    /// budget unless `now`).
    fn write_sinks(&mut self, now: bool) -> bool {
        let ok = self.writer.write_once(&self.scopes, self.config.sink_wait, now);
        if ok {
            self.last_sink_write = toolrank_live::now_ms();
        }
        ok
    }
}

/// The rounds an invocation appends in before its buckets that still lose the race to
/// concurrent invocations are failed (Lambda retries them).
const APPEND_ROUNDS: usize = 8;

/// An invocation's records as a [`Source`]: its units are the buckets they fall in. A
/// round brings each bucket's engine to its log's head (loading it when absent, or when
/// the deltas it needs were compacted away), applies the bucket's records, and appends
/// what they changed to the log. When a concurrent invocation appended first, the next
/// round applies the deltas it missed over its unsaved changes, then the records again
/// (those its rival's deltas replaced apply anew, the rest are stale). On any other
/// failure the bucket's cached engine is dropped: it may hold what was never saved.
struct Invocation<'h, 'e> {
    buckets: &'h mut HashMap<u32, Bucket>,
    scopes: &'h [String],
    compact_bytes: u64,
    items: &'h [Item<'e>],
    /// The buckets not appended yet: their records' indices and their log's head as read.
    pending: BTreeMap<u32, (&'h [usize], LogHead)>,
    /// The buckets that failed, each with the index of its first record.
    failed: Vec<(u32, usize)>,
}

impl Invocation<'_, '_> {
    fn fail(&mut self, bucket: u32, error: &toolrank_dynamodb::Error) {
        warn!(bucket, error = %error, "could not save a bucket; its records are retried");
        self.buckets.remove(&bucket);
        if let Some((indices, _)) = self.pending.remove(&bucket) {
            self.failed.push((bucket, indices[0]));
        }
    }

    /// Fails the buckets that lost the race in every round.
    fn give_up(&mut self) {
        let lost: Vec<u32> = self.pending.keys().copied().collect();
        for bucket in lost {
            self.fail(bucket, &toolrank_dynamodb::Error::Fenced(format!("concurrent invocations appended first {APPEND_ROUNDS} times")));
        }
    }

    /// Brings a bucket's cached engine to its log's head; returns the head as read.
    fn catch_up(&mut self, writer: &SinkWriter, bucket: u32) -> Result<LogHead, toolrank_dynamodb::Error> {
        let scope = &self.scopes[bucket as usize];
        let head = match writer.call("reading a bucket's log", writer.store().log_head(scope))? {
            Some(head) => head,
            None => {
                // The first append and compaction need a manifest to condition on.
                writer.call("creating a bucket", writer.store().claim(scope, OWNER))?;
                LogHead::default()
            }
        };
        let state_error = |e: toolrank_live::Error| toolrank_dynamodb::Error::Input(e.to_string());
        let b = self.buckets.get_mut(&bucket);
        match writer.log_catch_up(scope, b.as_ref().map(|b| b.at), &head, BaseRead::Whole)? {
            LogCatchUp::Current => Ok(head),
            LogCatchUp::Deltas(deltas) => {
                let b = b.expect("deltas follow a cached engine");
                apply_deltas(scope, &mut b.engine, &deltas).map_err(state_error)?;
                b.at = head.head;
                Ok(head)
            }
            // Cold, or behind a compaction: the base and the deltas after it.
            LogCatchUp::Log(log) => {
                let mut engine = log_engine(scope, &log).map_err(state_error)?;
                engine.track_deltas();
                self.buckets.insert(bucket, Bucket { engine, at: log.at.head });
                Ok(log.at)
            }
        }
    }

    /// Appends a bucket's changes to its log (compacting it when due) and moves the sink
    /// writer's copy along; `Ok(false)` when a concurrent invocation appended first.
    fn append(&mut self, writer: &mut SinkWriter, bucket: u32) -> Result<bool, toolrank_dynamodb::Error> {
        let scope = &self.scopes[bucket as usize];
        let (indices, head) = self.pending[&bucket];
        let b = self.buckets.get_mut(&bucket).expect("caught up");
        let deltas = b.engine.delta(DELTA_BYTES);
        if deltas.is_empty() {
            return Ok(true);
        }
        let appended = match writer.call("appending to a bucket's log", writer.store().append(scope, &head, &deltas, indices.len() as u64)) {
            Ok(appended) => appended,
            Err(toolrank_dynamodb::Error::Fenced(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        b.engine.delta_saved();
        let (from, at) = (std::mem::replace(&mut b.at, appended.head), appended.head);
        let bytes: u64 = deltas.iter().map(|d| d.len() as u64).sum();
        if head.compaction_due(deltas.len(), bytes, self.compact_bytes) {
            let (state, figures) = b.engine.snapshot_split();
            match writer.call("compacting a bucket's log", writer.store().compact(scope, OWNER, head.generation, &appended, &state, figures)) {
                Ok(_) | Err(toolrank_dynamodb::Error::Fenced(_)) => {}
                Err(e) => warn!(bucket, error = %e, "could not compact a bucket's log; a later invocation will"),
            }
        }
        if writer.has_sinks() {
            // The sink writer's copy follows without reading the deltas back.
            writer.advance_log(scope, from, at, &deltas).map_err(|e| toolrank_dynamodb::Error::Input(e.to_string()))?;
        }
        Ok(true)
    }
}

impl Source for Invocation<'_, '_> {
    type Error = toolrank_live::Error;

    fn sync(&mut self, writer: &mut SinkWriter) -> Result<(), Self::Error> {
        let buckets: Vec<u32> = self.pending.keys().copied().collect();
        for bucket in buckets {
            match self.catch_up(writer, bucket) {
                Ok(head) => self.pending.get_mut(&bucket).expect("pending").1 = head,
                Err(e) => self.fail(bucket, &e),
            }
        }
        Ok(())
    }

    /// Applies each bucket's records. A panic fails the bucket's records (its engine is
    /// dropped, so the retry starts from its log): Lambda retries them, and sends them to
    /// the event source's on-failure destination when the retries run out, while the
    /// other buckets go on.
    fn read(&mut self, writer: &mut SinkWriter) -> Result<usize, Self::Error> {
        let mut read = 0;
        let mut panicked = Vec::new();
        for (bucket, (indices, _)) in &self.pending {
            let b = self.buckets.get_mut(bucket).expect("caught up");
            let applied = toolrank_live::guard(|| {
                for &i in *indices {
                    apply_change(&mut b.engine, &self.items[i].change, writer.tally());
                }
            });
            if let Err(p) = applied {
                panicked.push((*bucket, p.reason()));
                continue;
            }
            writer.expire_tombstones(&mut b.engine);
            read += indices.len();
        }
        for (bucket, reason) in panicked {
            self.fail(bucket, &toolrank_dynamodb::Error::Input(reason));
        }
        Ok(read)
    }

    /// The buckets' changes reach the sink writer through their logs
    /// ([`SinkWriter::advance_log`]), not by forwarding: none to forward.
    fn engines(&mut self) -> Vec<&mut Engine> {
        Vec::new()
    }

    /// Every bucket: between invocations no writer owns one.
    fn others(&self) -> Vec<String> {
        self.scopes.to_vec()
    }

    fn checkpoint(&mut self, writer: &mut SinkWriter, _all: bool) -> Result<(), Self::Error> {
        let buckets: Vec<u32> = self.pending.keys().copied().collect();
        for bucket in buckets {
            match self.append(writer, bucket) {
                Ok(true) => {
                    self.pending.remove(&bucket);
                }
                Ok(false) => {}
                Err(e) => self.fail(bucket, &e),
            }
        }
        Ok(())
    }

    fn dirty(&self) -> bool {
        !self.pending.is_empty()
    }

    /// An invocation's input is all in its event.
    fn drained(&mut self, _writer: &mut SinkWriter) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// A DynamoDB stream record of a Lambda event.
fn decode_stream_record(raw: &str) -> Result<Change<'_>, String> {
    let mut out = None;
    decode_line(raw.as_bytes(), &mut |rec| out = Some(rec.result.map_err(|e| e.to_string()))).map_err(|e| e.to_string())?;
    out.unwrap_or_else(|| Err("no record".into()))
}

type Job = (Box<RawValue>, oneshot::Sender<Result<Outcome, String>>);

/// Runs the handler under the Lambda Runtime API (`AWS_LAMBDA_RUNTIME_API`) until the
/// process ends. `started` is when the process started, for the cold-start figure.
/// Each invocation's figures go to stdout as a CloudWatch embedded-metric-format line.
pub async fn serve(config: Config, started: Instant) -> Result<(), lambda_runtime::Error> {
    let function = std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "toolrank".into());
    // The handler makes blocking calls on a runtime of its own: it gets a thread of its own.
    let (jobs, queue) = std::sync::mpsc::channel::<Job>();
    let (ready, initialized) = oneshot::channel();
    std::thread::spawn(move || {
        let mut handler = match Handler::new(config) {
            Ok(h) => {
                let _ = ready.send(Ok(()));
                h
            }
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return;
            }
        };
        for (event, reply) in queue {
            let _ = reply.send(handler.handle(event.get().as_bytes()));
        }
    });
    initialized.await??;
    info!(init_ms = started.elapsed().as_millis() as u64, "cold start: ready for the first event");
    MetricLine::new(&function).seconds("InitSeconds", started.elapsed()).print();
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Box<RawValue>>| {
        let jobs = jobs.clone();
        let function = function.clone();
        async move {
            let started = Instant::now();
            let (reply, answer) = oneshot::channel();
            jobs.send((event.payload, reply))?;
            let outcome = answer.await??;
            info!(
                records = outcome.records,
                dead_letters = outcome.dead_letters,
                failures = outcome.failures.len(),
                ms = started.elapsed().as_millis() as u64,
                "invocation"
            );
            MetricLine::new(&function)
                .count("Records", outcome.records)
                .count("DeadLetters", outcome.dead_letters)
                .count("BatchItemFailures", outcome.failures.len())
                .seconds("InvocationSeconds", started.elapsed())
                .print();
            Ok::<_, lambda_runtime::Error>(outcome.response())
        }
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../../examples/seed-sample.jsonl");

    fn event(records: &[&str]) -> String {
        format!("{{\"Records\": [{}]}}", records.join(","))
    }

    #[test]
    fn a_streams_event_decodes_in_order_with_each_partition_key_in_one_bucket() {
        let lines: Vec<&str> = SAMPLE.lines().collect();
        let text = event(&lines);
        let batch = Batch::parse(text.as_bytes()).unwrap().expect("records");
        assert_eq!(batch.len(), lines.len());
        let (items, by_bucket, rejected) = batch.decode(8, usize::MAX);
        assert_eq!((items.len(), rejected.len()), (lines.len(), 0));
        assert_eq!(by_bucket.values().map(Vec::len).sum::<usize>(), items.len());
        let mut bucket_of: HashMap<&str, u32> = HashMap::new();
        for (&bucket, indices) in &by_bucket {
            assert!(indices.windows(2).all(|w| w[0] < w[1]), "a bucket keeps the event's order");
            for &i in indices {
                assert_eq!(*bucket_of.entry(items[i].change.pk.as_ref()).or_insert(bucket), bucket, "one key, one bucket");
            }
        }
        assert_eq!(Batch::parse(text.as_bytes()).unwrap().unwrap().decode(1, usize::MAX).1.len(), 1);
    }

    #[test]
    fn a_record_that_does_not_decode_is_rejected_whole_with_its_position_and_the_rest_go_on() {
        let lines: Vec<&str> = SAMPLE.lines().take(3).collect();
        let bad = r#"{"eventName": "INSERT", "dynamodb": {"SequenceNumber": "9"}}"#;
        let text = event(&[lines[0], bad, lines[1], lines[2]]);
        let batch = Batch::parse(text.as_bytes()).unwrap().unwrap();
        let (items, _, rejected) = batch.decode(1, usize::MAX);
        assert_eq!((items.len(), rejected.len()), (3, 1));
        assert_eq!((rejected[0].index, rejected[0].id.as_str(), rejected[0].raw.get()), (1, "9", bad));
        assert_eq!(items.iter().map(|i| i.index).collect::<Vec<_>>(), [0, 2, 3]);
        assert_eq!(batch.id(1), "9");
        assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["1000000000000000000002", "1000000000000000000003", "1000000000000000000004"]);
        // Over the size limit (the seed's records are longer than this bad one), a record
        // is rejected before it is decoded.
        let (items, _, rejected) = batch.decode(1, bad.len());
        let oversized: Vec<usize> = rejected.iter().filter(|r| r.reason.contains("larger than the limit")).map(|r| r.index).collect();
        assert_eq!((items.len(), rejected.len(), oversized), (0, 4, vec![0, 2, 3]));
    }

    #[test]
    fn a_record_whose_envelope_does_not_parse_ends_the_batch_and_fails_from_it() {
        let lines: Vec<&str> = SAMPLE.lines().take(2).collect();
        // `data` must be base64 text: the envelope is broken, its sequence number readable.
        let broken = r#"{"eventSource": "aws:kinesis", "kinesis": {"data": 5, "sequenceNumber": "77"}}"#;
        let text = event(&[lines[0], broken, lines[1]]);
        let batch = Batch::parse(text.as_bytes()).unwrap().unwrap();
        assert_eq!((batch.len(), batch.unreadable_at()), (1, Some(1)));
        assert_eq!(batch.id(1), "77", "Lambda retries from the broken record");
        let (items, _, rejected) = batch.decode(1, usize::MAX);
        assert_eq!((items.len(), rejected.len()), (1, 0), "the records before it are applied");
        // Without a sequence number it cannot be retried from: a bad record, dead-lettered.
        let nameless = r#"{"dynamodb": 5}"#;
        let text = event(&[lines[0], nameless, lines[1]]);
        let batch = Batch::parse(text.as_bytes()).unwrap().unwrap();
        assert_eq!((batch.len(), batch.unreadable_at()), (3, None));
        let (items, _, rejected) = batch.decode(1, usize::MAX);
        assert_eq!((items.len(), rejected.len(), rejected[0].index), (2, 1, 1));
    }

    #[test]
    fn an_object_without_records_is_a_flush_and_anything_else_is_refused() {
        assert!(Batch::parse(br#"{"source": "aws.scheduler"}"#).unwrap().is_none());
        assert!(Batch::parse(br#"{"Records": []}"#).unwrap().unwrap().is_empty());
        assert!(Batch::parse(b"[1, 2]").is_err());
        assert!(Batch::parse(b"\xff\xfe").is_err());
    }

    #[test]
    fn failures_answer_as_batch_item_failures() {
        let outcome = Outcome { records: 3, dead_letters: 0, failures: vec!["42".into()] };
        let response = outcome.response();
        assert_eq!(response.batch_item_failures.len(), 1);
        assert_eq!(response.batch_item_failures[0].item_identifier.as_deref(), Some("42"));
        assert!(Outcome::default().response().batch_item_failures.is_empty());
    }
}
