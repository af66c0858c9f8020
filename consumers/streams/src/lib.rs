//! `toolrank consume dynamodb-streams` and `toolrank consume kinesis`: shard pollers with
//! KCL-style leases and an exactly-once effect.
//!
//! How (also in docs/architecture.md):
//! - **Lineages.** A stream's shards form trees: a shard closes and its child (or two,
//!   after a split) continues its key range. All changes of one item, and of one session,
//!   stay within one tree, so a tree is the unit that owns engine state, the way a Kafka
//!   partition does. Trees are found from the shard listing (a shard whose parent is
//!   listed or known joins the parent's tree; any other starts one) and registered in
//!   the state table. Within a tree, a shard is read only after its parent was read to
//!   its end (parent before child).
//! - **Leases.** Each tree has a lease in the state table. Pollers of one application
//!   heartbeat, take free or lapsed tree leases up to their fair share, and let surplus
//!   trees go, so several pollers split the trees and a dead poller's trees are taken
//!   over once its leases lapse.
//! - **Checkpoints.** A tree's engine snapshot and its shards' sequence numbers are saved
//!   together, atomically ([`toolrank_state::CheckpointStore`]); a new owner claims
//!   (fencing the old one) and resumes from there, skipping records at or below each
//!   shard's sequence number, so a record is applied exactly once whatever is re-read.
//! - **Sinks.** One poller holds the sink lease and writes the sinks from all trees
//!   ([`toolrank_live::SinkWriter`]).
//!
//! The pipeline's own writes (Score and GSI1_SK on Agent items, pattern items) come back
//! on the same stream: an Agent item whose domain and name are unchanged is `Unchanged`
//! for the engine and pattern items are not executions, so they change no count and
//! cause no further write.

pub mod dynamodb_streams;
pub mod kinesis;
mod source;

pub use source::{compare_sequences, Page, ShardInfo, ShardSource, SourceError, StreamRecord};

use serde::{Deserialize, Serialize};
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use toolrank_dead_letters::{DeadLetters, Letter, Queue};
use toolrank_engine::Engine;
use toolrank_events::DeadLetter;
pub use toolrank_live::Summary;
use toolrank_live::{LiveConfig, LogHead, OnGap, SinkWriter, Wired};
use toolrank_state::Lease;
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Live(#[from] toolrank_live::Error),
    #[error("stream: {0}")]
    Source(#[from] SourceError),
    #[error("shard {shard} merges the lineages of {a} and {b}: shard merges across lineages are not supported")]
    Merge { shard: String, a: String, b: String },
    #[error(transparent)]
    DeadLetters(#[from] toolrank_dead_letters::Error),
    /// Trees stopped at a gap or at a broken checkpoint, each with why and what to do.
    #[error("trees stopped: {0}")]
    Stopped(String),
}

impl From<toolrank_dynamodb::Error> for Error {
    fn from(e: toolrank_dynamodb::Error) -> Error {
        Error::Live(e.into())
    }
}

/// What a poller needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The application: pollers with the same name share the stream's shards.
    pub application: String,
    /// How often the shard listing is read (new shards, splits).
    pub discover_interval: Duration,
    /// Pause after a round of reads that found nothing.
    pub idle_poll: Duration,
    /// Where rejected records go, one JSON line each.
    pub dead_letter_file: PathBuf,
    /// An SQS queue that takes the rejected records instead of the file, whole, with
    /// why and where (message attributes `toolrank-reason`, `toolrank-position`).
    pub dead_letter_queue_url: Option<String>,
    /// The sinks and the loop's pacing, as every live consumer has them. Its lease
    /// duration is also the trees' leases'.
    pub live: LiveConfig,
}

/// A shard's progress within its tree, as checkpointed.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct ShardPos {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    parent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    adjacent_parent: Option<String>,
    /// The last applied record; `None`: from the oldest.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    seq: Option<String>,
    /// Closed and read to its end.
    #[serde(default)]
    done: bool,
}

/// A tree this poller owns.
struct Tree {
    scope: String,
    lease: Lease,
    renewed: Instant,
    engine: Engine,
    /// Where its checkpoint's log stands.
    at: LogHead,
    shards: BTreeMap<String, ShardPos>,
    iterators: HashMap<String, String>,
    /// Shards whose last read returned nothing, and when they may be read again (the
    /// services limit reads per shard: an idle shard waits `idle_poll` while a busy one
    /// is read at once).
    caught_up: HashMap<String, Instant>,
    dirty: bool,
    /// Why the tree stopped (a trimmed position under `--on-gap stop`, a checkpoint that
    /// does not restore): it is read no more, its share left out of the rankings.
    stopped: Option<String>,
}

/// Parent before child: a shard is read once its parents in the tree are done.
fn ready(shards: &BTreeMap<String, ShardPos>, pos: &ShardPos) -> bool {
    [&pos.parent, &pos.adjacent_parent].into_iter().flatten().all(|p| shards.get(p).is_none_or(|pp| pp.done))
}

/// Where a poller's dead letters go: its file, or the SQS queue.
struct Letters {
    log: DeadLetters,
    queue: Option<Queue>,
}

impl Letters {
    /// Sends one letter; `false` when the queue did not take it: the record is read
    /// again, so that no checkpoint passes a letter that was lost.
    fn reject(&mut self, writer: &mut SinkWriter, mut letter: DeadLetter) -> Result<bool, Error> {
        if let Some(queue) = &self.queue {
            let position = letter.position.clone().unwrap_or_default();
            let sent = writer.block_on(queue.send(&[Letter { position: &position, reason: &letter.reason, body: &letter.raw }]));
            if let Err((_, error)) = sent {
                writer.tally().retried_errors += 1;
                warn!(position, error, "a dead letter was not sent; reading its record again");
                return Ok(false);
            }
            letter.raw.clear();
        }
        self.log.reject(&mut writer.tally().dead_letters, letter)?;
        Ok(true)
    }
}

/// A poller as the runtime's [`toolrank_live::Source`]: a unit per owned tree.
struct Poller<S: ShardSource> {
    config: Config,
    source: S,
    /// State-table prefix of this application on this stream.
    prefix: String,
    trees: BTreeMap<String, Tree>,
    /// Every tree of the stream, by root shard.
    registry: Vec<String>,
    /// Listed shards and the tree each belongs to.
    listing: Vec<ShardInfo>,
    tree_of: HashMap<String, String>,
    workers: usize,
    dead_letters: Letters,
    last_discover: Instant,
    last_balance: Instant,
    /// Sequence numbers of records the engine panicked on, already dead-lettered: read
    /// again after their tree is restored from its checkpoint, they are passed over.
    poisoned: HashSet<String>,
}

/// Runs a poller on `source`, writing `sinks` while it holds the sink lease, until
/// `stop` is set or, with `until_idle`, every shard is read.
pub fn run<S: ShardSource>(config: Config, source: S, sinks: Vec<Vec<Wired>>, stop: &AtomicBool) -> Result<Summary, Error> {
    let prefix = format!("streams/{}/{}", config.application, source.name());
    let mut writer = SinkWriter::new(config.live.writer.clone(), format!("{prefix}/sink-writer"), sinks)?;
    let pacing = config.live.pacing.clone();
    let long_ago = Instant::now() - Duration::from_secs(3600);
    let dead_letters = Letters {
        queue: config.dead_letter_queue_url.clone().map(|url| Queue::new(&writer.block_on(toolrank_dynamodb::sdk_config()), url, prefix.clone())),
        // With a queue, the letters are only counted and logged here.
        log: match config.dead_letter_queue_url {
            Some(_) => DeadLetters::open(None, false)?,
            None => DeadLetters::durable(&config.dead_letter_file),
        },
    };
    let mut p = Poller {
        config,
        source,
        prefix,
        trees: BTreeMap::new(),
        registry: Vec::new(),
        listing: Vec::new(),
        tree_of: HashMap::new(),
        workers: 1,
        dead_letters,
        last_discover: long_ago,
        last_balance: long_ago,
        poisoned: HashSet::new(),
    };
    toolrank_live::run(&mut p, &mut writer, &pacing, stop)?;
    let stopped: Vec<String> = p.trees.values().filter_map(|t| t.stopped.clone()).collect();
    if !stopped.is_empty() {
        return Err(Error::Stopped(stopped.join("; ")));
    }
    Ok(writer.into_summary())
}

/// Builds the AWS configuration (on the caller's side, before [`run`] starts its own runtime).
pub fn sdk_config() -> aws_config::SdkConfig {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    rt.block_on(toolrank_dynamodb::sdk_config())
}

impl<S: ShardSource> toolrank_live::Source for Poller<S> {
    type Error = Error;

    /// Reads the shard listing and balances the trees, each at its interval.
    fn sync(&mut self, writer: &mut SinkWriter) -> Result<(), Error> {
        if self.last_discover.elapsed() >= self.config.discover_interval {
            self.last_discover = Instant::now();
            self.discover(writer)?;
        }
        if self.last_balance.elapsed() >= self.config.live.writer.lease / 3 {
            self.last_balance = Instant::now();
            self.balance(writer)?;
        }
        Ok(())
    }

    fn read(&mut self, writer: &mut SinkWriter) -> Result<usize, Error> {
        self.read_round(writer)
    }

    fn engines(&mut self) -> Vec<&mut Engine> {
        self.trees.values_mut().map(|t| &mut t.engine).collect()
    }

    /// The scopes of the trees other pollers own.
    fn others(&self) -> Vec<String> {
        self.registry.iter().filter(|r| !self.trees.contains_key(*r)).map(|r| self.scope(r)).collect()
    }

    /// Saves every changed tree's state with its shards' positions.
    fn checkpoint(&mut self, writer: &mut SinkWriter, _all: bool) -> Result<(), Error> {
        let listed: HashSet<&str> = self.listing.iter().map(|s| s.id.as_str()).collect();
        let mut fenced = Vec::new();
        for (root, tree) in self.trees.iter_mut().filter(|(_, t)| t.dirty) {
            prune(&mut tree.shards, &listed);
            let position = serde_json::to_string(&tree.shards).expect("positions serialize");
            match writer.save(&tree.scope, tree.at, &position, &mut tree.engine) {
                Ok(Some(at)) => {
                    tree.at = at;
                    tree.dirty = false;
                }
                Ok(None) => {}
                Err(_) => fenced.push(root.clone()),
            }
        }
        for root in fenced {
            warn!(tree = root, "another poller owns this tree now; letting go");
            self.drop_tree(writer, &root);
        }
        Ok(())
    }

    fn dirty(&self) -> bool {
        self.trees.values().any(|t| t.dirty)
    }

    /// Whether every shard of every tree is read to what the stream holds: owned shards
    /// by their last read, others' by reading after their checkpointed positions.
    fn drained(&mut self, writer: &mut SinkWriter) -> Result<bool, Error> {
        self.discover(writer)?;
        for shard in &self.listing {
            let root = &self.tree_of[&shard.id];
            if let Some(tree) = self.trees.get(root) {
                if tree.stopped.is_some() {
                    // Read no more: the rest of the input decides.
                    continue;
                }
                let Some(pos) = tree.shards.get(&shard.id) else { return Ok(false) };
                if !pos.done && !tree.caught_up.contains_key(&shard.id) {
                    return Ok(false);
                }
                continue;
            }
            let scope = self.scope(root);
            let position = writer.call("reading a tree's position", writer.store().position(&scope))?;
            let pos = parse_position(position.as_deref()).remove(&shard.id).unwrap_or_default();
            if pos.done {
                continue;
            }
            let source = &self.source;
            let unread = writer.call("reading after another poller's position", async {
                let it = source.iterator(&shard.id, pos.seq.as_deref()).await.map_err(|e| toolrank_dynamodb::Error::Input(e.to_string()))?;
                let page = source.read(&it).await.map_err(|e| toolrank_dynamodb::Error::Input(e.to_string()))?;
                Ok::<_, toolrank_dynamodb::Error>(page.records.len())
            });
            match unread {
                Ok(0) => {}
                Ok(_) => return Ok(false),
                Err(e) => {
                    warn!(shard = shard.id, error = %e, "could not check another poller's progress");
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn idle(&mut self, _writer: &mut SinkWriter) -> Result<(), Error> {
        std::thread::sleep(self.config.idle_poll);
        Ok(())
    }

    /// Releases the leases of the trees whose state is saved.
    fn release(&mut self, writer: &mut SinkWriter) {
        for (root, tree) in &self.trees {
            if !tree.dirty {
                if let Err(e) = writer.call("releasing a tree lease", tree.lease.release()) {
                    warn!(tree = root, error = %e, "could not release a tree lease; it lapses by itself");
                }
            }
        }
    }
}

impl<S: ShardSource> Poller<S> {
    fn scope(&self, root: &str) -> String {
        format!("{}/tree/{root}", self.prefix)
    }

    /// Reads the shard listing and the registry, places every shard in its tree, and
    /// registers new trees.
    fn discover(&mut self, writer: &mut SinkWriter) -> Result<(), Error> {
        let listing = writer.call("listing shards", async { self.source.shards().await.map_err(|e| toolrank_dynamodb::Error::Input(e.to_string())) })?;
        let registry = writer.call("reading the tree registry", writer.store().set(&self.prefix, "trees", "Trees"))?;
        // Membership as the trees' owners recorded it (a root's shards may be trimmed).
        let mut member: HashMap<String, String> = HashMap::new();
        for root in &registry {
            member.insert(root.clone(), root.clone());
            let shards: Vec<String> = match self.trees.get(root) {
                Some(t) => t.shards.keys().cloned().collect(),
                None => {
                    let scope = self.scope(root);
                    let position = writer.call("reading a tree's position", writer.store().position(&scope))?;
                    parse_position(position.as_deref()).into_keys().collect()
                }
            };
            for s in shards {
                member.insert(s, root.clone());
            }
        }
        let listed: HashMap<&str, &ShardInfo> = listing.iter().map(|s| (s.id.as_str(), s)).collect();
        let mut tree_of: HashMap<String, String> = HashMap::new();
        for shard in &listing {
            let root = root_of(&shard.id, &listed, &member, &mut tree_of);
            if let Some(adjacent) = &shard.adjacent_parent {
                if listed.contains_key(adjacent.as_str()) || member.contains_key(adjacent) {
                    let other = root_of(adjacent, &listed, &member, &mut tree_of);
                    if other != root {
                        return Err(Error::Merge { shard: shard.id.clone(), a: root, b: other });
                    }
                }
            }
        }
        let new: Vec<String> = tree_of.values().filter(|r| !registry.contains(r)).cloned().collect::<HashSet<_>>().into_iter().collect();
        if !new.is_empty() {
            info!(trees = ?new, "registering new shard lineages");
            writer.call("registering trees", writer.store().add_to_set(&self.prefix, "trees", "Trees", new.clone()))?;
        }
        self.registry = registry.into_iter().chain(new).collect();
        self.registry.sort();
        self.registry.dedup();
        self.tree_of = tree_of;
        self.listing = listing;
        let (listing, tree_of) = (&self.listing, &self.tree_of);
        for (root, tree) in &mut self.trees {
            tree.dirty |= adopt_shards(&mut tree.shards, root, listing, tree_of);
        }
        Ok(())
    }

    /// Heartbeats, renews this poller's tree leases, takes free or lapsed trees up to its
    /// fair share, and lets surplus ones go.
    fn balance(&mut self, writer: &mut SinkWriter) -> Result<(), Error> {
        let workers_scope = format!("{}/workers", self.prefix);
        match writer.call("heartbeat", writer.store().heartbeat(&workers_scope, writer.owner(), self.config.live.writer.lease * 2)) {
            Ok(n) => self.workers = n,
            Err(e) => {
                writer.tally().retried_errors += 1;
                warn!(error = %e, "heartbeat failed");
            }
        }
        let roots: Vec<String> = self.trees.keys().cloned().collect();
        for root in roots {
            let tree = &self.trees[&root];
            let held = match writer.call("renewing a tree lease", tree.lease.acquire()) {
                Ok(held) => held,
                Err(e) => {
                    writer.tally().retried_errors += 1;
                    warn!(tree = root, error = %e, "renewing a tree lease failed");
                    tree.renewed.elapsed() < self.config.live.writer.lease / 2
                }
            };
            if held {
                self.trees.get_mut(&root).expect("owned").renewed = Instant::now();
            } else {
                warn!(tree = root, "lost the lease of a tree; letting go");
                self.drop_tree(writer, &root);
            }
        }
        let share = self.registry.len().div_ceil(self.workers.max(1));
        // Surplus trees go first, checkpointed, so that a new poller gets its share.
        while self.trees.len() > share {
            let Some(root) = self.trees.iter().find(|(_, t)| !t.dirty).map(|(r, _)| r.clone()) else { break };
            info!(tree = root, share, "handing a tree over to another poller");
            let lease = self.trees[&root].lease.clone();
            self.drop_tree(writer, &root);
            if let Err(e) = writer.call("releasing a tree lease", lease.release()) {
                warn!(tree = root, error = %e, "could not release a tree lease; it lapses by itself");
            }
        }
        let free: Vec<String> = self.registry.iter().filter(|r| !self.trees.contains_key(*r)).cloned().collect();
        for root in free {
            if self.trees.len() >= share {
                break;
            }
            let scope = self.scope(&root);
            let lease = Lease::new(
                writer.client().clone(),
                self.config.live.writer.state_table.clone(),
                scope.clone(),
                self.config.live.writer.owner.clone(),
                self.config.live.writer.lease,
            );
            match writer.call("taking a tree lease", lease.acquire()) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    writer.tally().retried_errors += 1;
                    warn!(tree = root, error = %e, "taking a tree lease failed");
                    continue;
                }
            }
            // A claim the state table failed is tried again at the next round: the
            // lease goes back meanwhile, for whichever poller gets there first.
            let (claimed, stopped) = match writer.claim(&scope) {
                // Stopped, its lease held: no other poller crash-loops on it.
                Err(e) if e.is_broken_checkpoint() => {
                    error!(tree = root, error = %e, "the tree is stopped");
                    (Some((Engine::new(), None, LogHead::default())), Some(e.to_string()))
                }
                claimed => (claimed?, None),
            };
            let Some((engine, position, at)) = claimed else {
                if let Err(e) = writer.call("releasing a tree lease", lease.release()) {
                    warn!(tree = root, error = %e, "could not release a tree lease; it lapses by itself");
                }
                continue;
            };
            let mut tree = Tree {
                scope,
                lease,
                renewed: Instant::now(),
                engine,
                at,
                shards: parse_position(position.as_deref()),
                iterators: HashMap::new(),
                caught_up: HashMap::new(),
                dirty: false,
                stopped,
            };
            tree.dirty = adopt_shards(&mut tree.shards, &root, &self.listing, &self.tree_of);
            info!(tree = root, generation = at.generation, shards = tree.shards.len(), "took a tree");
            self.trees.insert(root, tree);
        }
        Ok(())
    }

    /// Drops an owned tree and takes its share out of the merged engine.
    fn drop_tree(&mut self, writer: &mut SinkWriter, root: &str) {
        if let Some(mut tree) = self.trees.remove(root) {
            writer.release(&mut tree.engine);
        }
    }

    /// Reads one page from every ready shard of the owned trees; returns the records read.
    fn read_round(&mut self, writer: &mut SinkWriter) -> Result<usize, Error> {
        let mut total = 0;
        let mut restore = Vec::new();
        // Shards whose dead letter was not sent: read again from their last record.
        let mut unsent = false;
        let Poller { source, trees, dead_letters, config, poisoned, .. } = self;
        for (root, tree) in trees.iter_mut().filter(|(_, t)| t.stopped.is_none()) {
            let now = Instant::now();
            let ids: Vec<String> = tree
                .shards
                .iter()
                .filter(|(id, p)| !p.done && ready(&tree.shards, p) && tree.caught_up.get(*id).is_none_or(|at| now.duration_since(*at) >= config.idle_poll))
                .map(|(id, _)| id.clone())
                .collect();
            for id in ids {
                let iterator = match tree.iterators.get(&id) {
                    Some(it) => it.clone(),
                    None => {
                        let after = tree.shards[&id].seq.clone();
                        match writer.block_on(source.iterator(&id, after.as_deref())) {
                            Ok(it) => it,
                            // The records after the position are gone (older than the
                            // stream's retention): a gap.
                            Err(SourceError::Trimmed(e)) => match config.live.on_gap {
                                OnGap::Skip => {
                                    warn!(shard = id, error = %e, "position trimmed; reading on from the oldest record (--on-gap skip)");
                                    toolrank_live::count_gap(1);
                                    writer.block_on(source.iterator(&id, None))?
                                }
                                OnGap::Stop => {
                                    let at =
                                        format!("shard {id} of {}: the records after the checkpoint's position were trimmed before they were read", tree.scope);
                                    error!(shard = id, error = %e, "{at}; the shard's tree is stopped");
                                    tree.stopped = Some(format!("{at} ({})", toolrank_live::GAP_HINT));
                                    break;
                                }
                            },
                            Err(e) => {
                                writer.tally().retried_errors += 1;
                                warn!(shard = id, error = %e, "getting a shard iterator failed; retrying");
                                continue;
                            }
                        }
                    }
                };
                let page = match writer.block_on(async { tokio::time::timeout(toolrank_live::CALL_DEADLINE, source.read(&iterator)).await }) {
                    Ok(Ok(page)) => page,
                    Ok(Err(SourceError::Expired)) => {
                        tree.iterators.remove(&id);
                        continue;
                    }
                    Ok(Err(e)) => {
                        writer.tally().retried_errors += 1;
                        warn!(shard = id, error = %e, "reading a shard failed; retrying");
                        tree.iterators.remove(&id);
                        continue;
                    }
                    Err(_) => {
                        writer.tally().retried_errors += 1;
                        warn!(shard = id, "reading a shard timed out; retrying");
                        tree.iterators.remove(&id);
                        continue;
                    }
                };
                let pos = tree.shards.get_mut(&id).expect("listed");
                for rec in &page.records {
                    writer.tally().messages += 1;
                    let seq = rec.sequence();
                    if pos.seq.as_deref().is_some_and(|last| compare_sequences(seq, last) != CmpOrdering::Greater) {
                        writer.tally().skipped_redeliveries += 1;
                        continue;
                    }
                    if poisoned.contains(seq) {
                        pos.seq = Some(seq.to_owned());
                        tree.dirty = true;
                        continue;
                    }
                    let applied = match toolrank_live::oversized(rec.size(), config.live.max_record_bytes) {
                        Some(reason) => Err(reason),
                        None => toolrank_live::guard(|| rec.apply(&mut tree.engine, writer.tally())).unwrap_or_else(|panicked| {
                            if panicked.engine_touched {
                                poisoned.insert(seq.to_owned());
                                restore.push(root.clone());
                            }
                            Err(panicked.reason())
                        }),
                    };
                    match applied {
                        Ok(Some(created)) => writer.observe(created),
                        Ok(None) => {}
                        Err(reason) => {
                            let letter = DeadLetter {
                                source: format!("{}/{id}", source.name()),
                                line: writer.tally().messages,
                                record: None,
                                position: Some(seq.to_owned()),
                                reason,
                                raw: rec.describe(),
                            };
                            unsent = !dead_letters.reject(writer, letter)?;
                        }
                    }
                    if unsent {
                        tree.iterators.remove(&id);
                        break;
                    }
                    if restore.last() == Some(root) {
                        // Its engine is suspect: read no further.
                        break;
                    }
                    pos.seq = Some(seq.to_owned());
                    tree.dirty = true;
                }
                if std::mem::take(&mut unsent) {
                    continue;
                }
                if restore.last() == Some(root) {
                    break;
                }
                total += page.records.len();
                if page.records.is_empty() {
                    writer.caught_up();
                    tree.caught_up.insert(id.clone(), Instant::now());
                } else {
                    tree.caught_up.remove(&id);
                }
                match page.next {
                    Some(next) => {
                        tree.iterators.insert(id, next);
                    }
                    None => {
                        info!(shard = id, "shard closed and read to its end");
                        pos.done = true;
                        tree.dirty = true;
                        tree.iterators.remove(&id);
                    }
                }
            }
        }
        // Taken again from its checkpoint at the next balance (its lease is still ours).
        for root in restore {
            warn!(tree = root, "the engine panicked mid-change: restoring the tree from its checkpoint");
            self.drop_tree(writer, &root);
        }
        Ok(total)
    }
}

/// The root of `shard`'s tree: recorded membership first, then the parent's tree if the
/// parent is listed or known, else the shard starts its own.
fn root_of(shard: &str, listed: &HashMap<&str, &ShardInfo>, member: &HashMap<String, String>, memo: &mut HashMap<String, String>) -> String {
    if let Some(r) = memo.get(shard) {
        return r.clone();
    }
    let root = match (member.get(shard), listed.get(shard).and_then(|s| s.parent.as_deref())) {
        (Some(r), _) => r.clone(),
        (None, Some(p)) if listed.contains_key(p) || member.contains_key(p) => root_of(p, listed, member, memo),
        _ => shard.to_owned(),
    };
    memo.insert(shard.to_owned(), root.clone());
    root
}

/// Adds the listed shards of `root`'s tree that the tree does not know yet; whether any was.
fn adopt_shards(shards: &mut BTreeMap<String, ShardPos>, root: &str, listing: &[ShardInfo], tree_of: &HashMap<String, String>) -> bool {
    let mut added = false;
    for s in listing.iter().filter(|s| tree_of.get(&s.id).is_some_and(|r| r == root)) {
        if !shards.contains_key(&s.id) {
            shards.insert(s.id.clone(), ShardPos { parent: s.parent.clone(), adjacent_parent: s.adjacent_parent.clone(), seq: None, done: false });
            added = true;
        }
    }
    added
}

/// Forgets done shards the stream no longer lists and no remaining shard descends from.
fn prune(shards: &mut BTreeMap<String, ShardPos>, listed: &HashSet<&str>) {
    let parents: HashSet<String> = shards.values().flat_map(|p| [p.parent.clone(), p.adjacent_parent.clone()]).flatten().collect();
    shards.retain(|id, p| !p.done || listed.contains(id.as_str()) || parents.contains(id));
}

fn parse_position(position: Option<&str>) -> BTreeMap<String, ShardPos> {
    position.and_then(|p| serde_json::from_str(p).ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parent: Option<&str>) -> ShardInfo {
        ShardInfo { id: id.into(), parent: parent.map(Into::into), adjacent_parent: None }
    }

    /// The tree of every listed shard, as `discover` places them.
    fn trees(listing: &[ShardInfo], member: &HashMap<String, String>) -> HashMap<String, String> {
        let listed: HashMap<&str, &ShardInfo> = listing.iter().map(|s| (s.id.as_str(), s)).collect();
        let mut memo = HashMap::new();
        listing.iter().map(|s| (s.id.clone(), root_of(&s.id, &listed, member, &mut memo))).collect()
    }

    #[test]
    fn children_join_their_parents_tree_and_orphans_start_their_own() {
        // a splits into b and c; d's parent was trimmed from the listing and is unknown.
        let listing = [shard("a", None), shard("b", Some("a")), shard("c", Some("a")), shard("d", Some("gone"))];
        let t = trees(&listing, &HashMap::new());
        assert_eq!((t["a"].as_str(), t["b"].as_str(), t["c"].as_str(), t["d"].as_str()), ("a", "a", "a", "d"));
    }

    #[test]
    fn recorded_membership_outlives_a_trimmed_root() {
        // a was trimmed; its tree recorded b as a member, so b's child e stays in tree a.
        let listing = [shard("b", Some("a")), shard("e", Some("b"))];
        let member: HashMap<String, String> = [("a", "a"), ("b", "a")].map(|(s, r)| (s.to_owned(), r.to_owned())).into();
        let t = trees(&listing, &member);
        assert_eq!((t["b"].as_str(), t["e"].as_str()), ("a", "a"));
    }

    #[test]
    fn a_child_is_read_only_once_its_parents_are_done() {
        let mut shards = BTreeMap::new();
        let listing = [shard("a", None), shard("b", Some("a"))];
        let tree_of: HashMap<String, String> = [("a", "a"), ("b", "a")].map(|(s, r)| (s.to_owned(), r.to_owned())).into();
        assert!(adopt_shards(&mut shards, "a", &listing, &tree_of));
        assert!(!adopt_shards(&mut shards, "a", &listing, &tree_of), "known shards are not added twice");
        assert!(ready(&shards, &shards["a"]));
        assert!(!ready(&shards, &shards["b"]));
        shards.get_mut("a").unwrap().done = true;
        assert!(ready(&shards, &shards["b"]));
        // A parent the tree never knew (trimmed before it was listed) holds nothing up.
        let orphan = ShardPos { parent: Some("gone".into()), ..ShardPos::default() };
        assert!(ready(&shards, &orphan));
    }

    #[test]
    fn done_shards_are_forgotten_once_unlisted_and_without_children() {
        let pos = |parent: Option<&str>, done| ShardPos { parent: parent.map(Into::into), done, ..ShardPos::default() };
        let mut shards: BTreeMap<String, ShardPos> =
            [("a", pos(None, true)), ("b", pos(Some("a"), true)), ("c", pos(Some("b"), false)), ("x", pos(None, true))]
                .map(|(id, p)| (id.to_owned(), p))
                .into();
        // Only c is still listed: x goes; b stays as c's parent, and a as b's.
        prune(&mut shards, &["c"].into());
        assert_eq!(shards.keys().map(String::as_str).collect::<Vec<_>>(), ["a", "b", "c"]);
        // Once c is done and unlisted too, what named a parent is gone with it.
        shards.get_mut("c").unwrap().done = true;
        prune(&mut shards, &HashSet::new());
        assert_eq!(shards.keys().map(String::as_str).collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn positions_round_trip_and_an_unreadable_one_starts_empty() {
        let shards: BTreeMap<String, ShardPos> = [("a".to_owned(), ShardPos { seq: Some("42".into()), done: true, ..ShardPos::default() })].into();
        let text = serde_json::to_string(&shards).unwrap();
        assert_eq!(parse_position(Some(&text)), shards);
        assert!(parse_position(Some("not json")).is_empty());
        assert!(parse_position(None).is_empty());
    }
}
