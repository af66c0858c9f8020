//! Checkpoints and leases in the pipeline's state table.
//!
//! A checkpoint is an engine snapshot and the input position it covers (a Kafka offset,
//! a shard sequence number), written atomically: the snapshot goes into chunk items of a
//! new generation, then one conditional update of the manifest item switches to it. The
//! manifest names its owner, so a consumer that lost a partition (a zombie after a
//! rebalance) cannot overwrite the new owner's checkpoint: its save fails as `Fenced`.
//!
//! A checkpoint is also the base of a delta log. Between whole saves, a writer appends
//! what changed since its last save as the next numbered delta items, in one transaction
//! with the manifest's `Head` (and, for a unit with one owner, its `Position`,
//! conditioned on the owner): an append costs what changed, not the whole state. Of two
//! writers at the same head one fails as `Fenced`. Once the deltas add up to the base's
//! size the whole state is saved as a new base covering them, and their items are
//! deleted. Readers load the base and the deltas after it, or only the deltas after the
//! head they already hold.
//!
//! A *shared* log (a Lambda bucket, where many short writers take turns and none owns it)
//! is appended to without a transaction: each delta is one conditional put of the next
//! number (`attribute_not_exists`), carrying the log's running byte and record counts, so
//! of two writers at the same head one fails as `Fenced`, and the head is the last delta
//! item (a query), not a manifest field. A transaction would cost twice the units (and a
//! manifest update besides). Its compactions delete the deltas they cover only after
//! [`DELETE_GRACE`]: until then a writer that read an older head still finds its next
//! number taken.
//!
//! Snapshots and deltas are stored LZ4-compressed (about half their size: DynamoDB
//! charges writes, deletes and storage by the byte); items written before carry no
//! `Encoding` and are read as they are. Sizes in the manifest (`Bytes`, `LogBytes`) are
//! the uncompressed ones, so when a log is compacted does not change. When its saver says
//! where a snapshot's catalog and aggregates end (`FiguresBytes`), the manifest also says
//! how many stored bytes decode to them (`FiguresStored`) and of which generation
//! (`FiguresGeneration`; a base saved by an earlier release leaves them behind): a sink
//! writer keeping a copy of another consumer's aggregates fetches and decodes only those
//! ([`CheckpointStore::load_log_figures`]), not the sessions after them.

use crate::lz4_prefix;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, PutRequest, ReturnValue, WriteRequest};
use aws_sdk_dynamodb::Client;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use toolrank_dynamodb::{aws, batch_write, Error, Units, TOTAL};

/// Items stay well under DynamoDB's 400 KB limit.
const CHUNK_BYTES: usize = 350 * 1024;

/// The state of one scope (e.g. `kafka/<group>/<topic>/<partition>`) as last saved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Increases with every whole save; 0 before the first.
    pub generation: u64,
    /// Where the input resumes; `None` before the first save.
    pub position: Option<String>,
    /// The engine snapshot; empty before the first whole save.
    pub state: Vec<u8>,
    /// The deltas appended after it, to apply in order.
    pub deltas: Vec<Vec<u8>>,
    /// Where its log stands: what the owner's next append or save follows.
    pub at: LogHead,
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
    delete_grace: Duration,
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

/// The `Encoding` of compressed snapshots (on the manifest) and deltas (on the item).
const LZ4: &str = "lz4";

/// `bytes` as stored: LZ4 with the length prepended.
fn pack(bytes: &[u8]) -> Vec<u8> {
    lz4_flex::compress_prepend_size(bytes)
}

/// What [`pack`] stored, or `stored` itself when it was written uncompressed (`encoding`
/// absent). A corrupt item is an `Input` error naming `what`, never a panic or a huge
/// allocation (LZ4 expands at most 255 times).
fn unpack(stored: Vec<u8>, encoding: Option<&String>, what: impl FnOnce() -> String) -> Result<Vec<u8>, Error> {
    match encoding.map(String::as_str) {
        None => Ok(stored),
        Some(LZ4) => {
            let size = stored.get(..4).map_or(u64::MAX, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as u64);
            if size > 255 * stored.len() as u64 {
                return Err(Error::Input(format!("{}: corrupt (claims {size} bytes from {})", what(), stored.len())));
            }
            lz4_flex::decompress_size_prepended(&stored).map_err(|e| Error::Input(format!("{}: corrupt: {e}", what())))
        }
        Some(other) => Err(Error::Input(format!("{}: unknown encoding {other:?}", what()))),
    }
}

/// How many of the bytes [`pack`] stored for `state` decode to its first `figures`
/// bytes (0: nothing to read apart, when that is none or all of it).
fn figures_stored(stored: &[u8], state: &[u8], figures: usize) -> usize {
    match figures > 0 && figures < state.len() {
        true => stored.get(4..).and_then(|block| lz4_prefix::covering(block, figures).ok()).map_or(0, |n| 4 + n),
        false => 0,
    }
}

fn delta_sk(n: u64) -> String {
    format!("delta#{n:020}")
}

/// A delta item's size limit (the engine's `delta` `max_bytes`), under DynamoDB's 400 KB
/// per item.
pub const DELTA_BYTES: usize = 300 * 1024;

/// A log gets a new base once the deltas after its base add up to the base's size (at
/// least this, by default), so a cold start reads at most about twice the state and the
/// whole state is rewritten only once per its own size of deltas.
pub const COMPACT_MIN_BYTES: u64 = 256 * 1024;

/// ...or once this many deltas follow the base (each a row a cold start queries).
const COMPACT_MAX_DELTAS: u64 = 1000;

/// How long a shared log keeps the deltas a base covers: a writer that read an older
/// head puts its delta at a number that must still be taken, or the put would succeed
/// below the base, where no reader looks. Lambda ends an invocation after 15 minutes at
/// most; 5 more for clocks and requests in flight.
pub const DELETE_GRACE: Duration = Duration::from_secs(20 * 60);

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
    /// Input records appended to the log since it began (those [`CheckpointStore::append`]
    /// was told of): how many events a writer of the logs' sum has seen.
    pub records: u64,
    /// Bytes appended to the log since it began, through `head`: what a shared log's next
    /// delta counts on from.
    pub total_bytes: u64,
}

impl LogHead {
    fn of(manifest: &HashMap<String, AttributeValue>) -> LogHead {
        let base_at = number(manifest, "BaseAt");
        let log_bytes = number(manifest, "LogBytes");
        LogHead {
            generation: generation_of(manifest),
            base_at,
            // A shared log's manifest has no head: its deltas after the base say.
            head: number(manifest, "Head").max(base_at),
            base_bytes: number(manifest, "Bytes"),
            log_bytes,
            records: number(manifest, "Records"),
            total_bytes: number(manifest, "BaseTotal") + log_bytes,
        }
    }

    /// Whether the log is due for a new base ([`COMPACT_MIN_BYTES`]) once `parts` more
    /// deltas of `bytes` in all follow it; `min_bytes` is the smallest log compacted.
    pub fn compaction_due(&self, parts: usize, bytes: u64, min_bytes: u64) -> bool {
        self.log_bytes + bytes >= self.base_bytes.max(min_bytes) || self.head + parts as u64 - self.base_at >= COMPACT_MAX_DELTAS
    }
}

/// How a whole save relates to the log ([`CheckpointStore::save`], [`CheckpointStore::compact`]).
#[derive(Clone, Copy)]
enum Base {
    /// The owner's whole state: it covers every delta and whatever was not appended, so
    /// it takes the next log position (a reader at the old head sees that it moved).
    Whole,
    /// The state as of a shared log's delta `at` (a Lambda bucket's compaction; later
    /// deltas stay).
    Upto(LogHead),
}

/// A delta log read in full: its base state and the deltas after it.
#[derive(Debug, Clone, Default)]
pub struct Log {
    pub at: LogHead,
    pub base: Vec<u8>,
    pub deltas: Vec<Vec<u8>>,
    /// `base` is only the first part of a snapshot, its catalog and aggregates
    /// ([`CheckpointStore::load_log_figures`]).
    pub figures_only: bool,
}

impl From<Checkpoint> for Log {
    /// The log a whole checkpoint holds.
    fn from(ck: Checkpoint) -> Log {
        Log { at: ck.at, base: ck.state, deltas: ck.deltas, figures_only: false }
    }
}

/// Delta items per append transaction: 10 of at most `CHUNK_BYTES` stay under the 4 MB a
/// transaction may write. An owner's append takes at most this many.
pub const DELTAS_PER_APPEND: usize = 10;

impl CheckpointStore {
    pub fn new(client: Client, table: impl Into<String>) -> CheckpointStore {
        CheckpointStore { client, table: table.into(), writes: Arc::default(), units: Units::default(), delete_grace: DELETE_GRACE }
    }

    /// How long shared logs keep the deltas a base covers ([`DELETE_GRACE`]; tests that
    /// race no stale writer shorten it).
    pub fn with_delete_grace(self, grace: Duration) -> CheckpointStore {
        CheckpointStore { delete_grace: grace, ..self }
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

    /// A put of the item (`scope`, `sk`).
    fn put(&self, scope: &str, sk: &str) -> aws_sdk_dynamodb::operation::put_item::builders::PutItemFluentBuilder {
        self.client.put_item().table_name(&self.table).item("PK", s(scope)).item("SK", s(sk))
    }

    /// An update of the item (`scope`, `sk`).
    fn update(&self, scope: &str, sk: &str) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.client.update_item().table_name(&self.table).key("PK", s(scope)).key("SK", s(sk))
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

    /// The position of `scope`'s latest checkpoint, without its state.
    pub async fn position(&self, scope: &str) -> Result<Option<String>, Error> {
        Ok(self.manifest(scope).await?.and_then(|m| text(&m, "Position").cloned()))
    }

    /// Adds `members` to the string set `name` of the item (`scope`, `sk`), e.g. the
    /// registry of a stream's shard lineages.
    pub async fn add_to_set(&self, scope: &str, sk: &str, name: &str, members: Vec<String>) -> Result<(), Error> {
        self.wrote(1);
        let out = self
            .update(scope, sk)
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

    /// Stores `bytes` as the value `sk` of `scope` (a sink shard's census), in place of
    /// the one before.
    pub async fn put_value(&self, scope: &str, sk: &str, bytes: Vec<u8>) -> Result<(), Error> {
        self.wrote(1);
        let out = self
            .put(scope, sk)
            .item("Value", AttributeValue::B(Blob::new(bytes)))
            .return_consumed_capacity(TOTAL)
            .send()
            .await
            .map_err(aws(format!("writing {scope} {sk}")))?;
        self.units.add(out.consumed_capacity());
        Ok(())
    }

    /// Every value of `scope` ([`put_value`](Self::put_value)), by SK: one Query.
    pub async fn values(&self, scope: &str) -> Result<Vec<(String, Vec<u8>)>, Error> {
        let items = self.items(scope, None, "reading").await?;
        Ok(items.into_iter().filter_map(|i| Some((text(&i, "SK")?.clone(), i.get("Value")?.as_b().ok()?.as_ref().to_vec()))).collect())
    }

    /// Every item of `scope` (only the attributes of `projection`, if given), read
    /// consistently; `what` names the read in errors.
    async fn items(&self, scope: &str, projection: Option<&str>, what: &str) -> Result<Vec<HashMap<String, AttributeValue>>, Error> {
        self.client
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk")
            .expression_attribute_values(":pk", s(scope))
            .set_projection_expression(projection.map(str::to_owned))
            .consistent_read(true)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(aws(format!("{what} {scope}")))
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
            .put(scope, owner)
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

    /// Takes `scope` over for `owner` and returns its latest checkpoint. From now on only
    /// `owner` can save it or append to its log.
    pub async fn claim(&self, scope: &str, owner: &str) -> Result<Checkpoint, Error> {
        loop {
            let manifest = self.manifest(scope).await?;
            // Unchanged since we read it (or still absent): then it is ours.
            let condition = if manifest.is_some() { "#g = :g" } else { "attribute_not_exists(PK)" };
            self.wrote(1);
            let claimed = self
                .update(scope, "manifest")
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
            // Read again: the previous owner may have appended between our read and the
            // claim. From now on nobody else can.
            return match self.manifest(scope).await? {
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
        let blobs = self.blobs(scope, "begins_with(SK, :prefix)", &[(":prefix", s(set.prefix()))], "the checkpoint", None).await?;
        let got = blobs.len();
        if got != chunks {
            return Err(Error::Input(format!("checkpoint {generation} of {scope} has {got} of its {chunks} chunks")));
        }
        let state = unpack(blobs.concat(), text(manifest, "Encoding"), || format!("checkpoint {generation} of {scope}"))?;
        let at = self.head_of(scope, manifest).await?;
        let deltas = self.deltas(scope, at.base_at, at.head).await?;
        Ok(Checkpoint { generation, position, state, deltas, at })
    }

    /// Like [`load`](Self::load), but of a snapshot whose manifest says where its figures
    /// end (see the module docs) only the chunks holding them are read, and only they are
    /// decoded and returned.
    async fn load_figures(&self, scope: &str, manifest: &HashMap<String, AttributeValue>) -> Result<Log, Error> {
        let (stored_bytes, figures) = (number(manifest, "FiguresStored") as usize, number(manifest, "FiguresBytes") as usize);
        let current = number(manifest, "FiguresGeneration") == generation_of(manifest);
        if text(manifest, "Encoding").map(String::as_str) != Some(LZ4) || !current || stored_bytes <= 4 || figures == 0 {
            return self.load(scope, manifest).await.map(Log::from);
        }
        let set = Chunks::of(manifest);
        let stored = self.blobs(scope, "begins_with(SK, :prefix)", &[(":prefix", s(set.prefix()))], "the checkpoint", Some(stored_bytes)).await?.concat();
        let base = match stored.get(4..stored_bytes).map(|block| lz4_prefix::decode_prefix(block, figures)) {
            Some(Ok(base)) => base,
            // Cut short (a newer base replaced it while it was read) or not decoding: read
            // whole, as without the figures attributes (a race fails there too, and is
            // read again).
            _ => {
                return self.load(scope, manifest).await.map(Log::from);
            }
        };
        let at = self.head_of(scope, manifest).await?;
        let deltas = self.deltas(scope, at.base_at, at.head).await?;
        Ok(Log { at, base, deltas, figures_only: true })
    }

    /// The `Data` of `scope`'s items whose SK meets `sk_condition` (with `values`), in SK
    /// order: a checkpoint's chunks, a log's deltas. With `enough`, no further page is
    /// read once the blobs hold that many bytes.
    async fn blobs(
        &self,
        scope: &str,
        sk_condition: &str,
        values: &[(&str, AttributeValue)],
        what: &str,
        enough: Option<usize>,
    ) -> Result<Vec<Vec<u8>>, Error> {
        let mut blobs = Vec::new();
        let mut bytes = 0;
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
                blobs.push(unpack(blob.as_ref().to_vec(), text(item, "Encoding"), || format!("an item of {what} of {scope}"))?);
                bytes += blobs.last().map_or(0, Vec::len);
            }
            start = page.last_evaluated_key;
            if start.is_none() || enough.is_some_and(|enough| bytes >= enough) {
                return Ok(blobs);
            }
        }
    }

    /// Deletes every item of `scope` (its manifest, base, deltas and lease): the unit's
    /// next owner starts it from nothing. Returns how many items there were.
    pub async fn reset(&self, scope: &str) -> Result<usize, Error> {
        let keys = self.items(scope, Some("PK, SK"), "listing the checkpoint of").await?;
        let deletes: Vec<WriteRequest> = keys
            .iter()
            .map(|k| WriteRequest::builder().delete_request(DeleteRequest::builder().set_key(Some(k.clone())).build().expect("a key")).build())
            .collect();
        batch_write(&self.client, &self.table, deletes, &self.units).await.map_err(aws(format!("deleting the checkpoint of {scope}")))?;
        Ok(keys.len())
    }

    /// Saves `state` at `position` as the checkpoint after `generation`, if `owner` still
    /// owns `scope`: the log's new base, covering everything appended. Returns where the
    /// log stands now.
    ///
    /// `figures`: how many of the first bytes of `state` hold what a copy of its
    /// aggregates reads (noted on the manifest when neither 0 nor all of it; see the
    /// module docs).
    pub async fn save(&self, scope: &str, owner: &str, generation: u64, position: &str, state: &[u8], figures: usize) -> Result<LogHead, Error> {
        self.save_base(scope, owner, generation, position, (state, figures), Base::Whole).await
    }

    /// Where `scope`'s delta log stands; `None` before it exists.
    pub async fn log_head(&self, scope: &str) -> Result<Option<LogHead>, Error> {
        match self.manifest(scope).await? {
            Some(m) => Ok(Some(self.head_of(scope, &m).await?)),
            None => Ok(None),
        }
    }

    /// [`log_head`](Self::log_head) of each of `scopes`, in order, in one consistent
    /// BatchGetItem of their manifests per hundred (the API's limit): a sink writer
    /// follows every other consumer's log each second. Only a shared log's head takes a
    /// query of its own ([`head_of`](Self::head_of)).
    pub async fn log_heads(&self, scopes: &[String]) -> Result<Vec<Option<LogHead>>, Error> {
        use aws_sdk_dynamodb::types::KeysAndAttributes;
        let mut manifests: HashMap<String, HashMap<String, AttributeValue>> = HashMap::new();
        for group in scopes.chunks(100) {
            let keys = group.iter().map(|scope| HashMap::from([("PK".to_owned(), s(scope)), ("SK".to_owned(), s("manifest"))])).collect();
            let mut pending = Some(KeysAndAttributes::builder().set_keys(Some(keys)).consistent_read(true).build().expect("keys set"));
            let mut backoff = toolrank_backoff::Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
            while let Some(keys) = pending.take() {
                let out = self.client.batch_get_item().request_items(&self.table, keys).send().await.map_err(aws("reading checkpoint manifests"))?;
                for item in out.responses.and_then(|mut r| r.remove(&self.table)).unwrap_or_default() {
                    if let Some(scope) = text(&item, "PK").cloned() {
                        manifests.insert(scope, item);
                    }
                }
                pending = out.unprocessed_keys.and_then(|mut u| u.remove(&self.table)).filter(|k| !k.keys().is_empty());
                if pending.is_some() {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        let mut heads = Vec::with_capacity(scopes.len());
        for scope in scopes {
            heads.push(match manifests.get(scope) {
                Some(m) => Some(self.head_of(scope, m).await?),
                None => None,
            });
        }
        Ok(heads)
    }

    /// Where the log of `manifest` stands: at the manifest's head, or at a shared log's
    /// last delta after it. A manifest with a `Head` is an owned log's, whose appends move
    /// that head in the transaction that writes their deltas: nothing follows it, and no
    /// query looks.
    async fn head_of(&self, scope: &str, manifest: &HashMap<String, AttributeValue>) -> Result<LogHead, Error> {
        let mut at = LogHead::of(manifest);
        if manifest.contains_key("Head") {
            return Ok(at);
        }
        let got = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk AND SK BETWEEN :from AND :to")
            .expression_attribute_values(":pk", s(scope))
            .expression_attribute_values(":from", s(delta_sk(at.head + 1)))
            .expression_attribute_values(":to", s(delta_sk(u64::MAX)))
            .projection_expression("SK, #t, #r")
            .expression_attribute_names("#t", "Total")
            .expression_attribute_names("#r", "Records")
            .scan_index_forward(false)
            .limit(1)
            .consistent_read(true)
            .send()
            .await
            .map_err(aws(format!("reading the head of {scope}")))?;
        if let Some(last) = got.items().first() {
            at.head = text(last, "SK")
                .and_then(|sk| sk.strip_prefix("delta#"))
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Error::Input(format!("a delta of {scope} with a bad key")))?;
            at.total_bytes = number(last, "Total");
            at.log_bytes = at.total_bytes.saturating_sub(number(manifest, "BaseTotal"));
            at.records = number(last, "Records");
        }
        Ok(at)
    }

    /// The delta log of `scope` in full (empty before it exists), without claiming it
    /// (a sink writer merging the units other consumers own).
    pub async fn load_log(&self, scope: &str) -> Result<Log, Error> {
        self.read_log(scope, false).await
    }

    /// [`load_log`](Self::load_log), but of a base whose manifest says where its figures
    /// end (see the module docs) only the catalog and aggregates, its first part
    /// ([`Log::figures_only`]): what a copy of another consumer's aggregates reads.
    pub async fn load_log_figures(&self, scope: &str) -> Result<Log, Error> {
        self.read_log(scope, true).await
    }

    async fn read_log(&self, scope: &str, figures: bool) -> Result<Log, Error> {
        let mut tries = 0;
        loop {
            let Some(m) = self.manifest(scope).await? else { return Ok(Log::default()) };
            let read = match figures {
                true => self.load_figures(scope, &m).await,
                false => self.load(scope, &m).await.map(Log::from),
            };
            match read {
                Ok(log) => return Ok(log),
                // A new base was saved while we read (its predecessor's chunks and
                // deltas are deleted): read it.
                Err(Error::Input(_)) if tries < 10 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The deltas numbered `after + 1 ..= upto`, in order. `Err(Input)` when some are
    /// gone: a newer base covers them (read it instead).
    pub async fn deltas(&self, scope: &str, after: u64, upto: u64) -> Result<Vec<Vec<u8>>, Error> {
        if upto <= after {
            return Ok(Vec::new());
        }
        let deltas =
            self.blobs(scope, "SK BETWEEN :from AND :to", &[(":from", s(delta_sk(after + 1))), (":to", s(delta_sk(upto)))], "the deltas", None).await?;
        if deltas.len() as u64 != upto - after {
            return Err(Error::Input(format!("deltas {}..={upto} of {scope}: {} found (compacted since)", after + 1, deltas.len())));
        }
        Ok(deltas)
    }

    /// Appends `deltas`, the effect of `records` input records, to the shared log `scope`
    /// after `at`, if that is still its head: one conditional put per delta (see the
    /// module docs). Returns the new head; `Err(Fenced)` when another writer appended
    /// first (read its deltas, apply the batch again, append again). Each delta is a set
    /// of whole sessions, so a log cut between two is still consistent.
    pub async fn append(&self, scope: &str, at: &LogHead, deltas: &[Vec<u8>], records: u64) -> Result<LogHead, Error> {
        let mut head = *at;
        head.records += records;
        for d in deltas {
            head.head += 1;
            head.total_bytes += d.len() as u64;
            head.log_bytes += d.len() as u64;
            self.wrote(1);
            let put = self
                .put(scope, &delta_sk(head.head))
                .item("Data", AttributeValue::B(Blob::new(pack(d))))
                .item("Encoding", s(LZ4))
                .item("Total", n(head.total_bytes))
                .item("Records", n(head.records))
                .condition_expression("attribute_not_exists(PK)")
                .return_consumed_capacity(TOTAL)
                .send()
                .await;
            match put {
                Ok(out) => self.units.add(out.consumed_capacity()),
                Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => return Err(Error::Fenced(scope.to_owned())),
                Err(e) => return Err(aws(format!("appending to the delta log of {scope}"))(e)),
            }
        }
        Ok(head)
    }

    /// Appends what an owner's unit changed since its last save, with the input
    /// `position` it now covers, if `owner` still owns `scope` (`Err(Fenced)` if not).
    /// At most [`DELTAS_PER_APPEND`] deltas, written in one transaction with the position
    /// (more: save the whole state). No deltas: the position alone. Returns the new head.
    pub async fn append_owned(&self, scope: &str, owner: &str, position: &str, head: u64, deltas: &[Vec<u8>]) -> Result<u64, Error> {
        if deltas.len() > DELTAS_PER_APPEND {
            return Err(Error::Input(format!("{} deltas for {scope}: at most {DELTAS_PER_APPEND} go with a position", deltas.len())));
        }
        self.append_group(scope, head, deltas, owner, position).await
    }

    /// One append transaction: the manifest's head and the owner's position with the
    /// delta items.
    async fn append_group(&self, scope: &str, head: u64, group: &[Vec<u8>], owner: &str, position: &str) -> Result<u64, Error> {
        use aws_sdk_dynamodb::types::{Put, TransactWriteItem, Update};
        let next = head + group.len() as u64;
        let bytes: usize = group.iter().map(Vec::len).sum();
        let condition = if head == 0 { "(attribute_not_exists(#h) OR #h = :h) AND #o = :o" } else { "#h = :h AND #o = :o" };
        let update = Update::builder()
            .table_name(&self.table)
            .key("PK", s(scope))
            .key("SK", s("manifest"))
            .expression_attribute_names("#h", "Head")
            .expression_attribute_names("#lb", "LogBytes")
            .expression_attribute_values(":h", n(head))
            .expression_attribute_values(":next", n(next))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":bytes", n(bytes))
            .expression_attribute_names("#o", "Owner")
            .expression_attribute_names("#p", "Position")
            .expression_attribute_values(":o", s(owner))
            .expression_attribute_values(":p", s(position))
            .update_expression("SET #h = :next, #lb = if_not_exists(#lb, :zero) + :bytes, #p = :p")
            .condition_expression(condition)
            .build()
            .expect("update set");
        let mut items = vec![TransactWriteItem::builder().update(update).build()];
        for (i, d) in group.iter().enumerate() {
            let put = Put::builder()
                .table_name(&self.table)
                .item("PK", s(scope))
                .item("SK", s(delta_sk(head + 1 + i as u64)))
                .item("Data", AttributeValue::B(Blob::new(pack(d))))
                .item("Encoding", s(LZ4))
                .build()
                .expect("item set");
            items.push(TransactWriteItem::builder().put(put).build());
        }
        self.wrote(1);
        match self.client.transact_write_items().set_transact_items(Some(items)).return_consumed_capacity(TOTAL).send().await {
            Ok(out) => {
                self.units.add_all(out.consumed_capacity());
                Ok(next)
            }
            // A failed condition or a concurrent transaction on the manifest (not, say,
            // throttling: that is retried like any failure).
            Err(e) if e.as_service_error().is_some_and(lost_race) => Err(Error::Fenced(scope.to_owned())),
            Err(e) => Err(aws(format!("appending to the delta log of {scope}"))(e)),
        }
    }

    /// Saves `state`, which holds the deltas of the shared log `scope` up to `at` (as
    /// [`append`](Self::append) returned it), as the log's new base after base
    /// `generation`. The deltas it covers are deleted by a later compaction, once
    /// [`DELETE_GRACE`] has passed. `Err(Fenced)` when another writer saved a base first.
    /// `figures` as for [`save`](Self::save).
    pub async fn compact(&self, scope: &str, owner: &str, generation: u64, at: &LogHead, state: &[u8], figures: usize) -> Result<u64, Error> {
        Ok(self.save_base(scope, owner, generation, &at.head.to_string(), (state, figures), Base::Upto(*at)).await?.generation)
    }

    /// Saves `state` as the checkpoint after `generation` and the base of the log (see
    /// [`Base`]); deletes the previous base's chunks and the deltas the new one covers.
    async fn save_base(
        &self,
        scope: &str,
        owner: &str,
        generation: u64,
        position: &str,
        (state, figures): (&[u8], usize),
        base: Base,
    ) -> Result<LogHead, Error> {
        let next = generation + 1;
        let set = Chunks::new(next);
        let stored = pack(state);
        let first = figures_stored(&stored, state, figures);
        let chunks: Vec<&[u8]> = stored.chunks(CHUNK_BYTES).collect();
        // The chunks in batches of 25, then the manifest.
        self.wrote(chunks.len().div_ceil(25) + 1);
        let puts = chunks.iter().enumerate().map(|(i, c)| {
            let item = HashMap::from([("PK".to_owned(), s(scope)), ("SK".to_owned(), s(set.sk(i))), ("Data".to_owned(), AttributeValue::B(Blob::new(*c)))]);
            WriteRequest::builder().put_request(PutRequest::builder().set_item(Some(item)).build().expect("item set")).build()
        });
        batch_write(&self.client, &self.table, puts.collect(), &self.units).await.map_err(aws(format!("writing the checkpoint of {scope}")))?;
        let switched = self
            .update(scope, "manifest")
            .update_expression(match base {
                Base::Whole => "SET #g = :next, #p = :p, #c = :c, #b = :b, #t = :t, #e = :e, #fs = :fs, #fb = :fb, #fg = :next, #h = if_not_exists(#h, :zero) + :one, #ba = if_not_exists(#h, :zero) + :one REMOVE LogBytes",
                Base::Upto(_) => "SET #g = :next, #p = :p, #c = :c, #b = :b, #t = :t, #e = :e, #fs = :fs, #fb = :fb, #fg = :next, #ba = :at, #bt = :total, #r = :records, \
                                  #pa = if_not_exists(#pa, :at), #pm = if_not_exists(#pm, :now), #du = if_not_exists(#du, :before) REMOVE LogBytes",
            })
            .condition_expression("#o = :o AND #g = :g")
            .expression_attribute_names("#ba", "BaseAt")
            .expression_attribute_names("#g", "Generation")
            .expression_attribute_names("#p", "Position")
            .expression_attribute_names("#c", "Chunks")
            .expression_attribute_names("#b", "Bytes")
            .expression_attribute_names("#o", "Owner")
            .expression_attribute_names("#t", "ChunkTag")
            .expression_attribute_names("#e", "Encoding")
            .expression_attribute_names("#fs", "FiguresStored")
            .expression_attribute_names("#fb", "FiguresBytes")
            .expression_attribute_names("#fg", "FiguresGeneration")
            .expression_attribute_values(":t", s(&set.tag))
            .expression_attribute_values(":e", s(LZ4))
            .expression_attribute_values(":fs", n(first))
            .expression_attribute_values(":fb", n(if first > 0 { figures } else { 0 }))
            .expression_attribute_values(":next", n(next))
            .expression_attribute_values(":g", n(generation))
            .expression_attribute_values(":p", s(position))
            .expression_attribute_values(":c", n(chunks.len()))
            .expression_attribute_values(":b", n(state.len()))
            .expression_attribute_values(":o", s(owner));
        let switched = match base {
            Base::Whole => {
                switched.expression_attribute_names("#h", "Head").expression_attribute_values(":zero", n(0)).expression_attribute_values(":one", n(1))
            }
            Base::Upto(at) => switched
                .expression_attribute_names("#bt", "BaseTotal")
                .expression_attribute_names("#r", "Records")
                .expression_attribute_names("#pa", "PendingAt")
                .expression_attribute_names("#pm", "PendingMs")
                .expression_attribute_names("#du", "DeletedUpto")
                .expression_attribute_values(":at", n(at.head))
                .expression_attribute_values(":total", n(at.total_bytes))
                .expression_attribute_values(":records", n(at.records))
                .expression_attribute_values(":now", n(now_ms()))
                .expression_attribute_values(":before", n(at.base_at)),
        };
        let switched = switched.return_values(ReturnValue::AllOld).return_consumed_capacity(TOTAL).send().await;
        let old = match switched {
            // The manifest before: the previous save's generation, tag and count of
            // chunks, the log's base and head.
            Ok(out) => {
                self.units.add(out.consumed_capacity());
                out.attributes.unwrap_or_default()
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => {
                self.delete_chunks(scope, &set, chunks.len()).await;
                return Err(Error::Fenced(scope.to_owned()));
            }
            Err(e) => return Err(aws(format!("saving the checkpoint of {scope}"))(e)),
        };
        self.delete_chunks(scope, &Chunks::of(&old), number(&old, "Chunks") as usize).await;
        let base_bytes = state.len() as u64;
        match base {
            Base::Whole => {
                let (old_base, old_head) = (number(&old, "BaseAt"), number(&old, "Head"));
                self.delete_deltas(scope, old_base + 1..=old_head).await;
                Ok(LogHead {
                    generation: next,
                    base_at: old_head + 1,
                    head: old_head + 1,
                    base_bytes,
                    log_bytes: 0,
                    records: number(&old, "Records"),
                    total_bytes: 0,
                })
            }
            Base::Upto(at) => {
                self.delete_after_grace(scope, &old).await;
                Ok(LogHead { generation: next, base_at: at.head, base_bytes, log_bytes: 0, ..at })
            }
        }
    }

    /// A shared log's deletion of covered deltas ([`DELETE_GRACE`]): the manifest names
    /// one pending base (`PendingAt`, saved at `PendingMs`) and how far deltas are deleted
    /// (`DeletedUpto`). Once the pending base is old enough, the compaction that finds it
    /// (`old`, the manifest it replaced) makes its own base pending and deletes the deltas
    /// the old one covered; until then it deletes nothing.
    async fn delete_after_grace(&self, scope: &str, old: &HashMap<String, AttributeValue>) {
        let Some(pending_ms) = old.get("PendingMs").map(|_| number(old, "PendingMs")) else { return };
        if now_ms() < pending_ms + self.delete_grace.as_millis() as u64 {
            return;
        }
        let (pending_at, deleted_upto) = (number(old, "PendingAt"), number(old, "DeletedUpto"));
        // Conditioned on the pending base, so one compaction deletes its deltas; this one's
        // base (the manifest's BaseAt now) becomes pending.
        self.wrote(1);
        let rotated = self
            .update(scope, "manifest")
            .update_expression("SET #pa = #ba, #pm = :now, #du = :upto")
            .condition_expression("#pm = :ms")
            .expression_attribute_names("#pa", "PendingAt")
            .expression_attribute_names("#ba", "BaseAt")
            .expression_attribute_names("#pm", "PendingMs")
            .expression_attribute_names("#du", "DeletedUpto")
            .expression_attribute_values(":now", n(now_ms()))
            .expression_attribute_values(":upto", n(pending_at.max(deleted_upto)))
            .expression_attribute_values(":ms", n(pending_ms))
            .return_consumed_capacity(TOTAL)
            .send()
            .await;
        match rotated {
            Ok(out) => {
                self.units.add(out.consumed_capacity());
                self.delete_deltas(scope, deleted_upto + 1..=pending_at).await;
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => {}
            Err(e) => tracing::warn!(scope, error = %e, "could not mark compacted deltas for deletion; a later compaction will"),
        }
    }

    /// Best-effort removal of deltas a base covers: leftovers are never read again.
    async fn delete_deltas(&self, scope: &str, numbers: std::ops::RangeInclusive<u64>) {
        if numbers.is_empty() {
            return;
        }
        self.wrote(numbers.clone().count().div_ceil(25));
        let deletes = numbers
            .map(|d| {
                let key = HashMap::from([("PK".to_owned(), s(scope)), ("SK".to_owned(), s(delta_sk(d)))]);
                WriteRequest::builder().delete_request(DeleteRequest::builder().set_key(Some(key)).build().expect("key set")).build()
            })
            .collect();
        if let Err(e) = batch_write(&self.client, &self.table, deletes, &self.units).await {
            tracing::warn!(scope, error = %e, "could not delete compacted deltas");
        }
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

/// Whether a transaction was cancelled because another writer got there first.
fn lost_race(e: &aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError) -> bool {
    match e {
        aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c) => {
            c.cancellation_reasons().iter().any(|r| matches!(r.code(), Some("ConditionalCheckFailed" | "TransactionConflict")))
        }
        _ => false,
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

/// A lease taken or renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// This owner was its last holder: nobody held it in between.
    pub continued: bool,
    /// The fencing token: larger for every later holder.
    pub generation: u64,
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
        Ok(self.take(None).await?.is_some())
    }

    /// Takes the lease, or renews it when this owner holds it at generation `held`:
    /// `None` while another live owner holds it (or took it since `held`).
    ///
    /// Every take that is not a renewal increments the lease's generation in the same
    /// conditional write: a fencing token that orders the holders, so that a sink can
    /// refuse a deposed holder's late write. A new lease item starts at the current time
    /// in milliseconds, so a state table created anew still hands out larger tokens than
    /// the one it replaced.
    pub async fn take(&self, held: Option<u64>) -> Result<Option<Taken>, Error> {
        let now = now_ms();
        self.writes.fetch_add(1, Ordering::Relaxed);
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(&self.scope))
            .key("SK", s("lease"))
            .expression_attribute_names("#o", "Owner")
            .expression_attribute_names("#e", "Expires")
            .expression_attribute_values(":me", s(&self.owner))
            .expression_attribute_values(":until", n(now + self.duration.as_millis() as u64))
            .return_consumed_capacity(TOTAL);
        let update = match held {
            Some(generation) => update
                .update_expression("SET #o = :me, #e = :until")
                .condition_expression("#o = :me AND #g = :g")
                .expression_attribute_names("#g", "Generation")
                .expression_attribute_values(":g", n(generation))
                .return_values(ReturnValue::None),
            None => update
                .update_expression("SET #o = :me, #e = :until, #g = if_not_exists(#g, :now) + :one")
                .condition_expression("attribute_not_exists(PK) OR #o = :me OR #e < :now")
                .expression_attribute_names("#g", "Generation")
                .expression_attribute_values(":now", n(now))
                .expression_attribute_values(":one", n(1))
                .return_values(ReturnValue::AllOld),
        };
        match update.send().await {
            Ok(out) => {
                self.units.add(out.consumed_capacity());
                Ok(Some(match held {
                    Some(generation) => Taken { continued: true, generation },
                    // The item as it was: its owner, and the generation the write incremented.
                    None => {
                        let was = out.attributes();
                        let generation = was.filter(|w| w.contains_key("Generation")).map_or(now, |w| number(w, "Generation")) + 1;
                        Taken { continued: was.and_then(|w| text(w, "Owner")) == Some(&self.owner), generation }
                    }
                }))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_state_reads_back_and_old_items_read_as_they_are() {
        let state: Vec<u8> = (0..10_000u32).flat_map(|i| (i % 97).to_le_bytes()).collect();
        let stored = pack(&state);
        assert!(stored.len() < state.len() / 2, "{} of {}", stored.len(), state.len());
        assert_eq!(unpack(stored, Some(&LZ4.to_owned()), String::new).unwrap(), state);
        assert_eq!(unpack(state.clone(), None, String::new).unwrap(), state);
    }

    #[test]
    fn the_stored_bytes_of_a_states_figures_decode_to_them_alone() {
        let state: Vec<u8> = (0..10_000u32).flat_map(|i| (i % 97).to_le_bytes()).collect();
        let stored = pack(&state);
        let first = figures_stored(&stored, &state, 1234);
        assert!(4 < first && first < stored.len(), "{first} of {}", stored.len());
        assert_eq!(lz4_prefix::decode_prefix(&stored[4..first], 1234).unwrap(), state[..1234]);
        for figures in [0, state.len()] {
            assert_eq!(figures_stored(&stored, &state, figures), 0, "nothing to read apart");
        }
    }

    #[test]
    fn a_corrupt_or_unknown_encoding_is_an_error_not_a_panic() {
        let lz4 = Some(LZ4.to_owned());
        let what = || "delta 7".to_owned();
        for stored in [vec![], vec![1, 2], vec![255, 255, 255, 255, 0], pack(b"some state bytes").split_off(3)] {
            assert!(matches!(unpack(stored, lz4.as_ref(), what), Err(Error::Input(m)) if m.starts_with("delta 7: corrupt")));
        }
        let mut truncated = pack(&[7; 5000]);
        truncated.truncate(truncated.len() - 2);
        assert!(unpack(truncated, lz4.as_ref(), what).is_err());
        assert!(matches!(unpack(vec![1], Some(&"zstd".to_owned()), what), Err(Error::Input(m)) if m.contains("unknown encoding")));
    }
}
