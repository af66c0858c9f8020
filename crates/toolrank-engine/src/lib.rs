//! The toolrank engine: SPEC §3 maintained incrementally over the current table state.
//!
//! Pure and synchronous — no I/O, no clocks, no async — so every consumer drives the same
//! code and tests can compare it with a batch recomputation.
//!
//! Two stages:
//! 1. **Sessions** (keyed by the hist item's PK, `user#session`, which is also the DynamoDB
//!    partition key and the Kafka message key): the current rows of each session, with
//!    per-key stream sequence numbers for redelivery and reordering. A changed row marks
//!    its (session, agent) group dirty; [`Engine::flush`] turns each dirty group into a
//!    retraction of its previous [`Contribution`] and the addition of its new one.
//! 2. **Aggregates** ([`Aggregates`]) only sum those deltas.
//!
//! The catalog join (which agents exist, their domain and name) and the 80th-percentile
//! cut apply when a [`Report`] is built, so late or removed Agent items and domain moves
//! need no recomputation.

mod aggregate;
mod copy;
mod cut;
mod figures;
mod intern;
mod report;
pub mod score;
mod shard;

pub use aggregate::{AgentAggregate, Aggregates, Contribution, Contributions, DayHistogram, PatternAggregate, PatternKey, SymKind, Touched};
pub use copy::AggregateCopy;
pub use cut::{Cuts, ScoreCensus, ScoreInputs};
pub use figures::{AgentFigures, PatternFigures, PatternView, Recommended, ShardScores, ToolFigures, TOP_PERCENTILE};
pub use intern::{Interner, Sym};
pub use report::{recommendation_cut, AgentScore, PatternRow, Report, SequenceNames, StagingKey, StagingOrder, StagingRow, ToolErrors};
pub use shard::{shard_of, Shards};

use hashbrown::HashTable;
use rustc_hash::{FxBuildHasher, FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::hash::BuildHasher;
use toolrank_events::{Action, Change, Day, Entity, HistKey, Timestamp, BASE_SEQ, METADATA_SK};

/// What [`Engine::apply`] did with a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The table state changed.
    Changed,
    /// The change repeats the current state (e.g. an identical redelivery).
    Unchanged,
    /// Its sequence number is not newer than the last applied for the key.
    Stale,
    /// It concerns an item the computation does not read.
    Ignored,
}

/// A stream sequence number as two words: `u128` would force 16-byte alignment and pad
/// every row of every session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Seq(u64, u64);

impl From<u128> for Seq {
    fn from(v: u128) -> Seq {
        Seq((v >> 64) as u64, v as u64)
    }
}

impl From<Seq> for u128 {
    fn from(s: Seq) -> u128 {
        (u128::from(s.0) << 64) | u128::from(s.1)
    }
}

/// One hist row of a session.
#[derive(Clone, Debug)]
struct Row {
    /// Interned SK, resolving to process, agent and tool.
    sk: Sym,
    /// A tombstone's stamp: the engine's clock when the removal was applied (0: none,
    /// never expires). See [`Engine::expire_tombstones`].
    removed: u32,
    /// Last applied stream sequence number for this key.
    seq: Option<Seq>,
    /// The current item; `None` is a tombstone kept for its `seq`.
    data: Option<RowData>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RowData {
    tool_nm: Sym,
    at: Timestamp,
    success: bool,
}

/// The parts of an interned SK.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct SkParts {
    process: Sym,
    agent: Sym,
    tool: Sym,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Session {
    /// `user#session`, stored once: the index refers to it by slot. Empty in a free slot.
    pk: Box<str>,
    user: Sym,
    #[serde(with = "compact_rows")]
    rows: Vec<Row>,
    /// The contribution each agent group last added to the aggregates.
    committed: Vec<(Sym, Contribution)>,
    /// Agents whose rows changed since the last flush.
    #[serde(skip)]
    dirty: Vec<Sym>,
}

impl Session {
    /// The SessionID part of the PK.
    fn session_id(&self) -> &str {
        self.pk.split_once('#').map_or("", |(_, s)| s)
    }
}

/// An Agent METADATA key's state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct AgentSlot {
    seq: Option<Seq>,
    meta: Option<AgentMeta>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct AgentMeta {
    domain: Sym,
    name: Option<Box<str>>,
}

/// Size of the live state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateStats {
    /// Sessions with at least one current row.
    pub live_sessions: usize,
    /// Current hist rows.
    pub live_rows: usize,
    /// Removed keys remembered for their sequence numbers.
    pub tombstones: usize,
    /// Sessions held: live ones and those holding only tombstones.
    pub sessions: usize,
    /// Known agents (current Agent items).
    pub agents: usize,
    /// Approximate heap bytes of the whole state.
    pub heap_bytes: usize,
}

/// A snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("corrupt or incompatible engine snapshot: {0}")]
    Decode(#[from] postcard::Error),
    #[error("engine snapshot version {0}, expected {SNAPSHOT_VERSION}")]
    Version(u32),
    #[error("engine delta version {0}, expected {DELTA_VERSION}")]
    DeltaVersion(u32),
    #[error("engine delta holds a key that is not a hist item's: {0}")]
    DeltaKey(String),
    #[error("engine delta refers to string {0}, which it does not hold")]
    DeltaString(u32),
    #[error("engine delta of version {OLD_DELTA_VERSION} carries no aggregates: the engine it applies to must be restored from its log instead")]
    DeltaWithoutFigures,
}

/// Version 7 stores the catalog and the aggregates before the sessions, so that a copy
/// of them ([`AggregateCopy`]) reads a snapshot without its sessions. Version 6 (the
/// sessions first) still restores.
const SNAPSHOT_VERSION: u32 = 7;
const OLD_SNAPSHOT_VERSION: u32 = 6;

/// Below this many names, [`Engine::collect_names_if_due`] does not collect.
pub const NAMES_MIN: usize = 4096;

/// Old symbols to those of fresh interners that take only the names still referred to.
struct Renumber {
    old_strings: Interner<str>,
    old_sequences: Interner<[Sym]>,
    strings: Interner<str>,
    sequences: Interner<[Sym]>,
    string_map: FxHashMap<Sym, Sym>,
    sequence_map: FxHashMap<Sym, Sym>,
}

impl Renumber {
    fn new(old_strings: Interner<str>, old_sequences: Interner<[Sym]>) -> Renumber {
        Renumber {
            old_strings,
            old_sequences,
            strings: Interner::default(),
            sequences: Interner::default(),
            string_map: FxHashMap::default(),
            sequence_map: FxHashMap::default(),
        }
    }

    fn string(&mut self, s: Sym) -> Sym {
        *self.string_map.entry(s).or_insert_with(|| self.strings.intern(self.old_strings.get(s)))
    }

    fn sequence(&mut self, s: Sym) -> Sym {
        if let Some(&t) = self.sequence_map.get(&s) {
            return t;
        }
        let old = std::mem::take(&mut self.old_sequences);
        let renumbered: Vec<Sym> = old.get(s).iter().map(|&x| self.string(x)).collect();
        self.old_sequences = old;
        let t = self.sequences.intern(&renumbered);
        self.sequence_map.insert(s, t);
        t
    }
}

/// Maps one engine's symbols to another's; valid as long as both live and neither
/// collects its names (a collecting engine resets the map it forwards with).
#[derive(Default)]
struct Translation {
    strings: FxHashMap<Sym, Sym>,
    sequences: FxHashMap<Sym, Sym>,
}

impl Translation {
    fn string(&mut self, from: &Interner<str>, to: &mut Interner<str>, s: Sym) -> Sym {
        *self.strings.entry(s).or_insert_with(|| to.intern(from.get(s)))
    }

    fn sequence(&mut self, from: (&Interner<str>, &Interner<[Sym]>), to: (&mut Interner<str>, &mut Interner<[Sym]>), s: Sym) -> Sym {
        if let Some(&t) = self.sequences.get(&s) {
            return t;
        }
        let translated: Vec<Sym> = from.1.get(s).iter().map(|&x| self.string(from.0, to.0, x)).collect();
        let t = to.1.intern(&translated);
        self.sequences.insert(s, t);
        t
    }

    fn contribution(&mut self, from: (&Interner<str>, &Interner<[Sym]>), to: (&mut Interner<str>, &mut Interner<[Sym]>), c: &Contribution) -> Contribution {
        Contribution {
            pattern: self.sequence(from, (&mut *to.0, &mut *to.1), c.pattern),
            failed_tools: c.failed_tools.iter().map(|&t| self.string(from.0, to.0, t)).collect(),
            ..c.clone()
        }
    }

    /// Adds (`sign = 1`) or subtracts `figures`, whose symbols are those of `from`, to
    /// `into`, whose symbols are those of `to`.
    fn absorb(
        &mut self,
        from: (&Interner<str>, &Interner<[Sym]>),
        to: (&mut Interner<str>, &mut Interner<[Sym]>),
        figures: &Aggregates,
        sign: i64,
        into: &mut Aggregates,
        keep: impl FnMut(Sym) -> bool,
    ) {
        let (strings, sequences) = to;
        into.absorb_where(
            figures,
            sign,
            |kind, s| match kind {
                SymKind::String => self.string(from.0, strings, s),
                SymKind::Sequence => self.sequence(from, (&mut *strings, &mut *sequences), s),
            },
            keep,
        );
    }

    /// Adds the patterns of `figures` of the users `keep` takes (its agents are in `into` already).
    fn absorb_patterns(
        &mut self,
        from: (&Interner<str>, &Interner<[Sym]>),
        to: (&mut Interner<str>, &mut Interner<[Sym]>),
        figures: &Aggregates,
        into: &mut Aggregates,
        keep: impl FnMut(Sym) -> bool,
    ) {
        let (strings, sequences) = to;
        into.absorb_patterns(
            figures,
            1,
            &mut |kind, s| match kind {
                SymKind::String => self.string(from.0, strings, s),
                SymKind::Sequence => self.sequence(from, (&mut *strings, &mut *sequences), s),
            },
            keep,
        );
    }

    /// The Agent items of `catalog` (symbols of `from`) in the symbols of `to`.
    fn catalog(&mut self, from: &Interner<str>, catalog: &FxHashMap<Sym, AgentSlot>, to: &mut Interner<str>) -> Vec<(Sym, AgentMeta)> {
        let metas = catalog.iter().filter_map(|(&agent, slot)| Some((agent, slot.meta.as_ref()?)));
        metas.map(|(agent, m)| (self.string(from, to, agent), AgentMeta { domain: self.string(from, to, m.domain), name: m.name.clone() })).collect()
    }
}

/// Where a flush puts the contribution deltas: always into the delta being tracked, and
/// into this engine's aggregates (and a merged view's), or aside for another thread.
enum FlushTo<'a> {
    Own,
    Global(&'a mut Engine),
    Aside(&'a mut Contributions),
}

/// The `ToolNM`s of a contribution's rows: the second half of its pattern sequence.
fn tools_of<'a>(sequences: &'a Interner<[Sym]>, c: &Contribution) -> &'a [Sym] {
    let seq = sequences.get(c.pattern);
    &seq[seq.len() / 2..]
}

/// The incremental engine. See the crate docs.
#[derive(Default, Serialize, Deserialize)]
pub struct Engine {
    // Serialized in this order: what an [`AggregateCopy`] reads first, the sessions last.
    strings: Interner<str>,
    sequences: Interner<[Sym]>,
    catalog: FxHashMap<Sym, AgentSlot>,
    aggregates: Aggregates,
    sks: Vec<SkParts>,
    sk_index: Interner<str>,
    sessions: Vec<Session>,
    /// Slots of `sessions`, hashed by their PK.
    #[serde(skip)]
    session_index: HashTable<u32>,
    /// Slots of `sessions` that hold no session, reused first.
    #[serde(skip)]
    free: Vec<u32>,
    /// What tombstones are stamped with ([`Engine::set_clock`]).
    #[serde(skip)]
    clock: u32,
    /// The clock at the last sweep of [`Engine::expire_tombstones`].
    #[serde(skip)]
    swept_at: u32,
    #[serde(skip)]
    dirty: Vec<u32>,
    /// Agent items changed since the last flush (forwarded by [`Engine::flush_into`]).
    #[serde(skip)]
    catalog_changes: Vec<Sym>,
    /// Agents whose catalog entry changed, when tracking ([`Engine::take_changes`]).
    #[serde(skip)]
    catalog_touched: Option<FxHashSet<Sym>>,
    /// Our symbols to those of the engine [`Engine::flush_into`] forwards to.
    #[serde(skip)]
    forward: Translation,
    /// Names kept by the last [`Engine::collect_names`].
    #[serde(skip)]
    names_kept: usize,
    /// Sessions dropped since then: only they free names (a user's, above all).
    #[serde(skip)]
    dropped_since_collected: usize,
    /// What changed since the last [`Engine::delta_saved`], when tracking.
    #[serde(skip)]
    delta: Option<DeltaTracker>,
    /// The last `ToolNM` symbol of a row of each SK ([`Engine::tool_nm`]).
    #[serde(skip)]
    sk_tool_nm: Vec<Sym>,
    /// The sink shards a merged view keeps the patterns of; all without.
    #[serde(skip)]
    shards: Option<Shards>,
}

/// A snapshot of version 6: the same state, the sessions before the aggregates.
#[derive(Deserialize)]
struct EngineV6 {
    strings: Interner<str>,
    sequences: Interner<[Sym]>,
    sks: Vec<SkParts>,
    sk_index: Interner<str>,
    sessions: Vec<Session>,
    catalog: FxHashMap<Sym, AgentSlot>,
    aggregates: Aggregates,
}

/// What a copy of the aggregates reads of a snapshot: its beginning.
#[derive(Deserialize)]
struct SnapshotFigures {
    strings: Interner<str>,
    sequences: Interner<[Sym]>,
    catalog: FxHashMap<Sym, AgentSlot>,
    aggregates: Aggregates,
}

/// Sessions (by slot) and Agent items whose stored state changed, and what that did to
/// the aggregates.
#[derive(Default)]
struct DeltaTracker {
    sessions: FxHashSet<u32>,
    /// PKs of sessions dropped since: a receiver drops them too.
    dropped: FxHashSet<Box<str>>,
    catalog: FxHashSet<Sym>,
    /// The aggregates now minus those of the log's head: the flushed contribution
    /// changes since, less the figures of others' deltas applied since.
    figures: Aggregates,
}

/// Version 3 carries the aggregates' difference beside the sessions; version 2 (without
/// it) still applies to an engine that does not track deltas.
const DELTA_VERSION: u32 = 3;
const OLD_DELTA_VERSION: u32 = 2;

/// The new state of the sessions and Agent items a delta covers, by value (symbols are
/// each engine's own): a session's rows replace the receiver's, so removals carry over.
/// Beside them, what those changes did to the aggregates (`agents`, `patterns`: the
/// difference, which adds up along the log), so that a copy of the aggregates follows the
/// log without the sessions. Users, SKs, tool names and pattern sequences are indexes
/// into the delta's own `strings` and `sequences`, each written once: they repeat, and a
/// delta's bytes are what a checkpoint pays for. Sequence numbers are offsets from
/// `seq_base`, the delta's least: a few bytes each instead of a 21-digit number's eleven.
/// The sessions come last: a copy of the aggregates reads only the [`DeltaHead`].
#[derive(Serialize, Deserialize)]
struct Delta<'a> {
    #[serde(borrow)]
    head: DeltaHead<'a>,
    #[serde(borrow)]
    sessions: Vec<SessionState<'a>>,
}

/// A delta without its sessions (postcard writes a nested struct's fields in place).
#[derive(Serialize, Deserialize)]
struct DeltaHead<'a> {
    seq_base: u128,
    #[serde(borrow)]
    strings: Vec<&'a str>,
    sequences: Vec<Vec<u32>>,
    #[serde(borrow)]
    catalog: Vec<CatalogState<'a>>,
    agents: Vec<AgentChange>,
    patterns: Vec<PatternChange>,
}

impl Delta<'_> {
    fn is_empty(&self) -> bool {
        let h = &self.head;
        self.sessions.is_empty() && h.catalog.is_empty() && h.agents.is_empty() && h.patterns.is_empty()
    }
}

/// A delta of version 2: sessions and catalog only.
#[derive(Deserialize)]
struct DeltaV2<'a> {
    seq_base: u128,
    #[serde(borrow)]
    strings: Vec<&'a str>,
    #[serde(borrow)]
    sessions: Vec<SessionState<'a>>,
    #[serde(borrow)]
    catalog: Vec<CatalogState<'a>>,
}

/// An agent's aggregate difference; strings are indexes into the delta's.
#[derive(Serialize, Deserialize)]
struct AgentChange {
    agent: u32,
    executions: i64,
    successes: i64,
    last_days: Vec<(Day, i64)>,
    rows: i64,
    failed_rows: i64,
    failed_tools: Vec<(u32, i64)>,
    tools: Vec<(u32, i64)>,
}

/// A pattern's aggregate difference; `sequence` indexes the delta's `sequences`.
#[derive(Serialize, Deserialize)]
struct PatternChange {
    user: u32,
    agent: u32,
    sequence: u32,
    executions: i64,
    successes: i64,
    first_days: Vec<(Day, i64)>,
    last_days: Vec<(Day, i64)>,
}

#[derive(Serialize, Deserialize)]
struct SessionState<'a> {
    pk: &'a str,
    user: u32,
    rows: Vec<RowState>,
}

#[derive(Serialize, Deserialize)]
struct RowState {
    sk: u32,
    /// Above the delta's `seq_base`.
    seq: Option<u128>,
    /// ToolNM, TransactDT packed, success.
    data: Option<(u32, u64, bool)>,
    removed: u32,
}

/// The string and sequence tables of a delta being written.
#[derive(Default)]
struct DeltaStrings<'a> {
    index: FxHashMap<&'a str, u32>,
    strings: Vec<&'a str>,
    sequence_index: FxHashMap<Sym, u32>,
    sequences: Vec<Vec<u32>>,
    /// Bytes the tables add to the delta.
    bytes: usize,
}

/// Postcard's size of a varint of `n`.
fn varint_len(n: usize) -> usize {
    (usize::BITS - n.leading_zeros()).div_ceil(7).max(1) as usize
}

impl<'a> DeltaStrings<'a> {
    fn index(&mut self, s: &'a str) -> u32 {
        *self.index.entry(s).or_insert_with(|| {
            self.strings.push(s);
            // Postcard: the length as a varint, then the bytes.
            self.bytes += s.len() + varint_len(s.len());
            self.strings.len() as u32 - 1
        })
    }

    /// The index of the engine's pattern sequence `seq`, its strings in the string table.
    fn sequence(&mut self, strings: &'a Interner<str>, sequences: &Interner<[Sym]>, seq: Sym) -> u32 {
        if let Some(&i) = self.sequence_index.get(&seq) {
            return i;
        }
        let entries: Vec<u32> = sequences.get(seq).iter().map(|&x| self.index(strings.get(x))).collect();
        self.bytes += varint_len(entries.len()) + entries.iter().map(|&e| varint_len(e as usize)).sum::<usize>();
        self.sequences.push(entries);
        let i = self.sequences.len() as u32 - 1;
        self.sequence_index.insert(seq, i);
        i
    }
}

/// One entry of a delta being written.
enum DeltaEntry<'a> {
    Agent(AgentChange),
    Pattern(PatternChange),
    Session(SessionState<'a>),
}

impl DeltaEntry<'_> {
    fn size(&self) -> usize {
        match self {
            DeltaEntry::Agent(a) => postcard::experimental::serialized_size(a),
            DeltaEntry::Pattern(p) => postcard::experimental::serialized_size(p),
            DeltaEntry::Session(s) => postcard::experimental::serialized_size(s),
        }
        .unwrap_or(0)
    }
}

/// What a delta entry is built from.
#[derive(Clone, Copy)]
enum DeltaSource<'a> {
    Agent(Sym),
    Pattern(PatternKey),
    /// A session's PK and its slot (`None`: dropped).
    Session(&'a str, Option<u32>),
}

#[derive(Serialize, Deserialize)]
struct CatalogState<'a> {
    agent: &'a str,
    seq: Option<Seq>,
    /// DomainID and name; `None`: no Agent item (a removal's tombstone).
    meta: Option<(&'a str, Option<&'a str>)>,
}

/// What changed in a tracking engine since the last [`Engine::take_changes`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Agents whose figures or catalog entry changed.
    pub agents: Vec<Sym>,
    /// Patterns whose figures or visibility changed.
    pub patterns: Vec<PatternKey>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty() && self.patterns.is_empty()
    }

    /// Agents and patterns changed.
    pub fn len(&self) -> usize {
        self.agents.len() + self.patterns.len()
    }
}

impl Engine {
    pub fn new() -> Engine {
        Engine::default()
    }

    /// Makes room for `additional` more sessions at once: growing the session table step
    /// by step copies it and rehashes its index each time, into memory never touched before.
    pub fn reserve_sessions(&mut self, additional: usize) {
        self.sessions.reserve(additional);
        self.session_index.reserve(additional, slot_hash(&self.sessions));
    }

    /// Applies one change to the table state. Aggregates follow at the next [`flush`](Self::flush).
    pub fn apply(&mut self, change: &Change<'_>) -> Applied {
        let hash = FxBuildHasher.hash_one(change.pk.as_ref());
        let session = self.find_session(&change.pk, hash);
        // A held session's PK and an interned SK each passed `HistKey::parse` when first
        // seen: most records, which have both, skip parsing their key again.
        if let Some(sk) = session.and_then(|_| self.sk_index.lookup(&change.sk)) {
            return self.apply_hist(sk, session, hash, "", change);
        }
        match HistKey::parse(&change.pk, &change.sk) {
            Ok(key) => {
                let sk = self.intern_sk(&change.sk, &key);
                self.apply_hist(sk, session, hash, key.user, change)
            }
            Err(_) if change.sk == METADATA_SK => self.apply_metadata(change),
            Err(_) => Applied::Ignored,
        }
    }

    /// Applies a hist item's change to the row `sk` of the session with PK hash `hash`, at
    /// `session` if held (else a new session of `user`).
    fn apply_hist(&mut self, sk: Sym, session: Option<u32>, hash: u64, user: &str, change: &Change<'_>) -> Applied {
        let seq = change.seq.map(Seq::from);
        let data = match &change.action {
            Action::Put(Entity::Execution(e)) => Some(RowData { tool_nm: self.tool_nm(sk, &e.tool_nm), at: e.at, success: e.success }),
            Action::Put(_) | Action::Delete { .. } => None,
        };
        let agent = self.sks[sk as usize].agent;
        let idx = match session {
            Some(i) => i,
            None if data.is_none() && seq.is_none() => return Applied::Unchanged,
            None => self.add_session(&change.pk, hash, user),
        };
        let s = &mut self.sessions[idx as usize];
        let applied = match s.rows.iter().position(|r| r.sk == sk) {
            // A backfilled copy never replaces what the key holds, a tombstone included.
            Some(_) if change.seq == Some(BASE_SEQ) => return Applied::Stale,
            Some(i) => {
                let row = &mut s.rows[i];
                if let (Some(new), Some(old)) = (seq, row.seq) {
                    if new <= old {
                        return Applied::Stale;
                    }
                }
                row.seq = seq.or(row.seq);
                let changed = row.data != data;
                row.removed = if data.is_none() { self.clock } else { 0 };
                row.data = data;
                if row.data.is_none() && row.seq.is_none() {
                    s.rows.swap_remove(i);
                }
                if changed {
                    Applied::Changed
                } else {
                    Applied::Unchanged
                }
            }
            None => {
                let removed = if data.is_none() { self.clock } else { 0 };
                // Sessions hold a few rows: a vector's default first capacity of four
                // would leave a quarter to half of it unused.
                s.rows.reserve_exact(1);
                s.rows.push(Row { sk, removed, seq, data });
                if data.is_some() {
                    Applied::Changed
                } else {
                    Applied::Unchanged
                }
            }
        };
        if applied == Applied::Changed {
            mark_dirty(&mut self.dirty, idx, s, agent);
        }
        if let Some(d) = &mut self.delta {
            d.sessions.insert(idx);
        }
        applied
    }

    /// The symbol of `name`, the `ToolNM` of a row of `sk`: the SK's last one when that
    /// is the same name (nearly always: an SK names its tool), found without hashing it.
    /// Checked by value, so it holds across renumbered names.
    fn tool_nm(&mut self, sk: Sym, name: &str) -> Sym {
        if let Some(&last) = self.sk_tool_nm.get(sk as usize) {
            if (last as usize) < self.strings.len() && *self.strings.get(last) == *name {
                return last;
            }
        }
        let sym = self.strings.intern(name);
        if self.sk_tool_nm.len() <= sk as usize {
            self.sk_tool_nm.resize(sk as usize + 1, Sym::MAX);
        }
        self.sk_tool_nm[sk as usize] = sym;
        sym
    }

    fn apply_metadata(&mut self, change: &Change<'_>) -> Applied {
        let seq = change.seq.map(Seq::from);
        let agent_item = match &change.action {
            Action::Put(Entity::Agent(a)) => Some(a),
            Action::Put(_) | Action::Delete { .. } => None,
        };
        let id = match (agent_item, seq, self.strings.lookup(&change.pk)) {
            (None, None, None) => return Applied::Ignored,
            (_, _, Some(id)) => id,
            _ => self.strings.intern(&change.pk),
        };
        let new_meta = agent_item.map(|a| AgentMeta { domain: self.strings.intern(&a.domain_id), name: a.name.as_deref().map(Into::into) });
        let slot = match self.catalog.get_mut(&id) {
            Some(_) if change.seq == Some(BASE_SEQ) => return Applied::Stale,
            Some(slot) => slot,
            None if new_meta.is_none() && seq.is_none() => return Applied::Ignored,
            None => self.catalog.entry(id).or_default(),
        };
        if let (Some(new), Some(old)) = (seq, slot.seq) {
            if new <= old {
                return Applied::Stale;
            }
        }
        slot.seq = seq.or(slot.seq);
        if let Some(d) = &mut self.delta {
            d.catalog.insert(id);
        }
        let new_meta = match (new_meta, agent_item.is_some_and(|a| a.partial), &slot.meta) {
            (Some(mut m), true, Some(old)) if m.name.is_none() => {
                m.name = old.name.clone();
                Some(m)
            }
            (m, _, _) => m,
        };
        if slot.meta == new_meta {
            return if agent_item.is_some() { Applied::Unchanged } else { Applied::Ignored };
        }
        slot.meta = new_meta;
        if slot.meta.is_none() && slot.seq.is_none() {
            self.catalog.remove(&id);
        }
        self.catalog_changed(id);
        Applied::Changed
    }

    fn catalog_changed(&mut self, id: Sym) {
        self.catalog_changes.push(id);
        // A tracking engine fed directly (not only through `flush_into`) sees its own
        // catalog changes too: they change which patterns are visible.
        if let Some(t) = &mut self.catalog_touched {
            t.insert(id);
        }
    }

    /// Starts recording which sessions and Agent items change, for
    /// [`delta`](Self::delta). The engine must hold its log's head (a new engine, or one
    /// just restored from its log); its pending changes are flushed first, as part of it.
    pub fn track_deltas(&mut self) {
        if self.delta.is_none() {
            self.flush();
            self.delta = Some(DeltaTracker::default());
        }
    }

    /// The state of every session and Agent item changed since tracking started or the
    /// last [`delta_saved`](Self::delta_saved), with what it did to the aggregates, as
    /// deltas for [`apply_delta`](Self::apply_delta) (and [`AggregateCopy::apply_delta`])
    /// of about `max_bytes` at most each (a single session larger than that gets one of
    /// its own); empty when nothing changed. Lets a checkpoint store what one batch
    /// changed instead of everything.
    ///
    /// It flushes first, without forwarding: an engine that forwards into a merged one
    /// must [`flush_into`](Self::flush_into) it first, like before a
    /// [`snapshot`](Self::snapshot).
    pub fn delta(&mut self, max_bytes: usize) -> Vec<Vec<u8>> {
        self.delta_within(max_bytes, usize::MAX).expect("no limit")
    }

    /// [`delta`](Self::delta), or `None` as soon as the changes add up to more than
    /// `limit` bytes: a caller that would rather save everything then (a delta as large
    /// as the state) does not pay for serializing them first.
    pub fn delta_within(&mut self, max_bytes: usize, limit: usize) -> Option<Vec<Vec<u8>>> {
        // The figures must cover the sessions' rows: a new owner restoring this log
        // counts them, and would never send what a copy of the aggregates missed.
        self.flush();
        let Some(d) = &self.delta else { return Some(Vec::new()) };
        let mut sessions: Vec<u32> = d.sessions.iter().copied().collect();
        sessions.sort_unstable();
        let mut catalog: Vec<Sym> = d.catalog.iter().copied().collect();
        catalog.sort_unstable();
        let strings = &self.strings;
        let catalog: Vec<CatalogState> = catalog
            .iter()
            .map(|&id| {
                let slot = self.catalog.get(&id);
                CatalogState {
                    agent: strings.get(id),
                    seq: slot.and_then(|s| s.seq),
                    meta: slot.and_then(|s| s.meta.as_ref()).map(|m| (strings.get(m.domain), m.name.as_deref())),
                }
            })
            .collect();
        let seq_base = least_seq(sessions.iter().flat_map(|&i| &self.sessions[i as usize].rows));
        let mut out = Vec::new();
        let empty = |catalog| Delta {
            head: DeltaHead { seq_base, strings: Vec::new(), sequences: Vec::new(), catalog, agents: Vec::new(), patterns: Vec::new() },
            sessions: Vec::new(),
        };
        let mut part = empty(catalog);
        let mut table = DeltaStrings::default();
        let mut bytes = postcard::experimental::serialized_size(&part.head.catalog).unwrap_or(0);
        let mut total = bytes;
        let mut agents: Vec<Sym> = d.figures.agents.keys().copied().collect();
        agents.sort_unstable();
        let mut patterns: Vec<PatternKey> = d.figures.patterns.keys().copied().collect();
        patterns.sort_unstable();
        let sources = agents.into_iter().map(DeltaSource::Agent).chain(patterns.into_iter().map(DeltaSource::Pattern));
        // Dropped sessions first (no rows): a session of the same PK made since replaces nothing.
        let dropped = d.dropped.iter().map(|pk| DeltaSource::Session(pk, None));
        let current = sessions.iter().map(|&i| DeltaSource::Session(&self.sessions[i as usize].pk, Some(i)));
        for source in sources.chain(dropped).chain(current) {
            let strings_before = table.bytes;
            let mut entry = self.delta_entry(source, seq_base, &mut table);
            let mut size = entry.size() + table.bytes - strings_before;
            if bytes + size > max_bytes && !part.is_empty() {
                // A new part, with tables of its own.
                (part.head.strings, part.head.sequences) = {
                    let t = std::mem::take(&mut table);
                    (t.strings, t.sequences)
                };
                out.push(versioned(DELTA_VERSION, &std::mem::replace(&mut part, empty(Vec::new()))));
                bytes = 0;
                entry = self.delta_entry(source, seq_base, &mut table);
                size = entry.size() + table.bytes;
            }
            total += size;
            if total > limit {
                return None;
            }
            bytes += size;
            match entry {
                DeltaEntry::Agent(a) => part.head.agents.push(a),
                DeltaEntry::Pattern(p) => part.head.patterns.push(p),
                DeltaEntry::Session(s) => part.sessions.push(s),
            }
        }
        if !part.is_empty() {
            (part.head.strings, part.head.sequences) = (table.strings, table.sequences);
            out.push(versioned(DELTA_VERSION, &part));
        }
        Some(out)
    }

    /// A delta's entry for `source`, its strings and sequences in `table`.
    fn delta_entry<'e>(&'e self, source: DeltaSource<'e>, seq_base: u128, table: &mut DeltaStrings<'e>) -> DeltaEntry<'e> {
        let figures = &self.delta.as_ref().expect("tracking").figures;
        let strings = &self.strings;
        let syms = |map: &BTreeMap<Sym, i64>, table: &mut DeltaStrings<'e>| map.iter().map(|(&t, &n)| (table.index(strings.get(t)), n)).collect();
        match source {
            DeltaSource::Agent(agent) => {
                let a = &figures.agents[&agent];
                DeltaEntry::Agent(AgentChange {
                    agent: table.index(strings.get(agent)),
                    executions: a.executions,
                    successes: a.successes,
                    last_days: a.last_days.0.to_vec(),
                    rows: a.rows,
                    failed_rows: a.failed_rows,
                    failed_tools: syms(&a.failed_tools, table),
                    tools: syms(&a.tools, table),
                })
            }
            DeltaSource::Pattern(key) => {
                let p = &figures.patterns[&key];
                DeltaEntry::Pattern(PatternChange {
                    user: table.index(strings.get(key.user)),
                    agent: table.index(strings.get(key.agent)),
                    sequence: table.sequence(strings, &self.sequences, key.sequence),
                    executions: p.executions,
                    successes: p.successes,
                    first_days: p.first_days.0.to_vec(),
                    last_days: p.last_days.0.to_vec(),
                })
            }
            DeltaSource::Session(pk, slot) => DeltaEntry::Session(self.delta_session(pk, slot, seq_base, table)),
        }
    }

    /// Session `pk` (at `slot`; `None`: dropped) as a delta holds it, its strings in `table`.
    fn delta_session<'e>(&'e self, pk: &'e str, slot: Option<u32>, seq_base: u128, table: &mut DeltaStrings<'e>) -> SessionState<'e> {
        let Some(i) = slot else { return SessionState { pk, user: 0, rows: Vec::new() } };
        let s = &self.sessions[i as usize];
        let rows = s
            .rows
            .iter()
            .map(|r| RowState {
                sk: table.index(self.sk_index.get(r.sk)),
                seq: r.seq.map(|s| u128::from(s) - seq_base),
                data: r.data.map(|d| (table.index(self.strings.get(d.tool_nm)), d.at.packed, d.success)),
                removed: r.removed,
            })
            .collect();
        SessionState { pk, user: table.index(self.strings.get(s.user)), rows }
    }

    /// Forgets what [`delta`](Self::delta) returned: it is stored.
    pub fn delta_saved(&mut self) {
        if let Some(d) = &mut self.delta {
            *d = DeltaTracker::default();
        }
    }

    /// Sets the time (seconds; 0 stamps nothing) that removals applied from now on are
    /// stamped with, for [`expire_tombstones`](Self::expire_tombstones).
    pub fn set_clock(&mut self, now: u32) {
        self.clock = now;
    }

    /// Forgets tombstones stamped more than `horizon` seconds before the clock, and the
    /// sessions left without rows; returns how many tombstones went. A tombstone is what
    /// refuses a late copy of a record older than the removal (a redelivery), so memory
    /// stays bounded by the live items plus the removals of the last `horizon`, and a
    /// copy delivered later than that after the removal would count again: `horizon`
    /// must cover the input's redelivery window. Sweeps at most every sixteenth of the
    /// horizon (a tombstone lives up to 1/16 longer); dropped sessions reach deltas.
    pub fn expire_tombstones(&mut self, horizon: u32) -> usize {
        if self.clock == 0 || self.clock < self.swept_at.saturating_add((horizon / 16).max(1)) {
            return 0;
        }
        self.swept_at = self.clock;
        let before = self.clock.saturating_sub(horizon);
        let mut expired = 0;
        let mut emptied = Vec::new();
        for (i, s) in self.sessions.iter_mut().enumerate() {
            let n = s.rows.len();
            s.rows.retain(|r| r.data.is_some() || r.removed == 0 || r.removed >= before);
            if s.rows.len() == n {
                continue;
            }
            expired += n - s.rows.len();
            if let Some(d) = &mut self.delta {
                d.sessions.insert(i as u32);
            }
            if s.rows.is_empty() && s.committed.is_empty() && s.dirty.is_empty() {
                emptied.push(i as u32);
            }
        }
        for i in emptied {
            self.drop_session(i);
        }
        expired
    }

    /// Forgets the interned names (user IDs above all: they keep coming) that nothing
    /// in the state refers to any more, once there are as many again as were kept at the
    /// last collection (at least [`NAMES_MIN`]) and sessions were dropped since (a
    /// growing state, a backlog's, frees none): amortized, a name costs O(1) to collect.
    /// Returns how many went. See [`collect_names`](Self::collect_names).
    pub fn collect_names_if_due(&mut self) -> usize {
        if self.dropped_since_collected == 0 || self.strings.len() < (2 * self.names_kept).max(NAMES_MIN) {
            return 0;
        }
        self.collect_names()
    }

    /// Renumbers the names still referred to (by sessions, SKs, contributions, the
    /// catalog, the aggregates) into fresh interners, so that those of expired or removed
    /// sessions stop costing memory; returns how many went. Results are unchanged.
    /// Symbols are this engine's own: the engine it forwards to learns the new ones at
    /// the next flush, but anything else holding this engine's symbols (a [`Changes`] of
    /// a tracking engine, a sink's record of it) must not outlive this call: collect
    /// units, not a merged view with sinks behind it.
    pub fn collect_names(&mut self) -> usize {
        let before = self.strings.len();
        let mut r = Renumber::new(std::mem::take(&mut self.strings), std::mem::take(&mut self.sequences));
        for p in &mut self.sks {
            *p = SkParts { process: r.string(p.process), agent: r.string(p.agent), tool: r.string(p.tool) };
        }
        for s in self.sessions.iter_mut().filter(|s| !s.pk.is_empty()) {
            s.user = r.string(s.user);
            for d in s.rows.iter_mut().filter_map(|row| row.data.as_mut()) {
                d.tool_nm = r.string(d.tool_nm);
            }
            for (agent, c) in &mut s.committed {
                *agent = r.string(*agent);
                c.pattern = r.sequence(c.pattern);
                for t in c.failed_tools.iter_mut() {
                    *t = r.string(*t);
                }
            }
            for agent in &mut s.dirty {
                *agent = r.string(*agent);
            }
        }
        self.catalog = std::mem::take(&mut self.catalog)
            .into_iter()
            .map(|(agent, mut slot)| {
                if let Some(m) = &mut slot.meta {
                    m.domain = r.string(m.domain);
                }
                (r.string(agent), slot)
            })
            .collect();
        for agent in &mut self.catalog_changes {
            *agent = r.string(*agent);
        }
        if let Some(t) = &mut self.catalog_touched {
            *t = t.drain().map(|a| r.string(a)).collect();
        }
        let mut renumber = |kind, s| match kind {
            SymKind::String => r.string(s),
            SymKind::Sequence => r.sequence(s),
        };
        if let Some(d) = &mut self.delta {
            d.catalog = d.catalog.drain().map(|a| renumber(SymKind::String, a)).collect();
            d.figures.renumber(&mut renumber);
        }
        self.aggregates.renumber(&mut renumber);
        (self.strings, self.sequences) = (r.strings, r.sequences);
        self.forward = Translation::default();
        self.names_kept = self.strings.len();
        self.dropped_since_collected = 0;
        before - self.names_kept
    }

    /// Frees the slot of a session without rows or contributions.
    fn drop_session(&mut self, idx: u32) {
        self.dropped_since_collected += 1;
        let s =
            std::mem::replace(&mut self.sessions[idx as usize], Session { pk: "".into(), user: 0, rows: Vec::new(), committed: Vec::new(), dirty: Vec::new() });
        debug_assert!(s.rows.is_empty() && s.committed.is_empty() && s.dirty.is_empty());
        if let Ok(entry) = self.session_index.find_entry(FxBuildHasher.hash_one(&*s.pk), |&i| i == idx) {
            entry.remove();
        }
        self.free.push(idx);
        if let Some(d) = &mut self.delta {
            d.sessions.remove(&idx);
            d.dropped.insert(s.pk);
        }
    }

    /// Brings this engine to the state of the engine a delta was taken from, given that
    /// it held that engine's state as of the delta before (the deltas of one log, applied
    /// in order, on its base). Aggregates follow at the next [`flush`](Self::flush). Not
    /// recorded by this engine's own tracking.
    ///
    /// An engine that tracks deltas (one that appends to a shared log, like a Lambda
    /// bucket's) takes the delta's aggregate difference out of its own: what it appends
    /// next is its state's difference from this delta's.
    pub fn apply_delta(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let (version, body) = version_of(bytes, StateError::DeltaVersion)?;
        let (seq_base, strings, sessions, catalog) = match version {
            DELTA_VERSION => {
                let Delta { head, sessions } = postcard::from_bytes(body)?;
                // Only a tracking engine keeps a difference to take them out of: restoring
                // a log does not read the figures.
                if let Some(d) = &mut self.delta {
                    let figures = figures_of(&mut self.strings, &mut self.sequences, &head, |_| true)?;
                    d.figures.absorb(&figures, -1, |_, s| s);
                }
                (head.seq_base, head.strings, sessions, head.catalog)
            }
            OLD_DELTA_VERSION if self.delta.is_some() => return Err(StateError::DeltaWithoutFigures),
            OLD_DELTA_VERSION => {
                let delta: DeltaV2 = postcard::from_bytes(body)?;
                (delta.seq_base, delta.strings, delta.sessions, delta.catalog)
            }
            other => return Err(StateError::DeltaVersion(other)),
        };
        for session in sessions {
            self.replace_session(&strings, seq_base, session)?;
        }
        self.apply_catalog(catalog);
        Ok(())
    }

    /// The Agent items of a delta.
    fn apply_catalog(&mut self, catalog: Vec<CatalogState<'_>>) {
        for c in catalog {
            let id = self.strings.intern(c.agent);
            let meta = c.meta.map(|(domain, name)| AgentMeta { domain: self.strings.intern(domain), name: name.map(Into::into) });
            let old = self.catalog.get(&id).and_then(|s| s.meta.clone());
            if c.seq.is_none() && meta.is_none() {
                self.catalog.remove(&id);
            } else {
                *self.catalog.entry(id).or_default() = AgentSlot { seq: c.seq, meta: meta.clone() };
            }
            if old != meta {
                self.catalog_changed(id);
            }
        }
    }

    fn replace_session(&mut self, strings: &[&str], seq_base: u128, state: SessionState<'_>) -> Result<(), StateError> {
        let string = |i: u32| strings.get(i as usize).copied().ok_or(StateError::DeltaString(i));
        let mut rows = Vec::with_capacity(state.rows.len());
        for r in state.rows {
            let sk = string(r.sk)?;
            let key = HistKey::parse(state.pk, sk).map_err(|_| StateError::DeltaKey(format!("{}/{sk}", state.pk)))?;
            let data = match r.data {
                Some((tool_nm, at, success)) => {
                    let at = Timestamp::from_packed(at).ok_or_else(|| StateError::DeltaKey(format!("{}/{sk}: TransactDT {at}", state.pk)))?;
                    Some(RowData { tool_nm: self.strings.intern(string(tool_nm)?), at, success })
                }
                None => None,
            };
            let seq =
                r.seq.map(|offset| seq_at(seq_base, offset).ok_or_else(|| StateError::DeltaKey(format!("{}/{sk}: sequence number", state.pk)))).transpose()?;
            rows.push(Row { sk: self.intern_sk(sk, &key), removed: r.removed, seq, data });
        }
        if let Some(d) = &mut self.delta {
            // The state received supersedes a drop of ours not saved yet (a lost race).
            d.dropped.remove(state.pk);
        }
        let hash = FxBuildHasher.hash_one(state.pk);
        let idx = match self.find_session(state.pk, hash) {
            Some(i) => i,
            // A dropped session this engine never held.
            None if rows.is_empty() => return Ok(()),
            None => self.add_session(state.pk, hash, string(state.user)?),
        };
        let s = &mut self.sessions[idx as usize];
        let old = std::mem::replace(&mut s.rows, rows);
        // Every agent of the old or new rows is recomputed; an unchanged group's
        // contribution compares equal and moves nothing.
        let agents: Vec<Sym> = old.iter().chain(&s.rows).map(|r| self.sks[r.sk as usize].agent).collect();
        for agent in agents {
            mark_dirty(&mut self.dirty, idx, s, agent);
        }
        if s.rows.is_empty() && s.committed.is_empty() && s.dirty.is_empty() {
            self.drop_session(idx);
        }
        Ok(())
    }

    /// The slot of the session `pk` (its FxHash is `hash`), if the engine has it.
    fn find_session(&self, pk: &str, hash: u64) -> Option<u32> {
        let sessions = &self.sessions;
        self.session_index.find(hash, |&i| *sessions[i as usize].pk == *pk).copied()
    }

    /// Adds an empty session `pk` of `user` (its FxHash is `hash`); returns its slot.
    fn add_session(&mut self, pk: &str, hash: u64, user: &str) -> u32 {
        let user = self.strings.intern(user);
        let session = Session { pk: pk.into(), user, rows: Vec::new(), committed: Vec::new(), dirty: Vec::new() };
        let i = match self.free.pop() {
            Some(i) => {
                self.sessions[i as usize] = session;
                i
            }
            None => {
                self.sessions.push(session);
                self.sessions.len() as u32 - 1
            }
        };
        self.session_index.insert_unique(hash, i, slot_hash(&self.sessions));
        i
    }

    /// The symbol of a hist SK, its parts recorded when new.
    fn intern_sk(&mut self, sk: &str, key: &HistKey<'_>) -> Sym {
        let id = self.sk_index.intern(sk);
        if id as usize == self.sks.len() {
            let parts = SkParts { process: self.strings.intern(key.process), agent: self.strings.intern(key.agent), tool: self.strings.intern(key.tool) };
            self.sks.push(parts);
        }
        id
    }

    /// Turns every dirty (session, agent) group into contribution deltas on the aggregates.
    pub fn flush(&mut self) {
        self.flush_to(FlushTo::Own);
    }

    /// Flushes like [`flush`](Self::flush), but puts the contribution deltas into `out`
    /// instead of applying them to this engine's aggregates: another thread applies them
    /// ([`Contributions::apply_to`]) to aggregates that [`adopt_aggregates`](Self::adopt_aggregates)
    /// hands back, so that a replay's reading and summing run side by side.
    pub fn flush_aside(&mut self, out: &mut Contributions) {
        self.flush_to(FlushTo::Aside(out));
    }

    /// Adds aggregates built from this engine's [`flush_aside`](Self::flush_aside)
    /// batches (their symbols are this engine's) to its own.
    pub fn adopt_aggregates(&mut self, aggregates: Aggregates) {
        self.aggregates.add_all(aggregates);
    }

    /// Flushes, applying the same deltas and Agent item changes to `global` too: a merged
    /// view over the engines of several partitions, kept current without re-merging.
    /// Each engine must forward into one `global` only.
    pub fn flush_into(&mut self, global: &mut Engine) {
        self.flush_to(FlushTo::Global(global));
    }

    fn flush_to(&mut self, mut to: FlushTo<'_>) {
        let (mut rows, mut seq, mut emptied) = (Vec::new(), Vec::new(), Vec::new());
        for idx in std::mem::take(&mut self.dirty) {
            let s = &mut self.sessions[idx as usize];
            if s.rows.is_empty() {
                // Its last rows went without a tombstone (flat deletes, a dropped
                // session's delta): nothing is left once its contributions are.
                emptied.push(idx);
            }
            for agent in std::mem::take(&mut s.dirty) {
                let new = contribution(&self.strings, &mut self.sequences, &self.sks, &s.rows, agent, &mut rows, &mut seq);
                let old_pos = s.committed.iter().position(|(a, _)| *a == agent);
                if old_pos.map(|i| &s.committed[i].1) == new.as_ref() {
                    continue;
                }
                let old = old_pos.map(|i| s.committed.swap_remove(i).1);
                for (c, diff) in old.iter().map(|c| (c, -1)).chain(new.iter().map(|c| (c, 1))) {
                    let tools = tools_of(&self.sequences, c);
                    match &mut to {
                        FlushTo::Aside(out) => out.push(s.user, agent, c, tools, diff),
                        FlushTo::Own | FlushTo::Global(_) => self.aggregates.apply(s.user, agent, c, tools, diff),
                    }
                    if let Some(d) = &mut self.delta {
                        d.figures.apply(s.user, agent, c, tools, diff);
                    }
                    if let FlushTo::Global(g) = &mut to {
                        let from = (&self.strings, &self.sequences);
                        // A user of a shard the view does not keep is not even named there.
                        let keep = g.keeps(from.0.get(s.user));
                        let agent = self.forward.string(from.0, &mut g.strings, agent);
                        let user = if keep { self.forward.string(from.0, &mut g.strings, s.user) } else { agent };
                        let c = self.forward.contribution(from, (&mut g.strings, &mut g.sequences), c);
                        g.aggregates.apply_where(user, agent, &c, tools_of(&g.sequences, &c), diff, keep);
                    }
                }
                if let Some(new) = new {
                    // Sessions hold few agents: a vector's default first capacity of
                    // four would be most of a session's memory.
                    s.committed.reserve_exact(1);
                    s.committed.push((agent, new));
                }
            }
        }
        for idx in emptied {
            self.drop_session(idx);
        }
        match to {
            FlushTo::Global(g) => self.forward_catalog(g),
            FlushTo::Own | FlushTo::Aside(_) => self.catalog_changes.clear(),
        }
    }

    /// Sets the Agent items changed since the last flush in `global`.
    fn forward_catalog(&mut self, g: &mut Engine) {
        for id in std::mem::take(&mut self.catalog_changes) {
            let gid = self.forward.string(&self.strings, &mut g.strings, id);
            let meta = self
                .catalog
                .get(&id)
                .and_then(|slot| slot.meta.as_ref())
                .map(|m| AgentMeta { domain: self.forward.string(&self.strings, &mut g.strings, m.domain), name: m.name.clone() });
            g.set_meta(gid, meta);
        }
    }

    /// Sets or removes an agent's catalog entry in a merged view.
    fn set_meta(&mut self, id: Sym, meta: Option<AgentMeta>) {
        match meta {
            Some(meta) => self.catalog.entry(id).or_default().meta = Some(meta),
            None => {
                self.catalog.remove(&id);
            }
        }
        if let Some(t) = &mut self.catalog_touched {
            t.insert(id);
        }
    }

    /// Adds the results of an engine that consumed a disjoint part of the keys (another
    /// Kafka partition or stream shard): its aggregates are summed into ours and its
    /// Agent items joined into our catalog. Session state is not copied: the merged
    /// engine reports the combined tables, and each part keeps its own sessions.
    pub fn absorb(&mut self, other: &mut Engine) {
        self.merge(other, 1);
    }

    /// Takes back what [`absorb`](Self::absorb) added for `other` in the same state (a
    /// partition that moved to another consumer, or whose checkpoint is replaced). If
    /// `other` forwards into `self`, call [`flush_into`](Self::flush_into) first: a plain
    /// flush would take out deltas `self` never received.
    pub fn unabsorb(&mut self, other: &mut Engine) {
        self.merge(other, -1);
    }

    fn merge(&mut self, other: &mut Engine, sign: i64) {
        other.flush();
        self.flush();
        let mut map = Translation::default();
        for (id, meta) in map.catalog(&other.strings, &other.catalog, &mut self.strings) {
            self.set_meta(id, (sign > 0).then_some(meta));
        }
        self.add_figures(&mut map, (&other.strings, &other.sequences), &other.aggregates, sign);
    }

    /// Adds (`sign = 1`) or subtracts `figures`, whose symbols are those of `from`
    /// (mapped into ours through `map`).
    fn add_figures(&mut self, map: &mut Translation, from: (&Interner<str>, &Interner<[Sym]>), figures: &Aggregates, sign: i64) {
        let shards = self.shards.as_ref();
        let keep = |user| shards.is_none_or(|s| s.keeps(from.0.get(user)));
        map.absorb(from, (&mut self.strings, &mut self.sequences), figures, sign, &mut self.aggregates, keep);
    }

    /// Makes this (empty) merged view keep the patterns of the users of `shards` only:
    /// those the sink shards it is written to hold. The agents' figures and the catalog
    /// stay whole (which patterns are visible depends on them).
    pub fn keep_shards(&mut self, shards: Shards) {
        debug_assert!(self.aggregates.patterns.is_empty(), "a view keeps its shards from the start");
        self.shards = (!shards.is_all()).then_some(shards);
    }

    /// Makes this merged view keep the patterns of `shard` too, adding those of `units`,
    /// the engines that forward into it (each forwards what it holds back first, so that
    /// its figures are the view's).
    pub fn take_shard(&mut self, shard: u32, units: &mut [&mut Engine]) {
        if self.shards.as_ref().is_none_or(|s| s.holds(shard)) {
            return;
        }
        for unit in units.iter_mut() {
            unit.flush_into(self);
        }
        let shards = self.shards.as_mut().expect("checked above");
        shards.set(shard, true);
        let count = shards.count();
        for unit in units.iter() {
            let from = (&unit.strings, &unit.sequences);
            let keep = |user| shard_of(from.0.get(user), count) == shard;
            Translation::default().absorb_patterns(from, (&mut self.strings, &mut self.sequences), &unit.aggregates, &mut self.aggregates, keep);
        }
        if self.shards.as_ref().is_some_and(Shards::is_all) {
            self.shards = None;
        }
    }

    /// Makes this merged view keep the patterns of `shard` no more (another writer
    /// holds it now): they are dropped without being recorded as changes.
    pub fn give_up_shard(&mut self, shard: u32, count: u32) {
        let shards = self.shards.get_or_insert_with(|| Shards::all(count));
        shards.set(shard, false);
        let strings = &self.strings;
        self.aggregates.patterns.retain(|k, _| shard_of(strings.get(k.user), count) != shard);
    }

    /// The sink shards whose patterns this view keeps; `None`: every pattern.
    pub fn kept_shards(&self) -> Option<&Shards> {
        self.shards.as_ref()
    }

    /// Whether this view keeps the patterns of `user`.
    fn keeps(&self, user: &str) -> bool {
        self.shards.as_ref().is_none_or(|s| s.keeps(user))
    }

    /// Starts recording what changes, for [`take_changes`](Self::take_changes).
    pub fn track_changes(&mut self) {
        self.aggregates.track();
        self.catalog_touched.get_or_insert_with(Default::default);
    }

    /// Agents and patterns changed since the last call. A catalog change makes all the
    /// agent's patterns change visibility.
    pub fn take_changes(&mut self) -> Changes {
        let touched = self.aggregates.take_touched();
        let catalog = self.catalog_touched.as_mut().map(std::mem::take).unwrap_or_default();
        let mut patterns: FxHashSet<PatternKey> = touched.patterns;
        if !catalog.is_empty() {
            patterns.extend(self.aggregates.patterns.keys().filter(|k| catalog.contains(&k.agent)));
        }
        let mut agents: Vec<Sym> = touched.agents.union(&catalog).copied().collect();
        agents.sort_unstable();
        let mut patterns: Vec<PatternKey> = patterns.into_iter().collect();
        patterns.sort_unstable();
        Changes { agents, patterns }
    }

    /// Every agent and pattern, as [`Changes`] (for a full sink synchronization).
    pub fn everything(&self) -> Changes {
        let mut agents: Vec<Sym> = self.catalog.keys().chain(self.aggregates.agents.keys()).copied().collect();
        agents.sort_unstable();
        agents.dedup();
        let mut patterns: Vec<PatternKey> = self.aggregates.patterns.keys().copied().collect();
        patterns.sort_unstable();
        Changes { agents, patterns }
    }

    /// The text of a symbol of this engine.
    pub fn name(&self, s: Sym) -> &str {
        self.strings.get(s)
    }

    /// Flushes, then builds the seed's tables for `today`.
    pub fn report(&mut self, today: toolrank_events::Day) -> Report {
        self.flush();
        self.build_report(today)
    }

    /// The seed's tables for `today` as of the last [`flush`](Self::flush).
    pub fn build_report(&self, today: toolrank_events::Day) -> Report {
        self.borrowed_report(&self.pattern_sequence_names(), today).into_owned()
    }

    /// [`build_report`](Self::build_report) with pattern rows that borrow their names
    /// from the engine and `names` (from [`pattern_sequence_names`](Self::pattern_sequence_names)).
    pub fn borrowed_report<'e>(&'e self, names: &'e SequenceNames, today: toolrank_events::Day) -> Report<&'e str> {
        report::build(self, names, today)
    }

    /// The names of the pattern sequences the aggregates hold, for [`borrowed_report`](Self::borrowed_report).
    pub fn pattern_sequence_names(&self) -> SequenceNames {
        report::sequence_names(self)
    }

    /// The staging rows of the session `session_id` of `user`, which holds `rows`, each
    /// with its interned SK.
    fn session_staging<'e>(&'e self, user: Sym, session_id: &'e str, rows: &'e [Row]) -> impl Iterator<Item = (Sym, StagingRow<'e>)> + 'e {
        rows.iter().filter_map(move |r| {
            let data = r.data?;
            let parts = self.sks[r.sk as usize];
            let meta = self.agent_meta(parts.agent)?;
            Some((
                r.sk,
                StagingRow {
                    user_id: self.strings.get(user),
                    session_id,
                    process_id: self.strings.get(parts.process),
                    domain_id: self.strings.get(meta.domain),
                    agent_id: self.strings.get(parts.agent),
                    tool_id: self.strings.get(parts.tool),
                    tool_nm: self.strings.get(data.tool_nm),
                    execution_date: data.at.day,
                    execution_datetime: data.at,
                    success_flag: data.success,
                },
            ))
        })
    }

    fn agent_meta(&self, agent: Sym) -> Option<&AgentMeta> {
        self.catalog.get(&agent)?.meta.as_ref()
    }

    /// Serializes the whole state (after a flush) for a checkpoint.
    ///
    /// It flushes without forwarding: an engine that forwards into a merged one must
    /// [`flush_into`](Self::flush_into) it first, or the merged engine misses what was pending.
    pub fn snapshot(&mut self) -> Vec<u8> {
        self.snapshot_split().0
    }

    /// A [`snapshot`](Self::snapshot), and how many of its first bytes hold the catalog
    /// and aggregates: all an [`AggregateCopy`] reads, so that a checkpoint can say where
    /// they end, and a reader fetch and decode only them.
    pub fn snapshot_split(&mut self) -> (Vec<u8>, usize) {
        self.flush();
        // The fields in the order `Engine` serializes them: postcard writes a struct as
        // its fields one after the other, so the two parts make the same bytes.
        let mut out = versioned(SNAPSHOT_VERSION, &(&self.strings, &self.sequences, &self.catalog, &self.aggregates));
        let figures = out.len();
        postcard::to_io(&(&self.sks, &self.sk_index, &self.sessions), &mut out).expect("writing to a Vec cannot fail");
        (out, figures)
    }

    /// Restores a state written by [`snapshot`](Self::snapshot).
    pub fn restore(bytes: &[u8]) -> Result<Engine, StateError> {
        let mut engine = match version_of(bytes, StateError::Version)? {
            (SNAPSHOT_VERSION, body) => postcard::from_bytes(body)?,
            (OLD_SNAPSHOT_VERSION, body) => {
                let old: EngineV6 = postcard::from_bytes(body)?;
                Engine {
                    strings: old.strings,
                    sequences: old.sequences,
                    catalog: old.catalog,
                    aggregates: old.aggregates,
                    sks: old.sks,
                    sk_index: old.sk_index,
                    sessions: old.sessions,
                    ..Engine::default()
                }
            }
            (other, _) => return Err(StateError::Version(other)),
        };
        engine.strings.rebuild();
        engine.sequences.rebuild();
        engine.sk_index.rebuild();
        // Collect once as many again have come, not at once (a restart would pay a walk).
        engine.names_kept = engine.strings.len();
        for (i, s) in engine.sessions.iter().enumerate() {
            if s.pk.is_empty() {
                engine.free.push(i as u32);
                continue;
            }
            let hash = FxBuildHasher.hash_one(&*s.pk);
            engine.session_index.insert_unique(hash, i as u32, slot_hash(&engine.sessions));
        }
        Ok(engine)
    }

    /// Counts and approximate memory of the state.
    pub fn stats(&self) -> StateStats {
        let mut st = StateStats { agents: self.catalog.values().filter(|s| s.meta.is_some()).count(), ..Default::default() };
        let mut heap = self.strings.heap_bytes() + self.sequences.heap_bytes() + self.sk_index.heap_bytes();
        heap += self.sks.capacity() * std::mem::size_of::<SkParts>();
        heap += self.sessions.capacity() * std::mem::size_of::<Session>();
        heap += self.session_index.capacity() * (std::mem::size_of::<u32>() + 1);
        for s in &self.sessions {
            let live = s.rows.iter().filter(|r| r.data.is_some()).count();
            st.live_rows += live;
            st.tombstones += s.rows.len() - live;
            st.live_sessions += usize::from(live > 0);
            st.sessions += usize::from(!s.pk.is_empty());
            heap += s.rows.capacity() * std::mem::size_of::<Row>();
            heap += s.committed.capacity() * std::mem::size_of::<(Sym, Contribution)>();
            heap += s.committed.iter().map(|(_, c)| c.failed_tools.len() * 4).sum::<usize>();
            heap += s.pk.len();
        }
        heap += self.catalog.capacity() * (std::mem::size_of::<(Sym, AgentSlot)>() + 1);
        heap += self.aggregates.agents.len() * (std::mem::size_of::<(Sym, AgentAggregate)>() + 64);
        heap += self.aggregates.patterns.len() * (std::mem::size_of::<(PatternKey, PatternAggregate)>() + 96);
        st.heap_bytes = heap;
        st
    }
}

/// The hash `session_index` keeps a slot of `sessions` under: its PK's.
fn slot_hash(sessions: &[Session]) -> impl Fn(&u32) -> u64 + '_ {
    |&slot| FxBuildHasher.hash_one(&*sessions[slot as usize].pk)
}

/// `value` in postcard after its format's version (snapshots, deltas).
fn versioned(version: u32, value: &impl Serialize) -> Vec<u8> {
    let mut out = version.to_le_bytes().to_vec();
    postcard::to_io(value, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// The version and body of `bytes` written by [`versioned`]; `wrong(0)` when too short
/// to hold a version.
fn version_of(bytes: &[u8], wrong: fn(u32) -> StateError) -> Result<(u32, &[u8]), StateError> {
    let (version, body) = bytes.split_at_checked(4).ok_or(wrong(0))?;
    Ok((u32::from_le_bytes(version.try_into().expect("4 bytes")), body))
}

/// A delta's aggregate difference in the symbols of an engine's `strings` and
/// `sequences` (interned as needed). Checks every index before anything is summed.
/// The aggregate difference a delta's head carries, in the symbols of `strings` and
/// `sequences`, without the patterns of the users `keep` refuses.
fn figures_of(
    strings: &mut Interner<str>,
    sequences: &mut Interner<[Sym]>,
    head: &DeltaHead<'_>,
    keep: impl Fn(&str) -> bool,
) -> Result<Aggregates, StateError> {
    let mut string = |i: u32| head.strings.get(i as usize).map(|s| strings.intern(s)).ok_or(StateError::DeltaString(i));
    let mut out = Aggregates::default();
    for a in &head.agents {
        let mut syms = |list: &[(u32, i64)]| list.iter().map(|&(t, n)| Ok((string(t)?, n))).collect::<Result<BTreeMap<_, _>, StateError>>();
        let (failed_tools, tools) = (syms(&a.failed_tools)?, syms(&a.tools)?);
        out.agents.insert(
            string(a.agent)?,
            AgentAggregate {
                executions: a.executions,
                successes: a.successes,
                last_days: DayHistogram(a.last_days.as_slice().into()),
                rows: a.rows,
                failed_rows: a.failed_rows,
                failed_tools,
                tools,
            },
        );
    }
    let mut sequence_syms = Vec::with_capacity(head.sequences.len());
    for seq in &head.sequences {
        let syms = seq.iter().map(|&i| string(i)).collect::<Result<Vec<Sym>, _>>()?;
        sequence_syms.push(sequences.intern(&syms));
    }
    for p in &head.patterns {
        if !keep(head.strings.get(p.user as usize).copied().ok_or(StateError::DeltaString(p.user))?) {
            continue;
        }
        let sequence = *sequence_syms.get(p.sequence as usize).ok_or(StateError::DeltaString(p.sequence))?;
        let key = PatternKey { user: string(p.user)?, agent: string(p.agent)?, sequence };
        let figures = PatternAggregate {
            executions: p.executions,
            successes: p.successes,
            first_days: DayHistogram(p.first_days.as_slice().into()),
            last_days: DayHistogram(p.last_days.as_slice().into()),
        };
        out.patterns.insert(key, figures);
    }
    Ok(out)
}

/// The least sequence number of `rows` (0 if none): deltas and snapshots store the others
/// as offsets from it.
fn least_seq<'a>(rows: impl IntoIterator<Item = &'a Row>) -> u128 {
    rows.into_iter().filter_map(|r| r.seq).min().map_or(0, u128::from)
}

/// The sequence number `offset` above `base`; `None` if out of range (corrupt input).
fn seq_at(base: u128, offset: u128) -> Option<Seq> {
    base.checked_add(offset).map(Seq::from)
}

/// A session's rows in a snapshot: sequence numbers as offsets from the session's least
/// (a few bytes instead of a 21-digit number's twelve), TransactDT as its packed number.
mod compact_rows {
    use super::{least_seq, seq_at, Row, RowData, Sym};
    use serde::de::Error as _;
    use serde::ser::SerializeTuple;
    use serde::{Deserialize, Deserializer, Serializer};
    use toolrank_events::Timestamp;

    /// SK, tombstone stamp, sequence-number offset, (ToolNM, TransactDT packed, success).
    type Stored = (Sym, u32, Option<u128>, Option<(Sym, u64, bool)>);

    pub fn serialize<S: Serializer>(rows: &[Row], serializer: S) -> Result<S::Ok, S::Error> {
        let base = least_seq(rows);
        let stored =
            rows.iter().map(|r| -> Stored { (r.sk, r.removed, r.seq.map(|q| u128::from(q) - base), r.data.map(|d| (d.tool_nm, d.at.packed, d.success))) });
        let mut t = serializer.serialize_tuple(2)?;
        t.serialize_element(&base)?;
        t.serialize_element(&Rows(std::cell::Cell::new(Some(stored))))?;
        t.end()
    }

    /// Serializes an iterator of known length once, without collecting it.
    struct Rows<I>(std::cell::Cell<Option<I>>);

    impl<I: ExactSizeIterator<Item = Stored>> serde::Serialize for Rows<I> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(self.0.take().expect("serialized once"))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Row>, D::Error> {
        let (base, stored) = <(u128, Vec<Stored>)>::deserialize(deserializer)?;
        stored
            .into_iter()
            .map(|(sk, removed, offset, data)| {
                let seq = offset.map(|o| seq_at(base, o).ok_or_else(|| D::Error::custom("sequence number out of range"))).transpose()?;
                let data = data
                    .map(|(tool_nm, packed, success)| {
                        Timestamp::from_packed(packed)
                            .map(|at| RowData { tool_nm, at, success })
                            .ok_or_else(|| D::Error::custom(format!("TransactDT {packed}")))
                    })
                    .transpose()?;
                Ok(Row { sk, removed, seq, data })
            })
            .collect()
    }
}

/// Marks `agent`'s group of session `idx` for the next flush.
fn mark_dirty(dirty: &mut Vec<u32>, idx: u32, s: &mut Session, agent: Sym) {
    if !s.dirty.contains(&agent) {
        if s.dirty.is_empty() {
            dirty.push(idx);
        }
        s.dirty.push(agent);
    }
}

/// The contribution of `agent`'s current rows in one session, `None` when it has none.
/// Rows are taken in execution order, ties broken by ProcessID then ToolID.
fn contribution(
    strings: &Interner<str>,
    sequences: &mut Interner<[Sym]>,
    sks: &[SkParts],
    rows: &[Row],
    agent: Sym,
    group: &mut Vec<(RowData, SkParts)>,
    seq: &mut Vec<Sym>,
) -> Option<Contribution> {
    group.clear();
    group.extend(rows.iter().filter_map(|r| {
        let parts = sks[r.sk as usize];
        (parts.agent == agent).then_some(())?;
        Some((r.data?, parts))
    }));
    if group.is_empty() {
        return None;
    }
    group.sort_unstable_by(|(a, pa), (b, pb)| {
        a.at.packed
            .cmp(&b.at.packed)
            .then_with(|| strings.get(pa.process).cmp(strings.get(pb.process)))
            .then_with(|| strings.get(pa.tool).cmp(strings.get(pb.tool)))
    });
    seq.clear();
    seq.extend(group.iter().map(|(_, p)| p.process));
    seq.extend(group.iter().map(|(d, _)| d.tool_nm));
    let c = Contribution {
        success: group.iter().all(|(d, _)| d.success),
        first: group.iter().map(|(d, _)| d.at.day).min().expect("non-empty"),
        last: group.iter().map(|(d, _)| d.at.day).max().expect("non-empty"),
        pattern: sequences.intern(seq),
        rows: group.len() as u32,
        failed_tools: group.iter().filter(|(d, _)| !d.success).map(|(d, _)| d.tool_nm).collect(),
    };
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use toolrank_events::{AgentItem, Execution};

    fn hist(seq: Option<u128>, success: Option<bool>) -> Change<'static> {
        let action = match success {
            Some(success) => {
                Action::Put(Entity::Execution(Execution { tool_nm: Cow::Borrowed("T"), at: Timestamp::parse("20250614140605").unwrap(), success }))
            }
            None => Action::Delete { ttl: false },
        };
        Change { pk: Cow::Borrowed("U#S"), sk: Cow::Borrowed("P#A#T"), seq, action }
    }

    /// The Agent item of `AGT1`.
    fn agent1() -> Change<'static> {
        Change {
            pk: Cow::Borrowed("AGT1"),
            sk: Cow::Borrowed(METADATA_SK),
            seq: None,
            action: Action::Put(Entity::Agent(AgentItem { domain_id: Cow::Borrowed("D"), name: None, partial: false })),
        }
    }

    /// A row of `AGT1` in the session `pk`: run with `tool` and `success`, or removed.
    fn agent1_row(pk: String, tool: &str, success: Option<bool>) -> Change<'static> {
        let action = match success {
            Some(success) => {
                Action::Put(Entity::Execution(Execution { tool_nm: Cow::Owned(tool.to_owned()), at: Timestamp::parse("20250614140605").unwrap(), success }))
            }
            None => Action::Delete { ttl: false },
        };
        Change { pk: Cow::Owned(pk), sk: Cow::Borrowed("PRC001#AGT1#TL1"), seq: None, action }
    }

    #[test]
    fn a_key_is_checked_unless_its_session_and_sk_are_both_held() {
        let with_key = |pk: &'static str, sk: &'static str| Change { pk: Cow::Borrowed(pk), sk: Cow::Borrowed(sk), ..hist(None, Some(true)) };
        let mut e = Engine::new();
        assert_eq!(e.apply(&with_key("U#S", "P#A#T")), Applied::Changed);
        assert_eq!(e.apply(&with_key("U", "P#A#T")), Applied::Ignored, "an interned SK under a PK that is not USER#SESSION");
        assert_eq!(e.apply(&with_key("U#S", "P#A")), Applied::Ignored, "a held session under an SK that is not PROCESS#AGENT#TOOL");
        assert_eq!(e.apply(&with_key("U#S", "P#A#T#X")), Applied::Ignored);
        assert_eq!(e.apply(&with_key("U#S", "P#A#T2")), Applied::Changed, "a new SK of a held session");
        assert_eq!(e.apply(&with_key("U#S2", "P#A#T")), Applied::Changed, "a new session with an interned SK");
        assert_eq!(e.apply(&with_key("U#S2", "P#A#T")), Applied::Unchanged, "both held: the same row again");
        let st = e.stats();
        assert_eq!((st.live_sessions, st.live_rows), (2, 3));
    }

    #[test]
    fn a_backfilled_copy_only_fills_keys_the_engine_holds_nothing_for() {
        let mut e = Engine::new();
        assert_eq!(e.apply(&hist(Some(BASE_SEQ), Some(true))), Applied::Changed, "absent: the copy applies");
        assert_eq!(e.apply(&hist(Some(BASE_SEQ), Some(false))), Applied::Stale, "a second copy is no newer");
        assert_eq!(e.apply(&hist(Some(7), Some(false))), Applied::Changed, "any stream record is newer than a copy");
        assert_eq!(e.apply(&hist(Some(BASE_SEQ), Some(true))), Applied::Stale);
        assert_eq!(e.apply(&hist(Some(9), None)), Applied::Changed);
        assert_eq!(e.apply(&hist(Some(BASE_SEQ), Some(true))), Applied::Stale, "a removal's tombstone outranks a copy read before it");
        let mut flat = Engine::new();
        assert_eq!(flat.apply(&hist(None, Some(true))), Applied::Changed);
        assert_eq!(flat.apply(&hist(Some(BASE_SEQ), Some(false))), Applied::Stale, "a flat event outranks a copy");
        let agent = |seq| Change {
            pk: Cow::Borrowed("A"),
            sk: Cow::Borrowed(METADATA_SK),
            seq,
            action: Action::Put(Entity::Agent(AgentItem { domain_id: Cow::Borrowed("D"), name: None, partial: false })),
        };
        assert_eq!(e.apply(&agent(Some(BASE_SEQ))), Applied::Changed);
        assert_eq!(e.apply(&agent(Some(BASE_SEQ))), Applied::Stale);
        assert_eq!(e.apply(&agent(Some(3))), Applied::Unchanged, "the same content, now versioned");
    }

    #[test]
    fn names_nothing_refers_to_are_collected_and_results_stay() {
        let run = |user: usize, success: Option<bool>| agent1_row(format!("USR{user}#S{user}"), "T", success);
        let (mut e, mut global) = (Engine::new(), Engine::new());
        e.apply(&agent1());
        for u in 0..100 {
            e.apply(&run(u, Some(u % 3 != 0)));
        }
        e.flush_into(&mut global);
        for u in 0..90 {
            e.apply(&run(u, None));
        }
        e.flush_into(&mut global);
        let today = toolrank_events::Day::parse_iso("2025-06-20").unwrap();
        let (report, staging) = (e.report(today), format!("{:?}", e.staging_sorted()));
        assert_eq!(e.collect_names(), 90, "the names of the 90 users whose sessions went");
        assert_eq!((e.report(today), format!("{:?}", e.staging_sorted())), (report.clone(), staging));
        assert_eq!(global.report(today), report);
        // Forwarding and snapshots go on with the new symbols.
        for u in 95..110 {
            e.apply(&run(u, if u < 100 { None } else { Some(u % 2 == 0) }));
        }
        e.flush_into(&mut global);
        assert_eq!(global.report(today), e.report(today));
        assert_eq!(Engine::restore(&e.snapshot()).unwrap().report(today), e.report(today));
        assert_eq!(e.collect_names_if_due(), 0, "not due below NAMES_MIN names");

        // Due once names doubled and sessions were dropped since the last collection.
        let mut e = Engine::new();
        for u in 0..NAMES_MIN + 1000 {
            e.apply(&run(u, Some(true)));
        }
        e.flush();
        assert_eq!(e.collect_names_if_due(), 0, "a growing state has nothing to collect");
        for u in 0..3000 {
            e.apply(&run(u, None));
        }
        e.flush();
        assert_eq!(e.collect_names_if_due(), 3000);
        assert_eq!(e.collect_names_if_due(), 0, "collected a moment ago");
    }

    #[test]
    fn tombstones_refuse_late_copies_until_they_expire() {
        let mut e = Engine::new();
        e.set_clock(1000);
        e.apply(&hist(Some(5), Some(true)));
        e.apply(&hist(Some(9), None));
        e.flush();
        let held = e.stats();
        assert_eq!((held.sessions, held.live_sessions, held.tombstones), (1, 0, 1));
        e.set_clock(1100);
        assert_eq!(e.expire_tombstones(100), 0, "not older than the horizon");
        assert_eq!(e.apply(&hist(Some(5), Some(true))), Applied::Stale, "a late copy inside the horizon");
        e.set_clock(1101);
        assert_eq!(e.expire_tombstones(100), 0, "swept a moment ago");
        e.set_clock(1107);
        assert_eq!(e.expire_tombstones(100), 1);
        let after = e.stats();
        assert_eq!((after.sessions, after.tombstones), (0, 0));
        assert!(after.heap_bytes < held.heap_bytes, "{after:?} < {held:?}");
        assert_eq!(e.apply(&hist(Some(5), Some(true))), Applied::Changed, "past the horizon a copy counts: the horizon must cover redeliveries");
        assert_eq!(e.sessions.len(), 1, "the freed slot was reused");
        let mut unstamped = Engine::new();
        unstamped.apply(&hist(Some(9), None));
        unstamped.set_clock(u32::MAX);
        assert_eq!(unstamped.expire_tombstones(1), 0, "removals applied without a clock never expire");
    }

    #[test]
    fn staging_rows_come_by_user_then_session_id_however_long_the_ids() {
        let mut e = Engine::new();
        e.apply(&agent1());
        // Ids that tie on their first 16 bytes, end inside them, or hold a zero byte
        // there; users with many sessions and with one; a session in a freed slot.
        let ids = ["SESS202505160000062", "SESS202505160000061", "SESS2025051600000", "SESS202505160000", "SESS20250516000", "A", "A\0", "Z"];
        let users = ["USR2", "USR10", "USR1", "사용자"];
        let mut pks: Vec<String> = users.iter().flat_map(|u| ids.iter().map(move |i| format!("{u}#{i}"))).collect();
        pks.push("USR3#only".into());
        let put = |pk: &str, success| agent1_row(pk.to_owned(), "T", success);
        for pk in pks.iter().rev() {
            e.apply(&put(pk, Some(true)));
        }
        e.apply(&put("USR9#gone", Some(true)));
        e.flush();
        e.apply(&put("USR9#gone", None));
        e.flush();
        let got: Vec<(&str, &str)> = e.staging_sorted().iter().map(|r| (r.user_id, r.session_id)).collect();
        let mut want: Vec<(&str, &str)> = pks.iter().map(|pk| pk.split_once('#').unwrap()).collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn a_row_keeps_its_own_tool_name_whatever_its_sk_had_before() {
        let mut e = Engine::new();
        e.apply(&agent1());
        let put = |pk: String, tool: &str| agent1_row(pk, tool, Some(true));
        let delete = |pk: String| agent1_row(pk, "", None);
        let tools = |e: &Engine| e.staging_sorted().iter().map(|r| (r.user_id.to_owned(), r.tool_nm.to_owned())).collect::<Vec<_>>();
        e.apply(&put("U1#S".into(), "FIND"));
        e.apply(&put("U2#S".into(), "SEARCH"));
        e.apply(&put("U3#S".into(), "SEARCH"));
        e.apply(&put("U4#S".into(), "FIND"));
        e.flush();
        let want = |names: &[(&str, &str)]| names.iter().map(|(u, t)| (u.to_string(), t.to_string())).collect::<Vec<_>>();
        assert_eq!(tools(&e), want(&[("U1", "FIND"), ("U2", "SEARCH"), ("U3", "SEARCH"), ("U4", "FIND")]));
        // Names renumbered under the SK's last name: rows still get theirs.
        for u in 0..NAMES_MIN + 10 {
            e.apply(&put(format!("X{u}#S"), &format!("T{u}")));
        }
        e.flush();
        for u in 0..NAMES_MIN + 10 {
            e.apply(&delete(format!("X{u}#S")));
        }
        e.flush();
        assert!(e.collect_names() > 0);
        e.apply(&put("U5#S".into(), "FIND"));
        e.apply(&put("U6#S".into(), &format!("T{}", NAMES_MIN + 9)));
        e.apply(&put("U7#S".into(), "SEARCH"));
        e.flush();
        let names = [("U1", "FIND"), ("U2", "SEARCH"), ("U3", "SEARCH"), ("U4", "FIND"), ("U5", "FIND")];
        let mut expected = want(&names);
        expected.push(("U6".into(), format!("T{}", NAMES_MIN + 9)));
        expected.push(("U7".into(), "SEARCH".into()));
        assert_eq!(tools(&e), expected);
    }
}
