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
mod intern;
mod report;
pub mod score;

pub use aggregate::{AgentAggregate, Aggregates, Contribution, DayHistogram, PatternAggregate, PatternKey, SymKind};
pub use intern::{Interner, Sym};
pub use report::{AgentScore, PatternRow, Report, StagingOrder, StagingRow, ToolErrors};

use hashbrown::HashTable;
use rustc_hash::{FxBuildHasher, FxHashMap};
use std::hash::BuildHasher;
use serde::{Deserialize, Serialize};
use toolrank_events::{Action, Change, Entity, HistKey, Timestamp, METADATA_SK};

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

/// One hist row of a session.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Row {
    /// Interned SK, resolving to process, agent and tool.
    sk: Sym,
    /// Last applied stream sequence number for this key.
    seq: Option<Seq>,
    /// The current item; `None` is a tombstone kept for its `seq`.
    data: Option<RowData>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// `user#session`, stored once: the index refers to it by slot.
    pk: Box<str>,
    user: Sym,
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
}

const SNAPSHOT_VERSION: u32 = 3;

/// The incremental engine. See the crate docs.
#[derive(Default, Serialize, Deserialize)]
pub struct Engine {
    strings: Interner<str>,
    sequences: Interner<[Sym]>,
    sks: Vec<SkParts>,
    sk_index: Interner<str>,
    sessions: Vec<Session>,
    /// Slots of `sessions`, hashed by their PK.
    #[serde(skip)]
    session_index: HashTable<u32>,
    catalog: FxHashMap<Sym, AgentSlot>,
    aggregates: Aggregates,
    #[serde(skip)]
    dirty: Vec<u32>,
}

impl Engine {
    pub fn new() -> Engine {
        Engine::default()
    }

    /// Applies one change to the table state. Aggregates follow at the next [`flush`](Self::flush).
    pub fn apply(&mut self, change: &Change<'_>) -> Applied {
        if let Ok(key) = HistKey::parse(&change.pk, &change.sk) {
            self.apply_hist(key, change)
        } else if change.sk == METADATA_SK {
            self.apply_metadata(change)
        } else {
            Applied::Ignored
        }
    }

    fn apply_hist(&mut self, key: HistKey<'_>, change: &Change<'_>) -> Applied {
        let seq = change.seq.map(Seq::from);
        let data = match &change.action {
            Action::Put(Entity::Execution(e)) => {
                Some(RowData { tool_nm: self.strings.intern(&e.tool_nm), at: e.at, success: e.success })
            }
            Action::Put(_) | Action::Delete { .. } => None,
        };
        let sk = self.sk_index.intern(&change.sk);
        if sk as usize == self.sks.len() {
            let parts = SkParts {
                process: self.strings.intern(key.process),
                agent: self.strings.intern(key.agent),
                tool: self.strings.intern(key.tool),
            };
            self.sks.push(parts);
        }
        let agent = self.sks[sk as usize].agent;
        let hash = FxBuildHasher.hash_one(change.pk.as_ref());
        let sessions = &self.sessions;
        let idx = match self.session_index.find(hash, |&i| *sessions[i as usize].pk == *change.pk) {
            Some(&i) => i,
            None if data.is_none() && seq.is_none() => return Applied::Unchanged,
            None => {
                let i = self.sessions.len() as u32;
                let user = self.strings.intern(key.user);
                self.sessions.push(Session { pk: change.pk.as_ref().into(), user, rows: Vec::new(), committed: Vec::new(), dirty: Vec::new() });
                let sessions = &self.sessions;
                self.session_index.insert_unique(hash, i, |&j| FxBuildHasher.hash_one(&*sessions[j as usize].pk));
                i
            }
        };
        let s = &mut self.sessions[idx as usize];
        let applied = match s.rows.iter().position(|r| r.sk == sk) {
            Some(i) => {
                let row = &mut s.rows[i];
                if let (Some(new), Some(old)) = (seq, row.seq) {
                    if new <= old {
                        return Applied::Stale;
                    }
                }
                row.seq = seq.or(row.seq);
                let changed = row.data != data;
                row.data = data;
                if row.data.is_none() && row.seq.is_none() {
                    s.rows.swap_remove(i);
                }
                if changed { Applied::Changed } else { Applied::Unchanged }
            }
            None => {
                s.rows.push(Row { sk, seq, data });
                if data.is_some() { Applied::Changed } else { Applied::Unchanged }
            }
        };
        if applied == Applied::Changed && !s.dirty.contains(&agent) {
            if s.dirty.is_empty() {
                self.dirty.push(idx);
            }
            s.dirty.push(agent);
        }
        applied
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
        let new_meta = agent_item.map(|a| AgentMeta {
            domain: self.strings.intern(&a.domain_id),
            name: a.name.as_deref().map(Into::into),
        });
        let slot = match self.catalog.get_mut(&id) {
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
        Applied::Changed
    }

    /// Turns every dirty (session, agent) group into contribution deltas on the aggregates.
    pub fn flush(&mut self) {
        let (mut rows, mut seq) = (Vec::new(), Vec::new());
        for idx in std::mem::take(&mut self.dirty) {
            let s = &mut self.sessions[idx as usize];
            for agent in std::mem::take(&mut s.dirty) {
                let new = contribution(&self.strings, &mut self.sequences, &self.sks, &s.rows, agent, &mut rows, &mut seq);
                let old_pos = s.committed.iter().position(|(a, _)| *a == agent);
                if old_pos.map(|i| &s.committed[i].1) == new.as_ref() {
                    continue;
                }
                if let Some(i) = old_pos {
                    let (_, old) = s.committed.swap_remove(i);
                    self.aggregates.apply(s.user, agent, &old, -1);
                }
                if let Some(new) = new {
                    self.aggregates.apply(s.user, agent, &new, 1);
                    s.committed.push((agent, new));
                }
            }
        }
    }

    /// Adds the results of an engine that consumed a disjoint part of the keys (another
    /// Kafka partition or stream shard): its aggregates are summed into ours and its
    /// Agent items joined into our catalog. Session state is not copied: the merged
    /// engine reports the combined tables, and each part keeps its own sessions.
    pub fn absorb(&mut self, other: &mut Engine) {
        other.flush();
        self.flush();
        let mut map: FxHashMap<Sym, Sym> = FxHashMap::default();
        let mut translate = |strings: &mut Interner<str>, s: Sym| *map.entry(s).or_insert_with(|| strings.intern(other.strings.get(s)));
        for (&agent, slot) in &other.catalog {
            let Some(meta) = &slot.meta else { continue };
            let id = translate(&mut self.strings, agent);
            let domain = translate(&mut self.strings, meta.domain);
            let entry = self.catalog.entry(id).or_default();
            if entry.seq <= slot.seq || entry.meta.is_none() {
                *entry = AgentSlot { seq: slot.seq, meta: Some(AgentMeta { domain, name: meta.name.clone() }) };
            }
        }
        let (strings, sequences) = (&mut self.strings, &mut self.sequences);
        let mut seq_map: FxHashMap<Sym, Sym> = FxHashMap::default();
        self.aggregates.absorb(&other.aggregates, |kind, s| match kind {
            SymKind::String => translate(strings, s),
            SymKind::Sequence => *seq_map.entry(s).or_insert_with(|| {
                let translated: Vec<Sym> = other.sequences.get(s).iter().map(|&x| translate(strings, x)).collect();
                sequences.intern(&translated)
            }),
        });
    }

    /// Flushes, then builds the seed's tables for `today`.
    pub fn report(&mut self, today: toolrank_events::Day) -> Report {
        self.flush();
        self.build_report(today)
    }

    /// The seed's tables for `today` as of the last [`flush`](Self::flush).
    pub fn build_report(&self, today: toolrank_events::Day) -> Report {
        report::build(self, today)
    }

    fn session_staging<'e>(&'e self, s: &'e Session) -> impl Iterator<Item = StagingRow<'e>> + 'e {
        s.rows.iter().filter_map(move |r| {
            let data = r.data?;
            let parts = self.sks[r.sk as usize];
            let meta = self.agent_meta(parts.agent)?;
            Some(StagingRow {
                user_id: self.strings.get(s.user),
                session_id: s.session_id(),
                process_id: self.strings.get(parts.process),
                domain_id: self.strings.get(meta.domain),
                agent_id: self.strings.get(parts.agent),
                tool_id: self.strings.get(parts.tool),
                tool_nm: self.strings.get(data.tool_nm),
                execution_date: data.at.day,
                execution_datetime: data.at,
                success_flag: data.success,
            })
        })
    }

    fn agent_meta(&self, agent: Sym) -> Option<&AgentMeta> {
        self.catalog.get(&agent)?.meta.as_ref()
    }

    /// Serializes the whole state (after a flush) for a checkpoint.
    pub fn snapshot(&mut self) -> Vec<u8> {
        self.flush();
        let mut out = SNAPSHOT_VERSION.to_le_bytes().to_vec();
        postcard::to_io(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Restores a state written by [`snapshot`](Self::snapshot).
    pub fn restore(bytes: &[u8]) -> Result<Engine, StateError> {
        let (version, body) = bytes.split_at_checked(4).ok_or(StateError::Version(0))?;
        let version = u32::from_le_bytes(version.try_into().expect("4 bytes"));
        if version != SNAPSHOT_VERSION {
            return Err(StateError::Version(version));
        }
        let mut engine: Engine = postcard::from_bytes(body)?;
        engine.strings.rebuild();
        engine.sequences.rebuild();
        engine.sk_index.rebuild();
        let sessions = &engine.sessions;
        for (i, s) in sessions.iter().enumerate() {
            let hash = FxBuildHasher.hash_one(&*s.pk);
            engine.session_index.insert_unique(hash, i as u32, |&j| FxBuildHasher.hash_one(&*sessions[j as usize].pk));
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
            heap += s.rows.capacity() * std::mem::size_of::<Row>();
            heap += s.committed.capacity() * std::mem::size_of::<(Sym, Contribution)>();
            heap += s.committed.iter().map(|(_, c)| c.failed_tools.capacity() * 4).sum::<usize>();
            heap += s.pk.len();
        }
        heap += self.catalog.capacity() * (std::mem::size_of::<(Sym, AgentSlot)>() + 1);
        heap += self.aggregates.agents.len() * (std::mem::size_of::<(Sym, AgentAggregate)>() + 64);
        heap += self.aggregates.patterns.len() * (std::mem::size_of::<(PatternKey, PatternAggregate)>() + 96);
        st.heap_bytes = heap;
        st
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
