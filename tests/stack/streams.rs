//! The DynamoDB Streams and Kinesis pollers.

use crate::support::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn dynamodb_streams_poller_equals_replay_and_its_own_writes_change_nothing() {
    let live = Live::with_stream("1");
    let history = live.dir.path().join("history.jsonl");
    let history = history.to_str().unwrap();
    live.toolrank(&["generate", "--sessions", "400", "--seed", "11", "--agents", "30", "--out", history]);
    let produced = String::from_utf8(live.toolrank(&["produce", "--to", "dynamodb", "--table", &live.table, history]).stderr).unwrap();
    // The sink writes its rankings into the table it reads: they come back on the stream.
    let first = String::from_utf8(run(&mut live.streams_poller(&["--until-idle", "3"])).stderr).unwrap();
    eprintln!("{produced}{first}");
    live.assert_sinks_equal_replay(history, None);
    // Reading them (in the first run, or now if they reached the stream after it went
    // idle) moves no count and writes nothing: no write loop.
    let second = String::from_utf8(run(&mut live.streams_poller(&["--until-idle", "3"])).stderr).unwrap();
    assert!(second.contains("(0 DynamoDB requests"), "{second}");
    let consumed = count_after(&first, "consumed ") + count_after(&second, "consumed ");
    assert!(consumed > count_after(&produced, "produced "), "the pollers read the sink's writes back: {first}{second}");
    live.assert_sinks_equal_replay(history, None);
}

#[test]
fn dynamodb_streams_pollers_share_the_stream_and_take_over_from_a_killed_one() {
    let live = Live::with_stream("1");
    let history = live.dir.path().join("history.jsonl");
    let history = history.to_str().unwrap();
    live.toolrank(&["generate", "--sessions", "900", "--seed", "12", "--agents", "30", "--out", history]);
    // Paced (~3,000 records over ~20 s) so that records still arrive after both killed
    // pollers are gone, whatever the stack's speed: b must take their lineage over.
    let producer = Running::spawn(
        live.command().args(["produce", "--to", "dynamodb", "--table", &live.table, "--rate", "150", history]).stdout(Stdio::null()).stderr(Stdio::piped()),
    );
    let quiet = |mut cmd: Command| Running::spawn(cmd.stdout(Stdio::null()).stderr(Stdio::null()));
    let a = quiet(live.streams_poller(&["--id", "a"]));
    std::thread::sleep(Duration::from_secs(4));
    let b = Running::spawn(live.streams_poller(&["--id", "b", "--until-idle", "6"]).stdout(Stdio::null()).stderr(Stdio::piped()));
    std::thread::sleep(Duration::from_secs(4));
    a.kill();
    // A second poller that dies mid-stream too, after taking the lineage or not.
    std::thread::sleep(Duration::from_secs(1));
    let c = quiet(live.streams_poller(&["--id", "c"]));
    std::thread::sleep(Duration::from_secs(4));
    c.kill();
    assert!(producer.wait(COMMAND_LIMIT).status.success());
    let out = b.wait(COMMAND_LIMIT);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("took a tree"), "b took the killed pollers' lineage over: {log}");
    live.assert_sinks_equal_replay(history, None);
}

/// `history`'s stream records as Kinesis Data Streams for DynamoDB puts them, onto a new
/// stream of two shards (with `extra` records after them); returns the stream's name.
fn put_on_kinesis(live: &Live, history: &str, extra: &[String]) -> String {
    use aws_sdk_kinesis::primitives::Blob;
    use aws_sdk_kinesis::types::PutRecordsRequestEntry;
    let stream = unique("changes");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(history).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // Kinesis records of DynamoDB have no stream sequence number: their creation time (in
    // microseconds) keeps the history's order, so redeliveries in it stay older.
    let mut seqs: Vec<u128> = lines.iter().map(|v| v["dynamodb"]["SequenceNumber"].as_str().unwrap().parse().unwrap()).collect();
    seqs.sort_unstable();
    let mut records = Vec::new();
    for (i, mut v) in lines.into_iter().enumerate() {
        let data = v["dynamodb"].as_object_mut().unwrap();
        let seq: u128 = data.remove("SequenceNumber").unwrap().as_str().unwrap().parse().unwrap();
        let created = 1_752_000_000_000_000u64 + seqs.binary_search(&seq).unwrap() as u64;
        data.insert("ApproximateCreationDateTime".into(), created.into());
        let pk = data["Keys"]["PK"]["S"].as_str().unwrap().to_owned();
        let obj = v.as_object_mut().unwrap();
        obj.insert("recordFormat".into(), "application/json".into());
        obj.insert("tableName".into(), live.table.clone().into());
        let entry = PutRecordsRequestEntry::builder().partition_key(pk).data(Blob::new(serde_json::to_vec(&v).unwrap())).build().unwrap();
        // Kinesis delivers at least once: every seventh record arrives twice.
        if i % 7 == 0 {
            records.push(entry.clone());
        }
        records.push(entry);
    }
    records.extend(extra.iter().map(|data| PutRecordsRequestEntry::builder().partition_key("bad").data(Blob::new(data.as_bytes())).build().unwrap()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let kinesis = aws_sdk_kinesis::Client::new(&config);
        kinesis.create_stream().stream_name(&stream).shard_count(2).send().await.unwrap();
        for chunk in records.chunks(500) {
            let out = kinesis.put_records().stream_name(&stream).set_records(Some(chunk.to_vec())).send().await.unwrap();
            assert_eq!(out.failed_record_count(), Some(0));
        }
    });
    stream
}

#[test]
fn kinesis_records_put_as_dynamodb_puts_them_equal_replay() {
    let live = Live::new("1");
    let history = generated(&live, "300", "13");
    let stream = put_on_kinesis(&live, &history, &[]);
    let out = String::from_utf8(run(&mut live.poller(&["kinesis", "--stream", &stream], &["--until-idle", "3"])).stderr).unwrap();
    eprintln!("{out}");
    assert!(count_after(&out, "changes, ") > 0, "duplicates were recognized as stale: {out}");
    live.assert_sinks_equal_replay(&history, None);
}

/// With `--dead-letter-queue-url` a poller sends a record that does not decode whole to
/// the SQS queue (moto) with its reason and sequence number; the log names neither its
/// contents nor its keys, and the rest is applied.
#[test]
fn a_poller_sends_dead_letters_whole_to_sqs() {
    let live = Live::new("1");
    let history = generated(&live, "100", "17");
    let bad = r#"{"eventName":"INSERT","recordFormat":"application/json","dynamodb":{"ApproximateCreationDateTime":1752000000000000,"Keys":{"PK":{"S":"USR777#SESS1"},"SK":{"S":"PRC001"}},"NewImage":{"PK":{"S":"USR777#SESS1"},"SK":{"S":"PRC001"},"ToolValues":{"S":"card 4111-1111 kept secret"}}}}"#;
    let stream = put_on_kinesis(&live, &history, &[bad.to_owned()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sqs = rt.block_on(async { aws_sdk_sqs::Client::new(&aws_config::load_from_env().await) });
    let queue = rt.block_on(sqs.create_queue().queue_name(unique("poller-letters")).send()).unwrap().queue_url.unwrap();
    let out = run(&mut live.poller(&["kinesis", "--stream", &stream], &["--until-idle", "3", "--dead-letter-queue-url", &queue]));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("1 dead-lettered"), "{said}");
    let got =
        rt.block_on(sqs.receive_message().queue_url(&queue).max_number_of_messages(10).wait_time_seconds(2).message_attribute_names("All").send()).unwrap();
    let messages = got.messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    let attribute = |name: &str| messages[0].message_attributes().and_then(|a| a.get(name)).and_then(|v| v.string_value()).unwrap_or_default().to_owned();
    assert_eq!(messages[0].body(), Some(bad), "the record whole");
    assert!(attribute("toolrank-reason").contains("missing EntityType"), "{}", attribute("toolrank-reason"));
    assert!(!attribute("toolrank-position").is_empty());
    for secret in ["4111", "secret", "USR777"] {
        assert!(!said.contains(secret) && !attribute("toolrank-reason").contains(secret), "{secret:?} reached the log or the reason: {said}");
    }
    live.assert_sinks_equal_replay(&history, None);
}

/// DynamoDB Local keeps every record of a stream, so a stream that has trimmed what
/// follows a checkpoint is played by the real stream's source answering
/// TrimmedDataAccessException for any position after one.
struct Trimmed(toolrank_consume_streams::dynamodb_streams::DynamoStreams);

impl toolrank_consume_streams::ShardSource for Trimmed {
    type Record = <toolrank_consume_streams::dynamodb_streams::DynamoStreams as toolrank_consume_streams::ShardSource>::Record;

    fn name(&self) -> &str {
        self.0.name()
    }

    async fn shards(&self) -> Result<Vec<toolrank_consume_streams::ShardInfo>, toolrank_consume_streams::SourceError> {
        self.0.shards().await
    }

    async fn iterator(&self, shard: &str, after: Option<&str>) -> Result<String, toolrank_consume_streams::SourceError> {
        match after {
            Some(_) => Err(toolrank_consume_streams::SourceError::Trimmed("TrimmedDataAccessException (played by the test)".into())),
            None => self.0.iterator(shard, None).await,
        }
    }

    async fn read(&self, iterator: &str) -> Result<toolrank_consume_streams::Page<Self::Record>, toolrank_consume_streams::SourceError> {
        self.0.read(iterator).await
    }
}

/// A tree whose checkpointed position the stream no longer holds stops with an error
/// naming its shard and the way on (`--on-gap stop`, the default); with `--on-gap skip`
/// it reads on from the oldest record the stream holds, and counts the gap.
#[test]
fn a_trimmed_position_stops_its_tree_unless_gaps_are_skipped() {
    use toolrank_live::{LiveConfig, OnGap, Pacing, WriterConfig};
    let live = Live::with_stream("1");
    let history = live.dir.path().join("history.jsonl");
    live.toolrank(&["generate", "--sessions", "100", "--seed", "19", "--agents", "30", "--out", history.to_str().unwrap()]);
    live.toolrank(&["produce", "--to", "dynamodb", "--table", &live.table, history.to_str().unwrap()]);
    run(&mut live.streams_poller(&["--until-idle", "3"]));
    let poll = |on_gap: OnGap| {
        let config = toolrank_consume_streams::Config {
            application: live.group.clone(),
            discover_interval: Duration::from_secs(2),
            idle_poll: Duration::from_millis(100),
            dead_letter_file: live.dir.path().join("trimmed-letters.jsonl"),
            dead_letter_queue_url: None,
            live: LiveConfig {
                writer: WriterConfig {
                    state_table: "toolrank-state".into(),
                    today: None,
                    owner: toolrank_live::unique_owner("trimmed"),
                    lease: Duration::from_secs(2),
                    tombstone_horizon: toolrank_live::DEFAULT_TOMBSTONE_HORIZON,
                },
                pacing: Pacing {
                    until_idle: Some(Duration::from_secs(3)),
                    flush_interval: Duration::from_millis(100),
                    checkpoint_interval: Duration::from_secs(1),
                    checkpoint_max: Duration::from_secs(1),
                },
                max_record_bytes: toolrank_live::DEFAULT_MAX_RECORD_BYTES,
                on_gap,
            },
        };
        let sdk = toolrank_consume_streams::sdk_config();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let source = rt.block_on(toolrank_consume_streams::dynamodb_streams::DynamoStreams::of_table(&sdk, &live.table)).unwrap();
        toolrank_consume_streams::run(config, Trimmed(source), Vec::new(), &std::sync::atomic::AtomicBool::new(false))
    };
    let stopped = poll(OnGap::Stop).unwrap_err().to_string();
    assert!(stopped.contains("were trimmed before they were read") && stopped.contains("--on-gap skip"), "{stopped}");
    let skipped = poll(OnGap::Skip).unwrap();
    assert!(skipped.messages > 0, "read on from the oldest record: {skipped:?}");
}
