//! Checkpoints and leases in the pipeline's state table.
//!
//! A checkpoint is an engine snapshot and the input position it covers (a Kafka offset,
//! a shard sequence number), written atomically: the snapshot goes into chunk items of a
//! new generation, then one conditional update of the manifest item switches to it. The
//! manifest names its owner, so a consumer that lost a partition (a zombie after a
//! rebalance) cannot overwrite the new owner's checkpoint: its save fails as `Fenced`.
//!
//! A checkpoint can also be the base of a delta log (Lambda buckets, where many short
//! writers take turns): each writer appends what its batch changed as the next numbered
//! delta item, in one transaction with the manifest's `Head` (so of two writers at the
//! same head one fails as `Fenced`), and now and then saves the whole state as a new
//! base covering the deltas so far, whose items are then deleted. Readers load the base
//! and the deltas after it, or only the deltas after what they already hold.

use crate::{aws, batch_write, Error, Units, TOTAL};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, PutRequest, ReturnValue, WriteRequest};
use aws_sdk_dynamodb::Client;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Items stay well under DynamoDB's 400 KB limit.
const CHUNK_BYTES: usize = 350 * 1024;

/// The state of one scope (e.g. `kafka/<group>/<topic>/<partition>`) as last saved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Increases with every save; 0 before the first.
    pub generation: u64,
    /// Where the input resumes; `None` before the first save.
    pub position: Option<String>,
    /// The engine snapshot; empty before the first save.
    pub state: Vec<u8>,
}

/// Checkpoints in a DynamoDB table (see the module docs).
#[derive(Clone)]
pub struct CheckpointStore {
    client: Client,
    table: String,
    /// Write requests sent and capacity units they consumed, shared by clones: what the
    /// state costs.
    writes: Arc<AtomicU64>,
    units: Units,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The chunk items of one save: its generation and a tag of its own, so that a writer
/// that loses the race for a generation never overwrites (nor, cleaning up, deletes) the
/// winner's chunks. Manifests written before tags existed have none.
struct Chunks {
    generation: u64,
    tag: String,
}

impl Chunks {
    fn new(generation: u64) -> Chunks {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        Chunks { generation, tag: format!("{:016x}", h.finish()) }
    }

    fn of(manifest: &HashMap<String, AttributeValue>) -> Chunks {
        Chunks { generation: generation_of(manifest), tag: text(manifest, "ChunkTag").cloned().unwrap_or_default() }
    }

    fn prefix(&self) -> String {
        match self.tag.as_str() {
            "" => format!("chunk#{:020}#", self.generation),
            tag => format!("chunk#{:020}#{tag}#", self.generation),
        }
    }

    fn sk(&self, i: usize) -> String {
        format!("{}{i:06}", self.prefix())
    }
}

fn delta_sk(n: u64) -> String {
    format!("delta#{n:020}")
}

/// Where a delta log stands (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogHead {
    /// The base checkpoint's generation.
    pub generation: u64,
    /// The deltas the base covers: numbers up to this one.
    pub base_at: u64,
    /// The latest delta's number.
    pub head: u64,
    /// Size of the base's state.
    pub base_bytes: u64,
    /// Bytes appended since the base was saved.
    pub log_bytes: u64,
}

impl LogHead {
    fn of(manifest: &HashMap<String, AttributeValue>) -> LogHead {
        LogHead {
            generation: generation_of(manifest),
            base_at: text(manifest, "Position").and_then(|v| v.parse().ok()).unwrap_or(0),
            head: number(manifest, "Head"),
            base_bytes: number(manifest, "Bytes"),
            log_bytes: number(manifest, "LogBytes"),
        }
    }
}

/// A delta log read in full: its base state and the deltas after it.
#[derive(Debug, Clone, Default)]
pub struct Log {
    pub at: LogHead,
    pub base: Vec<u8>,
    pub deltas: Vec<Vec<u8>>,
}

/// Delta items per append transaction: 10 of at most `CHUNK_BYTES` stay under the 4 MB a
/// transaction may write.
const DELTAS_PER_APPEND: usize = 10;

impl CheckpointStore {
    pub fn new(client: Client, table: impl Into<String>) -> CheckpointStore {
        CheckpointStore { client, table: table.into(), writes: Arc::default(), units: Units::default() }
    }

    /// Write requests this store (and its clones) sent so far.
    pub fn write_requests(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Write capacity units this store (and its clones) consumed so far.
    pub fn write_units(&self) -> f64 {
        self.units.get()
    }

    /// Counts `n` write requests; a batch of `items` writes is one per 25.
    fn wrote(&self, n: usize) {
        self.writes.fetch_add(n as u64, Ordering::Relaxed);
    }

    async fn manifest(&self, scope: &str) -> Result<Option<HashMap<String, AttributeValue>>, Error> {
        let got = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(scope))
            .key("SK", s("manifest"))
            .consistent_read(true)
            .send()
            .await
            .map_err(aws(format!("reading the checkpoint of {scope}")))?;
        Ok(got.item)
    }

    /// The generation of `scope`'s latest checkpoint (0 if none), without claiming it.
    pub async fn generation(&self, scope: &str) -> Result<u64, Error> {
        Ok(self.manifest(scope).await?.as_ref().map_or(0, generation_of))
    }

    /// The position of `scope`'s latest checkpoint, without its state.
    pub async fn position(&self, scope: &str) -> Result<Option<String>, Error> {
        Ok(self.manifest(scope).await?.and_then(|m| text(&m, "Position").cloned()))
    }

    /// Adds `members` to the string set `name` of the item (`scope`, `sk`), e.g. the
    /// registry of a stream's shard lineages.
    pub async fn add_to_set(&self, scope: &str, sk: &str, name: &str, members: Vec<String>) -> Result<(), Error> {
        self.wrote(1);
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(scope))
            .key("SK", s(sk))
            .update_expression("ADD #n :m")
            .expression_attribute_names("#n", name)
            .expression_attribute_values(":m", AttributeValue::Ss(members))
            .return_consumed_capacity(TOTAL)
            .send()
            .await
            .map_err(aws(format!("adding to {scope} {sk}")))?;
        self.units.add(out.consumed_capacity());
        Ok(())
    }

    /// The string set `name` of the item (`scope`, `sk`); empty when absent.
    pub async fn set(&self, scope: &str, sk: &str, name: &str) -> Result<Vec<String>, Error> {
        let got = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(scope))
            .key("SK", s(sk))
            .consistent_read(true)
            .send()
            .await
            .map_err(aws(format!("reading {scope} {sk}")))?;
        Ok(got.item.and_then(|i| i.get(name).and_then(|v| v.as_ss().ok()).cloned()).unwrap_or_default())
    }

    /// Records that `owner` is alive until `duration` from now, and returns how many
    /// owners of `scope` are alive (e.g. pollers sharing a stream's shards).
    pub async fn heartbeat(&self, scope: &str, owner: &str, duration: Duration) -> Result<usize, Error> {
        let now = now_ms();
        self.wrote(1);
        let out = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(scope))
            .item("SK", s(owner))
            .item("Expires", n(now + duration.as_millis() as u64))
            .return_consumed_capacity(TOTAL)
            .send()
            .await
            .map_err(aws(format!("heartbeat in {scope}")))?;
        self.units.add(out.consumed_capacity());
        let got = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk")
            .filter_expression("Expires > :now")
            .expression_attribute_values(":pk", s(scope))
            .expression_attribute_values(":now", n(now))
            .consistent_read(true)
            .send()
            .await
            .map_err(aws(format!("reading {scope}")))?;
        Ok(got.items().len().max(1))
    }

    /// Reads `scope`'s latest checkpoint without claiming it (a sink writer merging the
    /// partitions other consumers own).
    pub async fn peek(&self, scope: &str) -> Result<Checkpoint, Error> {
        // The owner may switch generations (and delete the old chunks) while we read:
        // read again from the new manifest.
        let mut tries = 0;
        loop {
            let Some(m) = self.manifest(scope).await? else { return Ok(Checkpoint::default()) };
            match self.load(scope, &m).await {
                Err(Error::Input(_)) if tries < 10 && self.generation(scope).await? != generation_of(&m) => tries += 1,
                result => return result,
            }
        }
    }

    /// Takes `scope` over for `owner` and returns its latest checkpoint. From now on only
    /// `owner` can save it.
    pub async fn claim(&self, scope: &str, owner: &str) -> Result<Checkpoint, Error> {
        loop {
            let manifest = self.manifest(scope).await?;
            // Unchanged since we read it (or still absent): then it is ours.
            let condition = if manifest.is_some() { "#g = :g" } else { "attribute_not_exists(PK)" };
            self.wrote(1);
            let claimed = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("PK", s(scope))
                .key("SK", s("manifest"))
                .update_expression("SET #o = :o, #g = :g")
                .condition_expression(condition)
                .expression_attribute_names("#o", "Owner")
                .expression_attribute_names("#g", "Generation")
                .expression_attribute_values(":o", s(owner))
                .expression_attribute_values(":g", n(manifest.as_ref().map_or(0, generation_of)))
                .return_consumed_capacity(TOTAL)
                .send()
                .await;
            match claimed {
                Ok(out) => self.units.add(out.consumed_capacity()),
                Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => continue,
                Err(e) => return Err(aws(format!("claiming {scope}"))(e)),
            }
            return match manifest {
                Some(m) => self.load(scope, &m).await,
                None => Ok(Checkpoint::default()),
            };
        }
    }

    async fn load(&self, scope: &str, manifest: &HashMap<String, AttributeValue>) -> Result<Checkpoint, Error> {
        let generation = generation_of(manifest);
        let set = Chunks::of(manifest);
        let position = text(manifest, "Position").cloned();
        let chunks = number(manifest, "Chunks") as usize;
        let blobs = self.blobs(scope, "begins_with(SK, :prefix)", &[(":prefix", s(set.prefix()))], "the checkpoint").await?;
        let got = blobs.len();
        let state = blobs.concat();
        if got != chunks {
            return Err(Error::Input(format!("checkpoint {generation} of {scope} has {got} of its {chunks} chunks")));
        }
        Ok(Checkpoint { generation, position, state })
    }

    /// The `Data` of `scope`'s items whose SK meets `sk_condition` (with `values`), in SK
    /// order: a checkpoint's chunks, a log's deltas.
    async fn blobs(&self, scope: &str, sk_condition: &str, values: &[(&str, AttributeValue)], what: &str) -> Result<Vec<Vec<u8>>, Error> {
        let mut blobs = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let mut query = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression(format!("PK = :pk AND {sk_condition}"))
                .expression_attribute_values(":pk", s(scope));
            for (name, value) in values {
                query = query.expression_attribute_values(*name, value.clone());
            }
            let page = query.consistent_read(true).set_exclusive_start_key(start).send().await.map_err(aws(format!("reading {what} of {scope}")))?;
            for item in page.items() {
                let blob = item.get("Data").and_then(|v| v.as_b().ok()).ok_or_else(|| Error::Input(format!("an item of {what} of {scope} without Data")))?;
                blobs.push(blob.as_ref().to_vec());
            }
            start = page.last_evaluated_key;
            if start.is_none() {
                return Ok(blobs);
            }
        }
    }

    /// Saves `state` at `position` as the checkpoint after `generation`, if `owner` still
    /// owns `scope`. Returns the new generation.
    pub async fn save(&self, scope: &str, owner: &str, generation: u64, position: &str, state: &[u8]) -> Result<u64, Error> {
        self.save_base(scope, owner, generation, position, state, false).await
    }

    /// Where `scope`'s delta log stands; `None` before it exists.
    pub async fn log_head(&self, scope: &str) -> Result<Option<LogHead>, Error> {
        Ok(self.manifest(scope).await?.as_ref().map(LogHead::of))
    }

    /// The delta log of `scope` in full (empty before it exists).
    pub async fn load_log(&self, scope: &str) -> Result<Log, Error> {
        let mut tries = 0;
        loop {
            let Some(m) = self.manifest(scope).await? else { return Ok(Log::default()) };
            let at = LogHead::of(&m);
            let loaded = match self.load(scope, &m).await {
                Ok(ck) => self.deltas(scope, at.base_at, at.head).await.map(|deltas| Log { at, base: ck.state, deltas }),
                Err(e) => Err(e),
            };
            match loaded {
                // Compacted while we read: read the new base.
                Err(Error::Input(_)) if tries < 10 => tries += 1,
                result => return result,
            }
        }
    }

    /// The deltas numbered `after + 1 ..= upto`, in order. `Err(Input)` when some are
    /// gone: a newer base covers them (read it instead).
    pub async fn deltas(&self, scope: &str, after: u64, upto: u64) -> Result<Vec<Vec<u8>>, Error> {
        if upto <= after {
            return Ok(Vec::new());
        }
        let deltas = self.blobs(scope, "SK BETWEEN :from AND :to", &[(":from", s(delta_sk(after + 1))), (":to", s(delta_sk(upto)))], "the deltas").await?;
        if deltas.len() as u64 != upto - after {
            return Err(Error::Input(format!("deltas {}..={upto} of {scope}: {} found (compacted since)", after + 1, deltas.len())));
        }
        Ok(deltas)
    }

    /// Appends `deltas` after delta `head`, if that is still the latest. Returns the new
    /// head; `Err(Fenced)` when another writer appended first (read its deltas, apply the
    /// batch again, append again). Deltas past the first ten go in further transactions:
    /// each is a set of whole sessions, so a log cut between two is still consistent.
    pub async fn append(&self, scope: &str, head: u64, deltas: &[Vec<u8>]) -> Result<u64, Error> {
        use aws_sdk_dynamodb::types::{Put, TransactWriteItem, Update};
        let mut head = head;
        for group in deltas.chunks(DELTAS_PER_APPEND) {
            let next = head + group.len() as u64;
            let bytes: usize = group.iter().map(Vec::len).sum();
            let condition = if head == 0 { "attribute_not_exists(#h) OR #h = :h" } else { "#h = :h" };
            let update = Update::builder()
                .table_name(&self.table)
                .key("PK", s(scope))
                .key("SK", s("manifest"))
                .update_expression("SET #h = :next, #lb = if_not_exists(#lb, :zero) + :bytes")
                .condition_expression(condition)
                .expression_attribute_names("#h", "Head")
                .expression_attribute_names("#lb", "LogBytes")
                .expression_attribute_values(":h", n(head))
                .expression_attribute_values(":next", n(next))
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_values(":bytes", n(bytes))
                .build()
                .expect("update set");
            let mut items = vec![TransactWriteItem::builder().update(update).build()];
            for (i, d) in group.iter().enumerate() {
                let put = Put::builder()
                    .table_name(&self.table)
                    .item("PK", s(scope))
                    .item("SK", s(delta_sk(head + 1 + i as u64)))
                    .item("Data", AttributeValue::B(Blob::new(d.as_slice())))
                    .build()
                    .expect("item set");
                items.push(TransactWriteItem::builder().put(put).build());
            }
            self.wrote(1);
            match self.client.transact_write_items().set_transact_items(Some(items)).return_consumed_capacity(TOTAL).send().await {
                Ok(out) => {
                    self.units.add_all(out.consumed_capacity());
                    head = next;
                }
                // A failed condition or a concurrent transaction on the manifest.
                Err(e) if e.as_service_error().is_some_and(|e| e.is_transaction_canceled_exception()) => return Err(Error::Fenced(scope.to_owned())),
                Err(e) => return Err(aws(format!("appending to the delta log of {scope}"))(e)),
            }
        }
        Ok(head)
    }

    /// Saves `state`, which holds the deltas up to `at`, as the log's new base after base
    /// generation `from.generation`, then deletes the deltas it covers. `Err(Fenced)`
    /// when another writer saved a base first.
    pub async fn compact(&self, scope: &str, owner: &str, from: LogHead, at: u64, state: &[u8]) -> Result<u64, Error> {
        let g = self.save_base(scope, owner, from.generation, &at.to_string(), state, true).await?;
        self.wrote((at - from.base_at).div_ceil(25) as usize);
        let deletes = (from.base_at + 1..=at)
            .map(|d| {
                let key = HashMap::from([("PK".to_owned(), s(scope)), ("SK".to_owned(), s(delta_sk(d)))]);
                WriteRequest::builder().delete_request(DeleteRequest::builder().set_key(Some(key)).build().expect("key set")).build()
            })
            .collect();
        if let Err(e) = batch_write(&self.client, &self.table, deletes, &self.units).await {
            tracing::warn!(scope, error = %e, "could not delete compacted deltas");
        }
        Ok(g)
    }

    /// [`save`](Self::save); `log` also restarts the count of bytes appended since.
    async fn save_base(&self, scope: &str, owner: &str, generation: u64, position: &str, state: &[u8], log: bool) -> Result<u64, Error> {
        let next = generation + 1;
        let set = Chunks::new(next);
        let chunks: Vec<&[u8]> = state.chunks(CHUNK_BYTES).collect();
        // The chunks in batches of 25, then the manifest.
        self.wrote(chunks.len().div_ceil(25) + 1);
        let puts = chunks.iter().enumerate().map(|(i, c)| {
            let item = HashMap::from([("PK".to_owned(), s(scope)), ("SK".to_owned(), s(set.sk(i))), ("Data".to_owned(), AttributeValue::B(Blob::new(*c)))]);
            WriteRequest::builder().put_request(PutRequest::builder().set_item(Some(item)).build().expect("item set")).build()
        });
        batch_write(&self.client, &self.table, puts.collect(), &self.units).await.map_err(aws(format!("writing the checkpoint of {scope}")))?;
        let switched = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(scope))
            .key("SK", s("manifest"))
            .update_expression(if log { "SET #g = :next, #p = :p, #c = :c, #b = :b, #t = :t REMOVE LogBytes" } else { "SET #g = :next, #p = :p, #c = :c, #b = :b, #t = :t" })
            .condition_expression("#o = :o AND #g = :g")
            .expression_attribute_names("#g", "Generation")
            .expression_attribute_names("#p", "Position")
            .expression_attribute_names("#c", "Chunks")
            .expression_attribute_names("#b", "Bytes")
            .expression_attribute_names("#o", "Owner")
            .expression_attribute_names("#t", "ChunkTag")
            .expression_attribute_values(":t", s(&set.tag))
            .expression_attribute_values(":next", n(next))
            .expression_attribute_values(":g", n(generation))
            .expression_attribute_values(":p", s(position))
            .expression_attribute_values(":c", n(chunks.len()))
            .expression_attribute_values(":b", n(state.len()))
            .expression_attribute_values(":o", s(owner))
            .return_values(ReturnValue::UpdatedOld)
            .return_consumed_capacity(TOTAL)
            .send()
            .await;
        let (old, count) = match switched {
            // The old values of what was updated: the previous save's generation, tag and count.
            Ok(out) => {
                self.units.add(out.consumed_capacity());
                (out.attributes().map(Chunks::of), out.attributes().map_or(0, |a| number(a, "Chunks") as usize))
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => {
                self.delete_chunks(scope, &set, chunks.len()).await;
                return Err(Error::Fenced(scope.to_owned()));
            }
            Err(e) => return Err(aws(format!("saving the checkpoint of {scope}"))(e)),
        };
        if let Some(old) = old {
            self.delete_chunks(scope, &old, count).await;
        }
        Ok(next)
    }

    /// Best-effort removal of a save's chunks: leftovers are unreachable garbage.
    async fn delete_chunks(&self, scope: &str, set: &Chunks, count: usize) {
        self.wrote(count.div_ceil(25));
        let deletes = (0..count)
            .map(|i| {
                let key = HashMap::from([("PK".to_owned(), s(scope)), ("SK".to_owned(), s(set.sk(i)))]);
                WriteRequest::builder().delete_request(DeleteRequest::builder().set_key(Some(key)).build().expect("key set")).build()
            })
            .collect();
        if let Err(e) = batch_write(&self.client, &self.table, deletes, &self.units).await {
            tracing::warn!(scope, generation = set.generation, error = %e, "could not delete old checkpoint chunks");
        }
    }
}

fn generation_of(manifest: &HashMap<String, AttributeValue>) -> u64 {
    number(manifest, "Generation")
}

/// A number attribute of `item`; 0 when absent.
fn number(item: &HashMap<String, AttributeValue>, name: &str) -> u64 {
    item.get(name).and_then(|v| v.as_n().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A string attribute of `item`.
fn text<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a String> {
    item.get(name).and_then(|v| v.as_s().ok())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A time-limited exclusive role (e.g. the one consumer of a group that writes the
/// sinks), held by renewing it before it expires; a dead holder's lease lapses.
#[derive(Clone)]
pub struct Lease {
    client: Client,
    table: String,
    scope: String,
    owner: String,
    duration: Duration,
    /// Write requests sent (every take and release is one) and the units they consumed.
    writes: Arc<AtomicU64>,
    units: Units,
}

impl Lease {
    pub fn new(client: Client, table: impl Into<String>, scope: impl Into<String>, owner: impl Into<String>, duration: Duration) -> Lease {
        Lease { client, table: table.into(), scope: scope.into(), owner: owner.into(), duration, writes: Arc::default(), units: Units::default() }
    }

    /// Write requests this lease (and its clones) sent so far.
    pub fn write_requests(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Write capacity units this lease (and its clones) consumed so far.
    pub fn write_units(&self) -> f64 {
        self.units.get()
    }

    /// Takes or renews the lease; `false` while another live owner holds it.
    pub async fn acquire(&self) -> Result<bool, Error> {
        Ok(self.take().await?.is_some())
    }

    /// Takes or renews the lease: `None` while another live owner holds it, else whether
    /// this owner was its last holder (nobody held it in between).
    pub async fn take(&self) -> Result<Option<bool>, Error> {
        let now = now_ms();
        self.writes.fetch_add(1, Ordering::Relaxed);
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(&self.scope))
            .item("SK", s("lease"))
            .item("Owner", s(&self.owner))
            .item("Expires", n(now + self.duration.as_millis() as u64))
            .condition_expression("attribute_not_exists(PK) OR #o = :me OR #e < :now")
            .expression_attribute_names("#o", "Owner")
            .expression_attribute_names("#e", "Expires")
            .expression_attribute_values(":me", s(&self.owner))
            .expression_attribute_values(":now", n(now))
            .return_values(ReturnValue::AllOld)
            .return_consumed_capacity(TOTAL)
            .send()
            .await;
        match put {
            Ok(out) => {
                self.units.add(out.consumed_capacity());
                Ok(Some(out.attributes().and_then(|a| text(a, "Owner")) == Some(&self.owner)))
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(None),
            Err(e) => Err(aws(format!("taking the lease {}", self.scope))(e)),
        }
    }

    /// When a holder last gave the lease up (ms since the epoch; 0 if never): for
    /// holders that write at most once per interval, whoever they are.
    pub async fn last_released(&self) -> Result<u64, Error> {
        let got = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(&self.scope))
            .key("SK", s("lease"))
            .consistent_read(true)
            .send()
            .await
            .map_err(aws(format!("reading the lease {}", self.scope)))?;
        Ok(got.item.map_or(0, |i| number(&i, "Released")))
    }

    /// Gives the lease up so that another owner need not wait for it to lapse.
    pub async fn release(&self) -> Result<(), Error> {
        // Expired rather than deleted: the next holder learns who held it last.
        self.writes.fetch_add(1, Ordering::Relaxed);
        let expired = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(&self.scope))
            .key("SK", s("lease"))
            .update_expression("SET #e = :zero, #r = :now")
            .condition_expression("#o = :me")
            .expression_attribute_names("#o", "Owner")
            .expression_attribute_names("#e", "Expires")
            .expression_attribute_names("#r", "Released")
            .expression_attribute_values(":me", s(&self.owner))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":now", n(now_ms()))
            .return_consumed_capacity(TOTAL)
            .send()
            .await;
        match expired {
            Ok(out) => {
                self.units.add(out.consumed_capacity());
                Ok(())
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(()),
            Err(e) => Err(aws(format!("releasing the lease {}", self.scope))(e)),
        }
    }
}
