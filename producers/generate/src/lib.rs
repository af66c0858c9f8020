//! Deterministic synthetic `AgentTable` histories for demos, tests and benchmarks.
//!
//! The workload looks like agent traffic: agent popularity and user activity follow Zipf
//! laws, each agent has a few canonical tool workflows (so patterns repeat and some get
//! recommended), agents fail at different rates, and some Agent items arrive late.
//! In `stream` style it also emits what real streams deliver: modifies, removes (some by
//! TTL), redeliveries of old records and other entity types.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Zipf};
use std::collections::VecDeque;
use std::io::{self, Write};
use toolrank_events::Day;

/// What to generate.
#[derive(Clone, Debug)]
pub struct Config {
    pub sessions: u64,
    pub seed: u64,
    pub domains: u32,
    pub agents: u32,
    /// Days of history, ending on `end` (YYYY-MM-DD).
    pub days: u32,
    pub end: String,
    /// Fraction of agents whose Agent item only arrives after their executions.
    pub late_metadata: f64,
    /// Stream style: each session's executions are removed by TTL once this many later
    /// sessions were written, so the table's live items stay a sliding window (the
    /// seed's TTL) however long the stream runs. `None`: only the occasional removal.
    pub ttl_after: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config { sessions: 1000, seed: 1, domains: 8, agents: 200, days: 60, end: "2025-07-14".into(), late_metadata: 0.1, ttl_after: None }
    }
}

/// The line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// DynamoDB export lines of the final table state.
    Export,
    /// Lambda-style stream records with modifies, removes and redeliveries.
    Stream,
    /// Flat events (upserts and deletes).
    Flat,
}

/// What was written.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub lines: u64,
    pub executions: u64,
    pub bytes: u64,
}

const TOOL_NAMES: &[&str] = &[
    "FIND_LOC",
    "USE_SEARCH_ENGINE_API",
    "FORMAT_RESULTS",
    "FETCH_REVIEWS",
    "RANK_RESULTS",
    "CALL_MAPS_API",
    "TRANSLATE",
    "SUMMARIZE",
    "CREATE_S3_BUCKET",
    "LAUNCH_EC2",
    "QUERY_DB",
    "SEND_EMAIL",
];

struct Agent {
    id: String,
    domain: String,
    name: String,
    tools: Vec<(String, &'static str)>,
    workflows: Vec<Vec<usize>>,
    failure: f64,
    late: bool,
}

struct Writer<W: Write> {
    out: W,
    style: Style,
    seq: u128,
    stats: Stats,
    /// Recently written stream records, redelivered now and then.
    recent: Vec<String>,
}

impl<W: Write> Writer<W> {
    fn line(&mut self, text: &str) -> io::Result<()> {
        self.out.write_all(text.as_bytes())?;
        self.out.write_all(b"\n")?;
        self.stats.lines += 1;
        self.stats.bytes += text.len() as u64 + 1;
        Ok(())
    }

    /// Writes an item as an export line or an INSERT/MODIFY record.
    fn put(&mut self, rng: &mut ChaCha8Rng, pk: &str, sk: &str, attrs: &str, modify: bool) -> io::Result<()> {
        let item = format!(r#"{{"PK":{{"S":"{pk}"}},"SK":{{"S":"{sk}"}},{attrs}}}"#);
        let text = match self.style {
            Style::Export => format!(r#"{{"Item":{item}}}"#),
            Style::Stream | Style::Flat => {
                self.seq += 1 + rng.random_range(0..3);
                let name = if modify { "MODIFY" } else { "INSERT" };
                format!(
                    r#"{{"eventID":"{:x}","eventName":"{name}","eventSource":"aws:dynamodb","awsRegion":"ap-northeast-2","dynamodb":{{"Keys":{{"PK":{{"S":"{pk}"}},"SK":{{"S":"{sk}"}}}},"NewImage":{item},"SequenceNumber":"{}","StreamViewType":"NEW_AND_OLD_IMAGES"}}}}"#,
                    self.seq, self.seq
                )
            }
        };
        self.emit(rng, text)
    }

    fn remove(&mut self, rng: &mut ChaCha8Rng, pk: &str, sk: &str, ttl: bool) -> io::Result<()> {
        self.seq += 1;
        let identity = if ttl { r#","userIdentity":{"type":"Service","principalId":"dynamodb.amazonaws.com"}"# } else { "" };
        let text = format!(
            r#"{{"eventID":"{:x}","eventName":"REMOVE","dynamodb":{{"Keys":{{"PK":{{"S":"{pk}"}},"SK":{{"S":"{sk}"}}}},"SequenceNumber":"{}"}}{identity}}}"#,
            self.seq, self.seq
        );
        self.emit(rng, text)
    }

    fn emit(&mut self, rng: &mut ChaCha8Rng, text: String) -> io::Result<()> {
        self.line(&text)?;
        if self.style == Style::Stream {
            if rng.random_bool(0.03) && !self.recent.is_empty() {
                let old = self.recent[rng.random_range(0..self.recent.len())].clone();
                self.line(&old)?;
            }
            if self.recent.len() < 64 {
                self.recent.push(text);
            } else {
                let i = rng.random_range(0..64);
                self.recent[i] = text;
            }
        }
        Ok(())
    }
}

fn agent_attrs(a: &Agent) -> String {
    format!(r#""EntityType":{{"S":"Agent"}},"AgentNM":{{"S":"{}"}},"GSI1_PK":{{"S":"{}"}},"GSI1_SK":{{"S":"AGTSCORE#0"}}"#, a.name, a.domain)
}

fn hist_attrs(tool_nm: &str, dt: &str, success: bool) -> String {
    format!(
        r#""EntityType":{{"S":"UserSessPrcToolMappHist"}},"ToolNM":{{"S":"{tool_nm}"}},"ToolValues":{{"S":"query params"}},"TransactDT":{{"S":"{dt}"}},"SuccYN":{{"S":"{}"}},"ResultMsg":{{"S":"ok"}}"#,
        if success { "Y" } else { "N" }
    )
}

/// One execution as flat events describe it.
struct FlatRow<'a> {
    user: &'a str,
    session: &'a str,
    process: String,
    agent: &'a Agent,
    tool: &'a (String, &'static str),
    dt: &'a str,
    success: bool,
}

impl FlatRow<'_> {
    /// The flat event number `n` for this row: an upsert, or its deletion.
    fn event(&self, delete: bool, n: u64) -> String {
        let FlatRow { user, session, process, agent: a, tool, dt, success } = self;
        let op = if delete { "delete" } else { "upsert" };
        format!(
            r#"{{"event_id":"e{n}","op":"{op}","user_id":"{user}","session_id":"{session}","process_id":"{process}","domain_id":"{}","agent_id":"{}","agent_name":"{}","tool_id":"{}","tool_name":"{}","success":{success},"transact_dt":"{dt}","tool_values":"q","result_message":"ok"}}"#,
            a.domain, a.id, a.name, tool.0, tool.1
        )
    }
}

/// Writes a history of `cfg.sessions` sessions to `out`.
pub fn generate(cfg: &Config, style: Style, out: impl Write) -> io::Result<Stats> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let agents: Vec<Agent> = (0..cfg.agents.max(1))
        .map(|i| {
            let n_tools = rng.random_range(2..=6);
            let tools: Vec<(String, &'static str)> =
                (0..n_tools).map(|t| (format!("TL{:03}", t + 1), TOOL_NAMES[(i as usize * 7 + t) % TOOL_NAMES.len()])).collect();
            let workflows = (0..rng.random_range(1..=3)).map(|_| (0..rng.random_range(1..=4)).map(|_| rng.random_range(0..n_tools)).collect()).collect();
            Agent {
                id: format!("AGT{:04}", i + 1),
                domain: format!("DMN{:03}", i % cfg.domains.max(1) + 1),
                name: format!("에이전트 {}", i + 1),
                tools,
                workflows,
                failure: rng.random_range(0.0..0.3),
                late: rng.random_bool(cfg.late_metadata),
            }
        })
        .collect();
    let users = (cfg.sessions / 4).max(1);
    let agent_zipf = Zipf::new(agents.len() as f64, 1.1).expect("valid zipf");
    let user_zipf = Zipf::new(users as f64, 1.05).expect("valid zipf");
    let mut w = Writer { out: io::BufWriter::with_capacity(1 << 20, out), style, seq: 4_000_000_000_000_000_000, stats: Stats::default(), recent: Vec::new() };
    let on_time = |late: bool| agents.iter().filter(move |a| a.late == late);
    if style != Style::Flat {
        for d in 0..cfg.domains.max(1) {
            let attrs = format!(r#""EntityType":{{"S":"Domain"}},"DomainNM":{{"S":"domain {}"}},"GSI1_PK":{{"S":"Domain"}}"#, d + 1);
            w.put(&mut rng, &format!("DMN{:03}", d + 1), "METADATA", &attrs, false)?;
        }
        for a in on_time(false) {
            w.put(&mut rng, &a.id, "METADATA", &agent_attrs(a), false)?;
            for (tid, tnm) in &a.tools {
                let attrs = format!(r#""EntityType":{{"S":"Tool"}},"ToolNM":{{"S":"{tnm}"}},"GSI1_PK":{{"S":"{}"}}"#, a.domain);
                w.put(&mut rng, &a.id, tid, &attrs, false)?;
            }
        }
    }
    let end = Day::parse_iso(&cfg.end).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "end is not YYYY-MM-DD"))?;
    // Stream style with `ttl_after`: the sessions whose executions are still live.
    let mut window: VecDeque<(String, Vec<String>)> = VecDeque::new();
    for s in 0..cfg.sessions {
        let user = format!("USR{:06}", user_zipf.sample(&mut rng) as u64);
        let (y, m, d) = Day(end.0 - rng.random_range(0..cfg.days.max(1)) as i32).ymd();
        let session = format!("SESS{y:04}{m:02}{d:02}{s:07}");
        let pk = format!("{user}#{session}");
        let mut second = rng.random_range(0..80_000u32);
        let mut process = 0;
        let mut live = Vec::new();
        for _ in 0..if rng.random_bool(0.15) { 2 } else { 1 } {
            let a = &agents[agent_zipf.sample(&mut rng) as usize - 1];
            let flow = &a.workflows[rng.random_range(0..a.workflows.len())];
            for &t in flow {
                process += 1;
                second += rng.random_range(0..4);
                let dt = format!("{y:04}{m:02}{d:02}{:02}{:02}{:02}", second / 3600, second / 60 % 60, second % 60);
                let tool = &a.tools[t];
                let sk = format!("PRC{process:03}#{}#{}", a.id, tool.0);
                let success = !rng.random_bool(a.failure);
                w.stats.executions += 1;
                match style {
                    Style::Flat => {
                        let n = w.stats.lines;
                        let row = FlatRow { user: &user, session: &session, process: format!("PRC{process:03}"), agent: a, tool, dt: &dt, success };
                        w.line(&row.event(false, n))?;
                        if rng.random_bool(0.02) {
                            w.line(&row.event(true, n + 1))?;
                            w.stats.executions -= 1;
                        }
                    }
                    Style::Export => w.put(&mut rng, &pk, &sk, &hist_attrs(tool.1, &dt, success), false)?,
                    Style::Stream => {
                        w.put(&mut rng, &pk, &sk, &hist_attrs(tool.1, &dt, success), false)?;
                        if rng.random_bool(0.05) {
                            w.put(&mut rng, &pk, &sk, &hist_attrs(tool.1, &dt, !success), true)?;
                        }
                        if rng.random_bool(0.02) {
                            let ttl = rng.random_bool(0.5);
                            w.remove(&mut rng, &pk, &sk, ttl)?;
                            w.stats.executions -= 1;
                        } else if cfg.ttl_after.is_some() {
                            live.push(sk);
                        }
                    }
                }
            }
        }
        if let Some(keep) = cfg.ttl_after {
            window.push_back((pk, live));
            while window.len() as u64 > keep {
                let (pk, sks) = window.pop_front().expect("not empty");
                for sk in sks {
                    w.remove(&mut rng, &pk, &sk, true)?;
                    w.stats.executions -= 1;
                }
            }
        }
    }
    if style != Style::Flat {
        for a in on_time(true) {
            w.put(&mut rng, &a.id, "METADATA", &agent_attrs(a), false)?;
        }
    }
    w.out.flush()?;
    Ok(w.stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};
    use toolrank_events::{decode_line, Action, Entity};

    /// The keys a stream leaves holding an execution (by each key's newest record).
    fn live_executions(out: &[u8]) -> HashSet<(String, String)> {
        let mut latest: HashMap<(String, String), (u128, bool)> = HashMap::new();
        for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            decode_line(line, &mut |rec| {
                let c = rec.result.expect("generated records decode");
                let live = matches!(c.action, Action::Put(Entity::Execution(_)));
                let seq = c.seq.expect("stream records carry a sequence number");
                let slot = latest.entry((c.pk.into_owned(), c.sk.into_owned())).or_insert((0, false));
                if seq > slot.0 {
                    *slot = (seq, live);
                }
            })
            .expect("generated lines decode");
        }
        latest.into_iter().filter(|(_, (_, live))| *live).map(|(k, _)| k).collect()
    }

    #[test]
    fn ttl_after_keeps_a_sliding_window_of_live_sessions() {
        let cfg = Config { sessions: 500, seed: 3, ttl_after: Some(20), ..Config::default() };
        let mut out = Vec::new();
        let stats = generate(&cfg, Style::Stream, &mut out).unwrap();
        let live = live_executions(&out);
        assert_eq!(live.len() as u64, stats.executions, "the stats count what is live at the end");
        let sessions: HashSet<&str> = live.iter().map(|(pk, _)| pk.as_str()).collect();
        assert!(!sessions.is_empty() && sessions.len() <= 20, "{} sessions live", sessions.len());
        let oldest = sessions.iter().map(|pk| pk[pk.len() - 7..].parse::<u64>().unwrap()).min().unwrap();
        assert!(oldest >= 480, "only the last 20 sessions keep executions (oldest live: {oldest})");

        let without = generate(&Config { ttl_after: None, ..cfg }, Style::Stream, std::io::sink()).unwrap();
        assert!(without.executions > 20 * stats.executions / 2, "without it, the occasional removal only");
    }
}
