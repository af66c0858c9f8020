//! The batch path: the mirror, the Redshift SQL on the Data API endpoint, reconciliation.

use crate::support::*;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A warehouse database of one test, on the local Data API endpoint (DuckDB).
struct Warehouse {
    database: String,
}

impl Warehouse {
    fn new() -> Warehouse {
        Warehouse { database: unique("wh").replace('-', "_") }
    }

    fn args<'a>(&'a self, command: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = command.to_vec();
        args.extend_from_slice(&["--workgroup", "local", "--database", &self.database]);
        args.extend_from_slice(extra);
        args
    }

    fn toolrank(&self, command: &[&str], extra: &[&str]) -> Output {
        toolrank(&self.args(command, extra))
    }

    /// `warehouse score --out` into `dir`.
    fn score(&self, dir: &std::path::Path, extra: &[&str]) {
        let mut args = vec!["--today", TODAY, "--out", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.toolrank(&["warehouse", "score"], &args);
    }
}

#[test]
fn warehouse_reproduces_the_seed_tables_through_the_mirror() {
    let wh = Warehouse::new();
    let dir = tempfile::tempdir().unwrap();
    let out = wh.toolrank(&["mirror"], &[SEED]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("mirrored 34 item writes"), "{}", String::from_utf8_lossy(&out.stderr));
    let (batch, replay) = (dir.path().join("batch"), dir.path().join("replay"));
    wh.score(&batch, &[]);
    toolrank(&["replay", "--today", TODAY, "--out", replay.to_str().unwrap(), SEED]);
    assert_same_tables(&batch, &replay, &ALL_TABLES);
    // The seed's published agent_score_summary: AGT001 2/1/1 0.02, AGT002 1/1/0 0.05.
    let agents = std::fs::read_to_string(batch.join("agent_score_summary.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = agents.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let figures: Vec<(&str, u64, u64, u64, String)> = rows
        .iter()
        .map(|r| {
            (
                r["agentid"].as_str().unwrap(),
                r["total_executions"].as_u64().unwrap(),
                r["success_count"].as_u64().unwrap(),
                r["failure_count"].as_u64().unwrap(),
                format!("{:.2}", r["calculated_score"].as_f64().unwrap()),
            )
        })
        .collect();
    assert_eq!(figures, vec![("AGT002", 1, 1, 0, "0.05".into()), ("AGT001", 2, 1, 1, "0.02".into())]);
    // Mirrored again as a new load: the same tables, not twice the history.
    wh.toolrank(&["mirror"], &["--fresh", SEED]);
    let again = dir.path().join("again");
    wh.score(&again, &[]);
    assert_same_tables(&again, &replay, &ALL_TABLES);
}

#[test]
fn warehouse_equals_replay_on_histories_with_modifies_and_removes_full_and_incremental() {
    let wh = Warehouse::new();
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history.jsonl");
    toolrank(&["generate", "--sessions", "1500", "--seed", "11", "--style", "stream", "--out", history.to_str().unwrap()]);
    let text = std::fs::read_to_string(&history).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (first, rest) = (dir.path().join("first.jsonl"), dir.path().join("rest.jsonl"));
    std::fs::write(&first, lines[..lines.len() / 2].join("\n")).unwrap();
    std::fs::write(&rest, lines[lines.len() / 2..].join("\n")).unwrap();

    // Incremental from empty, then incremental over the rest of the history.
    wh.toolrank(&["mirror"], &[first.to_str().unwrap()]);
    let (inc1, rp1) = (dir.path().join("inc1"), dir.path().join("rp1"));
    wh.score(&inc1, &["--incremental"]);
    toolrank(&["replay", "--today", TODAY, "--out", rp1.to_str().unwrap(), first.to_str().unwrap()]);
    assert_same_tables(&inc1, &rp1, &ALL_TABLES);
    wh.toolrank(&["mirror"], &[rest.to_str().unwrap()]);
    let (inc2, full, rp2) = (dir.path().join("inc2"), dir.path().join("full"), dir.path().join("rp2"));
    wh.score(&inc2, &["--incremental"]);
    toolrank(&["replay", "--today", TODAY, "--out", rp2.to_str().unwrap(), history.to_str().unwrap()]);
    assert_same_tables(&inc2, &rp2, &ALL_TABLES);
    wh.score(&full, &[]);
    assert_same_tables(&full, &rp2, &ALL_TABLES);
    let patterns = std::fs::read_to_string(full.join("user_process_patterns.jsonl")).unwrap().lines().count();
    assert!(patterns > 1000, "{patterns} patterns: more than one GetStatementResult page");
}

#[test]
fn mirror_follows_kafka_and_reconcile_compares_the_sinks_with_the_warehouse() {
    let live = Live::new("3");
    let history = generated(&live, "400", "5");
    live.toolrank(&["produce", "--topic", &live.topic, &history]);
    live.drain(&[]);

    let wh = Warehouse::new();
    let follow = ["--follow", "kafka", "--topic", live.topic.as_str(), "--until-idle", "3"];
    let first = String::from_utf8(wh.toolrank(&["mirror"], &follow).stderr).unwrap();
    assert!(!first.contains("mirrored 0 item writes"), "{first}");
    // A restart resumes after the last committed batch: nothing is read twice.
    let again = String::from_utf8(wh.toolrank(&["mirror"], &follow).stderr).unwrap();
    assert!(again.contains("mirrored 0 item writes and 0 removes in 0 batches"), "{again}");

    let dir = live.dir.path();
    wh.score(&dir.join("batch"), &[]);
    toolrank(&["replay", "--today", TODAY, "--out", dir.join("replay").to_str().unwrap(), &history]);
    assert_same_tables(&dir.join("batch"), &dir.join("replay"), &ALL_TABLES);

    let reconcile = |from: &str| {
        let args = wh.args(&["reconcile"], &["--from", from, "--today", TODAY, "--namespace", &live.namespace, "--table", &live.table]);
        Command::new(env!("CARGO_BIN_EXE_toolrank")).args(args).output().unwrap()
    };
    for from in ["valkey", "dynamodb"] {
        let out = reconcile(from);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("AGREE") && !text.contains("DISAGREE"), "{from}: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    // A corrupted sink: one agent's execution count in Valkey.
    let agent = std::fs::read_to_string(dir.join("replay/agent_score_summary.jsonl")).unwrap();
    let agent: serde_json::Value = serde_json::from_str(agent.lines().next().unwrap()).unwrap();
    let id = agent["agentid"].as_str().unwrap();
    let client = redis::Client::open(env("TOOLRANK_VALKEY_URL")).unwrap();
    let mut conn = client.get_connection().unwrap();
    let _: () = redis::cmd("HINCRBY").arg(format!("{}:agent:{id}", live.namespace)).arg("executions").arg(7).query(&mut conn).unwrap();
    let out = reconcile("valkey");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("DISAGREE") && text.contains(&format!("differs   {} | {id}  total_executions", agent["domainid"].as_str().unwrap())), "{text}");
}

#[test]
fn data_api_client_pages_reports_failures_and_cancels_on_timeout() {
    use toolrank_warehouse::{DataApi, Error, Target, Value};
    let database = Warehouse::new().database;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let target = Target::Workgroup { name: "local".into(), secret_arn: None };
        let api = DataApi::connect(target.clone(), &database, Duration::from_secs(30)).await;
        let rows = api.query("SELECT range AS n, 'row' || range AS label FROM range(2500) ORDER BY n", &[]).await.unwrap();
        assert_eq!(rows.columns, ["n", "label"]);
        assert_eq!(rows.rows.len(), 2500, "every page");
        assert_eq!(rows.rows[2499], vec![Value::Long(2499), Value::Text("row2499".into())]);
        let bound = api.query("SELECT CAST(:day AS DATE) AS d", &[("day", "2025-07-14")]).await.unwrap();
        assert_eq!(bound.rows, vec![vec![Value::Text("2025-07-14".into())]]);

        match api.query("SELECT * FROM no_such_table", &[]).await {
            Err(Error::Failed { message, .. }) => assert!(message.contains("no_such_table"), "{message}"),
            other => panic!("expected a failed statement, got {other:?}"),
        }
        // A batch is one transaction: a failing statement undoes the ones before it.
        api.batch(vec!["CREATE TABLE t (x INT)".into()]).await.unwrap();
        assert!(api.batch(vec!["INSERT INTO t VALUES (1)".into(), "INSERT INTO t VALUES ('x')".into()]).await.is_err());
        assert_eq!(api.query("SELECT COUNT(*) FROM t", &[]).await.unwrap().rows, vec![vec![Value::Long(0)]]);

        let short = DataApi::connect(target, &database, Duration::from_secs(1)).await;
        let started = Instant::now();
        match short.query("SELECT pg_sleep(20)", &[]).await {
            Err(Error::Timeout { secs: 1, .. }) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "cancelled, not waited out");
    });
}

#[test]
fn mirror_follows_the_dynamodb_stream_like_zero_etl() {
    let live = Live::with_stream("1");
    let history = live.dir.path().join("history.jsonl");
    let history = history.to_str().unwrap();
    live.toolrank(&["generate", "--sessions", "300", "--seed", "12", "--agents", "30", "--out", history]);
    live.toolrank(&["produce", "--to", "dynamodb", "--table", &live.table, history]);
    let wh = Warehouse::new();
    let follow = ["--follow", "dynamodb-streams", "--source-table", live.table.as_str(), "--until-idle", "3"];
    let first = String::from_utf8(wh.toolrank(&["mirror"], &follow).stderr).unwrap();
    assert!(!first.contains("mirrored 0 item writes"), "{first}");
    let again = String::from_utf8(wh.toolrank(&["mirror"], &follow).stderr).unwrap();
    assert!(again.contains("mirrored 0 item writes and 0 removes"), "resumes after what it mirrored: {again}");
    let dir = live.dir.path();
    wh.score(&dir.join("batch"), &[]);
    toolrank(&["replay", "--today", TODAY, "--out", dir.join("replay").to_str().unwrap(), history]);
    assert_same_tables(&dir.join("batch"), &dir.join("replay"), &ALL_TABLES);
}

#[test]
fn warehouse_push_writes_the_batch_results_through_the_sinks() {
    let live = Live::new("1");
    let history = generated(&live, "300", "14");
    let wh = Warehouse::new();
    wh.toolrank(&["mirror"], &[&history]);
    let out = wh.toolrank(&["warehouse", "score"], &["--today", TODAY, "--push", "--table", &live.table, "--namespace", &live.namespace]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("pushed "), "{}", String::from_utf8_lossy(&out.stderr));
    live.assert_sinks_equal_replay(&history, None);
}
