//! Backfill and namespaces: rebuilding beside the live pipeline.

use crate::support::*;
use aws_sdk_dynamodb::types::AttributeValue;
use std::process::Stdio;
use std::time::Duration;

/// Writes `lines` as a DynamoDB export directory: gzip data files and their manifest.
fn export_dir(dir: &std::path::Path, lines: &[String]) -> std::path::PathBuf {
    use std::io::Write;
    let root = dir.join("AWSDynamoDB/0175-backfill");
    std::fs::create_dir_all(root.join("data")).unwrap();
    let mut manifest = String::new();
    for (i, chunk) in lines.chunks(lines.len().div_ceil(3)).enumerate() {
        let name = format!("part-{i}.json.gz");
        let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(root.join("data").join(&name)).unwrap(), flate2::Compression::fast());
        for line in chunk {
            writeln!(gz, "{line}").unwrap();
        }
        gz.finish().unwrap();
        manifest += &format!("{}\n", serde_json::json!({"itemCount": chunk.len(), "dataFileS3Key": format!("AWSDynamoDB/0175-backfill/data/{name}")}));
    }
    std::fs::write(root.join("manifest-files.json"), manifest).unwrap();
    root
}

#[test]
fn backfill_from_a_table_resumes_after_kill_and_equals_replay_and_the_export() {
    let live = Live::new("3");
    let history = live.dir.path().join("history.jsonl");
    let history = history.to_str().unwrap();
    live.toolrank(&["generate", "--sessions", "700", "--seed", "21", "--agents", "30", "--out", history]);
    live.toolrank(&["produce", "--to", "dynamodb", "--table", &live.table, history]);
    // The table's contents as a DynamoDB export would hold them.
    let export_lines: Vec<String> = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = toolrank_dynamodb::client().await;
        let (mut lines, mut start) = (Vec::new(), None);
        loop {
            let page = client.scan().table_name(&live.table).set_exclusive_start_key(start).send().await.unwrap();
            lines.extend(page.items().iter().map(|i| serde_json::json!({ "Item": toolrank_dynamodb::item_json(i) }).to_string()));
            start = page.last_evaluated_key;
            if start.is_none() {
                return lines;
            }
        }
    });
    let table_items = export_lines.len() as u64;
    let id = unique("backfill");
    let backfill = |extra: &[&str]| {
        let mut cmd = live.command();
        cmd.args(["backfill", "--from", "dynamodb", "--table", &live.table, "--topic", &live.topic, "--segments", "3", "--id", &id, "--page-items", "100"])
            .args(extra);
        cmd
    };
    // Slowed to a few read units/s: killed with -9 after 3 s, resumed and stopped by
    // SIGINT after 2 s, then resumed at full speed.
    let victim = Running::spawn(backfill(&["--max-rcu", "4"]).stderr(Stdio::null()));
    std::thread::sleep(Duration::from_secs(3));
    victim.kill();
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let interrupted = Running::spawn(backfill(&["--max-rcu", "1", "--metrics-addr", &metrics_addr]).stderr(Stdio::piped()));
    std::thread::sleep(Duration::from_secs(2));
    let metrics = scrape(&metrics_addr);
    let line = metrics.lines().find(|l| l.starts_with("toolrank_job_records_total{job=\"backfill\"}")).unwrap_or_else(|| panic!("{metrics}"));
    assert!(line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() > 0.0, "{metrics}");
    assert!(metrics.contains("# TYPE toolrank_backfill_read_capacity_units_total counter"), "{metrics}");
    interrupted.signal("-INT");
    let stopped = interrupted.wait(COMMAND_LIMIT);
    let said = String::from_utf8_lossy(&stopped.stderr);
    assert!(stopped.status.success() && said.contains("run the same command again to resume"), "{said}");
    let resumed = String::from_utf8(run(&mut backfill(&[])).stderr).unwrap();
    let items = count_after(&resumed, "backfilled ");
    assert!(items > 0 && items < table_items, "resumed after the checkpoint: {items} of {table_items} items\n{resumed}");
    live.drain(&[]);
    live.assert_sinks_equal_replay(history, None);

    // The same table state from an export directory, into a second pipeline.
    let other = Live::new("2");
    let catalog: String = export_lines.iter().filter(|l| l.contains(r#""SK":{"S":"METADATA"}"#)).map(|l| format!("{l}\n")).collect();
    std::fs::write(other.dir.path().join("catalog.jsonl"), catalog).unwrap();
    other.toolrank(&["produce", "--to", "dynamodb", "--table", &other.table, other.dir.path().join("catalog.jsonl").to_str().unwrap()]);
    let dir = export_dir(other.dir.path(), &export_lines);
    let out =
        String::from_utf8(other.toolrank(&["backfill", "--from", "export", "--topic", &other.topic, "--id", &unique("export"), dir.to_str().unwrap()]).stderr)
            .unwrap();
    assert_eq!(count_after(&out, "backfilled "), table_items, "{out}");
    other.drain(&[]);
    other.assert_sinks_equal_replay(history, None);

    // The export copied into S3 (moto) under another prefix: found by its manifest, its
    // data files by name.
    let in_s3 = Live::new("2");
    in_s3.toolrank(&["produce", "--to", "dynamodb", "--table", &in_s3.table, other.dir.path().join("catalog.jsonl").to_str().unwrap()]);
    let bucket = unique("exports");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let s3 = toolrank_backfill::s3::client().await;
        s3.create_bucket().bucket(&bucket).send().await.unwrap();
        for path in ["manifest-files.json", "data/part-0.json.gz", "data/part-1.json.gz", "data/part-2.json.gz"] {
            let body = aws_sdk_s3::primitives::ByteStream::from(std::fs::read(dir.join(path)).unwrap());
            s3.put_object().bucket(&bucket).key(format!("copied/AWSDynamoDB/0175-backfill/{path}")).body(body).send().await.unwrap();
        }
    });
    let url = format!("s3://{bucket}/copied/");
    let out = String::from_utf8(in_s3.toolrank(&["backfill", "--from", "export", "--topic", &in_s3.topic, "--id", &unique("s3"), &url]).stderr).unwrap();
    assert!(out.contains(&format!("{url}: 3 data files")) && count_after(&out, "backfilled ") == table_items, "{out}");
    in_s3.drain(&[]);
    in_s3.assert_sinks_equal_replay(history, None);
    let missing = in_s3.command().args(["backfill", "--from", "export", "--topic", &in_s3.topic, &format!("s3://{bucket}/nothing-here/")]).output().unwrap();
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("no manifest-files.json"), "{missing:?}");
}

/// A data file of an export whose gzip stream is corrupt is dead-lettered by name; the
/// backfill publishes the other files, checkpoints past it (run again, it has nothing
/// left to do) and the sinks equal replay of the files that read.
#[test]
fn a_corrupt_export_file_is_dead_lettered_by_name_and_the_backfill_goes_on_past_it() {
    let live = Live::new("1");
    let history = live.dir.path().join("export.jsonl");
    live.toolrank(&["generate", "--sessions", "300", "--seed", "23", "--agents", "30", "--style", "export", "--out", history.to_str().unwrap()]);
    let lines: Vec<String> = std::fs::read_to_string(&history).unwrap().lines().map(str::to_owned).collect();
    let dir = export_dir(live.dir.path(), &lines);
    // Past its 10-byte header the deflate stream of part-1 is garbage.
    let part = dir.join("data/part-1.json.gz");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[10..40].fill(0xff);
    std::fs::write(&part, bytes).unwrap();
    let kept: Vec<&String> = lines.chunks(lines.len().div_ceil(3)).enumerate().filter(|(i, _)| *i != 1).flat_map(|(_, c)| c).collect();
    let good = live.dir.path().join("good.jsonl");
    std::fs::write(&good, kept.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let catalog = live.dir.path().join("catalog.jsonl");
    std::fs::write(&catalog, kept.iter().filter(|l| l.contains(r#""SK":{"S":"METADATA"}"#)).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    live.toolrank(&["produce", "--to", "dynamodb", "--table", &live.table, catalog.to_str().unwrap()]);

    let letters = live.dir.path().join("letters.jsonl");
    let (id, dir, letters_arg) = (unique("corrupt"), dir.to_str().unwrap().to_owned(), letters.to_str().unwrap().to_owned());
    let backfill =
        || live.command().args(["backfill", "--from", "export", "--topic", &live.topic, "--id", &id, "--dead-letter", &letters_arg, &dir]).output().unwrap();
    let out = backfill();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert_eq!(count_after(&said, "backfilled "), kept.len() as u64, "{said}");
    let written = std::fs::read_to_string(&letters).unwrap();
    let letter: serde_json::Value = serde_json::from_str(written.lines().next().unwrap()).unwrap();
    assert_eq!(written.lines().count(), 1, "{written}");
    assert!(letter["source"].as_str().unwrap().ends_with("part-1.json.gz") && letter["reason"].as_str().unwrap().contains("corrupt"), "{letter}");
    let again = backfill();
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success() && count_after(&said, "backfilled ") == 0, "resumed past the corrupt file: {said}");
    live.drain(&[]);
    live.assert_sinks_equal_replay(good.to_str().unwrap(), None);
}

#[test]
fn backfill_beside_a_live_consumer_counts_nothing_twice() {
    let live = Live::new("3");
    // The table holds the first half when the pipeline starts; the application then
    // writes the second half to the table and the topic while a backfill scans the table
    // and a consumer reads the topic.
    let (history, after) = live.history_in_halves("700", "22");
    let consumer = live.consumer(&["--until-idle", "12"]);
    let to_table = Running::spawn(
        live.command()
            .args(["produce", "--to", "dynamodb", "--table", &live.table, "--rate", "400", after.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let to_topic = live.producer("400", after.to_str().unwrap());
    std::thread::sleep(Duration::from_millis(800));
    live.toolrank(&[
        "backfill",
        "--from",
        "dynamodb",
        "--table",
        &live.table,
        "--topic",
        &live.topic,
        "--segments",
        "2",
        "--page-items",
        "50",
        "--id",
        &unique("beside"),
    ]);
    for child in [to_table, to_topic] {
        assert!(child.wait(COMMAND_LIMIT).status.success());
    }
    let consumer = consumer.wait(COMMAND_LIMIT);
    assert!(consumer.status.success(), "{}", String::from_utf8_lossy(&consumer.stderr));
    live.drain(&[]);
    live.assert_sinks_equal_replay(history.to_str().unwrap(), None);
}

/// A Lambda deployment made exact without Kafka: the table holds the first half of a
/// history when the function starts; the application then writes the second half while
/// the stream delivers it to the function, and `backfill --target lambda` writes the
/// table's items into the function's bucket logs meanwhile. After the schedule's flush,
/// both sinks equal replay of the whole history.
#[test]
fn backfill_into_the_lambda_bucket_logs_beside_the_running_function_equals_replay() {
    let live = Live::new("1");
    let (history, after) = live.history_in_halves("600", "31");
    let api = RuntimeApi::start();
    let app = unique("lambda-backfill");
    let _function = Running::spawn(live.function(&api.address, "toolrank", &app, &[("TOOLRANK_BUCKETS", "2")]).stdout(Stdio::null()).stderr(Stdio::null()));
    let to_table = Running::spawn(
        live.command()
            .args(["produce", "--to", "dynamodb", "--table", &live.table, "--rate", "400", after.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let backfill = Running::spawn(
        live.command()
            .args(["backfill", "--from", "dynamodb", "--table", &live.table, "--target", "lambda", "--application", &app, "--buckets", "2"])
            .args(["--segments", "2", "--page-items", "50", "--lambda-batch", "100", "--id", &unique("lambda")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    // The stream delivers the second half to the function in batches, as it is written.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&after).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for batch in records.chunks(100) {
        let answer = api.invoke(serde_json::json!({ "Records": batch }).to_string()).expect("the function answers");
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(answer["batchItemFailures"], serde_json::json!([]), "{answer}");
        std::thread::sleep(Duration::from_millis(150));
    }
    let backfilled = backfill.wait(COMMAND_LIMIT);
    let said = String::from_utf8_lossy(&backfilled.stderr);
    assert!(backfilled.status.success(), "{said}");
    assert!(said.contains(&format!("into the bucket logs of {app}")), "{said}");
    assert!(to_table.wait(COMMAND_LIMIT).status.success());
    let flushed = api.invoke(r#"{"source":"aws.events","detail-type":"Scheduled Event","detail":{}}"#.to_owned());
    assert!(flushed.is_ok(), "{flushed:?}");
    live.assert_sinks_equal_replay(history.to_str().unwrap(), None);
}

#[test]
fn replay_from_kafka_into_a_shadow_namespace_then_diff_and_promote() {
    // A private Valkey: the active-namespace pointer is global to a Valkey.
    let port = free_port();
    let valkey = valkey_server(port);
    wait_for_port(port);
    let url = format!("redis://127.0.0.1:{port}");
    let state = unique("state");
    let live = Live::new("2");
    let history = generated(&live, "600", "31");
    let text = std::fs::read_to_string(&history).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (first, second) = (live.dir.path().join("first.jsonl"), live.dir.path().join("second.jsonl"));
    std::fs::write(&first, lines[..lines.len() / 2].join("\n")).unwrap();
    std::fs::write(&second, lines[lines.len() / 2..].join("\n")).unwrap();
    let first = first.to_str().unwrap();
    let sinks = ["--valkey-url", url.as_str(), "--state-table", state.as_str(), "--table", live.table.as_str(), "--today", TODAY];
    // The live pipeline has consumed the first half; the second half is on the topic too.
    live.toolrank(&["produce", "--topic", &live.topic, first]);
    live.drain(&["--valkey-url", &url]);
    live.toolrank(&[&["promote", &live.namespace, "--no-dynamodb"], &sinks[..]].concat());
    live.toolrank(&["produce", "--topic", &live.topic, second.to_str().unwrap()]);
    let read = |from: &str, namespace: Option<&str>, dir: &str| {
        let out = live.dir.path().join(dir);
        let mut args = [&["results", "--from", from, "--out", out.to_str().unwrap()], &sinks[..]].concat();
        args.extend(namespace.map(|n| ["--namespace", n]).into_iter().flatten());
        live.toolrank(&args);
        out
    };
    let replayed = |input: &str, dir: &str| {
        let out = live.dir.path().join(dir);
        live.toolrank(&["replay", "--today", TODAY, "--out", out.to_str().unwrap(), input]);
        out
    };
    let (replay_first, replay_all) = (replayed(first, "replay-first"), replayed(&history, "replay-all"));
    // Both stores as `replay` of `expected` has them.
    let assert_active = |expected: &std::path::Path, dir: &str| {
        assert_same_tables(&read("valkey", None, &format!("{dir}-valkey")), expected, &TABLES);
        assert_dynamodb_holds(&read("dynamodb", None, &format!("{dir}-dynamodb")), expected);
    };
    assert_active(&replay_first, "before");

    let shadow = unique("v2");
    let replay_args = [&["replay", "--from-kafka", "--topic", &live.topic, "--from-beginning", "--namespace", &shadow], &sinks[..]].concat();
    let out = String::from_utf8(live.toolrank(&replay_args).stderr).unwrap();
    assert!(out.contains(&format!("into namespace {shadow}")), "{out}");
    // Readers still see the live namespace, unchanged; the shadow holds the recomputation.
    assert_active(&replay_first, "during");
    assert_same_tables(&read("valkey", Some(&shadow), "shadow-valkey"), &replay_all, &TABLES);
    assert_dynamodb_holds(&read("dynamodb", Some(&shadow), "shadow-dynamodb"), &replay_all);
    let diff = String::from_utf8(live.toolrank(&["diff", &shadow, "--valkey-url", &url, "--state-table", &state, "--today", TODAY]).stdout).unwrap();
    assert!(diff.contains(&format!("{shadow} (new) against {} (current)", live.namespace)) && !diff.contains(" 0 changed  "), "{diff}");
    let dry = String::from_utf8(live.toolrank(&[&replay_args[..], &["--dry-run"]].concat()).stderr).unwrap();
    assert!(dry.contains("dry run: nothing written"), "{dry}");
    // A second consumer group rebuilding another shadow leaves the live items alone too.
    let rebuilt = unique("v3");
    let group = unique("rebuild");
    live.toolrank(
        &[
            &[
                "consume",
                "kafka",
                "--topic",
                &live.topic,
                "--group",
                &group,
                "--dead-letter-topic",
                &live.dlq,
                "--namespace",
                &rebuilt,
                "--shadow",
                "--until-idle",
                "8",
            ],
            &sinks[..],
        ]
        .concat(),
    );
    assert_dynamodb_holds(&read("dynamodb", Some(&rebuilt), "rebuilt-dynamodb"), &replay_all);
    assert_active(&replay_first, "beside-rebuild");

    // Promote, roll back, promote for good.
    live.toolrank(&[&["promote", &shadow], &sinks[..]].concat());
    assert_active(&replay_all, "promoted");
    assert_dynamodb_holds(&read("dynamodb", Some(&live.namespace), "kept-dynamodb"), &replay_first);
    live.toolrank(&[&["promote", &live.namespace], &sinks[..]].concat());
    assert_active(&replay_first, "rolled-back");
    let promoted = String::from_utf8(live.toolrank(&[&["promote", &shadow, "--drop-previous"], &sinks[..]].concat()).stderr).unwrap();
    assert!(promoted.contains(&format!("dropped namespace {}", live.namespace)), "{promoted}");
    assert_active(&replay_all, "after");
    let mut conn = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let left: Vec<String> = redis::cmd("KEYS").arg(format!("{}:*", live.namespace)).query(&mut conn).unwrap();
    assert!(left.is_empty(), "the old namespace is gone: {left:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let shadows = rt.block_on(async {
        let client = toolrank_dynamodb::client().await;
        let page = client
            .scan()
            .table_name(&live.table)
            .filter_expression("begins_with(PK, :old) OR begins_with(PK, :promoted)")
            .expression_attribute_values(":old", AttributeValue::S(format!("toolrank#{}#", live.namespace)))
            .expression_attribute_values(":promoted", AttributeValue::S(format!("toolrank#{shadow}#")))
            .send()
            .await
            .unwrap();
        page.count
    });
    assert_eq!(shadows, 0, "neither the dropped nor the promoted namespace has shadow items left");
    // The active namespace is never overwritten in place; nothing after --since is nothing.
    let refused = live.command().args(&replay_args).output().unwrap();
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("active namespace"));
    let later =
        String::from_utf8(live.toolrank(&["replay", "--from-kafka", "--topic", &live.topic, "--since", "2999-01-01", "--today", TODAY]).stderr).unwrap();
    assert!(later.contains(", 0 lines"), "{later}");
    valkey.kill();
}
