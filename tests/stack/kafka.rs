//! `consume kafka`: the seed, exactly once through kills, rebalances, outages and a broker restart.

use crate::support::*;
use aws_sdk_dynamodb::types::AttributeValue;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[test]
fn setup_is_idempotent() {
    let (topic, dlq, table) = (unique("events"), unique("dead"), unique("AgentTable"));
    let args = ["setup", "--topic", &topic, "--dead-letter-topic", &dlq, "--partitions", "3", "--table", &table];
    let first = String::from_utf8(toolrank(&args).stderr).unwrap();
    assert!(first.contains(&format!("kafka topic created {topic}")) && first.contains(&format!("dynamodb table created {table}")), "{first}");
    let second = String::from_utf8(toolrank(&args).stderr).unwrap();
    assert!(second.contains(&format!("kafka topic exists: {topic}")) && second.contains(&format!("dynamodb table exists: {table}")), "{second}");
}

#[test]
fn produced_records_are_keyed_by_session_and_ordered() {
    let topic = unique("produce");
    toolrank(&["setup", "--topic", &topic, "--dead-letter-topic", &unique("dlq"), "--partitions", "3", "--no-dynamodb"]);
    let out = toolrank(&["produce", "--topic", &topic, SEED]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("produced 34 records"));

    let consumer: BaseConsumer = toolrank_kafka::Connection::plain(&env("TOOLRANK_KAFKA_BROKERS"))
        .client_config()
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen: Vec<(String, i32, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 34 && Instant::now() < deadline {
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            let msg = msg.unwrap();
            let key = String::from_utf8(msg.key().unwrap().to_vec()).unwrap();
            let payload: serde_json::Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
            seen.push((key, msg.partition(), payload["dynamodb"]["SequenceNumber"].as_str().unwrap().to_owned()));
        }
    }
    assert_eq!(seen.len(), 34, "all records arrive");
    let mut partition_of: HashMap<&str, i32> = HashMap::new();
    let mut last_seq: HashMap<&str, &str> = HashMap::new();
    for (key, partition, seq) in &seen {
        assert_eq!(*partition_of.entry(key).or_insert(*partition), *partition, "{key} stays in one partition");
        let prev = last_seq.insert(key, seq);
        assert!(prev.is_none_or(|p| p.len() < seq.len() || (p.len() == seq.len() && p < seq.as_str())), "{key} in order");
    }
    assert!(partition_of.contains_key("USR001#SESS20250614001"));
}

#[test]
fn produce_to_dynamodb_writes_the_items() {
    let table = unique("Table");
    toolrank(&["setup", "--table", &table, "--no-kafka"]);
    toolrank(&["produce", "--to", "dynamodb", "--table", &table, SEED]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = toolrank_dynamodb::client().await;
        let scan = client.scan().table_name(&table).send().await.unwrap();
        assert_eq!(scan.count(), 34);
        let item = client
            .get_item()
            .table_name(&table)
            .key("PK", AttributeValue::S("USR002#SESS20250614001".into()))
            .key("SK", AttributeValue::S("PRC002#AGT001#TL002".into()))
            .send()
            .await
            .unwrap()
            .item
            .expect("hist item written");
        assert_eq!(item["SuccYN"], AttributeValue::S("N".into()));
        assert_eq!(item["ResultMsg"], AttributeValue::S("카페리스트".into()));
        let agents = client
            .query()
            .table_name(&table)
            .index_name("GSI1")
            .key_condition_expression("GSI1_PK = :d AND begins_with(GSI1_SK, :p)")
            .expression_attribute_values(":d", AttributeValue::S("DMN001".into()))
            .expression_attribute_values(":p", AttributeValue::S("AGTSCORE".into()))
            .send()
            .await
            .unwrap();
        assert_eq!(agents.count(), 3, "access pattern 2 over the seed's agents");
    });
}

#[test]
fn a_consumer_serves_counters_latency_histograms_process_metrics_and_health_while_it_runs() {
    let live = Live::new("2");
    toolrank(&["produce", "--topic", &live.topic, SEED]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let consumer = live.consumer(&["--metrics-addr", &addr, "--until-idle", "10"]);
    wait_for_port(port);
    // An idle client (connected, silent) holds up no scrape.
    let _idle = std::net::TcpStream::connect(&addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let metrics = scrape(&addr);
        if metrics.contains("toolrank_messages_total 34") && metrics.contains("toolrank_visible_latency_seconds_count") {
            break metrics;
        }
        assert!(Instant::now() < deadline, "the seed's 34 records and their latency never showed: {metrics}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for expected in [
        "# TYPE toolrank_visible_latency_seconds histogram",
        "toolrank_visible_latency_seconds_bucket{le=\"+Inf\"}",
        "# TYPE toolrank_sink_write_seconds histogram",
        "# TYPE toolrank_changes_total counter",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(metrics.contains(expected), "{expected} missing: {metrics}");
    }
    assert!(get(&addr, "/healthz").ends_with("\r\n\r\nok\n"));
    let out = consumer.wait(COMMAND_LIMIT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn seed_through_kafka_reaches_both_sinks_and_the_access_patterns() {
    let live = Live::new("3");
    let summary = live.seed_reaches_both_sinks(None);
    // Latency is measured from each record's creation and, for toolrank's own share, from
    // its reading: the share is never the larger.
    let (total, own) = (count_after(&summary, "visible in the sinks: p50 "), count_after(&summary, "from reading a record to visible: p50 "));
    assert!(own <= total, "{summary}");
    assert_seed_access_patterns(&live.table);
    let fallback = toolrank(&["top", "agents", "--domain", "DMN001", "--table", &live.table, "--valkey-url", "redis://127.0.0.1:1", "--today", TODAY]);
    let text = String::from_utf8(fallback.stdout).unwrap();
    assert!(text.starts_with("source: dynamodb") && text.find("AGT002").unwrap() < text.find("AGT001").unwrap(), "{text}");
}

/// ~100k generated events (with redeliveries, modifies and removes) stream in while
/// consumers are killed with -9 five times, two consumers share the group and one stops
/// mid-stream, DynamoDB fails twice for a few seconds, and the broker restarts. After
/// draining, both sinks equal replay.
#[test]
fn exactly_once_through_kills_rebalances_dynamodb_errors_and_a_broker_restart() {
    let mut broker = Broker::start();
    let proxy = FaultyProxy::start(&env("AWS_ENDPOINT_URL_DYNAMODB"));
    let live = Live::with_env("4", vec![("TOOLRANK_KAFKA_BROKERS", broker.address()), ("AWS_ENDPOINT_URL_DYNAMODB", proxy.url.clone())]);
    let history = generated(&live, "31000", "11");
    let events = std::fs::read_to_string(&history).unwrap().lines().count();
    assert!(events >= 100_000, "{events} events");
    let t0 = Instant::now();
    let producer = live.producer("5000", &history);
    // Kill -9 at moments that fall before, during and after checkpoints.
    for (i, ms) in [700u64, 1900, 1300, 2600, 1100].into_iter().enumerate() {
        let victim = live.consumer(&["--id", &format!("victim-{i}")]);
        std::thread::sleep(Duration::from_millis(ms));
        victim.kill();
    }
    eprintln!("{:?} kills done", t0.elapsed());
    // Two consumers in one group; DynamoDB fails under both; one stops mid-stream and
    // its partitions move.
    // `a` may have to read what nobody read for minutes before it stops (below), and
    // write it all at its stop: more than the default minute on a loaded machine.
    let a = live.consumer(&["--id", "a", "--until-idle", "12", "--shutdown-secs", "240"]);
    let b = live.consumer(&["--id", "b"]);
    std::thread::sleep(Duration::from_millis(1500));
    proxy.fail_for(Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(1000));
    b.signal("-TERM");
    let b = b.wait(Duration::from_secs(120));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    eprintln!("{:?} b stopped", t0.elapsed());
    // The broker restarts once `a` owns every partition: a restart that falls into a
    // rebalance can leave tansu's group coordinator never assigning partitions again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while owned_partitions(&a.said()).len() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("{:?} a owns partitions {:?}", t0.elapsed(), owned_partitions(&a.said()));
    broker.restart(Duration::from_secs(2));
    eprintln!("{:?} broker restarted", t0.elapsed());
    std::thread::sleep(Duration::from_millis(1000));
    proxy.fail_for(Duration::from_secs(2));
    assert!(producer.wait(COMMAND_LIMIT).status.success());
    eprintln!("{:?} producer done", t0.elapsed());
    // `a` should see the topic drained within its 12 s of idleness. Seen twice: after the
    // broker restart tansu's group coordinator never assigned a partition again, to `a`
    // or to a new consumer (the restart fell into a rebalance). Also seen: `b`'s
    // partitions never assigned to `a` after `b` left; `a` then finds them stranded
    // after two minutes, rejoins, reads them from their checkpoints and exits. Stop `a`
    // if it has not by then, gracefully, rather than hang the suite, and restart the
    // broker once more so that the group forms anew; the final drain checks the result.
    let mut a = a;
    let stuck = !a.exits_within(Duration::from_secs(330));
    if stuck {
        eprintln!("consumer a did not see the topic drained within 330 s: stopping it");
        a.signal("-TERM");
    }
    let a = a.wait(Duration::from_secs(270));
    if stuck {
        broker.restart(Duration::from_secs(2));
        eprintln!("{:?} broker restarted again", t0.elapsed());
    }
    let log = String::from_utf8_lossy(&a.stderr);
    eprintln!("{:?} a done", t0.elapsed());
    // Shown when an assertion below fails.
    eprintln!("consumer b:\n{}\nconsumer a:\n{log}", String::from_utf8_lossy(&b.stderr));
    assert!(a.status.success(), "{log}");
    let refused = proxy.refused.load(std::sync::atomic::Ordering::SeqCst);
    assert!(refused > 0, "DynamoDB errors were injected");
    let summary = live.drain(&["--id", "final"]);
    eprintln!("{:?} final ({refused} DynamoDB requests failed by injection):\n{summary}", t0.elapsed());
    live.assert_sinks_equal_replay(&history, None);
}

/// The partitions a consumer owns by its log so far ("partition assigned" and "partition
/// revoked" lines; colours stripped).
fn owned_partitions(log: &str) -> std::collections::BTreeSet<u32> {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                chars.by_ref().find(|c| c.is_ascii_alphabetic());
            }
            c => plain.push(c),
        }
    }
    let mut owned = std::collections::BTreeSet::new();
    for line in plain.lines() {
        let Some(p) = line.split("partition=").nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()).and_then(|n| n.parse().ok()) else {
            continue;
        };
        if line.contains("partition assigned") {
            owned.insert(p);
        } else if line.contains("partition revoked") {
            owned.remove(&p);
        }
    }
    owned
}

/// Valkey accepts connections but answers nothing (a proxy holds what the consumer
/// sends) from the start: the consumer reads on and DynamoDB gets the whole input
/// meanwhile; once Valkey answers, it gets everything too.
#[test]
fn a_valkey_that_never_answers_at_start_holds_up_nothing_else() {
    let valkey = FaultyProxy::start(env("TOOLRANK_VALKEY_URL").trim_start_matches("redis://"));
    valkey.hold(true);
    let valkey_url = valkey.url.replace("http://", "redis://");
    let live = Live::new("2");
    let history = generated(&live, "400", "61");
    assert!(live.producer("0", &history).wait(COMMAND_LIMIT).status.success());
    let consumer = live.consumer(&["--valkey-url", &valkey_url, "--dynamodb-flush-ms", "200", "--dynamodb-writes-per-event", "0"]);
    let replay = live.dir.path().join("replay");
    live.toolrank(&["replay", "--today", TODAY, "--out", replay.to_str().unwrap(), &history]);
    let dynamodb = live.dir.path().join("dynamodb");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        live.toolrank(&["results", "--from", "dynamodb", "--table", &live.table, "--today", TODAY, "--out", dynamodb.to_str().unwrap()]);
        if read_table(&dynamodb, "agent_score_summary") == read_table(&replay, "agent_score_summary") {
            break;
        }
        assert!(Instant::now() < deadline, "DynamoDB never got the input while Valkey was held: {}", consumer.said());
        std::thread::sleep(Duration::from_secs(1));
    }
    valkey.hold(false);
    live.await_sinks_equal_replay(&history, Some(&valkey_url), Duration::from_secs(120), || consumer.said());
    consumer.signal("-TERM");
    let out = consumer.wait(COMMAND_LIMIT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn valkey_outage_loses_nothing() {
    let port = 20000 + (std::process::id() % 5000) as u16;
    let url = format!("redis://127.0.0.1:{port}");
    let valkey = valkey_server(port);
    let live = Live::new("2");
    let history = generated(&live, "1500", "5");
    let producer = live.producer("1000", &history);
    let consumer = live.consumer(&["--valkey-url", &url, "--until-idle", "12"]);
    std::thread::sleep(Duration::from_secs(2));
    valkey.kill();
    std::thread::sleep(Duration::from_secs(10));
    // Back empty (no persistence): the sink must rebuild everything.
    let valkey = valkey_server(port);
    assert!(producer.wait(COMMAND_LIMIT).status.success());
    let out = consumer.wait(COMMAND_LIMIT);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("valkey sink write failed"), "the outage was noticed: {log}");
    eprintln!("{}", log.lines().filter(|l| !l.contains("valkey sink write failed")).collect::<Vec<_>>().join("\n"));
    live.assert_sinks_equal_replay(&history, Some(&url));
    valkey.kill();
}

#[test]
fn a_dynamodb_write_budget_defers_rounds_and_the_sinks_still_converge() {
    // A budget no round can meet: only the first write (the sink does not know what the
    // table holds yet) and the last (at exit) happen, where every 100 ms would without it.
    assert_eq!(rounds_under_budget("0.000001"), 2);
    // A budget every round meets: the estimate (no round planned to check it) lets them
    // through at their interval, as many as without a budget (7–9 here; each waits for
    // the one before it).
    assert!(rounds_under_budget("100") >= 4);
}

/// DynamoDB write rounds of a consumer with write budget `budget` (items per event) and
/// rounds due every 100 ms, over 300 generated sessions arriving at 250 records/s; the
/// sinks equal replay in the end.
fn rounds_under_budget(budget: &str) -> u64 {
    let _pace = dynamodb_pace();
    let live = Live::new("2");
    let history = generated(&live, "300", "11");
    let consumer =
        live.consumer(&["--until-idle", "3", "--dynamodb-flush-ms", "100", "--dynamodb-writes-per-event", budget, "--dynamodb-max-defer-ms", "600000"]);
    let producer = live.producer("250", &history);
    assert!(producer.wait(COMMAND_LIMIT).status.success());
    let out = consumer.wait(COMMAND_LIMIT);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    live.assert_sinks_equal_replay(&history, None);
    let rounds = count_after(&log, "DynamoDB requests in ");
    eprintln!("budget {budget}: {rounds} rounds");
    rounds
}

/// A backlog read with checkpoints at every (tiny) interval, and with them stretched by
/// the records' lateness (--checkpoint-max-secs; the policy is unit-tested in
/// toolrank-live): the sinks equal replay either way. Saving at every interval takes
/// whole snapshots while the partitions still coalesce changes for the sinks (whose
/// intervals a backlog stretches): a whole save forwards those changes first, so they
/// reach the sinks all the same.
#[test]
fn a_backlog_read_with_checkpoints_at_every_interval_or_stretched_stays_exact() {
    let checkpoints = |max: &str| {
        let live = Live::new("2");
        let history = generated(&live, "10000", "14");
        assert!(live.producer("0", &history).wait(COMMAND_LIMIT).status.success());
        // The records are 10 s old when the consumer reads them: a backlog, in which
        // Valkey is written once a second (a tenth of the lateness) and the partitions
        // coalesce their changes in between.
        std::thread::sleep(Duration::from_secs(10));
        let mut args = live.kafka_args();
        args.extend(["--until-idle", "3", "--checkpoint-secs", "0.05", "--checkpoint-max-secs", max]);
        let out = live.toolrank(&args);
        let log = String::from_utf8(out.stderr).unwrap();
        live.assert_sinks_equal_replay(&history, None);
        count_after(&log, "dead-lettered; ")
    };
    // How many fewer the stretched run saves depends on how fast DynamoDB Local saves
    // (one save in flight per partition) against how fast the backlog is read.
    let (every, stretched) = (checkpoints("0"), checkpoints("60"));
    eprintln!("checkpoints: {every} at every interval, {stretched} stretched");
}

/// Removed items' tombstones are forgotten once older than the horizon: a consumer
/// restarted past it expires those its partitions held (reported in the summary), and
/// the sinks still equal replay. The tail holds no redelivered copies (a copy of a
/// record older than an expired removal would count again: the horizon is a contract).
#[test]
fn tombstones_expire_after_the_horizon_and_the_sinks_stay_exact() {
    let live = Live::new("2");
    let history = generated(&live, "400", "13");
    let text = std::fs::read_to_string(&history).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cut = lines.len() * 9 / 10;
    assert!(lines[..cut].iter().any(|l| l.contains(r#""eventName":"REMOVE""#)));
    let seen: std::collections::HashSet<&str> = lines[..cut].iter().copied().collect();
    let tail: Vec<&str> = lines[cut..].iter().copied().filter(|l| !seen.contains(l)).collect();
    let (first, rest, whole) = (live.dir.path().join("first.jsonl"), live.dir.path().join("tail.jsonl"), live.dir.path().join("whole.jsonl"));
    std::fs::write(&first, lines[..cut].join("\n") + "\n").unwrap();
    std::fs::write(&rest, tail.join("\n") + "\n").unwrap();
    std::fs::write(&whole, format!("{}\n{}\n", lines[..cut].join("\n"), tail.join("\n"))).unwrap();
    assert!(live.producer("0", first.to_str().unwrap()).wait(COMMAND_LIMIT).status.success());
    let log = live.drain(&[]);
    assert!(!log.contains("tombstones of removed items expired"), "the default horizon is a week: {log}");
    let held = count_after(&log, "sessions, ");
    assert!(held > 0, "tombstones held: {log}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(live.producer("0", rest.to_str().unwrap()).wait(COMMAND_LIMIT).status.success());
    let log = live.drain(&["--tombstone-horizon-secs", "2"]);
    let expired = log.lines().find_map(|l| l.strip_suffix(" tombstones of removed items expired (--tombstone-horizon-secs)")?.parse::<u64>().ok());
    assert!(expired.is_some_and(|n| n > 0), "{log}");
    // What the state holds shrank by what expired (the tail's own removals aside).
    let removals = tail.iter().filter(|l| l.contains(r#""eventName":"REMOVE""#)).count() as u64;
    let after = count_after(&log, "sessions, ");
    eprintln!("tombstones: {held} held, {} expired, {removals} removals in the tail, {after} held after", expired.unwrap());
    assert!(after <= held + removals - expired.unwrap(), "{log}");
    live.assert_sinks_equal_replay(whole.to_str().unwrap(), None);
}

/// A consumer whose partition checkpoint is claimed by someone else while Kafka still
/// assigns it the partition (what a save that landed but reported a timeout looks like
/// to its next save) lets the partition go, then claims it again and reads on from its
/// checkpoint: no stall until the next rebalance, and the sinks equal replay.
#[test]
fn a_consumer_fenced_without_a_rebalance_claims_its_partition_again() {
    let live = Live::new("1");
    let history = generated(&live, "600", "17");
    // About 8 s of records: the partition is still dirty (so saved, so fenced) after the
    // claim. Saved every second even while it reads behind (a slow broker, a busy machine).
    let producer = live.producer("250", &history);
    let consumer = live.consumer(&["--until-idle", "5", "--checkpoint-max-secs", "1"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !consumer.said().contains("partition assigned") {
        assert!(Instant::now() < deadline, "never assigned: {}", consumer.said());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let state_table = std::env::var("TOOLRANK_STATE_TABLE").unwrap_or_else(|_| "toolrank-state".into());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = toolrank_state::CheckpointStore::new(toolrank_dynamodb::client().await, state_table);
        store.claim(&format!("kafka/{}/{}/0", live.group, live.topic), "intruder").await.unwrap();
    });
    assert!(producer.wait(COMMAND_LIMIT).status.success());
    let out = consumer.wait(COMMAND_LIMIT);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("another consumer owns this partition now"), "fenced: {log}");
    assert!(log.contains("claiming it again"), "{log}");
    live.assert_sinks_equal_replay(&history, None);
}

#[test]
fn bad_and_oversized_records_are_dead_lettered_with_reason_and_offset() {
    let live = Live::new("1");
    let input = live.dir.path().join("mixed.jsonl");
    let seed = std::fs::read_to_string(SEED).unwrap();
    // A valid execution of a new session, too large for --max-record-bytes.
    let mut big: serde_json::Value =
        serde_json::from_str(seed.lines().find(|l| l.contains("UserSessPrcToolMappHist") && l.contains("NewImage")).unwrap()).unwrap();
    for image in ["Keys", "NewImage"] {
        big["dynamodb"][image]["PK"] = serde_json::json!({"S": "USR999#SESS20250614009"});
    }
    big["dynamodb"]["NewImage"]["ToolValues"] = serde_json::json!({"S": "x".repeat(3000)});
    let big = big.to_string();
    std::fs::write(&input, format!("{seed}not json\n{{\"eventName\":\"INSERT\"}}\n{big}\n")).unwrap();
    toolrank(&["produce", "--topic", &live.topic, input.to_str().unwrap()]);
    let summary = live.drain(&["--no-dynamodb", "--max-record-bytes", "2500"]);
    assert!(summary.contains("3 dead-lettered"), "{summary}");
    let letters = dead_letters(&live.dlq, 3);
    assert_eq!(letters[0].1, b"not json");
    assert!(letters[0].0["toolrank-reason"].contains("not valid JSON"), "{:?}", letters[0].0);
    assert_eq!(letters[0].0["toolrank-source-offset"], "34");
    assert_eq!(letters[1].0["toolrank-source-offset"], "35");
    assert!(letters[1].0["toolrank-reason"].contains("missing"), "{:?}", letters[1].0);
    assert_eq!(letters[2].1, big.as_bytes(), "the oversized record whole");
    assert_eq!(letters[2].0["toolrank-source-offset"], "36");
    assert!(letters[2].0["toolrank-reason"].contains("larger than the limit of 2500"), "{:?}", letters[2].0);
}

/// The first `count` letters of the (one-partition) dead-letter topic, headers and payload.
fn dead_letters(topic: &str, count: usize) -> Vec<(std::collections::BTreeMap<String, String>, Vec<u8>)> {
    let consumer: BaseConsumer =
        toolrank_kafka::Connection::plain(&env("TOOLRANK_KAFKA_BROKERS")).client_config().set("group.id", unique("dlq-reader")).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let mut letters = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while letters.len() < count && Instant::now() < deadline {
        if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(200)) {
            letters.push((toolrank_consume_kafka::dead_letter_headers(&msg), msg.payload().unwrap().to_vec()));
        }
    }
    assert_eq!(letters.len(), count, "dead letters on {topic}");
    letters
}

/// A record the engine panics on (injected for one session's partition key) is caught:
/// each of its messages is dead-lettered with the reason, the partition is restored from
/// its checkpoint and passes over them, and the consumer goes on; the sinks equal replay
/// of the history without that session.
#[test]
fn a_record_the_engine_panics_on_is_dead_lettered_and_the_partition_restored() {
    let live = Live::new("2");
    let history = generated(&live, "300", "47");
    let text = std::fs::read_to_string(&history).unwrap();
    let pk = text.lines().find_map(|l| l.split(r#""Keys":{"PK":{"S":"USR"#).nth(1)).map(|rest| format!("USR{}", rest.split('"').next().unwrap())).unwrap();
    let marker = format!(r#""Keys":{{"PK":{{"S":"{pk}"}}"#);
    let poisoned = text.lines().filter(|l| l.contains(&marker)).count();
    let rest = live.dir.path().join("without-the-session.jsonl");
    std::fs::write(&rest, text.lines().filter(|l| !l.contains(&marker)).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    assert!(live.producer("5000", &history).wait(COMMAND_LIMIT).status.success());
    let out = live.command().args(live.consume_args(&["--until-idle", "8"])).env("TOOLRANK_FAULT_PANIC_PK", &pk).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains(&format!("{poisoned} dead-lettered")), "{poisoned} records of {pk}: {said}");
    assert!(said.contains("restoring the partition from its checkpoint"), "{said}");
    let letters = dead_letters(&live.dlq, poisoned);
    assert!(letters.iter().all(|(headers, _)| headers["toolrank-reason"].starts_with("panicked while applying: injected")), "{letters:?}");
    assert!(!said.contains(&pk), "no key in the logs: {said}");
    live.assert_sinks_equal_replay(rest.to_str().unwrap(), None);
}

/// A checkpoint whose position its partition no longer holds (here past the partition's
/// end, as after the topic was recreated or the state table restored from elsewhere)
/// stops that partition: the consumer exits non-zero within seconds, naming it, and reads
/// nothing from the wrong place. With `--on-gap skip` the partition reads on from its
/// oldest record, the gap is logged, and the sinks equal replay.
#[test]
fn a_checkpoint_its_partition_no_longer_holds_stops_it_unless_gaps_are_skipped() {
    let live = Live::new("1");
    toolrank(&["produce", "--to", "dynamodb", "--table", &live.table, SEED]);
    toolrank(&["produce", "--topic", &live.topic, SEED]);
    let scope = format!("kafka/{}/{}/0", live.group, live.topic);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = toolrank_state::CheckpointStore::new(toolrank_dynamodb::client().await, "toolrank-state");
        let ck = store.claim(&scope, "restored").await.unwrap();
        store.save(&scope, "restored", ck.generation, "1000", &[], 0).await.unwrap();
    });
    let started = Instant::now();
    let out = live.command().args(live.consume_args(&["--until-idle", "3"])).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(started.elapsed() < Duration::from_secs(60), "{said}");
    assert!(said.contains(&format!("partition 0 of {}", live.topic)) && said.contains("the partition ends at 34"), "{said}");
    assert!(said.contains("--on-gap skip"), "the error says how to go on: {said}");
    assert!(!said.contains("consumed 34 messages"), "{said}");

    let summary = live.drain(&["--on-gap", "skip"]);
    assert!(summary.contains("reading on from offset 0 (--on-gap skip)"), "{summary}");
    live.assert_sinks_equal_replay(SEED, None);
}

/// A dead letter the broker does not take (here: its topic does not exist yet) is never
/// lost: no checkpoint covers its record, the partition is read again from its
/// checkpoint, and once the topic exists the letter is delivered and the sinks equal
/// replay.
#[test]
fn a_dead_letter_not_delivered_is_sent_again_and_no_checkpoint_covers_it() {
    let live = Live::new("1");
    toolrank(&["produce", "--to", "dynamodb", "--table", &live.table, SEED]);
    let input = live.dir.path().join("mixed.jsonl");
    std::fs::write(&input, format!("{}not json\n", std::fs::read_to_string(SEED).unwrap())).unwrap();
    toolrank(&["produce", "--topic", &live.topic, input.to_str().unwrap()]);
    let missing = unique("dlq-not-yet");
    let args = |extra: &[&'static str]| {
        let mut args = live.consume_args(extra);
        let at = args.iter().position(|a| *a == "--dead-letter-topic").unwrap() + 1;
        args[at] = missing.as_str();
        args
    };
    let consumer = Running::spawn(live.command().args(args(&[])).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()));
    let deadline = Instant::now() + Duration::from_secs(90);
    while !consumer.said().contains("reading it again from its checkpoint") {
        assert!(Instant::now() < deadline, "{}", consumer.said());
        std::thread::sleep(Duration::from_millis(200));
    }
    consumer.signal("-TERM");
    let out = consumer.wait(COMMAND_LIMIT);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("a dead letter was not delivered"), "{said}");
    let scope = format!("kafka/{}/{}/0", live.group, live.topic);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let position =
        rt.block_on(async { toolrank_state::CheckpointStore::new(toolrank_dynamodb::client().await, "toolrank-state").position(&scope).await.unwrap() });
    assert!(position.as_deref().is_none_or(|p| p.parse::<i64>().unwrap() <= 34), "the checkpoint covers the letter's record: {position:?}");

    toolrank(&["setup", "--topic", &live.topic, "--dead-letter-topic", &missing, "--partitions", "1", "--table", &live.table]);
    let out = live.toolrank(&args(&["--until-idle", "5"]));
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("1 dead-lettered"), "{summary}");
    assert_eq!(dead_letters(&missing, 1)[0].1, b"not json");
    live.assert_sinks_equal_replay(SEED, None);
}

/// A stop that cannot finish (DynamoDB holds every request, so neither the last
/// checkpoint nor the sinks' write can end) ends at `--shutdown-secs` with status 1, and
/// at once on a second signal without a limit; a consumer started afterwards reads on
/// from the last checkpoint and the sinks equal replay.
#[test]
fn a_stop_that_cannot_finish_ends_at_the_shutdown_limit_or_a_second_signal() {
    let proxy = FaultyProxy::start(&env("AWS_ENDPOINT_URL_DYNAMODB"));
    let live = Live::with_env("2", vec![("AWS_ENDPOINT_URL_DYNAMODB", proxy.url.clone())]);
    let history = generated(&live, "300", "7");
    assert!(live.producer("0", &history).wait(COMMAND_LIMIT).status.success());
    for (limit, second_signal) in [("3", false), ("0", true)] {
        let consumer = live.steady_consumer(&["--shutdown-secs", limit]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !consumer.said().contains("took the sink lease") {
            assert!(Instant::now() < deadline, "{}", consumer.said());
            std::thread::sleep(Duration::from_millis(100));
        }
        // Reading, with checkpoints behind it.
        std::thread::sleep(Duration::from_secs(3));
        proxy.hold(true);
        consumer.signal("-TERM");
        let stopped = Instant::now();
        if second_signal {
            std::thread::sleep(Duration::from_secs(2));
            consumer.signal("-TERM");
        }
        let out = consumer.wait(Duration::from_secs(60));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(stopped.elapsed() < Duration::from_secs(20), "took {:?}: {said}", stopped.elapsed());
        assert_eq!(out.status.code(), Some(1), "{said}");
        let why = if second_signal { "a second signal: exiting now" } else { "the stop took longer than --shutdown-secs" };
        assert!(said.contains(why), "{said}");
        proxy.hold(false);
    }
    live.drain(&[]);
    live.assert_sinks_equal_replay(&history, None);
}

/// The sink holder's DynamoDB requests and Valkey commands stall in the network
/// mid-stream (a sink round, a Valkey transaction, its lease renewal) until the other
/// consumer has taken the sink lease and written; then they arrive. The table refuses the
/// late round (its fencing token is older than the one claimed since), the deposed holder
/// counts it, Valkey's late transaction changes nothing (the fence it watched has moved
/// on), and both sinks equal replay while both consumers still run.
#[test]
fn a_deposed_sink_holders_late_writes_are_refused_and_the_sinks_stay_exact() {
    let _pace = dynamodb_pace();
    let ProxiedGroup { live, valkey_url, history, producer, a, b } = ProxiedGroup::start("6000", "29", "400");
    let rounds = "\ntoolrank_sink_writes_total ";
    let written = |c: &Proxied| Some(scrape(&c.metrics)).filter(|m| m.contains(rounds)).map_or(0, |m| count_after(&m, rounds));
    // The holder's lease (5 s) lapses while its requests wait; the other takes it within a
    // second, claims its fencing token in the sink table and writes. The hold starts with a
    // sink round of the holder, a transaction that names the sink table (a checkpoint's
    // names the state table): that round is among the requests waiting, not only reads and
    // writes of checkpoints. It ends once the other has written, within 9.5 s: under the SDK's
    // 10 s attempt timeout, so the holder still waits for that round's reply when it
    // arrives. When the other has not written by then (a busy machine), the late round may
    // arrive before the other's claim and is rightly taken: the roles swap and it is tried
    // again.
    let mut deposed = None;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(2));
        let (holder, other) = if a.holds() { (&a, &b) } else { (&b, &a) };
        let before = written(other);
        holder.dynamodb.hold_from_next_write_to(&live.table);
        let armed_since = Instant::now();
        while !holder.dynamodb.is_holding() {
            assert!(armed_since.elapsed() < Duration::from_secs(30), "the holder sent no sink round:\n{}", holder.run.said());
            std::thread::sleep(Duration::from_millis(2));
        }
        holder.valkey.hold(true);
        let held_since = Instant::now();
        while written(other) == before && held_since.elapsed() < Duration::from_millis(9500) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let claimed_first = written(other) > before;
        holder.dynamodb.hold(false);
        holder.valkey.hold(false);
        if claimed_first {
            deposed = Some(holder);
            break;
        }
        let settled = Instant::now() + Duration::from_secs(60);
        while a.holds() == b.holds() {
            assert!(Instant::now() < settled, "nobody took the sink lease:\n{}\n{}", a.run.said(), b.run.said());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let holder = deposed.expect("in one of three tries the other consumer wrote before the held round arrived");
    let deposed = holder.id.clone();
    assert!(producer.wait(COMMAND_LIMIT).status.success());
    // Exact while both still run, soon after the input's end (DynamoDB Local answers the
    // new holder's reads of the other's checkpoints slowly for a while after the hold).
    live.await_sinks_equal_replay(&history, Some(&valkey_url), Duration::from_secs(90), || format!("a:\n{}\nb:\n{}", a.run.said(), b.run.said()));
    // The deposed holder takes its late round's reply back when it next looks at its
    // sinks (at the latest when it stops): it counts and logs the refusal then.
    let counter = "toolrank_sink_fenced_writes_total{sink=\"dynamodb\"} ";
    let holder_metrics = holder.metrics.clone();
    let counted = |metrics: &str| metrics.contains(counter) && count_after(metrics, counter) >= 1;
    let waited = Instant::now();
    let mut metrics = scrape(&holder_metrics);
    while !counted(&metrics) && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(500));
        metrics = scrape(&holder_metrics);
    }
    let mut said = String::new();
    for consumer in [a, b] {
        consumer.run.signal("-TERM");
        let out = consumer.run.wait(COMMAND_LIMIT);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        if consumer.id == deposed {
            said = String::from_utf8_lossy(&out.stderr).into_owned();
        }
    }
    assert!(
        counted(&metrics) || said.contains("dynamodb sink refused a write of this writer"),
        "the deposed holder's late round was refused and counted:\n{said}\n{metrics}"
    );
    live.assert_sinks_equal_replay(&history, Some(&valkey_url));
}

/// The sink holder's queries of the state table (among them its reads of the other
/// consumer's checkpoint log) each wait 8 s, longer than its 5 s lease, for 25 s: its loop
/// waits on them, but the lease is renewed beside the loop, so the other consumer never
/// takes it over; once the queries are quick again both sinks equal replay. A stall of
/// DynamoDB Local itself longer than two thirds of the lease (a busy machine) also passes
/// the lease on, whoever waits on what: the slow reads are tried on a second holder then,
/// and waiting on them must cost neither holder the lease.
#[test]
fn a_sink_holder_waiting_on_reads_longer_than_its_lease_keeps_it() {
    let _pace = dynamodb_pace();
    let ProxiedGroup { live, valkey_url, history, producer, a, b } = ProxiedGroup::start("3000", "37", "1500");
    let count = |c: &Proxied, what: &str| c.run.said().matches(what).count();
    let mut kept = false;
    for _ in 0..2 {
        let settled = Instant::now() + Duration::from_secs(60);
        while a.holds() == b.holds() {
            assert!(Instant::now() < settled, "nobody took the sink lease:\n{}\n{}", a.run.said(), b.run.said());
            std::thread::sleep(Duration::from_millis(100));
        }
        let (holder, other) = if a.holds() { (&a, &b) } else { (&b, &a) };
        let (taken, lost) = (count(other, "took the sink lease"), count(holder, "lost the sink lease"));
        let delayed = || holder.dynamodb.delayed_queries.load(std::sync::atomic::Ordering::SeqCst);
        let delayed_before = delayed();
        holder.dynamodb.delay_queries(Duration::from_secs(8));
        std::thread::sleep(Duration::from_secs(25));
        holder.dynamodb.delay_queries(Duration::ZERO);
        let logs = || format!("holder:\n{}\nother:\n{}", holder.run.said(), other.run.said());
        assert!(delayed() >= delayed_before + 2, "the holder waited on {} slow queries:\n{}", delayed() - delayed_before, logs());
        if count(other, "took the sink lease") == taken && count(holder, "lost the sink lease") == lost {
            kept = true;
            break;
        }
        eprintln!("the sink lease passed on while the holder's queries were slow; trying on the next holder:\n{}", logs());
    }
    assert!(kept, "a holder waiting on slow reads kept the sink lease in one of two tries:\na:\n{}\nb:\n{}", a.run.said(), b.run.said());
    assert!(producer.wait(COMMAND_LIMIT).status.success());
    live.await_sinks_equal_replay(&history, Some(&valkey_url), Duration::from_secs(90), || format!("a:\n{}\nb:\n{}", a.run.said(), b.run.said()));
    for consumer in [a, b] {
        consumer.run.signal("-TERM");
        let out = consumer.run.wait(COMMAND_LIMIT);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A consumer of a group that reaches DynamoDB and Valkey through proxies of its own.
struct Proxied {
    id: String,
    run: Running,
    metrics: String,
    dynamodb: FaultyProxy,
    valkey: FaultyProxy,
}

impl Proxied {
    /// `consume kafka` as `id`, with a 5 s sink lease and sink rounds at every 200 ms.
    fn start(live: &Live, valkey_url: &str, id: &str) -> Proxied {
        let dynamodb = FaultyProxy::start(&env("AWS_ENDPOINT_URL_DYNAMODB"));
        let valkey = FaultyProxy::start(valkey_url.trim_start_matches("redis://"));
        let through_proxy = valkey.url.replace("http://", "redis://");
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut cmd = live.command();
        cmd.env("AWS_ENDPOINT_URL_DYNAMODB", &dynamodb.url).args(live.kafka_args()).args([
            "--lease-secs",
            "5",
            "--checkpoint-secs",
            "1",
            "--dynamodb-flush-ms",
            "200",
            "--dynamodb-writes-per-event",
            "0",
            "--dynamodb-max-defer-ms",
            "0",
            "--valkey-url",
            &through_proxy,
            "--metrics-addr",
            &metrics,
            "--id",
            id,
        ]);
        let run = Running::spawn(cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()));
        Proxied { id: id.to_owned(), run, metrics, dynamodb, valkey }
    }

    /// Whether it holds the sink lease, by what it said.
    fn holds(&self) -> bool {
        let said = self.run.said();
        said.matches("took the sink lease").count() > said.matches("lost the sink lease").count()
    }
}

/// A group of two consumers on a 2-partition topic, each behind proxies of its own,
/// reading a generated history of `sessions` sessions (`seed`) produced at `rate` records/s.
struct ProxiedGroup {
    live: Live,
    valkey_url: String,
    history: String,
    producer: Running,
    a: Proxied,
    b: Proxied,
}

impl ProxiedGroup {
    /// Starts the producer, then consumer `a`, then `b` once `a` holds the sink lease;
    /// returns once the group settled: both own a partition and one holds the lease.
    fn start(sessions: &str, seed: &str, rate: &str) -> ProxiedGroup {
        let valkey_url = env("TOOLRANK_VALKEY_URL");
        let live = Live::new("2");
        let history = generated(&live, sessions, seed);
        let producer = live.producer(rate, &history);
        let a = Proxied::start(&live, &valkey_url, "a");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !a.holds() {
            assert!(Instant::now() < deadline, "a never took the sink lease: {}", a.run.said());
            std::thread::sleep(Duration::from_millis(100));
        }
        let b = Proxied::start(&live, &valkey_url, "b");
        while !(b.run.said().contains("checkpoint claimed") && a.holds() != b.holds()) {
            assert!(Instant::now() < deadline, "the group never settled:\n{}\n{}", a.run.said(), b.run.said());
            std::thread::sleep(Duration::from_millis(100));
        }
        ProxiedGroup { live, valkey_url, history, producer, a, b }
    }
}

/// DynamoDB answers every request with a throttle or a server error for 40 s (longer than
/// any one retry loop) while a second member joins the group: neither exits, the
/// partitions whose checkpoints cannot be claimed wait paused, and once DynamoDB answers
/// again both sinks equal replay.
#[test]
fn a_member_joining_while_dynamodb_fails_waits_for_its_claims_and_nobody_exits() {
    let _pace = dynamodb_pace();
    let proxy = FaultyProxy::start(&env("AWS_ENDPOINT_URL_DYNAMODB"));
    let live = Live::with_env("4", vec![("AWS_ENDPOINT_URL_DYNAMODB", proxy.url.clone())]);
    let history = generated(&live, "3000", "31");
    let producer = live.producer("2000", &history);
    let mut a = live.steady_consumer(&["--id", "a", "--until-idle", "15"]);
    std::thread::sleep(Duration::from_secs(4));
    proxy.fail(true);
    std::thread::sleep(Duration::from_secs(2));
    let mut b = live.steady_consumer(&["--id", "b", "--until-idle", "15"]);
    std::thread::sleep(Duration::from_secs(38));
    for member in [&mut a, &mut b] {
        assert!(!member.exits_within(Duration::ZERO), "nobody gave up:\n{}", member.said());
    }
    proxy.fail(false);
    assert!(producer.wait(COMMAND_LIMIT).status.success());
    for consumer in [a, b] {
        let out = consumer.wait(COMMAND_LIMIT);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
    }
    assert!(proxy.refused.load(std::sync::atomic::Ordering::SeqCst) > 0);
    live.assert_sinks_equal_replay(&history, None);
}

/// A member that joins a group while records arrive takes some of the partitions from
/// the checkpoints the first member saved when they were revoked, reads them, and serves
/// its counters though the first member holds the sink lease; the sinks equal replay
/// while both run.
#[test]
fn a_member_joining_a_reading_group_reads_its_partitions_and_serves_its_counters() {
    let live = Live::new("4");
    let history = generated(&live, "3000", "43");
    let producer = live.producer("2000", &history);
    // A lease that outlasts the loop's longest stall on a loaded machine: the test is of
    // a member that does not hold it (one that does serves its counters anyway).
    let a = live.consumer_with_lease("30", &["--id", "a"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !a.said().contains("took the sink lease") {
        assert!(Instant::now() < deadline, "{}", a.said());
        std::thread::sleep(Duration::from_millis(100));
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let b = live.consumer_with_lease("30", &["--id", "b", "--metrics-addr", &addr]);
    wait_for_port(port);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let metrics = scrape(&addr);
        let read = metrics.lines().find_map(|l| l.strip_prefix("toolrank_messages_total ")).and_then(|n| n.trim().parse::<u64>().ok());
        if read.is_some_and(|n| n > 0) {
            break;
        }
        assert!(!b.said().contains("took the sink lease"), "b took the sink lease before its counters showed what it read:\n{}", b.said());
        assert!(Instant::now() < deadline, "b's counters never showed what it read: {metrics}\nb:\n{}", b.said());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(producer.wait(COMMAND_LIMIT).status.success());
    live.await_sinks_equal_replay(&history, None, Duration::from_secs(180), || format!("a:\n{}\nb:\n{}", a.said(), b.said()));
    for member in [&a, &b] {
        member.signal("-TERM");
    }
    let (a, b) = (a.wait(COMMAND_LIMIT), b.wait(COMMAND_LIMIT));
    let said = String::from_utf8_lossy(&b.stderr);
    assert!(a.status.success() && b.status.success(), "{said}");
    assert!(said.contains("checkpoint claimed") && count_after(&said, "consumed ") > 0, "b read its partitions: {said}");
}

/// A group of two consumers with the sink stage split into three shards by user: both
/// come to hold shards (each writes its users' keys, and keeps their figures only), the
/// sinks reach replay's rankings while both run (the DynamoDB items chosen with the cuts
/// agreed from every shard's census), and after both stop, the last one writing every
/// shard, they still do.
#[test]
fn a_split_sink_stage_is_shared_by_the_group_and_the_sinks_equal_replay() {
    let live = Live::new("4");
    let history = generated(&live, "3000", "47");
    let producer = live.producer("2000", &history);
    let a = live.consumer(&["--id", "a", "--sink-shards", "3"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !a.said().contains("took the sink lease") {
        assert!(Instant::now() < deadline, "{}", a.said());
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = live.consumer(&["--id", "b", "--sink-shards", "3"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !b.said().contains("took the sink lease") {
        assert!(Instant::now() < deadline, "b never took a shard:\na:\n{}\nb:\n{}", a.said(), b.said());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(a.said().contains("gave a sink shard up"), "a gave b its share: {}", a.said());
    assert!(producer.wait(COMMAND_LIMIT).status.success());
    live.await_sinks_equal_replay(&history, None, Duration::from_secs(180), || format!("a:\n{}\nb:\n{}", a.said(), b.said()));
    for member in [&a, &b] {
        member.signal("-TERM");
    }
    let (a, b) = (a.wait(COMMAND_LIMIT), b.wait(COMMAND_LIMIT));
    assert!(a.status.success() && b.status.success(), "a:\n{}\nb:\n{}", String::from_utf8_lossy(&a.stderr), String::from_utf8_lossy(&b.stderr));
    live.assert_sinks_equal_replay(&history, None);
}

/// A partition paused because its claim failed, then revoked and assigned here again
/// (librdkafka keeps its pause through the rebalances), is read once its claim succeeds:
/// `a` starts while DynamoDB fails (every claim fails, all four partitions wait paused),
/// `b` joins and takes half of them, DynamoDB answers again, `b` leaves while records
/// still arrive, and `a` reads every partition to the end.
#[test]
fn a_partition_paused_by_a_failed_claim_and_assigned_again_is_read() {
    let _pace = dynamodb_pace();
    let proxy = FaultyProxy::start(&env("AWS_ENDPOINT_URL_DYNAMODB"));
    let live = Live::with_env("4", vec![("AWS_ENDPOINT_URL_DYNAMODB", proxy.url.clone())]);
    let history = generated(&live, "1500", "37");
    proxy.fail(true);
    let producer = live.producer("100", &history);
    let a = live.steady_consumer(&["--id", "a"]);
    let await_said = |who: &Running, what: &str, count: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while who.said().matches(what).count() < count {
            assert!(Instant::now() < deadline, "waiting for {count} \"{what}\":\n{}", who.said());
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    await_said(&a, "failed; trying again later", 4);
    let b = live.steady_consumer(&["--id", "b"]);
    await_said(&b, "partition assigned", 2);
    proxy.fail(false);
    await_said(&b, "checkpoint claimed", 2);
    b.signal("-TERM");
    let out = b.wait(COMMAND_LIMIT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(producer.wait(COMMAND_LIMIT).status.success());
    live.await_sinks_equal_replay(&history, None, Duration::from_secs(120), || a.said());
    a.signal("-TERM");
    let out = a.wait(COMMAND_LIMIT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(proxy.refused.load(std::sync::atomic::Ordering::SeqCst) > 0);
}

/// A state table that stalls longer than the group's poll interval (here 20 s,
/// `--kafka-config max.poll.interval.ms`) does not cost the member its group: the calls
/// between two polls share half the interval, so each slow call is cut off in time and
/// retried after the next poll, and librdkafka never reports the poll interval exceeded;
/// once DynamoDB answers again the consumer reads on and the sinks equal replay.
#[test]
fn a_consumer_waiting_on_a_stalled_state_table_stays_in_its_group() {
    let _pace = dynamodb_pace();
    let proxy = FaultyProxy::start(&env("AWS_ENDPOINT_URL_DYNAMODB"));
    let live = Live::with_env("4", vec![("AWS_ENDPOINT_URL_DYNAMODB", proxy.url.clone())]);
    let history = generated(&live, "300", "53");
    // Records keep coming through the stall: the consumer has work, and does not go idle.
    let producer = live.producer("15", &history);
    let consumer = live.steady_consumer(&["--until-idle", "10", "--kafka-config", "max.poll.interval.ms=20000"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while consumer.said().matches("checkpoint claimed").count() < 4 {
        assert!(Instant::now() < deadline, "{}", consumer.said());
        std::thread::sleep(Duration::from_millis(200));
    }
    proxy.hold(true);
    std::thread::sleep(Duration::from_secs(45));
    proxy.hold(false);
    assert!(producer.wait(COMMAND_LIMIT).status.success());
    let out = consumer.wait(COMMAND_LIMIT);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("no answer in time"), "the state table stalled: {said}");
    assert!(!said.contains("poll interval"), "{said}");
    live.assert_sinks_equal_replay(&history, None);
}

/// A partition checkpoint that no longer reads back (its stored state is garbage) is no
/// outage to retry: that partition stops, named with the way out, while the consumer
/// reads its other partition to the end (and checkpoints it); with `--until-idle` it then
/// exits non-zero, without a panic. `toolrank checkpoint reset` deletes the broken
/// checkpoint; the consumer then rebuilds the partition from the topic, and the sinks
/// equal replay.
#[test]
fn a_checkpoint_that_does_not_read_back_stops_its_partition_alone_and_is_reset() {
    let live = Live::new("2");
    let first = generated(&live, "300", "41");
    assert!(live.producer("5000", &first).wait(COMMAND_LIMIT).status.success());
    live.drain(&[]);
    let scope = |p: i32| format!("kafka/{}/{}/{p}", live.group, live.topic);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let corrupted = rt.block_on(async {
        use aws_sdk_dynamodb::primitives::Blob;
        let client = toolrank_dynamodb::client().await;
        let page = client
            .query()
            .table_name("toolrank-state")
            .key_condition_expression("PK = :pk")
            .expression_attribute_values(":pk", AttributeValue::S(scope(0)))
            .send()
            .await
            .unwrap();
        let mut corrupted = 0;
        for mut item in page.items().iter().filter(|i| i.contains_key("Data")).cloned() {
            item.insert("Data".into(), AttributeValue::B(Blob::new(vec![0xff; 40])));
            client.put_item().table_name("toolrank-state").set_item(Some(item)).send().await.unwrap();
            corrupted += 1;
        }
        corrupted
    });
    assert!(corrupted > 0, "the checkpoint of {} holds state", scope(0));
    let second = generated(&live, "300", "43");
    assert!(live.producer("5000", &second).wait(COMMAND_LIMIT).status.success());
    let attempt =
        |args: &[&str]| Running::spawn(live.command().args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped())).wait(COMMAND_LIMIT);
    let out = attempt(&live.consume_args(&["--until-idle", "5"]));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !said.contains("panicked"), "{said}");
    assert!(said.contains(&format!("checkpoint of {}", scope(0))) && said.contains(&format!("toolrank checkpoint reset --scope {}", scope(0))), "{said}");
    assert!(!said.contains(&format!("checkpoint of {}", scope(1))), "{said}");
    // The healthy partition was read to its end meanwhile.
    let reader: BaseConsumer = toolrank_kafka::Connection::plain(&env("TOOLRANK_KAFKA_BROKERS")).client_config().create().unwrap();
    let (_, end) = reader.fetch_watermarks(&live.topic, 1, Duration::from_secs(10)).unwrap();
    let position =
        rt.block_on(async { toolrank_state::CheckpointStore::new(toolrank_dynamodb::client().await, "toolrank-state").position(&scope(1)).await.unwrap() });
    assert_eq!(position.as_deref(), Some(end.to_string().as_str()), "{said}");

    let reset = live.toolrank(&["checkpoint", "reset", "--scope", &scope(0)]);
    assert!(reset.status.success() && String::from_utf8_lossy(&reset.stdout).contains("deleted the checkpoint"), "{reset:?}");
    let again = attempt(&["checkpoint", "reset", "--scope", &scope(0)]);
    assert!(!again.status.success(), "nothing left to reset");
    live.drain(&[]);
    let history = live.dir.path().join("both.jsonl");
    std::fs::write(&history, std::fs::read_to_string(&first).unwrap() + &std::fs::read_to_string(&second).unwrap()).unwrap();
    live.assert_sinks_equal_replay(history.to_str().unwrap(), None);
}
