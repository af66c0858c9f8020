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

use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, PutRequest, WriteRequest};
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::Client;
use futures_util::stream::{self, StreamExt};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use toolrank_engine::{AgentFigures, Changes, Engine, PatternFigures, Sym};
use toolrank_events::Day;

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
}

impl From<Error> for toolrank_dynamodb::Error {
    fn from(e: Error) -> Self {
        toolrank_dynamodb::Error::Aws { what: "writing the rankings".into(), message: e.to_string() }
    }
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

/// What the sink keeps per written pattern item.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Written {
    figures: PatternFigures,
    top: bool,
}

/// The DynamoDB sink (see the crate docs).
pub struct DynamoSink {
    client: Client,
    table: String,
    agents: HashMap<String, AgentFigures>,
    /// Pattern items by (user, name).
    patterns: HashMap<(String, String), Written>,
    /// Agents whose last write failed.
    pending_agents: HashSet<Sym>,
    /// Pattern items not yet written (a failure, or beyond a call's budget).
    patterns_pending: bool,
    /// The first write reads what the table holds.
    loaded: bool,
    pub stats: WriteStats,
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
        DynamoSink {
            client,
            table: table.into(),
            agents: HashMap::new(),
            patterns: HashMap::new(),
            pending_agents: HashSet::new(),
            patterns_pending: false,
            loaded: false,
            stats: WriteStats::default(),
        }
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
        let everything;
        let compared = self.loaded;
        let changes = if self.loaded {
            changes
        } else {
            let (agents, patterns) = read_table(&self.client, &self.table).await?;
            self.agents = agents.into_iter().map(|a| (a.agent_id.clone(), a)).collect();
            self.patterns = patterns.into_iter().map(|(f, top)| ((f.user_id.clone(), pattern_name(&f)), Written { figures: f, top })).collect();
            self.loaded = true;
            everything = engine.everything();
            &everything
        };
        let agents: HashSet<Sym> = changes.agents.iter().copied().chain(self.pending_agents.drain()).collect();
        let mut failed = self.write_agents(engine, agents, today).await.err();
        // The recommended set moves only when some pattern changed (the cut is
        // time-invariant); after a load, the table's items must be compared in any case.
        let patterns_changed = !compared || !changes.patterns.is_empty() || self.patterns_pending;
        if let Err(e) = if patterns_changed { self.write_patterns(engine, today).await } else { Ok(()) } {
            failed.get_or_insert(e);
        }
        failed.map_or(Ok(()), Err)
    }

    /// Updates the Agent items whose figures changed, `CONCURRENCY` requests at a time.
    async fn write_agents(&mut self, engine: &Engine, agents: HashSet<Sym>, today: Day) -> Result<(), Error> {
        let mut updates = Vec::new();
        for agent in agents {
            let id = engine.name(agent);
            let Some(mut f) = engine.agent_figures(agent) else {
                // Not in the catalog: its item is gone (or never was); nothing of ours to keep.
                self.agents.remove(id);
                continue;
            };
            // Per-tool figures are Valkey's; the table does not hold them.
            f.tools.clear();
            if self.agents.get(id) == Some(&f) {
                self.stats.unchanged += 1;
                continue;
            }
            updates.push((agent, self.update_agent(&f, today), f));
        }
        self.stats.requests += updates.len() as u64;
        let sent: Vec<_> = stream::iter(updates)
            .map(|(agent, req, f)| async move { (agent, f, req.send().await) })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut failed = None;
        for (agent, f, result) in sent {
            match result {
                Ok(_) => {}
                // The Agent item was removed meanwhile; its removal comes through the input.
                Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => {}
                Err(e) => {
                    self.pending_agents.insert(agent);
                    failed.get_or_insert(Error::Aws(format!("updating agent {}: {}", f.agent_id, aws_sdk_dynamodb::error::DisplayErrorContext(&e))));
                    continue;
                }
            }
            self.agents.insert(f.agent_id.clone(), f);
        }
        failed.map_or(Ok(()), Err)
    }

    /// The conditional UpdateItem of the attributes the pipeline owns on an Agent item.
    fn update_agent(&self, f: &AgentFigures, today: Day) -> UpdateItemFluentBuilder {
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
        let mut expr = format!("SET {}", (0..set.len()).map(|i| format!("#a{i} = :v{i}")).collect::<Vec<_>>().join(", "));
        if !remove.is_empty() {
            expr += &format!(" REMOVE {}", (0..remove.len()).map(|i| format!("#r{i}")).collect::<Vec<_>>().join(", "));
        }
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(&f.agent_id))
            .key("SK", s("METADATA"))
            .update_expression(expr)
            .condition_expression("attribute_exists(PK)");
        for (i, (name, value)) in set.into_iter().enumerate() {
            req = req.expression_attribute_names(format!("#a{i}"), name).expression_attribute_values(format!(":v{i}"), value);
        }
        for (i, name) in remove.into_iter().enumerate() {
            req = req.expression_attribute_names(format!("#r{i}"), name);
        }
        req
    }

    /// Puts the recommended patterns whose figures changed and deletes those no longer
    /// recommended. The cut moves with every new pattern, so this compares all.
    async fn write_patterns(&mut self, engine: &Engine, today: Day) -> Result<(), Error> {
        let rec = engine.recommended(today);
        let mut desired: HashMap<(String, String), Written> = HashMap::with_capacity(rec.patterns.len());
        for &k in &rec.patterns {
            if let Some(f) = engine.pattern_figures(k) {
                desired.insert((f.user_id.clone(), pattern_name(&f)), Written { top: rec.top.contains(&k), figures: f });
            }
        }
        let mut writes: Vec<((String, String), WriteRequest)> = Vec::new();
        for (key, w) in &desired {
            if self.patterns.get(key) == Some(w) {
                self.stats.unchanged += 1;
                continue;
            }
            writes.push((key.clone(), put_pattern(key, w, today)));
        }
        for key in self.patterns.keys().filter(|k| !desired.contains_key(*k)) {
            let item = HashMap::from([("PK".to_owned(), s(&key.0)), ("SK".to_owned(), s(format!("{PATTERN_ENTITY}#{}", key.1)))]);
            writes.push((key.clone(), WriteRequest::builder().delete_request(DeleteRequest::builder().set_key(Some(item)).build().expect("key")).build()));
        }
        // Batches of 25, several in flight, started only within the budget: a large
        // change (a first load, a moved cut) is spread over several calls instead of
        // blocking the caller. What was written is remembered batch by batch.
        let batches: Vec<Vec<((String, String), WriteRequest)>> = writes.chunks(25).map(<[_]>::to_vec).collect();
        let total = batches.len();
        let deadline = Instant::now() + WRITE_BUDGET;
        let (client, table) = (&self.client, &self.table);
        let done: Vec<_> = stream::iter(batches)
            .take_while(|_| std::future::ready(Instant::now() < deadline))
            .map(|batch| async move {
                let (keys, requests): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let n = requests.len() as u64;
                (keys, n, toolrank_dynamodb::batch_write(client, table, requests).await)
            })
            .buffer_unordered(CONCURRENCY / 4)
            .collect()
            .await;
        self.patterns_pending = done.len() < total;
        let mut failed = None;
        for (keys, n, result) in done {
            self.stats.requests += n;
            if let Err(e) = result {
                // Rewritten next time: puts and deletes are idempotent.
                self.patterns_pending = true;
                failed.get_or_insert(Error::Aws(format!("writing pattern items: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e))));
                continue;
            }
            for key in keys {
                match desired.get(&key) {
                    Some(w) => self.patterns.insert(key, w.clone()),
                    None => self.patterns.remove(&key),
                };
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

fn put_pattern(key: &(String, String), w: &Written, today: Day) -> WriteRequest {
    let f = &w.figures;
    let item = HashMap::from([
        ("PK".to_owned(), s(&key.0)),
        ("SK".to_owned(), s(format!("{PATTERN_ENTITY}#{}", key.1))),
        ("EntityType".to_owned(), s(PATTERN_ENTITY)),
        ("GSI1_PK".to_owned(), s(PATTERN_ENTITY)),
        ("GSI1_SK".to_owned(), s(&key.1)),
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
    WriteRequest::builder().put_request(PutRequest::builder().set_item(Some(item)).build().expect("item")).build()
}

type Item = HashMap<String, AttributeValue>;

fn get<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name).and_then(|v| v.as_s().ok()).map(String::as_str)
}

fn parse<T: std::str::FromStr>(item: &Item, name: &str, what: &'static str, key: &str) -> Result<T, Error> {
    get(item, name)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Item { what, key: key.to_owned(), reason: format!("missing or invalid {name}") })
}

fn parse_day(item: &Item, name: &str, what: &'static str, key: &str) -> Result<Day, Error> {
    get(item, name).and_then(Day::parse_iso).ok_or_else(|| Error::Item { what, key: key.to_owned(), reason: format!("missing or invalid {name}") })
}

/// Reads back what the sink holds: the scored Agent items and the pattern items (with
/// their top-scoring flag). Agent items the pipeline has not scored are left out.
pub async fn read_table(client: &Client, table: &str) -> Result<(Vec<AgentFigures>, Vec<(PatternFigures, bool)>), Error> {
    let mut agents = Vec::new();
    let mut start = None;
    loop {
        let page = client
            .scan()
            .table_name(table)
            .filter_expression("SK = :m AND ScoredBy = :src")
            .expression_attribute_values(":m", s("METADATA"))
            .expression_attribute_values(":src", s(SOURCE))
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| Error::Aws(format!("scanning {table}: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e))))?;
        for item in page.items() {
            agents.push(agent_from_item(item)?);
        }
        start = page.last_evaluated_key;
        if start.is_none() {
            break;
        }
    }
    let mut patterns = Vec::new();
    let mut start = None;
    loop {
        let page = client
            .query()
            .table_name(table)
            .index_name("GSI1")
            .key_condition_expression("GSI1_PK = :p")
            .filter_expression("ScoredBy = :src")
            .expression_attribute_values(":p", s(PATTERN_ENTITY))
            .expression_attribute_values(":src", s(SOURCE))
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| Error::Aws(format!("querying {table} GSI1: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e))))?;
        for item in page.items() {
            patterns.push((pattern_from_item(item)?, get(item, "TopScoring") == Some("Y")));
        }
        start = page.last_evaluated_key;
        if start.is_none() {
            break;
        }
    }
    Ok((agents, patterns))
}

/// The seed's access pattern 2: a domain's agents by `GSI1_SK` descending, best first.
pub async fn top_agents(client: &Client, table: &str, domain: &str, limit: usize) -> Result<Vec<AgentFigures>, Error> {
    let page = client
        .query()
        .table_name(table)
        .index_name("GSI1")
        .key_condition_expression("GSI1_PK = :d AND begins_with(GSI1_SK, :p)")
        .expression_attribute_values(":d", s(domain))
        .expression_attribute_values(":p", s("AGTSCORE"))
        .scan_index_forward(false)
        .limit(limit.clamp(1, 1000) as i32)
        .send()
        .await
        .map_err(|e| Error::Aws(format!("querying {table} GSI1: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e))))?;
    page.items().iter().filter(|i| get(i, "ScoredBy") == Some(SOURCE)).map(agent_from_item).collect()
}

/// Recommended patterns: of one user (access pattern 7, `PK = user AND begins_with(SK,
/// 'UserPrcToolMapp#')`) or of everyone (access pattern 8, on GSI1).
pub async fn patterns(client: &Client, table: &str, user: Option<&str>) -> Result<Vec<PatternFigures>, Error> {
    let Some(user) = user else {
        return Ok(read_table(client, table).await?.1.into_iter().map(|(f, _)| f).collect());
    };
    let mut out = Vec::new();
    let mut start = None;
    loop {
        let page = client
            .query()
            .table_name(table)
            .key_condition_expression("PK = :u AND begins_with(SK, :p)")
            .expression_attribute_values(":u", s(user))
            .expression_attribute_values(":p", s(format!("{PATTERN_ENTITY}#")))
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| Error::Aws(format!("querying {table}: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e))))?;
        for item in page.items() {
            out.push(pattern_from_item(item)?);
        }
        start = page.last_evaluated_key;
        if start.is_none() {
            return Ok(out);
        }
    }
}

fn agent_from_item(item: &Item) -> Result<AgentFigures, Error> {
    let key = get(item, "PK").unwrap_or_default().to_owned();
    let what = "Agent";
    let failed_tools: Vec<String> = get(item, "FailedTools").filter(|s| !s.is_empty()).map(|s| s.split(", ").map(str::to_owned).collect()).unwrap_or_default();
    Ok(AgentFigures {
        domain_id: get(item, "GSI1_PK").unwrap_or_default().to_owned(),
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

fn pattern_from_item(item: &Item) -> Result<PatternFigures, Error> {
    let key = format!("{}/{}", get(item, "PK").unwrap_or_default(), get(item, "SK").unwrap_or_default());
    let what = PATTERN_ENTITY;
    let text = |name: &str| get(item, name).map(str::to_owned).ok_or_else(|| Error::Item { what, key: key.clone(), reason: format!("missing {name}") });
    Ok(PatternFigures {
        user_id: text("PK")?,
        process_pattern: text("Proclist")?,
        agent_id: text("AgentList")?,
        tool_sequence: text("Toollist")?,
        executions: parse(item, "ExecutionCount", what, &key)?,
        successes: parse(item, "SuccessCount", what, &key)?,
        first: parse_day(item, "FirstUsedDate", what, &key)?,
        last: parse_day(item, "LastUsedDate", what, &key)?,
    })
}
