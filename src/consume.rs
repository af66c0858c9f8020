//! `toolrank consume kafka`: the live pipeline.

use crate::sinks::SinkArgs;
use anyhow::Result;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Consume history continuously and keep the rankings in DynamoDB and Valkey exact.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    source: Source,
}

#[derive(clap::Subcommand)]
enum Source {
    Kafka(KafkaArgs),
}

/// Consume a Kafka topic as a member of a consumer group.
///
/// Each partition's engine state is checkpointed with its offset in the state table, so
/// crashes, restarts, redeliveries and rebalances never count an execution twice; run
/// several consumers with the same --group to share the partitions. One of them (the
/// sink lease holder) writes the sinks. Bad records go to the dead-letter topic with
/// the reason and source offset in headers. SIGINT/SIGTERM finish the batch, checkpoint
/// and commit.
///
///   eval "$(infra/local/up)" && toolrank setup
///   toolrank produce --topic toolrank-events examples/seed-sample.jsonl
///   toolrank consume kafka --topic toolrank-events --group toolrank --until-idle 5
///   toolrank top agents --domain DMN001
#[derive(clap::Args)]
struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "TOOLRANK_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The events topic.
    #[arg(long, env = "TOOLRANK_TOPIC", default_value = "toolrank-events")]
    topic: String,
    /// The consumer group.
    #[arg(long, env = "TOOLRANK_GROUP", default_value = "toolrank")]
    group: String,
    /// The dead-letter topic.
    #[arg(long, env = "TOOLRANK_DEAD_LETTER_TOPIC", default_value = "toolrank-dead-letters")]
    dead_letter_topic: String,
    /// Exit after SECS without a new message (tests, batch use).
    #[arg(long, value_name = "SECS")]
    until_idle: Option<f64>,
    /// Milliseconds between Valkey writes (changes are coalesced per key in between).
    #[arg(long, default_value_t = 50, env = "TOOLRANK_FLUSH_MS")]
    flush_ms: u64,
    /// Milliseconds between DynamoDB writes: each key is written at most once per
    /// interval, whatever its number of changes (DynamoDB bills per write).
    #[arg(long, default_value_t = 1000, env = "TOOLRANK_DYNAMODB_FLUSH_MS")]
    dynamodb_flush_ms: u64,
    /// Seconds between checkpoints of partition state (a restart replays at most this much).
    #[arg(long, default_value_t = 5.0, env = "TOOLRANK_CHECKPOINT_SECS")]
    checkpoint_secs: f64,
    /// Seconds the sink lease lasts without renewal (how soon another consumer takes
    /// over the sinks from a dead one).
    #[arg(long, default_value_t = 5.0)]
    lease_secs: f64,
    /// This consumer's identity (default: host and process id).
    #[arg(long, env = "TOOLRANK_CONSUMER_ID")]
    id: Option<String>,
    #[command(flatten)]
    sinks: SinkArgs,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let Source::Kafka(a) = args.source;
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(stop.clone());
    let owner = a.id.unwrap_or_else(|| format!("{}-{}", std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()), std::process::id()));
    let config = toolrank_consume_kafka::Config {
        brokers: a.brokers,
        topic: a.topic,
        group: a.group,
        dead_letter_topic: a.dead_letter_topic,
        until_idle: a.until_idle.map(Duration::from_secs_f64),
        flush_interval: Duration::from_millis(a.flush_ms),
        dynamodb_interval: Duration::from_millis(a.dynamodb_flush_ms),
        checkpoint_interval: Duration::from_secs_f64(a.checkpoint_secs),
        state_table: a.sinks.state_table.clone(),
        table: (!a.sinks.no_dynamodb).then(|| a.sinks.table.clone()),
        valkey_url: (!a.sinks.no_valkey).then(|| a.sinks.valkey_url.clone()),
        valkey_prefix: a.sinks.namespace.clone(),
        today: a.sinks.today()?,
        owner,
        lease: Duration::from_secs_f64(a.lease_secs),
    };
    let s = toolrank_consume_kafka::run(config, stop)?;
    eprintln!(
        "consumed {} messages: {} changes, {} stale, {} ignored, {} redeliveries skipped, {} dead-lettered; {} checkpoints, {} sink writes ({} DynamoDB requests, {} Valkey commands)",
        s.messages, s.changes, s.stale, s.ignored, s.skipped_redeliveries, s.dead_letters, s.checkpoints, s.sink_writes, s.dynamodb_requests, s.valkey_commands
    );
    if let (Some(p50), Some(p99), Some(max)) = (s.latency_p50_ms, s.latency_p99_ms, s.latency_max_ms) {
        eprintln!("latency from produce to visible in the sinks: p50 {p50} ms, p99 {p99} ms, max {max} ms");
    }
    if s.retried_errors > 0 {
        eprintln!("{} sink, checkpoint or lease errors were retried", s.retried_errors);
    }
    Ok(ExitCode::SUCCESS)
}

/// Sets `stop` on SIGINT or SIGTERM.
fn watch_signals(stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        rt.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        stop.store(true, Ordering::Relaxed);
    });
}
