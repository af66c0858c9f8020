//! Rankings into Valkey (SPEC §4). Key layout, under a prefix (default `tr`, the
//! namespace of the replay jobs):
//!
//! | key | type | content |
//! |---|---|---|
//! | `P:agents:<domain>` | sorted set | agent ids by rank key (SPEC §3; `-inf` without successes) |
//! | `P:agent:<agent>` | hash | domain, name, executions, successes, last, rows, failed_rows, failed_tools |
//! | `P:tools:<agent>` | sorted set | ToolNMs by rows × success rate² |
//! | `P:toolfigures:<agent>` | hash | ToolNM → `rows failed` |
//! | `P:patterns:<user>` | sorted set | pattern ids (`user|process_pattern|agent|tool_sequence`) by rank key |
//! | `P:patterns` | sorted set | all pattern ids by rank key |
//! | `P:pattern:<id>` | hash | user, process_pattern, agent, tool_sequence, executions, successes, first, last |
//! | `P:domains`, `P:agent-ids` | sets | what exists, for readers that list everything |
//! | `P:fence` | string | the largest sink-lease fencing token written with (live consumers) |
//!
//! In a cluster (found when connecting: `INFO cluster`), the prefix is the namespace's
//! hash tag, `{tr}:agents:<domain>` and so on, so that a namespace's keys share one slot
//! and everything below holds as on one server, on the node that owns the slot
//! ([`cluster`]).
//!
//! Rank keys are time-invariant, so the sorted sets stay correctly ordered as days pass;
//! scores are derived when read. Each call is one `MULTI`/`EXEC` pipeline; a writer
//! holding the sink lease first `WATCH`es `P:fence`, refuses to write when it holds a
//! larger token than its own, and sets it to its own in the transaction, so that a
//! deposed writer's late transaction is refused or aborted. When Valkey
//! is unreachable the sink remembers to resynchronize: on the next successful connection
//! it rewrites everything, so nothing is lost. A full rewrite goes out in transactions of
//! bounded size ([`REWRITE_BYTES`]), whatever the rankings' size, each encoded only as it
//! goes out (the sink holds one at a time): each holds whole keys,
//! the set of all patterns is built aside and renamed over `P:patterns` in the last, and
//! the keys it did not write are deleted after that. So a reader sees each key old or
//! new, and Valkey never queues one transaction of the whole state (its client query
//! buffer is 1 GB).

mod cluster;
mod connect;

use connect::{Following, Valkey};
pub use connect::{CA_FILE_ENV, PASSWORD_FILE_ENV};
use redis::{Cmd, Commands, Connection};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use toolrank_engine::{shard_of, AgentFigures, Changes, Engine, PatternFigures, PatternView, Sym, ToolFigures};
use toolrank_events::Day;
use toolrank_sink::{Fingerprint, Fingerprints};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("valkey: {0}")]
    Valkey(#[from] redis::RedisError),
    #[error("valkey settings: {0}")]
    Settings(String),
    #[error("connecting to valkey at {endpoint}: {cause}")]
    Connect { endpoint: String, cause: String },
    #[error("valkey holds an unreadable {what} {key}: {reason}")]
    Data { what: &'static str, key: String, reason: String },
    #[error("write refused: {0} holds a newer fencing token than this writer's {1}")]
    Fenced(String, u64),
    #[error("an older writer's transaction came in between; everything is written again")]
    Interleaved,
}

/// Read and write timeout of one sink call of ordinary size.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The transactions built by [`ValkeySink::prepare`], with the agent figures they write.
pub struct Prepared {
    /// The one `MULTI`/`EXEC` of a write of changes, or the start of a full rewrite's
    /// first.
    pipe: Packed,
    /// A full rewrite's patterns, encoded into its transactions only as they go out.
    rewrite: Option<Rewrite>,
    agents: Vec<(String, Option<AgentFigures>)>,
    /// It rewrites everything: the fingerprints of the keys it writes. Every other key
    /// of the namespace is deleted once they are written.
    full: Option<HashSet<Fingerprint>>,
    /// The fencing token it carries, if the writer holds the sink lease.
    token: Option<u64>,
}

/// A full rewrite's patterns, user by user, with the names they refer to: some 40 bytes
/// a pattern, where their commands take some 500. They are encoded a transaction at a
/// time as the rewrite goes out, so that a rewrite holds one transaction's encoding,
/// not the whole namespace's (hundreds of MB for millions of patterns).
struct Rewrite {
    /// User and agent ids, which `patterns` refer to by index.
    ids: Vec<String>,
    /// The names of each pattern sequence.
    sequences: HashMap<Sym, (String, String)>,
    /// Sorted by user.
    patterns: Vec<RewritePattern>,
    /// The size at which a transaction ends (at the next user).
    bytes: usize,
    /// The set of all patterns holds other shards' members too: the patterns go into it
    /// directly (its stale members are removed after), not into a set renamed over it.
    shared: bool,
}

/// A pattern of a [`Rewrite`].
struct RewritePattern {
    user: u32,
    agent: u32,
    sequence: Sym,
    executions: u64,
    successes: u64,
    first: Day,
    last: Day,
}

impl Rewrite {
    fn view(&self, p: &RewritePattern) -> PatternView<'_> {
        let (user_id, agent_id) = (&self.ids[p.user as usize], &self.ids[p.agent as usize]);
        PatternView { user_id, agent_id, sequence: p.sequence, executions: p.executions, successes: p.successes, first: p.first, last: p.last }
    }

    /// Adds to `pipe` the patterns from index `next` on, user by user: each user's set
    /// deleted and written whole, with their patterns' hashes and their members of the
    /// set of all patterns being rebuilt, until `pipe` holds [`bytes`](Self::bytes); after
    /// the last user, the rename of that set over `P:patterns`. Where the next
    /// transaction starts, or `None` once this one is the last.
    fn encode(&self, pipe: &mut Packed, prefix: &str, mut next: usize) -> Option<usize> {
        let all = key(prefix, &["patterns"]);
        let rebuilt = match self.shared {
            true => all.clone(),
            false => key(prefix, &["rebuild", "patterns"]),
        };
        let mut members = Vec::new();
        while let Some(first) = self.patterns.get(next) {
            // A transaction holds one user at least, however large.
            if pipe.commands > 0 && pipe.bytes.len() >= self.bytes {
                return Some(next);
            }
            let end = self.patterns[next..].iter().position(|p| p.user != first.user).map_or(self.patterns.len(), |n| next + n);
            let set = key(prefix, &["patterns", &self.ids[first.user as usize]]);
            pipe.add(Cmd::del(&set));
            members.clear();
            for p in &self.patterns[next..end] {
                let v = self.view(p);
                let id = PatternId::of(&v, &self.sequences);
                put_pattern(pipe, prefix, &id, &v);
                members.push((v.user_id, v.rank_key(), id));
            }
            for set in [&set, &rebuilt] {
                for chunk in members.chunks(SET_CHUNK) {
                    zadd(pipe, set, chunk);
                }
            }
            next = end;
        }
        match (self.shared, self.patterns.is_empty()) {
            (true, _) => {}
            (false, true) => pipe.add(Cmd::del(&all)),
            (false, false) => pipe.add(Cmd::rename(&rebuilt, &all)),
        }
        None
    }
}

/// The Valkey sink (see the crate docs).
pub struct ValkeySink {
    valkey: Valkey,
    conn: Option<Connection>,
    /// The namespace.
    namespace: String,
    /// Its key prefix: the namespace, or in a cluster its hash tag (known once connected).
    prefix: String,
    /// The figures of each agent as written, so that a write sends only what differs.
    agents: HashMap<String, AgentFigures>,
    /// Everything must be rewritten (first call, or after Valkey was unreachable).
    resync: bool,
    /// The sink lease's fencing token the writes carry ([`toolrank_sink::Sink::hold`]).
    token: Option<u64>,
    /// Commands sent, for metrics and benchmarks.
    pub commands: u64,
    /// Transactions sent (`MULTI`/`EXEC`), for tests and benchmarks.
    pub transactions: u64,
    /// The memory the last transaction was encoded into, for the next one.
    spare: Vec<u8>,
    /// What a full rewrite keeps of the names of the keys it writes.
    fingerprints: Fingerprints,
    /// The size at which a full rewrite starts its next transaction.
    rewrite_bytes: usize,
    /// The sink shard it writes (shard, of how many): the keys of that shard's users,
    /// and shard 0 the agents'; `None`: everything.
    shard: Option<(u32, u32)>,
}

/// A transaction's commands, encoded as they are added (no command outlives its line).
#[derive(Default)]
struct Packed {
    bytes: Vec<u8>,
    commands: u64,
}

impl Packed {
    fn add(&mut self, cmd: Cmd) {
        cmd.write_packed_command(&mut self.bytes);
        self.commands += 1;
    }

    /// Starts a command of `args` arguments (the command's name included), each written
    /// next with [`arg`](Self::arg) or [`number`](Self::number): the hot commands are
    /// encoded from the engine's names without building their keys and ids first.
    fn command(&mut self, args: usize) {
        self.bytes.push(b'*');
        self.bytes.extend_from_slice(itoa::Buffer::new().format(args).as_bytes());
        self.bytes.extend_from_slice(b"\r\n");
        self.commands += 1;
    }

    /// One argument: `pieces` joined.
    fn arg(&mut self, pieces: &[&[u8]]) {
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        self.bytes.push(b'$');
        self.bytes.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
        self.bytes.extend_from_slice(b"\r\n");
        for p in pieces {
            self.bytes.extend_from_slice(p);
        }
        self.bytes.extend_from_slice(b"\r\n");
    }

    /// One argument: an integer, or a sorted set's score (as redis-rs writes an `f64`).
    fn number(&mut self, n: Number) {
        match n {
            Number::Count(n) => self.arg(&[itoa::Buffer::new().format(n).as_bytes()]),
            Number::Score(f) => self.arg(&[ryu::Buffer::new().format(f).as_bytes()]),
        }
    }
}

enum Number {
    Count(u64),
    Score(f64),
}

/// A pattern's id, `user|process_pattern|agent|tool_sequence`, as its parts.
#[derive(Clone, Copy)]
struct PatternId<'a> {
    user: &'a str,
    process_pattern: &'a str,
    agent: &'a str,
    tool_sequence: &'a str,
}

impl<'a> PatternId<'a> {
    fn of(v: &PatternView<'a>, names: &'a HashMap<Sym, (String, String)>) -> PatternId<'a> {
        let (process_pattern, tool_sequence) = &names[&v.sequence];
        PatternId { user: v.user_id, process_pattern, agent: v.agent_id, tool_sequence }
    }

    fn pieces(&self) -> [&'a [u8]; 7] {
        let (u, p, a, t) = (self.user, self.process_pattern, self.agent, self.tool_sequence);
        [u.as_bytes(), b"|", p.as_bytes(), b"|", a.as_bytes(), b"|", t.as_bytes()]
    }

    fn push_to(&self, s: &mut String) {
        for (i, part) in [self.user, self.process_pattern, self.agent, self.tool_sequence].into_iter().enumerate() {
            if i > 0 {
                s.push('|');
            }
            s.push_str(part);
        }
    }
}

/// A pattern in a sorted set: its user, rank key and id.
type Member<'a> = (&'a str, f64, PatternId<'a>);

/// The largest encoding kept for the next transaction: a full rewrite's can be hundreds
/// of MB, which would then be held for good.
const SPARE_LIMIT: usize = 16 << 20;

impl ValkeySink {
    /// A sink for `url` (e.g. `redis://127.0.0.1:6379`) under `prefix`. Connects lazily.
    pub fn new(url: &str, prefix: impl Into<String>) -> Result<ValkeySink, Error> {
        let namespace: String = prefix.into();
        Ok(ValkeySink {
            valkey: Valkey::open(url)?,
            conn: None,
            prefix: namespace.clone(),
            namespace,
            agents: HashMap::new(),
            resync: true,
            token: None,
            commands: 0,
            transactions: 0,
            spare: Vec::new(),
            fingerprints: Fingerprints::new(),
            rewrite_bytes: REWRITE_BYTES,
            shard: None,
        })
    }

    /// Writes shard `shard` of `count` only: the keys of the users in it, and for shard 0
    /// the agents' keys; its transactions are fenced on a fence key of its own. All
    /// shards' patterns share the set of all patterns, each shard its own members.
    pub fn for_shard(mut self, shard: u32, count: u32) -> ValkeySink {
        self.shard = (count > 1).then_some((shard, count));
        self
    }

    /// Whether the keys of `user` are this sink's to write.
    fn mine(&self, user: &str) -> bool {
        self.shard.is_none_or(|(shard, count)| shard_of(user, count) == shard)
    }

    /// The key holding the largest fencing token this sink's shard was written with.
    fn fence_key(&self) -> String {
        match self.shard {
            None => self.key(&["fence"]),
            Some((shard, count)) => self.key(&["fence", &format!("shard-{shard}-of-{count}")]),
        }
    }

    fn key(&self, parts: &[&str]) -> String {
        key(&self.prefix, parts)
    }

    fn connection(&mut self) -> Result<&mut Connection, Error> {
        if self.conn.is_none() {
            self.open(Duration::from_secs(1))?;
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// Connects to the node serving the namespace, learning whether Valkey is a cluster
    /// (and so the key prefix).
    fn open(&mut self, timeout: Duration) -> Result<&mut Connection, Error> {
        let conn = self.valkey.connection_for(&cluster::tag(&self.namespace), timeout)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        conn.set_write_timeout(Some(IO_TIMEOUT))?;
        self.prefix = self.valkey.key_prefix(&self.namespace);
        Ok(self.conn.insert(conn))
    }

    /// Connects once, so that settings Valkey refuses (a TLS handshake that fails, a
    /// wrong password) stop the caller at start with the cause. Valkey being down is an
    /// outage, not a settings error: it is only logged, the writes retry.
    pub fn verify(&mut self) -> Result<(), Error> {
        let endpoint = self.valkey.endpoint();
        match self.open(Duration::from_secs(5)) {
            Ok(conn) => {
                redis::cmd("PING").query::<String>(conn).map_err(|e| Error::Connect { endpoint, cause: e.to_string() })?;
                Ok(())
            }
            Err(Error::Connect { endpoint, cause }) => match self.valkey.refusal(&cause) {
                Some(cause) => Err(Error::Connect { endpoint, cause }),
                None => {
                    tracing::warn!(%endpoint, error = %cause, "valkey does not answer yet; going on, the writes retry");
                    Ok(())
                }
            },
            Err(e) => Err(e),
        }
    }

    /// Makes a full rewrite start its next transaction at about `bytes` instead of
    /// [`REWRITE_BYTES`] (for a Valkey with a smaller `client-query-buffer-limit`).
    pub fn set_rewrite_bytes(&mut self, bytes: usize) {
        self.rewrite_bytes = bytes;
    }

    /// Makes the next write rewrite everything (e.g. after another writer held the sinks).
    pub fn force_resync(&mut self) {
        self.resync = true;
    }

    /// Whether the next write rewrites everything.
    pub fn needs_resync(&self) -> bool {
        self.resync
    }

    /// Brings Valkey up to date with `engine` for `changes`, or entirely after a gap.
    /// On failure the sink stays consistent by resynchronizing at the next call.
    pub fn write(&mut self, engine: &Engine, changes: &Changes) -> Result<(), Error> {
        let prepared = self.prepare(engine, changes)?;
        self.send(prepared)
    }

    /// The transaction that brings Valkey up to date with `engine` for `changes` (or
    /// entirely after a gap), for [`send`](Self::send): built apart from sending so that
    /// a caller can send it on another thread while it goes on. Only what differs from
    /// the figures last written goes in.
    pub fn prepare(&mut self, engine: &Engine, changes: &Changes) -> Result<Prepared, Error> {
        if self.valkey.cluster().is_none() {
            // The key names depend on whether Valkey is a cluster.
            self.connection()?;
        }
        let mut pipe = Packed { bytes: std::mem::take(&mut self.spare), commands: 0 };
        if let Some(token) = self.token {
            pipe.add(Cmd::set(self.fence_key(), token));
        }
        if self.resync {
            return Ok(self.prepare_full(engine, pipe));
        }
        let mut agents = Vec::new();
        for &agent in &changes.agents {
            let id = engine.name(agent);
            let new = engine.agent_figures(agent);
            let old = self.agents.get(id);
            if old == new.as_ref() {
                continue;
            }
            self.put_agent(&mut pipe, old, new.as_ref(), id);
            agents.push((id.to_owned(), new));
        }
        // Each pattern's hash is its own command; its two sorted sets take it with every
        // other pattern of the same set, in one ZADD or ZREM per set (per `SET_CHUNK`).
        // A sequence's names are joined once per write: many users share it.
        let views: Vec<_> = changes.patterns.iter().map(|&k| (k, engine.pattern_view(k))).collect();
        let mut names = HashMap::new();
        for v in views.iter().filter_map(|(_, v)| v.as_ref()) {
            names.entry(v.sequence).or_insert_with(|| engine.sequence_names(v.sequence));
        }
        let (mut ranked, mut removed) = (Vec::new(), Vec::new());
        for (k, v) in &views {
            match v {
                // ZADD moves a member, HSET overwrites every field: nothing to remove first.
                Some(v) => {
                    let id = PatternId::of(v, &names);
                    put_pattern(&mut pipe, &self.prefix, &id, v);
                    ranked.push((v.user_id, v.rank_key(), id));
                }
                None => {
                    let id = engine.pattern_id(*k);
                    pipe.add(Cmd::del(self.key(&["pattern", &id])));
                    removed.push((engine.name(k.user), id));
                }
            }
        }
        self.per_set(&mut pipe, &mut ranked, |r| r.0, zadd);
        self.per_set(
            &mut pipe,
            &mut removed,
            |r| r.0,
            |pipe, key, chunk| {
                pipe.add(Cmd::zrem(key, chunk.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>()));
            },
        );
        Ok(Prepared { pipe, rewrite: None, agents, full: None, token: self.token })
    }

    /// A full rewrite of `engine` after `pipe`'s commands, in transactions of about
    /// [`REWRITE_BYTES`]: the agents' keys, then the patterns user by user. Each key
    /// written is deleted first in the same transaction, so it holds exactly what the
    /// engine holds once that transaction is in; the set of all patterns is built under
    /// a key of its own and renamed over `P:patterns` in the last one.
    fn prepare_full(&mut self, engine: &Engine, mut pipe: Packed) -> Prepared {
        self.agents.clear();
        let everything = engine.everything();
        let mut written = HashSet::new();
        if self.shard.is_none() {
            // Left by a rewrite cut off before its rename.
            pipe.add(Cmd::del(self.key(&["rebuild", "patterns"])));
        }
        let agents = everything.agents.iter().filter(|_| self.shard.is_none_or(|(shard, _)| shard == 0));
        let figures: Vec<(&str, AgentFigures)> = agents.filter_map(|&a| Some((engine.name(a), engine.agent_figures(a)?))).collect();
        let mut domains: Vec<&str> = figures.iter().map(|(_, f)| f.domain_id.as_str()).collect();
        domains.sort_unstable();
        domains.dedup();
        let mut whole = match figures.is_empty() && self.shard.is_some() {
            true => Vec::new(),
            false => vec![self.key(&["domains"]), self.key(&["agent-ids"])],
        };
        whole.extend(domains.iter().map(|d| self.key(&["agents", d])));
        for (id, _) in &figures {
            whole.extend(["agent", "tools", "toolfigures"].map(|kind| self.key(&[kind, id])));
        }
        for chunk in whole.chunks(SET_CHUNK) {
            pipe.add(Cmd::del(chunk));
        }
        written.extend(whole.iter().map(|k| self.fingerprints.of(k.as_str())));
        let mut agents = Vec::with_capacity(figures.len());
        for (id, f) in figures {
            self.put_agent(&mut pipe, None, Some(&f), id);
            agents.push((id.to_owned(), Some(f)));
        }
        let mut views: Vec<PatternView<'_>> = everything.patterns.iter().filter_map(|&k| engine.pattern_view(k)).filter(|v| self.mine(v.user_id)).collect();
        views.sort_unstable_by(|a, b| a.user_id.cmp(b.user_id));
        let mut sequences = HashMap::new();
        for v in &views {
            sequences.entry(v.sequence).or_insert_with(|| engine.sequence_names(v.sequence));
        }
        let (mut ids, mut index) = (Vec::new(), HashMap::new());
        let mut id_of = |name| -> u32 {
            *index.entry(name).or_insert_with(|| {
                ids.push(String::from(name));
                ids.len() as u32 - 1
            })
        };
        let (mut patterns, mut key) = (Vec::with_capacity(views.len()), String::new());
        for run in views.chunk_by(|a, b| a.user_id == b.user_id) {
            written.insert(self.fingerprints.of(self.key(&["patterns", run[0].user_id]).as_str()));
            for v in run {
                key.clear();
                key.push_str(&self.prefix);
                key.push_str(":pattern:");
                PatternId::of(v, &sequences).push_to(&mut key);
                written.insert(self.fingerprints.of(key.as_str()));
                let (user, agent) = (id_of(v.user_id), id_of(v.agent_id));
                patterns.push(RewritePattern {
                    user,
                    agent,
                    sequence: v.sequence,
                    executions: v.executions,
                    successes: v.successes,
                    first: v.first,
                    last: v.last,
                });
            }
        }
        written.insert(self.fingerprints.of(self.key(&["patterns"]).as_str()));
        let rewrite = Rewrite { ids, sequences, patterns, bytes: self.rewrite_bytes, shared: self.shard.is_some() };
        Prepared { pipe, rewrite: Some(rewrite), agents, full: Some(written), token: self.token }
    }

    /// Sends a prepared transaction; what it wrote is remembered once it succeeded. On
    /// failure the next [`prepare`](Self::prepare) rewrites everything.
    pub fn send(&mut self, prepared: Prepared) -> Result<(), Error> {
        let result = self.try_send(&prepared);
        // The next transaction is encoded into the same memory (a large one's only
        // up to a limit: it would be held for good).
        if prepared.pipe.bytes.capacity() <= SPARE_LIMIT {
            self.spare = prepared.pipe.bytes;
            self.spare.clear();
        }
        match result {
            Ok(()) => {
                for (id, figures) in prepared.agents {
                    match figures {
                        Some(f) => self.agents.insert(id, f),
                        None => self.agents.remove(&id),
                    };
                }
                self.resync = false;
            }
            Err(_) => {
                self.conn = None;
                self.resync = true;
            }
        }
        result
    }

    fn try_send(&mut self, prepared: &Prepared) -> Result<(), Error> {
        let (fence, prefix) = (self.fence_key(), self.prefix.clone());
        self.connection()?;
        let conn = self.conn.as_mut().expect("just connected");
        let (mut sent, mut transactions) = (0, 0);
        let result = transact(conn, prepared, (&fence, &prefix), (&self.fingerprints, self.shard), &mut sent, &mut transactions);
        self.commands += sent;
        self.transactions += transactions;
        result
    }

    /// Moves agent `id` from its `old` figures (as written) to its `new` ones: all its
    /// keys when it appears, moves domain or leaves; otherwise only the changed parts.
    fn put_agent(&self, pipe: &mut Packed, old: Option<&AgentFigures>, new: Option<&AgentFigures>, id: &str) {
        let moved = match (old, new) {
            (Some(o), Some(n)) => o.domain_id != n.domain_id,
            _ => true,
        };
        if let Some(o) = old.filter(|_| moved) {
            pipe.add(Cmd::zrem(self.key(&["agents", &o.domain_id]), id));
            pipe.add(Cmd::srem(self.key(&["agent-ids"]), id));
            pipe.add(Cmd::del(&[self.key(&["agent", id]), self.key(&["tools", id]), self.key(&["toolfigures", id])]));
        }
        let Some(f) = new else { return };
        let old = old.filter(|_| !moved);
        if old.is_none_or(|o| o.rank_key().to_bits() != f.rank_key().to_bits()) {
            pipe.add(Cmd::zadd(self.key(&["agents", &f.domain_id]), id, f.rank_key()));
        }
        if old.is_none() {
            pipe.add(Cmd::sadd(self.key(&["domains"]), &f.domain_id));
            pipe.add(Cmd::sadd(self.key(&["agent-ids"]), id));
        }
        let hash = |a: &AgentFigures| {
            let mut fields = vec![
                ("domain", a.domain_id.clone()),
                ("executions", a.executions.to_string()),
                ("successes", a.successes.to_string()),
                ("rows", a.rows.to_string()),
                ("failed_rows", a.failed_rows.to_string()),
                ("failed_tools", a.failed_tools.join(", ")),
            ];
            fields.extend(a.agent_name.clone().map(|n| ("name", n)));
            fields.extend(a.last.map(|l| ("last", l.to_string())));
            fields
        };
        let fields = hash(f);
        if old.is_none_or(|o| hash(o) != fields) {
            let gone: Vec<&str> = ["name", "last"].into_iter().filter(|n| !fields.iter().any(|(k, _)| k == n)).collect();
            if old.is_some() && !gone.is_empty() {
                pipe.add(Cmd::hdel(self.key(&["agent", id]), gone));
            }
            pipe.add(Cmd::hset_multiple(self.key(&["agent", id]), &fields));
        }
        let before: HashMap<&str, &ToolFigures> = old.map(|o| o.tools.iter().map(|t| (t.tool_nm.as_str(), t)).collect()).unwrap_or_default();
        for t in f.tools.iter().filter(|t| before.get(t.tool_nm.as_str()) != Some(t)) {
            pipe.add(Cmd::zadd(self.key(&["tools", id]), &t.tool_nm, t.score()));
            pipe.add(Cmd::hset(self.key(&["toolfigures", id]), &t.tool_nm, format!("{} {}", t.rows, t.failed)));
        }
        for gone in before.keys().filter(|n| !f.tools.iter().any(|t| t.tool_nm == **n)) {
            pipe.add(Cmd::zrem(self.key(&["tools", id]), *gone));
            pipe.add(Cmd::hdel(self.key(&["toolfigures", id]), *gone));
        }
    }

    /// Adds `command` for each pattern sorted set: every user's `patterns:<user>` with that
    /// user's `items`, then `patterns` with all of them, `SET_CHUNK` items at a time.
    fn per_set<'a, T>(&self, pipe: &mut Packed, items: &mut [T], user: fn(&T) -> &'a str, command: impl Fn(&mut Packed, &str, &[T])) {
        items.sort_unstable_by(|a, b| user(a).cmp(user(b)));
        let runs = items.chunk_by(|a, b| user(a) == user(b)).map(|run| (self.key(&["patterns", user(&run[0])]), run));
        for (key, run) in runs.chain(std::iter::once((self.key(&["patterns"]), &items[..]))) {
            for chunk in run.chunks(SET_CHUNK) {
                command(pipe, &key, chunk);
            }
        }
    }
}

/// `prefix:part:part...`
fn key(prefix: &str, parts: &[&str]) -> String {
    let mut k = prefix.to_owned();
    for p in parts {
        k.push(':');
        k.push_str(p);
    }
    k
}

/// Adds the HSET of pattern `id`'s hash under `prefix`, from its view `v`.
fn put_pattern(pipe: &mut Packed, prefix: &str, id: &PatternId<'_>, v: &PatternView<'_>) {
    let [u, s1, p, s2, a, s3, t] = id.pieces();
    pipe.command(18);
    pipe.arg(&[b"HSET"]);
    pipe.arg(&[prefix.as_bytes(), b":pattern:", u, s1, p, s2, a, s3, t]);
    for (field, value) in [(&b"user"[..], u), (b"process_pattern", p), (b"agent", a), (b"tool_sequence", t)] {
        pipe.arg(&[field]);
        pipe.arg(&[value]);
    }
    for (field, n) in [(&b"executions"[..], v.executions), (b"successes", v.successes)] {
        pipe.arg(&[field]);
        pipe.number(Number::Count(n));
    }
    for (field, day) in [(&b"first"[..], v.first), (b"last", v.last)] {
        pipe.arg(&[field]);
        pipe.arg(&[day.to_string().as_bytes()]);
    }
}

/// The most members one ZADD or ZREM carries: a pipeline's arguments stay small, and
/// so does what Valkey parses at once.
const SET_CHUNK: usize = 1024;

/// The size at which a full rewrite starts its next transaction (at the next user): a
/// few tens of thousands of patterns, which Valkey executes in tens of milliseconds.
pub const REWRITE_BYTES: usize = 8 << 20;

/// The most keys of the namespace one transaction deletes after a full rewrite.
const STALE_KEYS: usize = 64 * SET_CHUNK;

/// Adds a ZADD of `members` to sorted set `key`.
fn zadd(pipe: &mut Packed, key: &str, members: &[Member<'_>]) {
    pipe.command(2 + 2 * members.len());
    pipe.arg(&[b"ZADD"]);
    pipe.arg(&[key.as_bytes()]);
    for (_, rank, id) in members {
        pipe.number(Number::Score(*rank));
        pipe.arg(&id.pieces());
    }
}

/// How many times a reader reads a listing whose members a write removed before their
/// figures were read ([`listed`]).
const LIST_READS: usize = 3;

/// Reads the members a ranking or set lists (`list`), then each member's figures (`read`,
/// `None`: no such member). The two reads are apart, so a write may remove a member in
/// between: the listing is then read again, up to [`LIST_READS`] times in all; `Err` with
/// a member still missing at the last.
fn listed<C, T>(
    ctx: &mut C,
    list: impl Fn(&mut C) -> Result<Vec<String>, Error>,
    read: impl Fn(&mut C, &str) -> Result<Option<T>, Error>,
) -> Result<Result<Vec<T>, String>, Error> {
    let mut missing = None;
    for _ in 0..LIST_READS {
        let ids = list(ctx)?;
        let mut all = Vec::with_capacity(ids.len());
        missing = None;
        for id in ids {
            match read(ctx, &id)? {
                Some(figures) => all.push(figures),
                None => {
                    missing = Some(id);
                    break;
                }
            }
        }
        if missing.is_none() {
            return Ok(Ok(all));
        }
    }
    Ok(Err(missing.unwrap_or_default()))
}

/// Reads what a Valkey sink holds under `prefix`.
pub struct ValkeyReader {
    conn: Following,
    prefix: String,
}

/// Sends `prepared`'s transactions in order (a full rewrite's encoded one at a time);
/// with a fencing token, each only while `fence` holds no larger one. After a full
/// rewrite's, deletes every key of the namespace (`prefix`) it did not write (of its
/// `shard`'s, with the stale members of the set of all patterns). Counts the commands
/// and transactions sent in `sent` and `transactions`.
fn transact(
    conn: &mut Connection,
    prepared: &Prepared,
    (fence, prefix): (&str, &str),
    (fingerprints, shard): (&Fingerprints, Option<(u32, u32)>),
    sent: &mut u64,
    transactions: &mut u64,
) -> Result<(), Error> {
    let mut stale = Vec::new();
    let (mut encoded, mut next) = (Packed::default(), Some(0));
    for i in 0.. {
        let pipe = match &prepared.rewrite {
            None if i == 0 => &prepared.pipe,
            None => break,
            Some(rewrite) => {
                let Some(from) = next else { break };
                encoded.bytes.clear();
                encoded.commands = 0;
                if i == 0 {
                    encoded.bytes.extend_from_slice(&prepared.pipe.bytes);
                    encoded.commands = prepared.pipe.commands;
                }
                next = rewrite.encode(&mut encoded, prefix, from);
                &encoded
            }
        };
        watch(conn, fence, prepared.token, sent)?;
        if let Some(written) = prepared.full.as_ref().filter(|_| i == 0) {
            // What the namespace holds is listed only now, after the WATCH: a key another
            // writer adds later aborts the rewrite instead of outliving it. Only the keys
            // the rewrite does not write are kept (not every key of a large namespace).
            conn.set_read_timeout(Some(IO_TIMEOUT))?;
            let fences = key(prefix, &["fence"]);
            let (keys, calls) = namespace_keys(conn, prefix, |k| !k.starts_with(&fences) && !written.contains(&fingerprints.of(k)))?;
            *sent += calls;
            stale = match shard {
                None => keys,
                Some(shard) => shard_keys(conn, prefix, keys, shard, sent)?,
            };
        }
        exec_watched(conn, pipe, fence, prepared.token, sent)?;
        *transactions += 1;
    }
    if prepared.full.is_none() {
        return Ok(());
    }
    tracing::debug!(transactions = *transactions, stale = stale.len(), "valkey full rewrite written; deleting the keys it did not write");
    let (all, hashes) = (key(prefix, &["patterns"]), key(prefix, &["pattern", ""]));
    for keys in stale.chunks(STALE_KEYS) {
        let mut pipe = Packed::default();
        for chunk in keys.chunks(SET_CHUNK) {
            pipe.add(Cmd::del(chunk));
            // A shard's stale patterns leave the set of all patterns (another shard's
            // rewrite renames nothing over it).
            let ids: Vec<&str> = chunk.iter().filter_map(|k| k.strip_prefix(&hashes)).collect();
            if shard.is_some() && !ids.is_empty() {
                pipe.add(Cmd::zrem(&all, ids));
            }
        }
        watch(conn, fence, prepared.token, sent)?;
        exec_watched(conn, &pipe, fence, prepared.token, sent)?;
        *transactions += 1;
    }
    Ok(())
}

/// Of `keys`, keys of namespace `prefix` that a rewrite of `shard` (shard, of how many)
/// did not write, those that are the shard's: the pattern hashes (their user read from
/// them) and per-user sets of its users, and for shard 0 every other key but the set of
/// all patterns, which every shard writes.
fn shard_keys(conn: &mut Connection, prefix: &str, keys: Vec<String>, (shard, count): (u32, u32), sent: &mut u64) -> Result<Vec<String>, Error> {
    let ours = |user: &str| shard_of(user, count) == shard;
    let (hashes, sets, all) = (key(prefix, &["pattern", ""]), key(prefix, &["patterns", ""]), key(prefix, &["patterns"]));
    let (patterns, others): (Vec<String>, Vec<String>) = keys.into_iter().partition(|k| k.starts_with(&hashes));
    let mut stale: Vec<String> = others
        .into_iter()
        .filter(|k| match k.strip_prefix(&sets) {
            Some(user) => ours(user),
            None => shard == 0 && *k != all,
        })
        .collect();
    for chunk in patterns.chunks(SET_CHUNK) {
        let mut pipe = redis::pipe();
        chunk.iter().for_each(|k| {
            pipe.hget(k, "user");
        });
        *sent += chunk.len() as u64;
        let users: Vec<Option<String>> = pipe.query(conn)?;
        // A hash without a user is nobody's but shard 0's to remove.
        stale.extend(chunk.iter().zip(users).filter(|(_, user)| user.as_deref().map_or(shard == 0, ours)).map(|(k, _)| k.clone()));
    }
    Ok(stale)
}

/// With a fencing token: `WATCH`es `fence`, so that another writer's transaction from
/// now on aborts the next one, and refuses to go on when it holds a larger token.
fn watch(conn: &mut Connection, fence: &str, token: Option<u64>, sent: &mut u64) -> Result<(), Error> {
    let Some(token) = token else { return Ok(()) };
    *sent += 2;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    let (held,): (Option<u64>,) = redis::pipe().cmd("WATCH").arg(fence).ignore().get(fence).query(conn)?;
    match held {
        Some(held) if held > token => Err(Error::Fenced(fence.to_owned(), token)),
        _ => Ok(()),
    }
}

/// Sends `pipe` as a transaction after a [`watch`]: an abort means another writer's
/// transaction changed the fence since.
fn exec_watched(conn: &mut Connection, pipe: &Packed, fence: &str, token: Option<u64>, sent: &mut u64) -> Result<(), Error> {
    // A large transaction takes Valkey longer: the timeouts grow with it (about 10 µs per
    // pattern), or it would never finish within them and be retried forever.
    let timeout = IO_TIMEOUT + Duration::from_nanos(75 * pipe.bytes.len() as u64);
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    *sent += pipe.commands;
    if exec(conn, pipe)? {
        return Ok(());
    }
    *sent += 1;
    let token = token.unwrap_or_default();
    match conn.get::<_, Option<u64>>(fence)? {
        Some(held) if held > token => Err(Error::Fenced(fence.to_owned(), token)),
        _ => Err(Error::Interleaved),
    }
}

/// Sends `pipe`'s commands as one MULTI/EXEC transaction; `false` when Valkey aborted it
/// (a watched key changed).
fn exec(conn: &mut Connection, pipe: &Packed) -> redis::RedisResult<bool> {
    conn.send_packed_command(&redis::cmd("MULTI").get_packed_command())?;
    conn.send_packed_command(&pipe.bytes)?;
    conn.send_packed_command(&redis::cmd("EXEC").get_packed_command())?;
    // MULTI's reply and one per queued command come first: all are read before an error
    // is returned, so that the connection stays in step.
    let mut failed = None;
    for _ in 0..=pipe.commands {
        if let Err(e) = conn.recv_response()?.extract_error() {
            failed.get_or_insert(e);
        }
    }
    let done = conn.recv_response()?;
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(done.extract_error()? != redis::Value::Nil)
}

fn field<T: std::str::FromStr>(h: &HashMap<String, String>, name: &str, what: &'static str, key: &str) -> Result<T, Error> {
    h.get(name).and_then(|v| v.parse().ok()).ok_or_else(|| Error::Data { what, key: key.to_owned(), reason: format!("missing or invalid {name}") })
}

fn day_field(h: &HashMap<String, String>, name: &str, what: &'static str, key: &str) -> Result<Day, Error> {
    h.get(name).and_then(|v| Day::parse_iso(v)).ok_or_else(|| Error::Data { what, key: key.to_owned(), reason: format!("missing or invalid {name}") })
}

impl ValkeyReader {
    pub fn connect(url: &str, namespace: &str, timeout: Duration) -> Result<ValkeyReader, Error> {
        let conn = Following::new(Valkey::open(url)?, &cluster::tag(namespace), timeout)?;
        let prefix = conn.valkey().key_prefix(namespace);
        Ok(ValkeyReader { conn, prefix })
    }

    fn key(&self, parts: &[&str]) -> String {
        std::iter::once(self.prefix.as_str()).chain(parts.iter().copied()).collect::<Vec<_>>().join(":")
    }

    /// [`listed`], a member still missing at the last read an error.
    fn each<T>(
        &mut self,
        what: &'static str,
        list: impl Fn(&mut Self) -> Result<Vec<String>, Error>,
        read: impl Fn(&mut Self, &str) -> Result<Option<T>, Error>,
    ) -> Result<Vec<T>, Error> {
        listed(self, list, read)?.map_err(|id| Error::Data { what, key: self.key(&[what, &id]), reason: format!("listed but not found, {LIST_READS} times") })
    }

    /// A domain's agents, best first, up to `limit` (0: all).
    pub fn top_agents(&mut self, domain: &str, limit: usize) -> Result<Vec<AgentFigures>, Error> {
        let ranking = self.key(&["agents", domain]);
        self.each("agent", |r| Ok(r.conn.zrevrange(&ranking, 0, limit as isize - 1)?), Self::agent_if_any)
    }

    /// One agent's figures, with its tools.
    pub fn agent(&mut self, id: &str) -> Result<AgentFigures, Error> {
        self.agent_if_any(id)?.ok_or_else(|| Error::Data { what: "agent", key: self.key(&["agent", id]), reason: "not found".into() })
    }

    fn agent_if_any(&mut self, id: &str) -> Result<Option<AgentFigures>, Error> {
        let key = self.key(&["agent", id]);
        let h: HashMap<String, String> = self.conn.hgetall(&key)?;
        if h.is_empty() {
            return Ok(None);
        }
        let tools: HashMap<String, String> = self.conn.hgetall(self.key(&["toolfigures", id]))?;
        let mut tools: Vec<ToolFigures> = tools
            .into_iter()
            .map(|(tool_nm, v)| {
                let mut it = v.split(' ').map(|x| x.parse::<u64>());
                match (it.next(), it.next()) {
                    (Some(Ok(rows)), Some(Ok(failed))) => Ok(ToolFigures { tool_nm, rows, failed }),
                    _ => Err(Error::Data { what: "tool figures", key: id.to_owned(), reason: format!("bad value {v:?}") }),
                }
            })
            .collect::<Result<_, _>>()?;
        tools.sort_unstable_by(|a, b| a.tool_nm.cmp(&b.tool_nm));
        Ok(Some(AgentFigures {
            agent_id: id.to_owned(),
            domain_id: field(&h, "domain", "agent", &key)?,
            agent_name: h.get("name").cloned(),
            executions: field(&h, "executions", "agent", &key)?,
            successes: field(&h, "successes", "agent", &key)?,
            last: h.contains_key("last").then(|| day_field(&h, "last", "agent", &key)).transpose()?,
            rows: field(&h, "rows", "agent", &key)?,
            failed_rows: field(&h, "failed_rows", "agent", &key)?,
            failed_tools: h.get("failed_tools").filter(|s| !s.is_empty()).map(|s| s.split(", ").map(str::to_owned).collect()).unwrap_or_default(),
            tools,
        }))
    }

    /// Every agent.
    pub fn agents(&mut self) -> Result<Vec<AgentFigures>, Error> {
        let set = self.key(&["agent-ids"]);
        self.each("agent", |r| Ok(r.conn.smembers(&set)?), Self::agent_if_any)
    }

    /// Pattern figures of `user` (or of everyone), best first, up to `limit` (0: all).
    pub fn top_patterns(&mut self, user: Option<&str>, limit: usize) -> Result<Vec<PatternFigures>, Error> {
        let key = match user {
            Some(u) => self.key(&["patterns", u]),
            None => self.key(&["patterns"]),
        };
        self.each("pattern", |r| Ok(r.conn.zrevrange(&key, 0, limit as isize - 1)?), Self::pattern)
    }

    fn pattern(&mut self, id: &str) -> Result<Option<PatternFigures>, Error> {
        let key = self.key(&["pattern", id]);
        let h: HashMap<String, String> = self.conn.hgetall(&key)?;
        if h.is_empty() {
            return Ok(None);
        }
        let what = "pattern";
        Ok(Some(PatternFigures {
            user_id: field(&h, "user", what, &key)?,
            process_pattern: field(&h, "process_pattern", what, &key)?,
            agent_id: field(&h, "agent", what, &key)?,
            tool_sequence: field(&h, "tool_sequence", what, &key)?,
            executions: field(&h, "executions", what, &key)?,
            successes: field(&h, "successes", what, &key)?,
            first: day_field(&h, "first", what, &key)?,
            last: day_field(&h, "last", what, &key)?,
        }))
    }

    /// Every pattern.
    pub fn patterns(&mut self) -> Result<Vec<PatternFigures>, Error> {
        self.top_patterns(None, 0)
    }
}

/// The key holding the namespace readers use (`toolrank promote` sets it). It has no `:`,
/// so no namespace's keys can include it.
pub const ACTIVE_KEY: &str = "toolrank-active-namespace";

/// Keys a `SCAN` call looks at. SCAN walks the whole keyspace, other namespaces' keys
/// too, and at its default (10) a full rewrite would make a round trip per ten keys of
/// the server; a thousand keeps each call short for the server (about a millisecond).
const SCAN_COUNT: usize = 1000;

/// Every key of namespace `prefix` that `keep` keeps (once each: SCAN may return a key
/// twice), and the SCAN calls that listed them.
fn namespace_keys(conn: &mut Connection, prefix: &str, keep: impl Fn(&str) -> bool) -> Result<(Vec<String>, u64), Error> {
    let pattern = format!("{prefix}:*");
    let (mut keys, mut cursor, mut calls) = (Vec::new(), 0u64, 0);
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(SCAN_COUNT).query(conn)?;
        calls += 1;
        keys.extend(batch.into_iter().filter(|k| keep(k)));
        if next == 0 {
            keys.sort_unstable();
            keys.dedup();
            return Ok((keys, calls));
        }
        cursor = next;
    }
}

/// Namespaces (key prefixes) of rankings in one Valkey: which one is active, switching,
/// dropping.
pub struct Namespaces {
    valkey: Valkey,
    timeout: Duration,
}

impl Namespaces {
    pub fn connect(url: &str, timeout: Duration) -> Result<Namespaces, Error> {
        let mut namespaces = Namespaces { valkey: Valkey::open(url)?, timeout };
        namespaces.node(ACTIVE_KEY)?;
        Ok(namespaces)
    }

    /// A connection to the node serving `key`.
    fn node(&mut self, key: &str) -> Result<Connection, Error> {
        let conn = self.valkey.connection_for(key, self.timeout)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(conn)
    }

    /// The node and key prefix of namespace `name`.
    fn namespace(&mut self, name: &str) -> Result<(Connection, String), Error> {
        let conn = self.node(&cluster::tag(name))?;
        Ok((conn, self.valkey.key_prefix(name)))
    }

    /// The namespace readers use, if one was promoted.
    pub fn active(&mut self) -> Result<Option<String>, Error> {
        Ok(self.node(ACTIVE_KEY)?.get(ACTIVE_KEY)?)
    }

    /// Makes `name` the active namespace in one command; returns the one it replaces.
    pub fn promote(&mut self, name: &str) -> Result<Option<String>, Error> {
        Ok(redis::cmd("SET").arg(ACTIVE_KEY).arg(name).arg("GET").query(&mut self.node(ACTIVE_KEY)?)?)
    }

    /// How many keys namespace `name` has (0: it holds no rankings).
    pub fn size(&mut self, name: &str) -> Result<usize, Error> {
        let (mut conn, prefix) = self.namespace(name)?;
        Ok(namespace_keys(&mut conn, &prefix, |_| true)?.0.len())
    }

    /// Deletes every key of namespace `name`; returns how many there were.
    pub fn drop(&mut self, name: &str) -> Result<usize, Error> {
        let (mut conn, prefix) = self.namespace(name)?;
        let (keys, _) = namespace_keys(&mut conn, &prefix, |_| true)?;
        for chunk in keys.chunks(1000) {
            let _: () = conn.del(chunk)?;
        }
        Ok(keys.len())
    }
}

impl toolrank_sink::Sink for ValkeySink {
    type Request = Prepared;

    fn name(&self) -> &'static str {
        "valkey"
    }

    fn plan(&mut self, figures: &Engine, changes: &Changes, _: toolrank_sink::Scope<'_>) -> Result<Prepared, toolrank_sink::Error> {
        self.prepare(figures, changes).map_err(|e| toolrank_sink::Error::new("valkey", e))
    }

    fn send(&mut self, prepared: Prepared) -> Result<(), toolrank_sink::Error> {
        ValkeySink::send(self, prepared).map_err(|e| match e {
            Error::Fenced(..) => toolrank_sink::Error::fenced("valkey", e),
            e => toolrank_sink::Error::new("valkey", e),
        })
    }

    fn pending(&self) -> bool {
        self.needs_resync()
    }

    fn fence(&mut self) {
        self.force_resync();
    }

    fn hold(&mut self, generation: u64) {
        self.token = Some(generation);
    }

    fn stats(&self) -> toolrank_sink::Stats {
        toolrank_sink::Stats { requests: self.commands, write_units: 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose listing names `b` until `removed` listings were read, while `b`'s
    /// figures are gone from the start (a write removed it between the reads).
    struct Store {
        listings: usize,
        removed: usize,
    }

    fn read_listed(store: &mut Store) -> Result<Result<Vec<String>, String>, Error> {
        let list = |s: &mut Store| {
            s.listings += 1;
            Ok(if s.listings > s.removed { vec!["a".to_owned()] } else { vec!["a".to_owned(), "b".to_owned()] })
        };
        listed(store, list, |_, id| Ok((id == "a").then(|| id.to_uppercase())))
    }

    #[test]
    fn a_member_removed_between_the_listing_and_its_figures_is_read_again() {
        let mut store = Store { listings: 0, removed: 0 };
        assert_eq!(read_listed(&mut store).unwrap(), Ok(vec!["A".to_owned()]));
        assert_eq!(store.listings, 1);
        let mut store = Store { listings: 0, removed: LIST_READS - 1 };
        assert_eq!(read_listed(&mut store).unwrap(), Ok(vec!["A".to_owned()]), "the last listing no longer names b");
        assert_eq!(store.listings, LIST_READS);
        // Listed at every read, never found: an error that names it.
        let mut store = Store { listings: 0, removed: LIST_READS };
        assert_eq!(read_listed(&mut store).unwrap(), Err("b".to_owned()));
        assert_eq!(store.listings, LIST_READS);
    }

    /// The hand-encoded pattern commands are byte for byte what redis-rs encodes.
    #[test]
    fn pattern_commands_encode_as_redis_rs_does() {
        let sink = ValkeySink::new("redis://127.0.0.1:1", "ns").expect("a valid URL");
        let (first, last) = (Day::parse_iso("2025-07-01").unwrap(), Day::parse_iso("2025-07-14").unwrap());
        let v = PatternView { user_id: "u1", agent_id: "a9", sequence: 3, executions: 12, successes: 7, first, last };
        let names = HashMap::from([(3, ("p1->p2".to_owned(), "t1->t2".to_owned()))]);
        let id = PatternId::of(&v, &names);
        let mut packed = Packed::default();
        put_pattern(&mut packed, &sink.prefix, &id, &v);
        let mut hset = redis::cmd("HSET");
        hset.arg("ns:pattern:u1|p1->p2|a9|t1->t2");
        hset.arg("user").arg("u1").arg("process_pattern").arg("p1->p2").arg("agent").arg("a9").arg("tool_sequence").arg("t1->t2");
        hset.arg("executions").arg(12u64).arg("successes").arg(7u64).arg("first").arg("2025-07-01").arg("last").arg("2025-07-14");
        assert_eq!(String::from_utf8_lossy(&packed.bytes), String::from_utf8_lossy(&hset.get_packed_command()));

        let mut packed = Packed::default();
        packed.command(6);
        packed.arg(&[b"ZADD"]);
        packed.arg(&[b"ns:patterns"]);
        for rank in [v.rank_key(), f64::NEG_INFINITY] {
            packed.number(Number::Score(rank));
            packed.arg(&id.pieces());
        }
        let members = [(v.rank_key(), "u1|p1->p2|a9|t1->t2"), (f64::NEG_INFINITY, "u1|p1->p2|a9|t1->t2")];
        assert_eq!(packed.bytes, Cmd::zadd_multiple("ns:patterns", &members).get_packed_command());
        assert_eq!(packed.commands, 1);
    }
}
