//! The local stack as one test sees it: its own topic, table and namespace, and what the sinks must hold.

use super::*;
use aws_sdk_dynamodb::types::AttributeValue;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const TODAY: &str = "2025-07-14";
pub const TABLES: [&str; 3] = ["agent_score_summary", "user_process_patterns", "agent_tool_errors"];

/// Short leases and checkpoints, so that a test sees units move within seconds.
const SHORT_LEASES: [&str; 4] = ["--lease-secs", "2", "--checkpoint-secs", "1"];

/// A topic, its dead-letter topic, a table and a Valkey namespace of one test.
pub struct Live {
    pub topic: String,
    pub dlq: String,
    pub table: String,
    pub namespace: String,
    pub group: String,
    pub dir: tempfile::TempDir,
    /// Environment of every command (another broker, a faulty DynamoDB endpoint).
    pub env: Vec<(&'static str, String)>,
}

impl Live {
    /// A topic of `partitions` partitions and a table without a stream: DynamoDB Local
    /// keeps every stream record for the rest of its run, and each write to a table with a
    /// stream slows down with their number (a 99-item transaction went from 0.05 s to 8 s
    /// over the suite), so only a test that reads the table's stream has one.
    pub fn new(partitions: &str) -> Live {
        Live::with_env(partitions, Vec::new())
    }

    /// [`Live::new`] with the table's stream, for the tests that read it.
    pub fn with_stream(partitions: &str) -> Live {
        Live::setup(partitions, Vec::new(), true)
    }

    pub fn with_env(partitions: &str, env: Vec<(&'static str, String)>) -> Live {
        Live::setup(partitions, env, false)
    }

    fn setup(partitions: &str, env: Vec<(&'static str, String)>, stream: bool) -> Live {
        let live = Live {
            topic: unique("live"),
            dlq: unique("live-dlq"),
            table: unique("LiveTable"),
            namespace: unique("ns"),
            group: unique("group"),
            dir: tempfile::tempdir().unwrap(),
            env,
        };
        let mut args = vec!["setup", "--topic", &live.topic, "--dead-letter-topic", &live.dlq, "--partitions", partitions, "--table", &live.table];
        if !stream {
            args.push("--no-stream");
        }
        live.toolrank(&args);
        live
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_toolrank"));
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// `toolrank lambda` under the Runtime API at `runtime_api` as function `name`, writing
    /// this test's table and namespace with the state of `application`; `env` on top.
    pub fn function(&self, runtime_api: &str, name: &str, application: &str, env: &[(&str, &str)]) -> Command {
        let mut cmd = self.command();
        cmd.arg("lambda")
            .envs([
                ("AWS_LAMBDA_RUNTIME_API", runtime_api),
                ("AWS_LAMBDA_FUNCTION_NAME", name),
                ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512"),
                ("AWS_LAMBDA_FUNCTION_VERSION", "1"),
                ("TOOLRANK_TABLE", &self.table),
                ("TOOLRANK_NAMESPACE", &self.namespace),
                ("TOOLRANK_APPLICATION", application),
                ("TOOLRANK_TODAY", TODAY),
            ])
            .envs(env.iter().copied());
        cmd
    }

    /// A generated history of `sessions` (30 agents) and its first and second halves, as
    /// files; the first half is written into the table.
    pub fn history_in_halves(&self, sessions: &str, seed: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let history = self.dir.path().join("history.jsonl");
        self.toolrank(&["generate", "--sessions", sessions, "--seed", seed, "--agents", "30", "--out", history.to_str().unwrap()]);
        let text = std::fs::read_to_string(&history).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let (before, after) = (self.dir.path().join("before.jsonl"), self.dir.path().join("after.jsonl"));
        std::fs::write(&before, lines[..lines.len() / 2].join("\n")).unwrap();
        std::fs::write(&after, lines[lines.len() / 2..].join("\n")).unwrap();
        self.toolrank(&["produce", "--to", "dynamodb", "--table", &self.table, before.to_str().unwrap()]);
        (history, after)
    }

    pub fn toolrank(&self, args: &[&str]) -> Output {
        run(self.command().args(args))
    }

    /// The seed sample through the test's topic (and its items into the table) reaches
    /// both sinks equal to `replay` (Valkey at `valkey_url`, default the local one), and
    /// `top` reads it from Valkey. Returns what the draining consumer said.
    pub fn seed_reaches_both_sinks(&self, valkey_url: Option<&str>) -> String {
        self.toolrank(&["produce", "--to", "dynamodb", "--table", &self.table, SEED]);
        self.toolrank(&["produce", "--topic", &self.topic, SEED]);
        let summary = self.drain(&[]);
        assert!(summary.contains("consumed 34 messages"), "{summary}");
        self.assert_sinks_equal_replay(SEED, valkey_url);
        let top = String::from_utf8(self.toolrank(&["top", "agents", "--domain", "DMN001", "--namespace", &self.namespace, "--today", TODAY]).stdout).unwrap();
        assert!(top.starts_with("source: valkey") && top.find("AGT002").unwrap() < top.find("AGT001").unwrap(), "{top}");
        summary
    }

    pub fn consume_args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = self.kafka_args();
        args.extend(SHORT_LEASES);
        args.extend_from_slice(extra);
        args
    }

    /// `consume kafka` on the test's topic, group, table and namespace, at the scoring
    /// date, with the consumer's own leases and checkpoints.
    pub fn kafka_args(&self) -> Vec<&str> {
        let mut args = vec!["consume", "kafka", "--topic", &self.topic, "--group", &self.group, "--dead-letter-topic", &self.dlq];
        args.extend(self.sink_args());
        args
    }

    /// Where every live consumer of the test writes: its table and namespace, at the
    /// scoring date.
    fn sink_args(&self) -> [&str; 6] {
        ["--table", &self.table, "--namespace", &self.namespace, "--today", TODAY]
    }

    pub fn consumer(&self, extra: &[&str]) -> Running {
        Running::spawn(self.command().args(self.consume_args(extra)).stdout(Stdio::null()).stderr(Stdio::piped()))
    }

    /// A consumer with 5 s leases: for tests whose DynamoDB is slow on purpose, where a
    /// renewal can take longer than a 2 s lease and the lease would pass back and forth.
    pub fn steady_consumer(&self, extra: &[&str]) -> Running {
        self.consumer_with_lease("5", extra)
    }

    /// A consumer whose sink lease lasts `secs` seconds, checkpointing every second.
    pub fn consumer_with_lease(&self, secs: &str, extra: &[&str]) -> Running {
        let mut args = self.kafka_args();
        args.extend(["--lease-secs", secs, "--checkpoint-secs", "1"]);
        args.extend_from_slice(extra);
        Running::spawn(self.command().args(args).stdout(Stdio::null()).stderr(Stdio::piped()))
    }

    /// Publishes `input` to the topic at `rate` records/s in the background.
    pub fn producer(&self, rate: &str, input: &str) -> Running {
        Running::spawn(self.command().args(["produce", "--topic", &self.topic, "--rate", rate, input]).stdout(Stdio::null()).stderr(Stdio::piped()))
    }

    /// Runs a consumer until the topic is drained (longer than the group's session
    /// timeout, so partitions of killed members come back to it).
    pub fn drain(&self, extra: &[&str]) -> String {
        let mut args = self.consume_args(&["--until-idle", "12"]);
        args.extend_from_slice(extra);
        String::from_utf8(self.toolrank(&args).stderr).unwrap()
    }

    /// Runs `consume SOURCE` (dynamodb-streams or kinesis) on the test's table and
    /// namespace, with short leases and intervals.
    pub fn poller(&self, source_args: &[&str], extra: &[&str]) -> Command {
        let mut cmd = self.command();
        let dead_letters = self.dir.path().join("stream-dead-letters.jsonl");
        cmd.args(["consume"]).args(source_args).args(self.sink_args()).args(SHORT_LEASES).args([
            "--application",
            &self.group,
            "--discover-secs",
            "2",
            "--idle-poll-ms",
            "100",
        ]);
        cmd.arg("--dead-letter-file").arg(dead_letters).args(extra);
        cmd
    }

    pub fn streams_poller(&self, extra: &[&str]) -> Command {
        self.poller(&["dynamodb-streams", "--source-table", &self.table], extra)
    }

    /// `results` of both sinks equal `replay` of `input`: every table from Valkey, and
    /// the agents, tool errors and recommended patterns from DynamoDB.
    pub fn assert_sinks_equal_replay(&self, input: &str, valkey_url: Option<&str>) {
        let d = self.dir.path();
        let (rr, rv, rd) = (d.join("replay"), d.join("valkey"), d.join("dynamodb"));
        self.toolrank(&["replay", "--today", TODAY, "--out", rr.to_str().unwrap(), input]);
        let url = valkey_url.map(str::to_owned).unwrap_or_else(|| env("TOOLRANK_VALKEY_URL"));
        self.toolrank(&["results", "--from", "valkey", "--valkey-url", &url, "--namespace", &self.namespace, "--today", TODAY, "--out", rv.to_str().unwrap()]);
        self.toolrank(&["results", "--from", "dynamodb", "--table", &self.table, "--today", TODAY, "--out", rd.to_str().unwrap()]);
        for t in TABLES {
            assert_eq!(read_table(&rv, t), read_table(&rr, t), "valkey {t} equals replay");
        }
        assert_dynamodb_holds(&rd, &rr);
    }

    /// [`assert_sinks_equal_replay`](Self::assert_sinks_equal_replay) passes within
    /// `limit` while the consumers run (checked every second); past it, fails with the
    /// last difference and `said()` (what the consumers said).
    pub fn await_sinks_equal_replay(&self, input: &str, valkey_url: Option<&str>, limit: Duration, said: impl Fn() -> String) {
        let deadline = Instant::now() + limit;
        loop {
            let exact = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.assert_sinks_equal_replay(input, valkey_url)));
            match exact {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("{}", said());
                    std::panic::resume_unwind(e)
                }
                Err(_) => std::thread::sleep(Duration::from_secs(1)),
            }
        }
    }
}

pub fn read_table(dir: &std::path::Path, table: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{table}.jsonl"))).unwrap()
}

/// `results --from dynamodb` in `dynamodb` holds what DynamoDB keeps of `replay`: the
/// agents, the tool errors and the recommended patterns.
pub fn assert_dynamodb_holds(dynamodb: &std::path::Path, replay: &std::path::Path) {
    assert_eq!(read_table(dynamodb, "agent_score_summary"), read_table(replay, "agent_score_summary"), "dynamodb agents equal replay");
    assert_eq!(read_table(dynamodb, "agent_tool_errors"), read_table(replay, "agent_tool_errors"), "dynamodb tool errors equal replay");
    let all = read_table(replay, "user_process_patterns");
    let recommended: Vec<&str> = all.lines().filter(|l| l.contains("\"is_recommended\":true")).collect();
    assert_eq!(read_table(dynamodb, "user_process_patterns").lines().collect::<Vec<_>>(), recommended, "dynamodb holds the recommended patterns");
    assert!(!recommended.is_empty());
}

/// DynamoDB Local keeps working on every table with a stream, idle or not, until it is
/// deleted: without this, a long test run slows it down for everything after.
impl Drop for Live {
    fn drop(&mut self) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let client = toolrank_dynamodb::client().await;
            let _ = client.delete_table().table_name(&self.table).send().await;
        });
    }
}

/// A generated history, and its METADATA lines (the catalog) written into the test's
/// table, so that the DynamoDB sink has Agent items to score. The hist items are not
/// needed there: the consumer reads them from Kafka.
pub fn generated(live: &Live, sessions: &str, seed: &str) -> String {
    let path = live.dir.path().join(format!("history-{seed}.jsonl"));
    live.toolrank(&["generate", "--sessions", sessions, "--seed", seed, "--agents", "30", "--out", path.to_str().unwrap()]);
    let catalog = live.dir.path().join(format!("catalog-{seed}.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: String = text.lines().filter(|l| l.contains(r#""SK":{"S":"METADATA"}"#)).map(|l| format!("{l}\n")).collect();
    assert!(!lines.is_empty());
    std::fs::write(&catalog, lines).unwrap();
    live.toolrank(&["produce", "--to", "dynamodb", "--table", &live.table, catalog.to_str().unwrap()]);
    path.to_str().unwrap().to_owned()
}

/// A private tansu broker (SQLite storage in its own directory), to restart it.
pub struct Broker {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub process: Option<Running>,
}

impl Broker {
    pub fn start() -> Broker {
        let mut b = Broker { port: free_port(), dir: tempfile::tempdir().unwrap(), process: None };
        b.spawn();
        b
    }

    pub fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Running::spawn(
            Command::new(env("TOOLRANK_TANSU"))
                .args(["broker", "--storage-engine", "sqlite://tansu.db", "--listener-url", &url, "--advertised-listener-url", &url])
                .current_dir(self.dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        self.process = Some(child);
        wait_for_port(self.port);
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker gracefully and starts it again on the same storage.
    pub fn restart(&mut self, down_for: Duration) {
        let mut broker = self.process.take().unwrap();
        broker.signal("-TERM");
        if !broker.exits_within(Duration::from_secs(30)) {
            eprintln!("tansu did not stop within 30 s of SIGTERM: killed");
        }
        drop(broker);
        std::thread::sleep(down_for);
        self.spawn();
    }
}

/// A private Valkey without persistence on `port`.
pub fn valkey_server(port: u16) -> Running {
    Running::spawn(
        Command::new(env("TOOLRANK_VALKEY_SERVER"))
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null()),
    )
}

/// Every table of two `replay --out` directories holds the same rows: keys, counts,
/// names and dates exactly, floats to 1e-9 relative.
pub fn assert_same_tables(a: &std::path::Path, b: &std::path::Path, tables: &[&str]) {
    pub fn load(dir: &std::path::Path, table: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
        let text = std::fs::read_to_string(dir.join(format!("{table}.jsonl"))).unwrap();
        let mut rows: Vec<_> = text.lines().map(|l| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(l).unwrap()).collect();
        let key = |r: &serde_json::Map<String, serde_json::Value>| {
            r.iter().filter(|(_, v)| v.is_string()).map(|(_, v)| v.as_str().unwrap().to_owned()).collect::<Vec<_>>()
        };
        rows.sort_by_key(key);
        rows
    }
    for table in tables {
        let (x, y) = (load(a, table), load(b, table));
        assert_eq!(x.len(), y.len(), "{table}: row counts");
        for (r, s) in x.iter().zip(&y) {
            assert_eq!(r.keys().collect::<Vec<_>>(), s.keys().collect::<Vec<_>>(), "{table}: columns");
            for (k, v) in r {
                let w = &s[k];
                match (v.as_f64(), w.as_f64()) {
                    (Some(p), Some(q)) if v.is_f64() || w.is_f64() => {
                        assert!((p - q).abs() <= 1e-12_f64.max(1e-9 * p.abs()), "{table}.{k}: {p} vs {q} in {r:?}")
                    }
                    _ => assert_eq!(v, w, "{table}.{k} in {r:?}"),
                }
            }
        }
    }
}

pub const ALL_TABLES: [&str; 4] = ["agent_score_summary", "user_process_patterns", "agent_tool_errors", "staging"];

/// The seed's access patterns answer from the DynamoDB sink's items in `table` after the
/// seed sample went through a live path: agents by score (2), one user's recommended
/// patterns (7), everyone's (8).
pub fn assert_seed_access_patterns(table: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = toolrank_dynamodb::client().await;
        // Access pattern 2: the domain's agents by GSI1_SK descending.
        let agents = client
            .query()
            .table_name(table)
            .index_name("GSI1")
            .key_condition_expression("GSI1_PK = :d AND begins_with(GSI1_SK, :p)")
            .expression_attribute_values(":d", AttributeValue::S("DMN001".into()))
            .expression_attribute_values(":p", AttributeValue::S("AGTSCORE".into()))
            .scan_index_forward(false)
            .send()
            .await
            .unwrap();
        let order: Vec<&str> = agents.items().iter().map(|i| i["PK"].as_s().unwrap().as_str()).collect();
        assert_eq!(order, ["AGT002", "AGT001", "AGT003"], "AGT002 (0.05) before AGT001 (0.02); AGT003 has no executions");
        assert_eq!(agents.items()[1]["Score"], AttributeValue::S(format!("{}", 0.024893534183931972)));
        assert_eq!(agents.items()[0]["AgentNM"].as_s().unwrap(), "매장 검색 에이전트2", "fields of the application are kept");
        // Access pattern 7: one user's recommended patterns.
        let mine = client
            .query()
            .table_name(table)
            .key_condition_expression("PK = :u AND begins_with(SK, :p)")
            .expression_attribute_values(":u", AttributeValue::S("USR001".into()))
            .expression_attribute_values(":p", AttributeValue::S("UserPrcToolMapp#PRC001".into()))
            .send()
            .await
            .unwrap();
        assert_eq!(mine.count(), 1);
        assert_eq!(mine.items()[0]["Toollist"].as_s().unwrap(), "FIND_LOC->USE_SEARCH_ENGINE_API->FORMAT_RESULTS");
        assert!(mine.items()[0].contains_key("ExpireAt"), "the seed's TTL policy");
        // Access pattern 8: everyone's, on GSI1.
        let all = client
            .query()
            .table_name(table)
            .index_name("GSI1")
            .key_condition_expression("GSI1_PK = :p AND begins_with(GSI1_SK, :n)")
            .expression_attribute_values(":p", AttributeValue::S("UserPrcToolMapp".into()))
            .expression_attribute_values(":n", AttributeValue::S("PRC001->PRC002".into()))
            .send()
            .await
            .unwrap();
        assert_eq!(all.count(), 2);
    });
}
