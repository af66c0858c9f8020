//! `lambda-bench HISTORY [INVOKE_RECORDS [RATE]]`: the Lambda handler's cost, on a stream-style
//! history (`toolrank generate --style stream`) cut into DynamoDB Streams events.
//!
//! 1. CPU: every record decoded and applied to in-memory bucket engines (state and sinks
//!    aside), with events of 100 and of 1000 records: records/s of one core and CPU µs
//!    per record.
//! 2. Invocations (with `AWS_ENDPOINT_URL_DYNAMODB` set, e.g. DynamoDB Local): the whole
//!    handler on the first INVOKE_RECORDS records (default 20000) in one warm container,
//!    invoked at RATE records/s (default 5000, as a stream would deliver them; 0: at once),
//!    its bucket log in the state table and the DynamoDB sink on (Valkey off): duration
//!    per invocation at both batch sizes, and DynamoDB write requests per record (the
//!    sink's, and the state table's: log appends, compactions, the sink lease), with the
//!    sink interval of `TOOLRANK_SINK_INTERVAL_MS` (1 s), the write budget of
//!    `TOOLRANK_DYNAMODB_WRITES_PER_EVENT` (0.05) and a flush event after the last batch.
//!
//! `BATCHES` (default `100,1000`) lists the batch sizes, e.g. `100,1000,10000` (DynamoDB
//! Streams and Kinesis event sources allow up to 10,000 records per invocation).

use std::time::{Duration, Instant};
use toolrank_engine::Engine;
use toolrank_lambda::{Batch, Config, Handler, COMPACT_MIN_BYTES};
use toolrank_live::{apply_change, Summary};

/// CPU time of this thread (Linux), for a figure independent of the machine's load.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(stat.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0))
}

/// What an EventBridge schedule sends: any event without `Records` is a flush.
const FLUSH_EVENT: &str = r#"{"version":"0","id":"flush","detail-type":"Scheduled Event","source":"aws.events","detail":{}}"#;

fn events(lines: &[&str], batch: usize) -> Vec<String> {
    lines.chunks(batch).map(|c| format!("{{\"Records\":[{}]}}", c.join(","))).collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: lambda-bench HISTORY [INVOKE_RECORDS]");
    let invoke_records: usize = args.next().map_or(20_000, |n| n.parse().expect("INVOKE_RECORDS is a number"));
    let rate: f64 = args.next().map_or(5000.0, |n| n.parse().expect("RATE is a number of records/s"));
    let text = std::fs::read_to_string(&path).expect("history readable");
    let lines: Vec<&str> = text.lines().collect();
    let batches: Vec<usize> = std::env::var("BATCHES")
        .map(|list| list.split(',').map(|b| b.trim().parse().expect("BATCHES lists numbers of records")).collect())
        .unwrap_or_else(|_| vec![100, 1000]);
    let buckets = 1;
    for &batch in &batches {
        let events = events(&lines, batch);
        let mut engines: Vec<Engine> = (0..buckets).map(|_| Engine::new()).collect();
        let mut summary = Summary::default();
        let (wall, start) = (Instant::now(), cpu());
        for event in &events {
            let parsed = Batch::parse(event.as_bytes()).expect("an event").expect("records");
            let (items, by_bucket, _) = parsed.decode(buckets, usize::MAX);
            for (b, indices) in by_bucket {
                let engine = &mut engines[b as usize];
                for i in indices {
                    apply_change(engine, &items[i].change, &mut summary);
                }
                engine.flush();
            }
        }
        let (cpu_s, wall_s) = ((cpu() - start).as_secs_f64(), wall.elapsed().as_secs_f64());
        println!(
            "decode+apply, batches of {batch}: {} records in {wall_s:.3} s wall, {cpu_s:.3} s CPU: {:.0} records/s per core, {:.2} CPU µs/record",
            lines.len(),
            lines.len() as f64 / cpu_s,
            cpu_s * 1e6 / lines.len() as f64
        );
    }
    if std::env::var("AWS_ENDPOINT_URL_DYNAMODB").is_err() {
        println!("AWS_ENDPOINT_URL_DYNAMODB is not set: no invocation figures");
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let state_table = std::env::var("TOOLRANK_STATE_TABLE").unwrap_or_else(|_| "toolrank-state".into());
    // A sink table per batch size: one that already holds the results would take fewer writes.
    let sink_table = |batch: usize| format!("lambda-bench-{}-{batch}", std::process::id());
    rt.block_on(async {
        let client = toolrank_dynamodb::client().await;
        toolrank_state::create_state_table(&client, &state_table).await.expect("state table");
        for &batch in &batches {
            toolrank_dynamodb::create_table(&client, &sink_table(batch), false).await.expect("sink table");
        }
    });
    let subset = &lines[..invoke_records.min(lines.len())];
    for &batch in &batches {
        let config = Config {
            application: format!("bench-{}-{batch}", std::process::id()),
            state_table: state_table.clone(),
            table: Some(sink_table(batch)),
            valkey_url: None,
            valkey_prefix: "bench".into(),
            today: None,
            buckets,
            compact_bytes: COMPACT_MIN_BYTES,
            // The sink interval and write budget as the function's environment sets them.
            ..toolrank_lambda::Settings::from_env().expect("TOOLRANK_* settings").config()
        };
        let mut handler = Handler::new(config).expect("a handler");
        let started = Instant::now();
        let mut sent = 0;
        let mut durations: Vec<f64> = events(subset, batch)
            .iter()
            .map(|event| {
                // The stream's pace: this batch is complete once its last record arrived.
                sent += batch;
                if rate > 0.0 {
                    std::thread::sleep(Duration::from_secs_f64(sent as f64 / rate).saturating_sub(started.elapsed()));
                }
                let t = Instant::now();
                let outcome = handler.handle(event.as_bytes()).expect("handled");
                assert!(outcome.failures.is_empty(), "an invocation failed: {outcome:?}");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        // The schedule's flush after the last batch writes what the interval held back.
        let flush = Instant::now();
        handler.handle(FLUSH_EVENT.as_bytes()).expect("flushed");
        let flush_ms = flush.elapsed().as_secs_f64() * 1e3;
        let summary = handler.summary();
        durations.sort_by(f64::total_cmp);
        let q = |p: f64| durations[((durations.len() as f64 * p).ceil() as usize).clamp(1, durations.len()) - 1];
        let mean = durations.iter().sum::<f64>() / durations.len() as f64;
        let records = subset.len() as f64;
        println!(
            "invocations against DynamoDB, batches of {batch}: {} invocations over {} records: mean {mean:.1} ms, p50 {:.1} ms, p99 {:.1} ms, {:.0} records/s; final flush {flush_ms:.0} ms",
            durations.len(),
            subset.len(),
            q(0.5),
            q(0.99),
            records / (durations.iter().sum::<f64>() / 1e3)
        );
        println!(
            "  DynamoDB write requests/record: {:.4} (sink {:.4} in {} writes, state table {:.4}: {} requests for logs, compactions and the lease)",
            (summary.dynamodb_requests + summary.state_writes) as f64 / records,
            summary.dynamodb_requests as f64 / records,
            summary.dynamodb_rounds,
            summary.state_writes as f64 / records,
            summary.state_writes
        );
        println!(
            "  DynamoDB write units/record: {:.4} (sink {:.4}, state table {:.4})",
            (summary.dynamodb_write_units + summary.state_write_units) / records,
            summary.dynamodb_write_units / records,
            summary.state_write_units / records
        );
    }
}
