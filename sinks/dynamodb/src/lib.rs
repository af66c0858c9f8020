//! Rankings into DynamoDB, in the seed's own table (SPEC §4).
//!
//! - Each Agent METADATA item gets `Score` (for the day written), its counts and dates, and
//!   `GSI1_SK = AGTSCORE#<rank key>`: the seed's access pattern 2 (`GSI1_PK = domain AND
//!   begins_with(GSI1_SK, 'AGTSCORE')`, descending) returns the true top agents at any
//!   later date without rewrites, because the key is time-invariant (SPEC §3).
//!   Updates are conditional on the item existing and set only the attributes the
//!   pipeline owns.
//! - Recommended patterns are `UserPrcToolMapp` items (`PK` = user, `SK` =
//!   `UserPrcToolMapp#<name>`, `GSI1_PK = UserPrcToolMapp`, `GSI1_SK` = name) serving
//!   access patterns 7 and 8, deleted when no longer recommended, with the seed's TTL
//!   (30 days, 60 for the top-scoring set).
//!
//! Writes are coalesced: the sink remembers what it wrote and writes a key only when its
//! figures changed since. A failed key stays pending and is retried on the next call.
//!
//! Reading back what the sink wrote (at a start, or after another writer held the sink)
//! costs what the rankings cost, never what the history costs: no Scan. The domains the
//! sink scored agents in are registered on one item of their own (`PK =
//! toolrank#sink`, `SK = Domains` or `Domains#NAME`, a string set, added to before the
//! first agent of a new domain is written); each domain's agents are one Query of GSI1
//! (access pattern 2's), the pattern items one Query of GSI1's `UserPrcToolMapp`
//! partition. Index reads are eventually consistent: a value a moment old only makes the
//! next write compare with it, and writes are absolute.
//!
//! A writer holding the sink lease writes fenced ([`fence`]): it claims its token on a
//! fence item before reading the table back, and each of its writes is a transaction
//! checked against that item, so a deposed holder's late write is refused.
//!
//! A shadow namespace ([`Namespace::Shadow`], written by recomputations) keeps the same
//! items under keys readers of the seed's access patterns never meet: `PK` and `GSI1_PK`
//! prefixed `toolrank#NAME#`, agents at `SK = SCORE`. No such key parses as a hist or
//! METADATA key, so they are no events if they come back through the stream.

mod fence;

use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, PutRequest, WriteRequest};
use aws_sdk_dynamodb::Client;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::{self, StreamExt};
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use toolrank_dynamodb::TOTAL;
use toolrank_engine::{shard_of, AgentFigures, Changes, Cuts, Engine, PatternFigures, PatternKey, Recommended, Sym};
use toolrank_events::Day;
use toolrank_sink::{Fingerprint, Fingerprints, Scope};

/// `GSI1_PK` and `EntityType` of pattern items.
pub const PATTERN_ENTITY: &str = "UserPrcToolMapp";
/// Marks the items and attributes this sink owns.
const SOURCE: &str = "toolrank";
const DEFAULT_TTL_DAYS: u64 = 30;
const TOP_TTL_DAYS: u64 = 60;
/// Requests in flight at once: DynamoDB latency, not its throughput, bounds a sequential writer.
const CONCURRENCY: usize = 32;
/// How long one call starts new pattern batches: the consumer's poll loop waits for it.
const WRITE_BUDGET: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Aws(String),
    #[error("unreadable {what} item {key}: {reason}")]
    Item { what: &'static str, key: String, reason: String },
    #[error("write refused: {0}")]
    Fenced(String),
}

impl From<Error> for toolrank_dynamodb::Error {
    fn from(e: Error) -> Self {
        toolrank_dynamodb::Error::Aws { what: "writing the rankings".into(), message: e.to_string() }
    }
}

/// A write's figures, taken from the engine ([`DynamoSink::plan`]).
#[derive(Debug)]
pub struct Plan {
    /// Agents to compare: an engine symbol (kept pending if its write fails), the id,
    /// and the figures (`None`: the agent left the rankings).
    agents: Vec<(Option<Sym>, String, Option<AgentFigures>)>,
    /// The pattern items to compare, when the recommended set may have moved.
    patterns: Option<PatternPlan>,
    today: Day,
}

/// The pattern items a write compares with what the sink wrote.
#[derive(Clone, Debug)]
struct PatternPlan {
    /// Recommended patterns, with top-scoring flags and the fingerprint of that content:
    /// put where the sink wrote another.
    desired: FxHashMap<(String, String), (Written, Fingerprint)>,
    /// Items to delete where written; `None` compares all: whatever the sink wrote that
    /// `desired` lacks is deleted.
    leaving: Option<Vec<(String, String)>>,
    /// The recommended set (engine keys, top flags) once this plan is carried out; `None`
    /// for a plan not taken from an engine.
    recommended: Option<Recommended>,
}

/// Counters of what the sink did, for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Write requests (UpdateItem, and items in BatchWriteItem).
    pub requests: u64,
    /// Keys skipped because nothing changed.
    pub unchanged: u64,
}

/// The fixed-width, lexically sortable `GSI1_SK` of an agent: larger keys rank higher;
/// agents without successes get the smallest.
pub fn agent_sort_key(rank_key: f64) -> String {
    let v = if rank_key.is_finite() { ((rank_key + 1.0e4) * 1.0e9).round().clamp(1.0, 9.9e19) as u64 } else { 0 };
    format!("AGTSCORE#{v:020}")
}

/// The pattern item's name: `process_pattern|agent|tool_sequence` (the user is its PK).
pub fn pattern_name(f: &PatternFigures) -> String {
    format!("{}|{}|{}", f.process_pattern, f.agent_id, f.tool_sequence)
}

/// A pattern item's content: its figures and whether it is in the top-scoring set.
#[derive(Clone, Debug, Hash)]
struct Written {
    figures: PatternFigures,
    top: bool,
}

/// Where a namespace's rankings live in the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespace {
    /// On the application's own items: what the seed's access patterns read.
    Live,
    /// Items of the sink's own, under `toolrank#NAME#` keys.
    Shadow(String),
}

/// `PK` of the item that registers the domains a namespace's agents were scored in.
const REGISTRY_PK: &str = "toolrank#sink";

/// `SK` and `EntityType` of an agent's item in a shadow namespace.
const SHADOW_AGENT_SK: &str = "SCORE";
const SHADOW_ENTITY: &str = "ToolrankScore";

/// One agent write in flight (an UpdateItem or a DeleteItem).
type Request = Pin<Box<dyn Future<Output = Result<(), WriteFailure>> + Send>>;

/// One agent write: the pipeline's attributes of an item set or removed, or a shadow
/// item deleted.
enum AgentWrite {
    Update(aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder),
    Delete(aws_sdk_dynamodb::operation::delete_item::builders::DeleteItemFluentBuilder),
}

impl AgentWrite {
    /// Sends it alone, unfenced.
    fn send(self, units: &toolrank_dynamodb::Units) -> Request {
        match self {
            AgentWrite::Update(req) => send_update(req, units),
            AgentWrite::Delete(req) => {
                let units = units.clone();
                Box::pin(async move {
                    req.return_consumed_capacity(TOTAL).send().await.map(|out| units.add(out.consumed_capacity())).map_err(|e| WriteFailure::other(&e))
                })
            }
        }
    }

    /// It as one element of a fenced transaction.
    fn transact(self) -> aws_sdk_dynamodb::types::TransactWriteItem {
        match self {
            AgentWrite::Update(req) => fence::update(&req),
            AgentWrite::Delete(req) => {
                let i = req.as_input();
                fence::delete(i.get_table_name().as_deref().unwrap_or_default(), i.get_key().clone().unwrap_or_default())
            }
        }
    }
}

#[derive(Clone, Debug)]
enum WriteFailure {
    /// A live Agent item no longer exists (the condition failed).
    ItemGone,
    /// A writer with a newer fencing token claimed the table.
    Fenced(String),
    Other(String),
}

impl WriteFailure {
    fn other(e: &(dyn std::error::Error + 'static)) -> WriteFailure {
        WriteFailure::Other(aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string())
    }

    fn message(&self) -> &str {
        match self {
            WriteFailure::ItemGone => "the item is gone",
            WriteFailure::Fenced(m) | WriteFailure::Other(m) => m,
        }
    }
}

impl Namespace {
    fn prefix(&self) -> String {
        match self {
            Namespace::Live => String::new(),
            Namespace::Shadow(name) => format!("toolrank#{name}#"),
        }
    }

    fn agent_key(&self, agent_id: &str) -> (String, &'static str) {
        match self {
            Namespace::Live => (agent_id.to_owned(), "METADATA"),
            Namespace::Shadow(_) => (self.prefix() + agent_id, SHADOW_AGENT_SK),
        }
    }

    /// The key of the item registering this namespace's domains.
    fn registry_key(&self) -> Item {
        let sk = match self {
            Namespace::Live => "Domains".to_owned(),
            Namespace::Shadow(name) => format!("Domains#{name}"),
        };
        HashMap::from([("PK".to_owned(), s(REGISTRY_PK)), ("SK".to_owned(), s(sk))])
    }

    /// The key of the item holding the largest fencing token the namespace was written with.
    fn fence_key(&self) -> Item {
        let sk = match self {
            Namespace::Live => "Fence".to_owned(),
            Namespace::Shadow(name) => format!("Fence#{name}"),
        };
        HashMap::from([("PK".to_owned(), s(REGISTRY_PK)), ("SK".to_owned(), s(sk))])
    }

    fn pattern_key(&self, (user, name): &(String, String)) -> Item {
        HashMap::from([("PK".to_owned(), s(self.prefix() + user)), ("SK".to_owned(), s(format!("{PATTERN_ENTITY}#{name}")))])
    }
}

/// The DynamoDB sink (see the crate docs).
pub struct DynamoSink {
    client: Client,
    table: String,
    namespace: Namespace,
    agents: HashMap<String, AgentFigures>,
    /// Agents whose last write failed, maybe after the table applied it (a connection cut
    /// while DynamoDB answered): what their items hold is unknown, so they are written
    /// again whatever their figures.
    agents_unknown: HashSet<String>,
    /// Pattern items by (user, name): the fingerprint of what each holds, `None` where a
    /// put failed, maybe after the table applied it. Such an item is put again while its
    /// pattern is recommended and deleted once it is not.
    patterns: FxHashMap<(String, String), Option<Fingerprint>>,
    fingerprints: Fingerprints,
    /// Agents whose last write failed.
    pending_agents: HashSet<Sym>,
    /// Pattern items not yet written (a failure, or beyond a call's budget).
    patterns_pending: bool,
    /// The recommended set the written pattern items hold, by engine key with top flags,
    /// when known: a plan then takes the figures of only the patterns that changed or
    /// crossed a cut since (taking all of them costs ~100 ms on a large state).
    recommended: Option<Recommended>,
    /// The first write reads what the table holds.
    loaded: bool,
    /// The domains registered as holding this namespace's scored agents.
    domains: HashSet<String>,
    /// The sink lease's fencing token the writes carry, when the writer holds the lease.
    fence: Option<fence::Fence>,
    pub stats: WriteStats,
    /// Write capacity units the sink's writes consumed.
    pub units: toolrank_dynamodb::Units,
    /// The write capacity budget per second ([`DynamoSink::with_max_wcu`]).
    limiter: toolrank_dynamodb::Limiter,
    /// The sink shard it writes (shard, of how many): the pattern items of that shard's
    /// users, and shard 0 the agents' items; `None`: everything.
    shard: Option<(u32, u32)>,
    /// The cuts its written pattern items were chosen with, when given from outside
    /// (other shards' patterns count): new ones make a plan compare the patterns again.
    cuts: Option<Cuts>,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn expire_at(days: u64) -> AttributeValue {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    AttributeValue::N((now + days * 86_400).to_string())
}

impl DynamoSink {
    pub fn new(client: Client, table: impl Into<String>) -> DynamoSink {
        DynamoSink::in_namespace(client, table, Namespace::Live)
    }

    pub fn in_namespace(client: Client, table: impl Into<String>, namespace: Namespace) -> DynamoSink {
        DynamoSink {
            client,
            table: table.into(),
            namespace,
            agents: HashMap::new(),
            agents_unknown: HashSet::new(),
            patterns: FxHashMap::default(),
            fingerprints: Fingerprints::new(),
            pending_agents: HashSet::new(),
            patterns_pending: false,
            recommended: None,
            loaded: false,
            domains: HashSet::new(),
            fence: None,
            stats: WriteStats::default(),
            units: toolrank_dynamodb::Units::default(),
            limiter: toolrank_dynamodb::Limiter::new(None),
            shard: None,
            cuts: None,
        }
    }

    /// Writes shard `shard` of `count` only: the pattern items of the users in it, and
    /// for shard 0 the agents' items; its writes are fenced on a fence item of its own.
    pub fn for_shard(mut self, shard: u32, count: u32) -> DynamoSink {
        self.shard = (count > 1).then_some((shard, count));
        self
    }

    /// Whether the pattern items of `user` are this sink's to write.
    fn mine(&self, user: &str) -> bool {
        self.shard.is_none_or(|(shard, count)| shard_of(user, count) == shard)
    }

    /// Whether the agents' items are this sink's to write.
    fn writes_agents(&self) -> bool {
        self.shard.is_none_or(|(shard, _)| shard == 0)
    }

    /// The key of the item holding the largest fencing token this sink's shard was written with.
    fn fence_key(&self) -> Item {
        let mut key = self.namespace.fence_key();
        if let Some((shard, count)) = self.shard {
            let sk = key.get("SK").and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
            key.insert("SK".to_owned(), s(format!("{sk}#shard-{shard}-of-{count}")));
        }
        key
    }

    /// Spends at most `per_second` write capacity units a second (one per item: the
    /// sink's items are under 1 KB), spreading a large round out; `None`: no limit.
    pub fn with_max_wcu(mut self, per_second: Option<f64>) -> DynamoSink {
        self.limiter = toolrank_dynamodb::Limiter::new(per_second);
        self
    }

    /// Forgets what was written, so the next write compares with the table again (after
    /// a failure whose effect is unknown, or when another writer may have written).
    pub fn reset(&mut self) {
        self.loaded = false;
    }

    /// Whether a write is due without new changes: after a reset, a failure, or a
    /// pattern change larger than one call's budget.
    pub fn needs_write(&self) -> bool {
        !self.loaded || !self.pending_agents.is_empty() || self.patterns_pending
    }

    /// Brings the table up to date with `engine` for the `changes` (everything on the
    /// first call), scoring for `today`.
    pub async fn write(&mut self, engine: &Engine, changes: &Changes, today: Day) -> Result<(), Error> {
        let plan = self.plan(engine, changes, today);
        self.execute(plan).await
    }

    /// What a write of `changes` must compare and send, taken from `engine` now, so that
    /// the write itself needs no engine and can run while the engine moves on.
    pub fn plan(&mut self, engine: &Engine, changes: &Changes, today: Day) -> Plan {
        self.plan_with(engine, changes, Scope::of(today))
    }

    /// [`plan`](Self::plan) for `scope`: with the recommendation cuts over every shard's
    /// patterns, when `engine` holds only some shards', and the scores other shards'
    /// sinks planned from the same engine took.
    pub fn plan_with(&mut self, engine: &Engine, changes: &Changes, scope: Scope<'_>) -> Plan {
        let everything;
        let changes = if self.loaded {
            changes
        } else {
            everything = engine.everything();
            &everything
        };
        let agents: HashSet<Sym> = match self.writes_agents() {
            true => changes.agents.iter().copied().chain(self.pending_agents.drain()).collect(),
            false => HashSet::new(),
        };
        let agents = agents.into_iter().map(|agent| (Some(agent), engine.name(agent).to_owned(), engine.agent_figures(agent).map(table_figures))).collect();
        // The recommended set moves only when some pattern changed (the cut is
        // time-invariant) or, for a shard, the other shards moved the cuts; after a load,
        // the table's items must be compared in any case.
        let recut = scope.cuts != self.cuts;
        let patterns = (!self.loaded || !changes.patterns.is_empty() || self.patterns_pending || recut).then(|| self.plan_patterns(engine, changes, scope));
        self.cuts = scope.cuts;
        Plan { agents, patterns, today: scope.today }
    }

    /// The recommended set for `today` and the items to compare: all of them when the
    /// sink must compare all (a first write, a failed one), otherwise those of patterns
    /// in `changes` or that entered, left or moved across the top cut since the set the
    /// table holds.
    fn plan_patterns(&self, engine: &Engine, changes: &Changes, scope: Scope<'_>) -> PatternPlan {
        let (shard, count) = self.shard.unwrap_or((0, 1));
        let scored;
        let scores = match scope.scores {
            Some(shared) => shared.get_or_init(|| engine.scores_by_shard(scope.today, count, scope.cuts)),
            None => {
                scored = engine.scores_by_shard(scope.today, count, scope.cuts);
                &scored
            }
        };
        let recommended = scores.recommended(shard);
        let known = self.recommended.as_ref().filter(|_| self.loaded && !self.patterns_pending);
        // Only a plan against a known set skips patterns, so only it looks them up.
        let changed: FxHashSet<PatternKey> = known.map(|_| changes.patterns.iter().copied().collect()).unwrap_or_default();
        let mut desired = FxHashMap::default();
        for (k, top) in recommended.iter() {
            if known.is_some_and(|was| !changed.contains(&k) && was.get(&k) == Some(top)) {
                continue;
            }
            if let Some(f) = engine.pattern_figures(k) {
                let (key, item) = self.item(f, top);
                desired.insert(key, item);
            }
        }
        let leaving = known.map(|was| was.iter().filter(|(k, _)| !recommended.contains(k)).map(|(k, _)| item_key(engine, k)).collect());
        PatternPlan { desired, leaving, recommended: Some(recommended) }
    }

    /// The item of a pattern's `figures`: its key (user, name), its content, and the
    /// content's fingerprint, taken once for every comparison of a plan.
    fn item(&self, figures: PatternFigures, top: bool) -> ((String, String), (Written, Fingerprint)) {
        let key = (figures.user_id.clone(), pattern_name(&figures));
        let written = Written { figures, top };
        let fingerprint = self.fingerprints.of(&written);
        (key, (written, fingerprint))
    }

    /// How many items a [`plan`](Self::plan) writes when carried out now (what differs
    /// from what the sink wrote); `None` while the sink does not know what the table
    /// holds ([`needs_write`](Self::needs_write)).
    pub fn writes(&self, plan: &Plan) -> Option<usize> {
        if self.needs_write() {
            return None;
        }
        let agents = plan.agents.iter().filter(|(_, id, f)| self.agent_changed(id, f.as_ref())).count();
        let patterns = plan.patterns.as_ref().map_or(0, |p| self.pattern_changes(p).count());
        Some(agents + patterns)
    }

    /// Whether the table holds other figures for agent `id` than `f` (`None`: it left
    /// the rankings, so its attributes are removed if it has any).
    fn agent_changed(&self, id: &str, f: Option<&AgentFigures>) -> bool {
        if self.agents_unknown.contains(id) {
            return true;
        }
        match f {
            None => self.agents.contains_key(id),
            Some(f) => self.agents.get(id) != Some(f),
        }
    }

    /// The pattern items a plan writes: puts (`Some`) of those whose figures or flag
    /// differ, deletes (`None`) of those no longer recommended.
    fn pattern_changes<'a>(&'a self, plan: &'a PatternPlan) -> impl Iterator<Item = (&'a (String, String), Option<&'a Written>)> + 'a {
        let puts = plan.desired.iter().filter(|(key, (_, fp))| self.patterns.get(*key) != Some(&Some(*fp))).map(|(key, (w, _))| (key, Some(w)));
        let unwanted = plan.leaving.is_none().then(|| self.patterns.keys().filter(|k| !plan.desired.contains_key(*k))).into_iter().flatten();
        let leaving = plan.leaving.iter().flatten().filter(|k| self.patterns.contains_key(*k));
        puts.chain(unwanted.chain(leaving).map(|k| (k, None)))
    }

    /// Carries a [`plan`](Self::plan) out: reads the namespace first if this sink does not
    /// know what it holds.
    pub async fn execute(&mut self, plan: Plan) -> Result<(), Error> {
        if let Some(f) = self.fence.filter(|f| !f.claimed) {
            // Before the table is read: a deposed writer's write from now on is refused.
            fence::claim(self, f.token).await.inspect_err(|_| self.reset())?;
            self.fence = Some(fence::Fence { claimed: true, ..f });
        }
        if !self.loaded {
            // A first plan holds every agent the engine knows: their domains are read too.
            let known: HashSet<String> = plan.agents.iter().filter_map(|(_, _, f)| f.as_ref().map(|f| f.domain_id.clone())).collect();
            self.load(known).await?;
        }
        let mut failed = self.write_agents(plan.agents, plan.today).await.err();
        if let Some(patterns) = plan.patterns.filter(|_| !matches!(failed, Some(Error::Fenced(_)))) {
            if let Err(e) = self.write_patterns(patterns, plan.today).await {
                failed.get_or_insert(e);
            }
        }
        if let Some(Error::Fenced(_)) = failed {
            // Another writer holds the table now: what it holds is unknown to this one.
            self.reset();
        }
        failed.map_or(Ok(()), Err)
    }

    /// Reads what the namespace holds, to compare each write with it: the agents of the
    /// registered domains and of `known` ones, and the pattern items.
    async fn load(&mut self, known: HashSet<String>) -> Result<(), Error> {
        let (registered, agents) = match self.writes_agents() {
            true => {
                let registered = registered_domains(&self.client, &self.table, &self.namespace).await?;
                let domains: HashSet<String> = registered.iter().cloned().chain(known).collect();
                let agents = read_agents(&self.client, &self.table, &self.namespace, &domains).await?;
                (registered, agents)
            }
            false => (HashSet::new(), Vec::new()),
        };
        let mut patterns = read_patterns(&self.client, &self.table, &self.namespace).await?;
        patterns.retain(|(f, _)| self.mine(&f.user_id));
        self.domains = registered;
        self.agents = agents.into_iter().map(|a| (a.agent_id.clone(), a)).collect();
        self.agents_unknown.clear();
        self.patterns = patterns.into_iter().map(|(f, top)| self.item(f, top)).map(|(key, (_, fingerprint))| (key, Some(fingerprint))).collect();
        self.recommended = None;
        self.loaded = true;
        Ok(())
    }

    /// Makes the namespace hold exactly these rankings (another namespace's, at a
    /// promotion): agents and patterns not among them are dropped.
    pub async fn write_figures(&mut self, agents: Vec<AgentFigures>, patterns: Vec<(PatternFigures, bool)>, today: Day) -> Result<(), Error> {
        self.load(agents.iter().map(|a| a.domain_id.clone()).collect()).await?;
        let named: HashSet<&str> = agents.iter().map(|a| a.agent_id.as_str()).collect();
        let gone: Vec<String> = self.agents.keys().filter(|id| !named.contains(id.as_str())).cloned().collect();
        let writes =
            agents.into_iter().map(|f| (None, f.agent_id.clone(), Some(table_figures(f)))).chain(gone.into_iter().map(|id| (None, id, None))).collect();
        self.write_agents(writes, today).await?;
        let desired = patterns.into_iter().map(|(f, top)| self.item(f, top)).collect();
        let patterns = PatternPlan { desired, leaving: None, recommended: None };
        loop {
            self.write_patterns(patterns.clone(), today).await?;
            if !self.patterns_pending {
                return Ok(());
            }
        }
    }

    /// Writes the agents whose figures (as the table holds them: [`table_figures`])
    /// changed, `CONCURRENCY` requests at a time: an agent without figures left the
    /// catalog. A failed engine agent (`Some` symbol) stays pending.
    async fn write_agents(&mut self, agents: Vec<(Option<Sym>, String, Option<AgentFigures>)>, today: Day) -> Result<(), Error> {
        if let Err(e) = self.register_domains(&agents).await {
            self.pending_agents.extend(agents.iter().filter_map(|(agent, _, _)| *agent));
            return Err(e);
        }
        let mut requests = Vec::new();
        for (agent, id, figures) in agents {
            if !self.agent_changed(&id, figures.as_ref()) {
                self.stats.unchanged += u64::from(figures.is_some());
                continue;
            }
            let write = match &figures {
                Some(f) => self.update_agent(f, today),
                // Not among the rankings: a shadow item is ours to delete; a live Agent item
                // (if it still exists) loses the pipeline's attributes and sorts last.
                None => self.unscore_agent(&id),
            };
            requests.push(((agent, id, figures), write));
        }
        self.stats.requests += requests.len() as u64;
        let (targets, writes): (Vec<_>, Vec<_>) = requests.into_iter().unzip();
        let sent = self.send_agent_writes(writes).await;
        let mut failed = None;
        for ((agent, id, f), result) in targets.into_iter().zip(sent) {
            if let Err(e) = self.agent_written(agent, id, f, result) {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Remembers what the table holds of agent `id` after a write of its figures `f`
    /// (`None`: it left the rankings) ended with `result`; a failed one is retried.
    fn agent_written(&mut self, agent: Option<Sym>, id: String, f: Option<AgentFigures>, result: Result<(), WriteFailure>) -> Result<(), Error> {
        let failed = match result {
            // The Agent item was removed meanwhile; its removal comes through the input.
            Ok(()) | Err(WriteFailure::ItemGone) => None,
            Err(WriteFailure::Fenced(e)) => Some(Error::Fenced(e)),
            Err(WriteFailure::Other(e)) => Some(Error::Aws(format!("writing agent {id}: {e}"))),
        };
        if let Some(e) = failed {
            agent.map(|a| self.pending_agents.insert(a));
            self.agents_unknown.insert(id);
            return Err(e);
        }
        self.agents_unknown.remove(&id);
        match f {
            Some(f) => self.agents.insert(id, f),
            None => self.agents.remove(&id),
        };
        Ok(())
    }

    /// Sends agent writes: fenced, in transactions one at a time; otherwise alone,
    /// `CONCURRENCY` at a time. The outcome of each, by position.
    async fn send_agent_writes(&self, writes: Vec<AgentWrite>) -> Vec<Result<(), WriteFailure>> {
        if let Some(f) = self.fence {
            let len = writes.len();
            let sent = fence::send(self, f.token, writes.into_iter().map(AgentWrite::transact), len, None).await;
            // Without a deadline every item is sent, or refused by the fence.
            return sent.into_iter().map(|o| o.unwrap_or_else(|| Err(WriteFailure::Other("not sent".into())))).collect();
        }
        // Boxed futures: the write must be `Send` to run on a runtime's worker, which a
        // stream of closures over borrowed data does not prove.
        let (limiter, units) = (&self.limiter, &self.units);
        let sends: Vec<BoxFuture<'_, _>> = writes
            .into_iter()
            .enumerate()
            .map(|(i, write)| {
                async move {
                    limiter.spend(1.0).await;
                    (i, write.send(units).await)
                }
                .boxed()
            })
            .collect();
        let mut sent: Vec<_> = stream::iter(sends).buffer_unordered(CONCURRENCY).collect().await;
        sent.sort_unstable_by_key(|(i, _)| *i);
        sent.into_iter().map(|(_, result)| result).collect()
    }

    /// Puts and deletes unfenced, in batches of 25, several in flight, none started after
    /// `deadline`. The outcome of each, by position: `None` if it was not sent.
    async fn batch_write_within(&self, requests: Vec<WriteRequest>, deadline: Instant) -> Vec<Option<Result<(), WriteFailure>>> {
        let (client, table, units, limiter) = (&self.client, &self.table, &self.units, &self.limiter);
        let sends: Vec<BoxFuture<'_, _>> = requests
            .chunks(25)
            .map(|batch| {
                let batch = batch.to_vec();
                async move {
                    if Instant::now() >= deadline {
                        return (batch.len(), None);
                    }
                    limiter.spend(batch.len() as f64).await;
                    (batch.len(), Some(toolrank_dynamodb::batch_write(client, table, batch, units).await))
                }
                .boxed()
            })
            .collect();
        // In order: each batch's outcome stands for its items, by position.
        let done: Vec<_> = stream::iter(sends).buffered(CONCURRENCY / 4).collect().await;
        done.into_iter()
            .flat_map(|(len, result)| {
                let outcome = result.map(|r| r.map_err(|e| WriteFailure::Other(aws_sdk_dynamodb::error::DisplayErrorContext(&e).to_string())));
                std::iter::repeat_n(outcome, len)
            })
            .collect()
    }

    /// Registers the domains of `agents` not registered yet, before any of them is written:
    /// a later load finds every scored agent by its domain.
    async fn register_domains(&mut self, agents: &[(Option<Sym>, String, Option<AgentFigures>)]) -> Result<(), Error> {
        let new: HashSet<&str> =
            agents.iter().filter_map(|(_, _, f)| f.as_ref()).map(|f| f.domain_id.as_str()).filter(|d| !self.domains.contains(*d)).collect();
        if new.is_empty() {
            return Ok(());
        }
        let new: Vec<String> = new.into_iter().map(str::to_owned).collect();
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.namespace.registry_key()))
            .update_expression("ADD Domains :d SET ScoredBy = :src")
            .expression_attribute_values(":d", AttributeValue::Ss(new.clone()))
            .expression_attribute_values(":src", s(SOURCE))
            .return_consumed_capacity(TOTAL)
            .send()
            .await
            .map_err(|e| Error::Aws(format!("registering domains in {}: {}", self.table, aws_sdk_dynamodb::error::DisplayErrorContext(&e))))?;
        self.units.add(out.consumed_capacity());
        self.stats.requests += 1;
        self.domains.extend(new);
        Ok(())
    }

    /// Deletes an agent's shadow item, or removes what the pipeline owns from a live one.
    fn unscore_agent(&self, agent_id: &str) -> AgentWrite {
        let (pk, sk) = self.namespace.agent_key(agent_id);
        if self.namespace != Namespace::Live {
            return AgentWrite::Delete(self.client.delete_item().table_name(&self.table).key("PK", s(pk)).key("SK", s(sk)));
        }
        let owned = [
            "Score",
            "TotalExecutions",
            "SuccessCount",
            "FailureCount",
            "ToolRows",
            "FailedToolRows",
            "FailedTools",
            "ScoreDate",
            "ScoredBy",
            "LastExecutionDate",
        ];
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(pk))
            .key("SK", s(sk))
            .update_expression(format!("SET GSI1_SK = :last REMOVE {}", (0..owned.len()).map(|i| format!("#r{i}")).collect::<Vec<_>>().join(", ")))
            .expression_attribute_values(":last", s(agent_sort_key(f64::NEG_INFINITY)))
            .condition_expression("attribute_exists(PK)");
        for (i, name) in owned.into_iter().enumerate() {
            req = req.expression_attribute_names(format!("#r{i}"), name);
        }
        AgentWrite::Update(req)
    }

    /// The UpdateItem of the attributes the pipeline owns on an Agent item, conditional on
    /// the item existing; in a shadow namespace, of the whole item of its own.
    fn update_agent(&self, f: &AgentFigures, today: Day) -> AgentWrite {
        let score = f.last.map_or(0.0, |last| toolrank_engine::score::agent_score(f.executions, f.successes, i64::from(today.0) - i64::from(last.0)));
        let mut set = vec![
            ("Score", s(score.to_string())),
            ("GSI1_SK", s(agent_sort_key(f.rank_key()))),
            ("TotalExecutions", s(f.executions.to_string())),
            ("SuccessCount", s(f.successes.to_string())),
            ("FailureCount", s((f.executions - f.successes).to_string())),
            ("ToolRows", s(f.rows.to_string())),
            ("FailedToolRows", s(f.failed_rows.to_string())),
            ("FailedTools", s(f.failed_tools.join(", "))),
            ("ScoreDate", s(today.to_string())),
            ("ScoredBy", s(SOURCE)),
        ];
        let mut remove = Vec::new();
        match f.last {
            Some(last) => set.push(("LastExecutionDate", s(last.to_string()))),
            None => remove.push("LastExecutionDate"),
        }
        if let Namespace::Shadow(name) = &self.namespace {
            set.extend([
                ("GSI1_PK", s(self.namespace.prefix() + &f.domain_id)),
                ("AgentId", s(&f.agent_id)),
                ("EntityType", s(SHADOW_ENTITY)),
                ("Namespace", s(name)),
            ]);
            match &f.agent_name {
                Some(n) => set.push(("AgentNM", s(n))),
                None => remove.push("AgentNM"),
            }
        }
        let mut expr = format!("SET {}", (0..set.len()).map(|i| format!("#a{i} = :v{i}")).collect::<Vec<_>>().join(", "));
        if !remove.is_empty() {
            expr += &format!(" REMOVE {}", (0..remove.len()).map(|i| format!("#r{i}")).collect::<Vec<_>>().join(", "));
        }
        let (pk, sk) = self.namespace.agent_key(&f.agent_id);
        let mut req = self.client.update_item().table_name(&self.table).key("PK", s(pk)).key("SK", s(sk)).update_expression(expr);
        if self.namespace == Namespace::Live {
            req = req.condition_expression("attribute_exists(PK)");
        }
        for (i, (name, value)) in set.into_iter().enumerate() {
            req = req.expression_attribute_names(format!("#a{i}"), name).expression_attribute_values(format!(":v{i}"), value);
        }
        for (i, name) in remove.into_iter().enumerate() {
            req = req.expression_attribute_names(format!("#r{i}"), name);
        }
        AgentWrite::Update(req)
    }

    /// Puts the recommended patterns (with their top-scoring flag) whose figures changed
    /// and deletes those no longer recommended.
    async fn write_patterns(&mut self, plan: PatternPlan, today: Day) -> Result<(), Error> {
        // Keys only: a key of `desired` is put, any other deleted; the requests are built
        // as they are sent.
        let keys: Vec<(String, String)> = self.pattern_changes(&plan).map(|(key, _)| key.clone()).collect();
        let puts = keys.iter().filter(|key| plan.desired.contains_key(*key)).count();
        self.stats.unchanged += (plan.desired.len() - puts) as u64;
        let request = |key: &(String, String)| match plan.desired.get(key) {
            Some((w, _)) => put_pattern(&self.namespace, key, w, today),
            None => {
                WriteRequest::builder().delete_request(DeleteRequest::builder().set_key(Some(self.namespace.pattern_key(key))).build().expect("key")).build()
            }
        };
        // Started only within the budget: a large change (a first load, a moved cut) is
        // spread over several calls instead of blocking the caller. What was written is
        // remembered item by item.
        let deadline = Instant::now() + WRITE_BUDGET;
        let outcomes = match self.fence {
            Some(f) => fence::send(self, f.token, keys.iter().map(|key| fence::from_batch(&self.table, request(key))), keys.len(), Some(deadline)).await,
            None => self.batch_write_within(keys.iter().map(request).collect(), deadline).await,
        };
        self.patterns_pending = false;
        let mut failed = None;
        for (key, outcome) in keys.into_iter().zip(outcomes) {
            let Some(result) = outcome else {
                self.patterns_pending = true;
                continue;
            };
            self.stats.requests += 1;
            let put = plan.desired.get(&key).map(|&(_, fingerprint)| fingerprint);
            if let Err(e) = self.pattern_written(key, put, result) {
                failed.get_or_insert(e);
            }
        }
        // Known only once every item of the plan was written.
        self.recommended = plan.recommended.filter(|_| !self.patterns_pending && failed.is_none());
        failed.map_or(Ok(()), Err)
    }

    /// Remembers what the table holds of pattern item `key` after a put of the content
    /// fingerprinted `put` (`None`: a delete) ended with `result`. A failed write is
    /// retried at the next one (puts and deletes are idempotent); a failed put may have
    /// reached the table, so the item's content counts as unknown until then.
    fn pattern_written(&mut self, key: (String, String), put: Option<Fingerprint>, result: Result<(), WriteFailure>) -> Result<(), Error> {
        let Err(e) = result else {
            match put {
                Some(fingerprint) => self.patterns.insert(key, Some(fingerprint)),
                None => self.patterns.remove(&key),
            };
            return Ok(());
        };
        self.patterns_pending = true;
        if put.is_some() {
            self.patterns.insert(key, None);
        }
        Err(match e {
            WriteFailure::Fenced(m) => Error::Fenced(m),
            WriteFailure::ItemGone | WriteFailure::Other(_) => Error::Aws(format!("writing pattern items: {}", e.message())),
        })
    }
}

/// An agent's figures as the table holds them: per-tool figures are Valkey's.
fn table_figures(mut f: AgentFigures) -> AgentFigures {
    f.tools.clear();
    f
}

/// The item key (user, name) of pattern `k`, whether or not the engine still holds its figures.
fn item_key(engine: &Engine, k: PatternKey) -> (String, String) {
    let user = engine.name(k.user);
    let id = engine.pattern_id(k);
    (user.to_owned(), id[user.len() + 1..].to_owned())
}

/// Sends an UpdateItem; a failed `attribute_exists(PK)` condition means the item is gone.
fn send_update(req: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder, units: &toolrank_dynamodb::Units) -> Request {
    let units = units.clone();
    Box::pin(async move {
        req.return_consumed_capacity(TOTAL).send().await.map(|out| units.add(out.consumed_capacity())).map_err(|e| {
            match e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) {
                true => WriteFailure::ItemGone,
                false => WriteFailure::other(&e),
            }
        })
    })
}

fn put_pattern(namespace: &Namespace, key: &(String, String), w: &Written, today: Day) -> WriteRequest {
    let f = &w.figures;
    // Sized for every attribute: growing it rehashes twice per item.
    let mut item = Item::with_capacity(19);
    item.extend(namespace.pattern_key(key));
    item.extend([
        ("EntityType".to_owned(), s(PATTERN_ENTITY)),
        ("GSI1_PK".to_owned(), s(namespace.prefix() + PATTERN_ENTITY)),
        ("GSI1_SK".to_owned(), s(&key.1)),
        ("UserId".to_owned(), s(&key.0)),
        ("Proclist".to_owned(), s(&f.process_pattern)),
        ("AgentList".to_owned(), s(&f.agent_id)),
        ("Toollist".to_owned(), s(&f.tool_sequence)),
        ("ExecutionCount".to_owned(), s(f.executions.to_string())),
        ("SuccessCount".to_owned(), s(f.successes.to_string())),
        ("FirstUsedDate".to_owned(), s(f.first.to_string())),
        ("LastUsedDate".to_owned(), s(f.last.to_string())),
        ("PatternScore".to_owned(), s(f.score(today).to_string())),
        ("TopScoring".to_owned(), s(if w.top { "Y" } else { "N" })),
        ("ScoredBy".to_owned(), s(SOURCE)),
        (toolrank_dynamodb::TTL_ATTRIBUTE.to_owned(), expire_at(if w.top { TOP_TTL_DAYS } else { DEFAULT_TTL_DAYS })),
    ]);
    if let Namespace::Shadow(name) = namespace {
        item.insert("Namespace".to_owned(), s(name));
    }
    WriteRequest::builder().put_request(PutRequest::builder().set_item(Some(item)).build().expect("item")).build()
}

type Item = HashMap<String, AttributeValue>;

fn get<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name).and_then(|v| v.as_s().ok()).map(String::as_str)
}

fn parse<T: std::str::FromStr>(item: &Item, name: &str, what: &'static str, key: &str) -> Result<T, Error> {
    get(item, name).and_then(|v| v.parse().ok()).ok_or_else(|| Error::Item { what, key: key.to_owned(), reason: format!("missing or invalid {name}") })
}

fn parse_day(item: &Item, name: &str, what: &'static str, key: &str) -> Result<Day, Error> {
    get(item, name).and_then(Day::parse_iso).ok_or_else(|| Error::Item { what, key: key.to_owned(), reason: format!("missing or invalid {name}") })
}

/// What a read returned (an item, or the items a paginated Scan or Query collected with
/// `.into_paginator().items().send().try_collect()`), its failure told as `what` failing.
fn read<T, E: std::error::Error + 'static, R: std::fmt::Debug>(result: Result<T, aws_sdk_dynamodb::error::SdkError<E, R>>, what: &str) -> Result<T, Error> {
    result.map_err(|e| Error::Aws(format!("{what}: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e))))
}

/// Reads back what a namespace holds: the scored agents (of the registered domains and
/// `known` ones) and the pattern items (with their top-scoring flag). Live Agent items
/// the pipeline has not scored are left out.
pub async fn read_table(
    client: &Client,
    table: &str,
    namespace: &Namespace,
    known: &[String],
) -> Result<(Vec<AgentFigures>, Vec<(PatternFigures, bool)>), Error> {
    let domains: HashSet<String> = registered_domains(client, table, namespace).await?.into_iter().chain(known.iter().cloned()).collect();
    Ok((read_agents(client, table, namespace, &domains).await?, read_patterns(client, table, namespace).await?))
}

/// The domains registered as holding a namespace's scored agents (one GetItem).
async fn registered_domains(client: &Client, table: &str, namespace: &Namespace) -> Result<HashSet<String>, Error> {
    let got = client
        .get_item()
        .table_name(table)
        .set_key(Some(namespace.registry_key()))
        .consistent_read(true)
        .send()
        .await
        .map_err(|e| Error::Aws(format!("reading the domain registry of {table}: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e))))?;
    Ok(got.item.and_then(|i| i.get("Domains").and_then(|v| v.as_ss().ok()).cloned()).unwrap_or_default().into_iter().collect())
}

/// The scored agents of `domains`: one Query of GSI1 per domain (access pattern 2's),
/// several at a time.
async fn read_agents(client: &Client, table: &str, namespace: &Namespace, domains: &HashSet<String>) -> Result<Vec<AgentFigures>, Error> {
    let queries = domains.iter().map(|domain| {
        let query = client
            .query()
            .table_name(table)
            .index_name("GSI1")
            .key_condition_expression("GSI1_PK = :d AND begins_with(GSI1_SK, :p)")
            .filter_expression("ScoredBy = :src")
            .expression_attribute_values(":d", s(namespace.prefix() + domain))
            .expression_attribute_values(":p", s("AGTSCORE"))
            .expression_attribute_values(":src", s(SOURCE));
        async move { read(query.into_paginator().items().send().try_collect().await, &format!("querying {table} GSI1")) }
    });
    let pages: Vec<Result<Vec<Item>, Error>> = stream::iter(queries).buffer_unordered(CONCURRENCY / 4).collect().await;
    let mut agents = Vec::new();
    for items in pages {
        for item in items? {
            // A shadow agent's own SK; a live Agent item's METADATA.
            if get(&item, "SK") == Some(namespace.agent_key("").1) {
                agents.push(agent_from_item(&item, namespace)?);
            }
        }
    }
    Ok(agents)
}

/// The pattern items the sink wrote: one Query of GSI1's `UserPrcToolMapp` partition,
/// each item decoded as it arrives (undecoded, an item takes some 2 KB: all of a large
/// namespace's at once would be the largest thing a new sink holder allocates).
async fn read_patterns(client: &Client, table: &str, namespace: &Namespace) -> Result<Vec<(PatternFigures, bool)>, Error> {
    let query = client
        .query()
        .table_name(table)
        .index_name("GSI1")
        .key_condition_expression("GSI1_PK = :p")
        .filter_expression("ScoredBy = :src")
        .expression_attribute_values(":p", s(namespace.prefix() + PATTERN_ENTITY))
        .expression_attribute_values(":src", s(SOURCE));
    let mut items = query.into_paginator().items().send();
    let mut patterns = Vec::new();
    while let Some(item) = items.next().await {
        let item = read(item, &format!("querying {table} GSI1"))?;
        patterns.push((pattern_from_item(&item, namespace)?, get(&item, "TopScoring") == Some("Y")));
    }
    Ok(patterns)
}

/// The seed's access pattern 2: a domain's agents by `GSI1_SK` descending, best first.
pub async fn top_agents(client: &Client, table: &str, namespace: &Namespace, domain: &str, limit: usize) -> Result<Vec<AgentFigures>, Error> {
    let page = client
        .query()
        .table_name(table)
        .index_name("GSI1")
        .key_condition_expression("GSI1_PK = :d AND begins_with(GSI1_SK, :p)")
        .expression_attribute_values(":d", s(namespace.prefix() + domain))
        .expression_attribute_values(":p", s("AGTSCORE"))
        .scan_index_forward(false)
        .limit(limit.clamp(1, 1000) as i32)
        .send()
        .await
        .map_err(|e| Error::Aws(format!("querying {table} GSI1: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e))))?;
    page.items().iter().filter(|i| get(i, "ScoredBy") == Some(SOURCE)).map(|i| agent_from_item(i, namespace)).collect()
}

/// Recommended patterns: of one user (access pattern 7, `PK = user AND begins_with(SK,
/// 'UserPrcToolMapp#')`) or of everyone (access pattern 8, on GSI1).
pub async fn patterns(client: &Client, table: &str, namespace: &Namespace, user: Option<&str>) -> Result<Vec<PatternFigures>, Error> {
    let Some(user) = user else {
        return Ok(read_patterns(client, table, namespace).await?.into_iter().map(|(f, _)| f).collect());
    };
    let query = client
        .query()
        .table_name(table)
        .key_condition_expression("PK = :u AND begins_with(SK, :p)")
        .expression_attribute_values(":u", s(namespace.prefix() + user))
        .expression_attribute_values(":p", s(format!("{PATTERN_ENTITY}#")));
    let items = read(query.into_paginator().items().send().try_collect().await, &format!("querying {table}"))?;
    items.iter().map(|item| pattern_from_item(item, namespace)).collect()
}

/// Deletes a shadow namespace's items; returns how many there were.
pub async fn drop_namespace(client: &Client, table: &str, name: &str) -> Result<usize, Error> {
    let namespace = Namespace::Shadow(name.to_owned());
    let (agents, patterns) = read_table(client, table, &namespace, &[]).await?;
    let agent_keys = agents.iter().map(|a| {
        let (pk, sk) = namespace.agent_key(&a.agent_id);
        HashMap::from([("PK".to_owned(), s(pk)), ("SK".to_owned(), s(sk))])
    });
    let pattern_keys = patterns.iter().map(|(f, _)| namespace.pattern_key(&(f.user_id.clone(), pattern_name(f))));
    let keys: Vec<Item> = agent_keys.chain(pattern_keys).collect();
    let n = keys.len();
    let delete = |k: Item| WriteRequest::builder().delete_request(DeleteRequest::builder().set_key(Some(k)).build().expect("key")).build();
    // The registry goes last: until then a retried drop finds what is left.
    for batch in [keys.into_iter().map(delete).collect(), vec![delete(namespace.registry_key()), delete(namespace.fence_key())]] {
        toolrank_dynamodb::batch_write(client, table, batch, &Default::default())
            .await
            .map_err(|e| Error::Aws(format!("deleting namespace {name}: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e))))?;
    }
    Ok(n)
}

/// An attribute the namespace prefixed, without its prefix.
fn unprefixed<'a>(item: &'a Item, name: &str, namespace: &Namespace) -> &'a str {
    let v = get(item, name).unwrap_or_default();
    v.strip_prefix(namespace.prefix().as_str()).unwrap_or(v)
}

fn agent_from_item(item: &Item, namespace: &Namespace) -> Result<AgentFigures, Error> {
    let key = unprefixed(item, "PK", namespace).to_owned();
    let what = "Agent";
    let failed_tools: Vec<String> = get(item, "FailedTools").filter(|s| !s.is_empty()).map(|s| s.split(", ").map(str::to_owned).collect()).unwrap_or_default();
    Ok(AgentFigures {
        domain_id: unprefixed(item, "GSI1_PK", namespace).to_owned(),
        agent_name: get(item, "AgentNM").map(str::to_owned),
        executions: parse(item, "TotalExecutions", what, &key)?,
        successes: parse(item, "SuccessCount", what, &key)?,
        last: get(item, "LastExecutionDate").map(|_| parse_day(item, "LastExecutionDate", what, &key)).transpose()?,
        rows: parse(item, "ToolRows", what, &key)?,
        failed_rows: parse(item, "FailedToolRows", what, &key)?,
        failed_tools,
        // Per-tool figures live in Valkey; the table serves the agent ranking.
        tools: Vec::new(),
        agent_id: key,
    })
}

fn pattern_from_item(item: &Item, namespace: &Namespace) -> Result<PatternFigures, Error> {
    let key = format!("{}/{}", get(item, "PK").unwrap_or_default(), get(item, "SK").unwrap_or_default());
    let what = PATTERN_ENTITY;
    let text = |name: &str| get(item, name).map(str::to_owned).ok_or_else(|| Error::Item { what, key: key.clone(), reason: format!("missing {name}") });
    Ok(PatternFigures {
        user_id: unprefixed(item, "PK", namespace).to_owned(),
        process_pattern: text("Proclist")?,
        agent_id: text("AgentList")?,
        tool_sequence: text("Toollist")?,
        executions: parse(item, "ExecutionCount", what, &key)?,
        successes: parse(item, "SuccessCount", what, &key)?,
        first: parse_day(item, "FirstUsedDate", what, &key)?,
        last: parse_day(item, "LastUsedDate", what, &key)?,
    })
}

impl toolrank_sink::Sink for DynamoSink {
    type Request = Plan;

    fn name(&self) -> &'static str {
        "dynamodb"
    }

    fn plan(&mut self, figures: &Engine, changes: &Changes, scope: Scope<'_>) -> Result<Plan, toolrank_sink::Error> {
        Ok(DynamoSink::plan_with(self, figures, changes, scope))
    }

    fn size(&self, plan: &Plan) -> Option<usize> {
        self.writes(plan)
    }

    /// Runs the plan on the caller's runtime. Cut off after the deadline, what the table
    /// holds is unknown: the next write compares with it.
    fn send(&mut self, plan: Plan) -> Result<(), toolrank_sink::Error> {
        let handle = tokio::runtime::Handle::current();
        match handle.block_on(async { tokio::time::timeout(toolrank_sink::SEND_DEADLINE, self.execute(plan)).await }) {
            Ok(Err(e @ Error::Fenced(_))) => Err(toolrank_sink::Error::fenced("dynamodb", e)),
            Ok(result) => result.map_err(|e| toolrank_sink::Error::new("dynamodb", e)),
            Err(_) => {
                self.reset();
                Err(toolrank_sink::Error::new(
                    "dynamodb",
                    format!("cut off after {} s; comparing with the table at the next write", toolrank_sink::SEND_DEADLINE.as_secs()),
                ))
            }
        }
    }

    fn pending(&self) -> bool {
        self.needs_write()
    }

    fn fence(&mut self) {
        self.reset();
    }

    fn hold(&mut self, generation: u64) {
        if self.fence.is_none_or(|f| f.token != generation) {
            self.fence = Some(fence::Fence { token: generation, claimed: false });
        }
    }

    fn stats(&self) -> toolrank_sink::Stats {
        toolrank_sink::Stats { requests: self.stats.requests, write_units: self.units.get() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use toolrank_engine::Applied;
    use toolrank_events::{Action, AgentItem, Change, Entity};

    /// A sink that sends nothing in these tests: its client is never called.
    fn offline_sink() -> DynamoSink {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .build();
        DynamoSink::new(Client::from_conf(config), "AgentTable")
    }

    /// One pattern's figures.
    fn figures() -> PatternFigures {
        PatternFigures {
            user_id: "USR1".into(),
            process_pattern: "PRC1".into(),
            agent_id: "AGT1".into(),
            tool_sequence: "T1".into(),
            executions: 3,
            successes: 1,
            first: Day(20_000),
            last: Day(20_010),
        }
    }

    /// A put whose connection was cut may have been applied: a later write that no longer
    /// recommends the pattern deletes its item, and one that still does puts it again,
    /// even with the figures of the failed put.
    #[test]
    fn a_failed_put_leaves_its_item_to_be_put_again_or_deleted() {
        let mut sink = offline_sink();
        let (key, (written, fingerprint)) = sink.item(figures(), false);
        let cut = sink.pattern_written(key.clone(), Some(fingerprint), Err(WriteFailure::Other("connection reset".into())));
        assert!(matches!(cut, Err(Error::Aws(_))) && sink.patterns_pending);
        let compare_all = |desired: FxHashMap<(String, String), (Written, Fingerprint)>| PatternPlan { desired, leaving: None, recommended: None };
        let gone = compare_all(FxHashMap::default());
        let changes: Vec<_> = sink.pattern_changes(&gone).map(|(k, w)| (k.clone(), w.is_some())).collect();
        assert_eq!(changes, [(key.clone(), false)], "deleted where it may exist");
        let kept = compare_all(FxHashMap::from_iter([(key.clone(), (written, fingerprint))]));
        let changes: Vec<_> = sink.pattern_changes(&kept).map(|(k, w)| (k.clone(), w.is_some())).collect();
        assert_eq!(changes, [(key.clone(), true)], "put again though the same content was tried");
        // Once a put succeeds, the same content is not sent again.
        sink.pattern_written(key.clone(), Some(fingerprint), Ok(())).unwrap();
        assert_eq!(sink.pattern_changes(&kept).count(), 0);
    }

    /// An agent update whose connection was cut may have been applied: the next write
    /// sends the agent's figures even when they equal the ones written before it.
    #[test]
    fn a_failed_agent_update_is_written_again_whatever_the_figures() {
        let mut sink = offline_sink();
        let before = AgentFigures {
            agent_id: "AGT1".into(),
            domain_id: "DMN1".into(),
            agent_name: None,
            executions: 3,
            successes: 2,
            last: Some(Day(20_010)),
            rows: 3,
            failed_rows: 1,
            failed_tools: Vec::new(),
            tools: Vec::new(),
        };
        sink.agent_written(Some(1), "AGT1".into(), Some(before.clone()), Ok(())).unwrap();
        assert!(!sink.agent_changed("AGT1", Some(&before)));
        let tried = AgentFigures { executions: 4, ..before.clone() };
        assert!(sink.agent_written(Some(1), "AGT1".into(), Some(tried), Err(WriteFailure::Other("timeout".into()))).is_err());
        assert!(sink.agent_changed("AGT1", Some(&before)), "the table may hold the figures of the failed update");
        assert!(sink.agent_changed("AGT1", None));
        sink.agent_written(Some(1), "AGT1".into(), Some(before.clone()), Ok(())).unwrap();
        assert!(!sink.agent_changed("AGT1", Some(&before)));
    }

    #[test]
    fn an_items_fingerprint_moves_with_every_part_of_its_content() {
        let f = PatternFigures {
            user_id: "USR1".into(),
            process_pattern: "PRC1->PRC2".into(),
            agent_id: "AGT1".into(),
            tool_sequence: "T1->T2".into(),
            executions: 3,
            successes: 2,
            first: Day(20_000),
            last: Day(20_010),
        };
        let fp = Fingerprints::new();
        let of = |f: &PatternFigures, top| fp.of(&Written { figures: f.clone(), top });
        assert_eq!(of(&f, false), of(&f.clone(), false));
        let variants = [
            PatternFigures { successes: 3, ..f.clone() },
            PatternFigures { last: Day(20_011), ..f.clone() },
            PatternFigures { first: Day(19_999), ..f.clone() },
            PatternFigures { tool_sequence: "T1->T3".into(), ..f.clone() },
        ];
        for v in &variants {
            assert_ne!(of(v, false), of(&f, false), "{v:?}");
        }
        assert_ne!(of(&f, true), of(&f, false));
    }

    /// A shadow namespace's items and the domain registries come back through the
    /// table's stream like any write: none of their keys may count as an Agent or an
    /// execution.
    #[test]
    fn shadow_items_are_no_events() {
        let ns = Namespace::Shadow("v2".into());
        let (agent_pk, agent_sk) = ns.agent_key("A1");
        let pattern = ns.pattern_key(&("U1".into(), "P1|A1|T1".into()));
        let key = |item: &Item| (get(item, "PK").unwrap().to_owned(), get(item, "SK").unwrap().to_owned());
        let keys = [(agent_pk, agent_sk.to_owned()), key(&pattern), key(&ns.registry_key()), key(&Namespace::Live.registry_key())];
        let agent = || Entity::Agent(AgentItem { domain_id: Cow::Borrowed("toolrank#v2#D1"), name: None, partial: false });
        let mut engine = Engine::new();
        for (pk, sk) in keys {
            for action in [Action::Put(agent()), Action::Put(Entity::Other), Action::Delete { ttl: false }, Action::Delete { ttl: true }] {
                for seq in [None, Some(7)] {
                    let change = Change { pk: Cow::Borrowed(&pk), sk: Cow::Borrowed(&sk), seq, action: action.clone() };
                    assert_eq!(engine.apply(&change), Applied::Ignored, "{pk} / {sk}");
                }
            }
        }
        engine.flush();
        assert!(engine.everything().agents.is_empty());
    }

    #[test]
    fn live_keys_are_the_applications() {
        assert_eq!(Namespace::Live.agent_key("A1"), ("A1".to_owned(), "METADATA"));
        assert_eq!(get(&Namespace::Live.pattern_key(&("U1".into(), "n".into())), "PK"), Some("U1"));
    }
}
