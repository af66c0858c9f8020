//! The Lambda function: under a Runtime API of the tests and under cargo-lambda's emulator.

use crate::support::*;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The Lambda records of a generated history, split into two shards by session, as
/// DynamoDB Streams events or as Kinesis events carrying DynamoDB changes.
fn lambda_shards(history: &str, kinesis: bool) -> [Vec<(String, serde_json::Value)>; 2] {
    use base64::Engine as _;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(history).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut seqs: Vec<u128> = lines.iter().map(|v| v["dynamodb"]["SequenceNumber"].as_str().unwrap().parse().unwrap()).collect();
    seqs.sort_unstable();
    let mut shards = [Vec::new(), Vec::new()];
    for mut v in lines {
        let pk = v["dynamodb"]["Keys"]["PK"]["S"].as_str().unwrap().to_owned();
        let shard = pk.bytes().map(u64::from).sum::<u64>() as usize % 2;
        let seq = v["dynamodb"]["SequenceNumber"].as_str().unwrap().to_owned();
        let record = if kinesis {
            let data = v["dynamodb"].as_object_mut().unwrap();
            data.remove("SequenceNumber");
            let rank = seqs.binary_search(&seq.parse().unwrap()).unwrap() as u64;
            data.insert("ApproximateCreationDateTime".into(), (1_752_000_000_000_000u64 + rank).into());
            // Kinesis sequence numbers of the shard: increasing, unlike the history's.
            let kinesis_seq = format!("4959{:020}", shards[shard].len());
            let encoded = base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&v).unwrap());
            let record = serde_json::json!({
                "kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": pk, "sequenceNumber": kinesis_seq, "data": encoded, "approximateArrivalTimestamp": 1752000000.0},
                "eventSource": "aws:kinesis", "eventVersion": "1.0", "eventID": format!("shardId-00000000000{shard}:{kinesis_seq}"),
                "eventName": "aws:kinesis:record", "awsRegion": "us-east-1", "eventSourceARN": "arn:aws:kinesis:us-east-1:000000000000:stream/changes"
            });
            (kinesis_seq, record)
        } else {
            v["eventSourceARN"] = "arn:aws:dynamodb:us-east-1:000000000000:table/AgentTable/stream/2025-07-14T00:00:00.000".into();
            (seq, v)
        };
        shards[shard].push(record);
    }
    shards
}

/// Feeds one shard to the function as the Lambda service does (batches of up to 100, in
/// order, retrying from the first reported failure), with duplicate deliveries and
/// bisected batches injected. Counts its invocations in `invoked`. Returns the batch item
/// failures reported.
fn drive_shard(api: &RuntimeApi, records: &[(String, serde_json::Value)], invoked: &std::sync::atomic::AtomicUsize) -> usize {
    let event = |batch: &[(String, serde_json::Value)]| serde_json::json!({"Records": batch.iter().map(|(_, r)| r).collect::<Vec<_>>()}).to_string();
    let (mut at, mut n, mut failures) = (0, 0, 0);
    while at < records.len() {
        n += 1;
        let batch = &records[at..(at + 100).min(records.len())];
        if n % 5 == 0 {
            // Delivered twice (a retry after a lost answer).
            let _ = api.invoke(event(batch));
        }
        if n % 7 == 0 {
            // Bisected after an error: the first half alone, then all of it again.
            let _ = api.invoke(event(&batch[..batch.len() / 2]));
        }
        invoked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match api.invoke(event(batch)) {
            Ok(answer) => {
                let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
                match answer["batchItemFailures"].as_array().and_then(|f| f.first()) {
                    None => at += batch.len(),
                    Some(failed) => {
                        failures += 1;
                        let id = failed["itemIdentifier"].as_str().unwrap();
                        at += batch.iter().position(|(seq, _)| seq == id).expect("a failed record of the batch");
                    }
                }
            }
            Err(e) => panic!("the handler failed an invocation: {e}"),
        }
    }
    failures
}

/// Two handler processes under a local Runtime API take batches of two shards at once
/// (racing to append to the same bucket logs); batches are delivered twice and
/// bisected, and DynamoDB fails for a while. After the last batch both sinks equal replay.
fn lambda_handler_is_exact(kinesis: bool, seed: &str, buckets: &str, compact_bytes: &str) {
    let proxy = FaultyProxy::start(&env("AWS_ENDPOINT_URL_DYNAMODB"));
    let live = Live::new("1");
    let history = generated(&live, "500", seed);
    let api = RuntimeApi::start();
    let app = unique("lambda");
    let handlers: Vec<Running> = (0..2)
        .map(|_| {
            Running::spawn(
                live.function(
                    &api.address,
                    "toolrank",
                    &app,
                    &[("AWS_ENDPOINT_URL_DYNAMODB", proxy.url.as_str()), ("TOOLRANK_BUCKETS", buckets), ("TOOLRANK_COMPACT_BYTES", compact_bytes)],
                )
                .stderr(Stdio::null()),
            )
        })
        .collect();
    let shards = lambda_shards(&history, kinesis);
    let invoked = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::thread::scope(|s| {
        let drivers: Vec<_> = shards.iter().map(|records| s.spawn(|| drive_shard(&api, records, &invoked))).collect();
        // A few batches in (each shard has more than ten), DynamoDB fails for longer than
        // the SDK's retries: invocations fail and report their records.
        while invoked.load(std::sync::atomic::Ordering::SeqCst) < 4 {
            std::thread::sleep(Duration::from_millis(5));
        }
        proxy.fail_for(Duration::from_secs(8));
        drivers.into_iter().map(|d| d.join().unwrap()).sum::<usize>()
    });
    // The schedule's flush: writes what the sink interval held back after the last batch.
    let flushed = api.invoke(r#"{"version":"0","id":"flush","detail-type":"Scheduled Event","source":"aws.events","detail":{}}"#.to_owned());
    assert!(flushed.is_ok(), "{flushed:?}");
    drop(handlers);
    eprintln!("{failures} batch item failures reported; {} requests refused", proxy.refused.load(std::sync::atomic::Ordering::SeqCst));
    assert!(proxy.refused.load(std::sync::atomic::Ordering::SeqCst) > 0, "errors were injected");
    assert!(failures > 0, "batch item failures were reported and retried");
    live.assert_sinks_equal_replay(&history, None);
}

#[test]
fn lambda_handler_on_dynamodb_stream_events_is_exact_through_retries_and_failures() {
    // One bucket (the default) whose log is compacted every few KB: both handlers append
    // to it in turn, and read deltas that the other one's compaction deletes.
    lambda_handler_is_exact(false, "21", "1", "4096");
}

#[test]
fn lambda_handler_on_kinesis_events_is_exact_through_retries_and_failures() {
    lambda_handler_is_exact(true, "22", "3", "262144");
}

/// DynamoDB write rounds of a Lambda handler (one warm container, called directly) with
/// write budget `budget` and the sinks due at every invocation, over 300 generated
/// sessions in batches of 50 and the schedule's flush; the sinks equal replay in the end.
/// The function under cargo-lambda's Runtime API emulator (`cargo lambda watch
/// --only-lambda-apis`), invoked by `cargo lambda invoke` with events shaped as `sam
/// local generate-event dynamodb update` writes them (one document over many lines, every
/// envelope field). While DynamoDB fails, the response carries batch item failures from
/// the batch's first record; retried from there, the batch goes through, and after a
/// scheduled flush both sinks equal replay.
#[test]
fn the_function_under_the_cargo_lambda_emulator_reports_partial_failures_and_is_exact() {
    let cargo_lambda = env("TOOLRANK_CARGO_LAMBDA");
    let proxy = FaultyProxy::start(&env("AWS_ENDPOINT_URL_DYNAMODB"));
    let live = Live::new("1");
    let history = generated(&live, "150", "23");
    let port = free_port().to_string();
    let emulator = Running::spawn(
        Command::new(&cargo_lambda)
            .args(["lambda", "watch", "--only-lambda-apis", "--invoke-address", "127.0.0.1", "--invoke-port", &port])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    wait_for_port(port.parse().unwrap());
    let runtime_api = format!("http://127.0.0.1:{port}/.rt");
    // The emulator's function name when `cargo lambda invoke` names none.
    let function = Running::spawn(
        live.function(&runtime_api, "_", &unique("emulated"), &[("AWS_ENDPOINT_URL_DYNAMODB", proxy.url.as_str())])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let invoke = |event: &str| -> serde_json::Value {
        let file = live.dir.path().join("event.json");
        std::fs::write(&file, event).unwrap();
        let out =
            run(Command::new(&cargo_lambda).args(["lambda", "invoke", "--invoke-address", "127.0.0.1", "--invoke-port", &port, "--data-file"]).arg(&file));
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("the function's response {text:?}: {e}; the emulator said: {}", emulator.said()))
    };
    // The history's stream records in order, each in the envelope Lambda delivers.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&history)
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            let mut dynamodb = r["dynamodb"].clone();
            dynamodb["ApproximateCreationDateTime"] = serde_json::json!(1_752_000_000 + i);
            dynamodb["SizeBytes"] = serde_json::json!(line.len());
            dynamodb["StreamViewType"] = serde_json::json!("NEW_AND_OLD_IMAGES");
            serde_json::json!({"eventID": (i + 1).to_string(), "eventVersion": "1.1", "dynamodb": dynamodb, "awsRegion": "us-east-1",
                "eventName": r["eventName"], "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/AgentTable/stream/2025-07-14T00:00:00.000",
                "eventSource": "aws:dynamodb"})
        })
        .collect();
    let mut failures = 0;
    for (n, batch) in records.chunks(100).enumerate() {
        let event = serde_json::to_string_pretty(&serde_json::json!({ "Records": batch })).unwrap();
        if n == 1 {
            proxy.fail(true);
            let answer = invoke(&event);
            proxy.fail(false);
            let failed = answer["batchItemFailures"].as_array().cloned().unwrap_or_default();
            assert_eq!(failed.len(), 1, "{answer}");
            assert_eq!(failed[0]["itemIdentifier"], batch[0]["dynamodb"]["SequenceNumber"], "retried from the batch's first record");
            failures += 1;
        }
        let answer = invoke(&event);
        assert_eq!(answer["batchItemFailures"], serde_json::json!([]), "batch {n}: {answer}");
    }
    let flushed = invoke(r#"{"version":"0","id":"flush","detail-type":"Scheduled Event","source":"aws.events","detail":{}}"#);
    assert_eq!(flushed["batchItemFailures"], serde_json::json!([]), "{flushed}");
    assert_eq!(failures, 1);
    let said = function.said();
    drop(function);
    assert!(said.contains("could not save a bucket"), "{said}");
    live.assert_sinks_equal_replay(&history, None);
}

fn lambda_rounds_under_budget(budget: f64) -> u64 {
    let _pace = dynamodb_pace();
    let live = Live::new("1");
    let history = generated(&live, "300", "11");
    let config = toolrank_lambda::Config {
        application: unique("lambda-budget"),
        state_table: "toolrank-state".into(),
        table: Some(live.table.clone()),
        valkey_url: Some(env("TOOLRANK_VALKEY_URL")),
        valkey_prefix: live.namespace.clone(),
        today: toolrank_events::Day::parse_iso(TODAY),
        buckets: 1,
        compact_bytes: toolrank_lambda::COMPACT_MIN_BYTES,
        sink_wait: Duration::from_secs(20),
        sink_interval: Duration::ZERO,
        dynamodb_writes_per_event: Some(budget).filter(|&b| b > 0.0),
        dynamodb_max_defer: Duration::from_secs(600),
        dynamodb_max_wcu: None,
        tombstone_horizon: toolrank_live::DEFAULT_TOMBSTONE_HORIZON,
        dead_letter_queue_url: None,
        max_record_bytes: toolrank_live::DEFAULT_MAX_RECORD_BYTES,
    };
    let mut handler = toolrank_lambda::Handler::new(config).unwrap();
    let text = std::fs::read_to_string(&history).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for batch in lines.chunks(50) {
        let outcome = handler.handle(format!("{{\"Records\":[{}]}}", batch.join(",")).as_bytes()).unwrap();
        assert!(outcome.failures.is_empty(), "{outcome:?}");
    }
    handler.handle(br#"{"detail-type":"Scheduled Event","detail":{}}"#).unwrap();
    live.assert_sinks_equal_replay(&history, None);
    let rounds = handler.summary().dynamodb_rounds;
    eprintln!("lambda, budget {budget}: {rounds} rounds over {} invocations", lines.len().div_ceil(50));
    rounds
}

/// The Lambda path keeps the Kafka path's write budget across invocations, counting the
/// records appended to the bucket logs: a budget no round can meet defers every round
/// after the first (which compares with the table) to the schedule's flush; without one
/// every invocation writes. Valkey is written at every invocation either way.
#[test]
fn the_lambda_handler_keeps_the_dynamodb_write_budget_across_invocations() {
    assert_eq!(lambda_rounds_under_budget(1e-6), 2);
    assert!(lambda_rounds_under_budget(0.0) >= 10);
}

/// A record that does not decode goes whole to the dead-letter queue (SQS, in moto) with
/// its reason and sequence number, while the log names only those two: none of its
/// contents or keys. The rest of the batch is applied. When the queue cannot take the
/// letter, the batch fails from that record, so Lambda retries it and nothing is lost.
#[test]
fn lambda_dead_letters_go_whole_to_sqs_and_never_into_the_log() {
    let live = Live::new("1");
    // The application's items, which the sink scores.
    live.toolrank(&["produce", "--to", "dynamodb", "--table", &live.table, SEED]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sqs = rt.block_on(async { aws_sdk_sqs::Client::new(&aws_config::load_from_env().await) });
    let queue = rt.block_on(sqs.create_queue().queue_name(unique("dead-letters")).send()).unwrap().queue_url.unwrap();
    let app = unique("lambda-dlq");
    let bad = |seq: &str| {
        let image = r#"{"PK":{"S":"USR777#SESS1"},"SK":{"S":"PRC001"},"EntityType":{"S":"UserSessPrcToolMappHist"},"ToolValues":{"S":"card 4111-1111 kept secret"},"TransactDT":{"S":"20250614101500"},"SuccYN":{"S":"Y"}}"#;
        format!(
            r#"{{"eventName":"INSERT","eventSource":"aws:dynamodb","dynamodb":{{"SequenceNumber":"{seq}","Keys":{{"PK":{{"S":"USR777#SESS1"}},"SK":{{"S":"PRC001"}}}},"NewImage":{image}}}}}"#
        )
    };
    let seed = std::fs::read_to_string(SEED).unwrap();
    let lines: Vec<&str> = seed.lines().collect();
    let event = |records: &[&str]| format!(r#"{{"Records": [{}]}}"#, records.join(","));
    let flush = r#"{"version":"0","id":"flush","detail-type":"Scheduled Event","source":"aws.events","detail":{}}"#;

    let api = RuntimeApi::start();
    let function = Running::spawn(
        live.function(&api.address, "toolrank", &app, &[("TOOLRANK_DEAD_LETTER_QUEUE_URL", &queue)]).stdout(Stdio::piped()).stderr(Stdio::piped()),
    );
    let first = bad("999");
    let mut records = lines.clone();
    records.insert(3, &first);
    let answer: serde_json::Value = serde_json::from_str(&api.invoke(event(&records)).unwrap()).unwrap();
    assert_eq!(answer["batchItemFailures"], serde_json::json!([]), "{answer}");
    assert!(api.invoke(flush.to_owned()).is_ok());
    let said = function.said();
    drop(function);

    let got =
        rt.block_on(sqs.receive_message().queue_url(&queue).max_number_of_messages(10).wait_time_seconds(2).message_attribute_names("All").send()).unwrap();
    let messages = got.messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    let attribute = |name: &str| messages[0].message_attributes().and_then(|a| a.get(name)).and_then(|v| v.string_value()).unwrap_or_default().to_owned();
    assert_eq!(messages[0].body(), Some(first.as_str()), "the record whole");
    assert!(attribute("toolrank-reason").contains("SK is not PROCESS#AGENT#TOOL"), "{}", attribute("toolrank-reason"));
    assert_eq!(attribute("toolrank-position"), "999");
    assert_eq!(attribute("toolrank-source"), format!("lambda/{app}"));
    assert!(said.contains("dead-lettered") && said.contains("999"), "{said}");
    for secret in ["4111", "secret", "USR777", "PRC001\""] {
        assert!(!said.contains(secret) && !attribute("toolrank-reason").contains(secret), "{secret:?} reached the log or the reason: {said}");
    }

    // A queue that does not exist: the letter is not sent, and the batch fails from it.
    let missing = format!("{queue}-missing");
    // A Runtime API of its own: the first function's last poll for an event may outlive it.
    let api = RuntimeApi::start();
    let function = Running::spawn(live.function(&api.address, "toolrank", &app, &[("TOOLRANK_DEAD_LETTER_QUEUE_URL", &missing)]).stderr(Stdio::null()));
    let second = bad("1001");
    let answer: serde_json::Value = serde_json::from_str(&api.invoke(event(&[lines[0], &second])).unwrap()).unwrap();
    assert_eq!(answer["batchItemFailures"], serde_json::json!([{"itemIdentifier": "1001"}]), "{answer}");
    assert!(api.invoke(flush.to_owned()).is_ok());
    drop(function);
    live.assert_sinks_equal_replay(SEED, None);
}
