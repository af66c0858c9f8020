//! `toolrank consume kafka|dynamodb-streams|kinesis`: the live pipeline.

use crate::sinks::SinkArgs;
use anyhow::Result;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Consume history continuously and keep the rankings in DynamoDB and Valkey exact.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    shutdown: crate::signals::ShutdownArgs,
    #[command(subcommand)]
    source: Source,
}

#[derive(clap::Subcommand)]
enum Source {
    Kafka(KafkaArgs),
    DynamodbStreams(StreamsArgs),
    Kinesis(KinesisArgs),
}

/// Poll the DynamoDB stream of the table (the Streams API), sharing its shards with the
/// other pollers of the same --application.
///
/// Shards are grouped into lineages (a shard and the children that continue its keys);
/// each lineage has a lease in the state table and its engine state checkpointed with
/// its shards' sequence numbers, so a poller killed at any moment loses nothing and
/// counts nothing twice: another takes its lineages over when their leases lapse.
/// Parents are read before children. The pipeline's own writes to the table come back
/// on the stream and change nothing. Bad records go to --dead-letter-file.
///
///   eval "$(infra/local/up)" && toolrank setup
///   toolrank produce --to dynamodb examples/seed-sample.jsonl
///   toolrank consume dynamodb-streams --table AgentTable --until-idle 5
///   toolrank top agents --domain DMN001
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
struct StreamsArgs {
    /// The table whose stream is read (its latest stream).
    #[arg(long, env = "TOOLRANK_SOURCE_TABLE", default_value = "AgentTable")]
    source_table: String,
    #[command(flatten)]
    poller: PollerArgs,
}

/// Poll a Kinesis data stream that receives the table's changes (Kinesis Data Streams
/// for DynamoDB), with the same lineages, leases and checkpoints as dynamodb-streams.
///
/// Kinesis records of DynamoDB carry no stream sequence number and may repeat or arrive
/// out of order for one item: they are ordered by ApproximateCreationDateTime, so set
/// the table's Kinesis destination to MICROSECOND precision.
///
///   toolrank consume kinesis --stream agent-table-changes --until-idle 5
#[derive(clap::Args)]
struct KinesisArgs {
    /// The Kinesis stream name.
    #[arg(long, env = "TOOLRANK_KINESIS_STREAM")]
    stream: String,
    #[command(flatten)]
    poller: PollerArgs,
}

/// How often the DynamoDB sink writes: what its rankings cost.
#[derive(clap::Args)]
struct DynamoDbPacing {
    /// Milliseconds between DynamoDB writes: each key is written at most once per
    /// interval, whatever its number of changes (DynamoDB bills per write).
    #[arg(long, default_value_t = 1000, env = "TOOLRANK_DYNAMODB_FLUSH_MS")]
    dynamodb_flush_ms: u64,
    /// While a backlog is read (the input has not run dry for a second), DynamoDB writes
    /// wait as long as its records are late, up to this many milliseconds: intermediate
    /// rankings that are stale anyway are not paid for. 0 writes at every interval. Also
    /// the longest a write waits for --dynamodb-writes-per-event.
    #[arg(long, default_value_t = 60_000, env = "TOOLRANK_DYNAMODB_MAX_DEFER_MS")]
    dynamodb_max_defer_ms: u64,
    /// A write budget: a DynamoDB write waits (checked after 1, 2, 4, ... intervals, at
    /// most --dynamodb-max-defer-ms) until it writes at most this many items per event
    /// read since the last write. At a steady rate each interval rewrites the agents and
    /// recommended patterns touched in it (about 0.13 items/event at 5,000 events/s on the
    /// generated workload); waiting lets hot keys coalesce. Valkey stays live either way.
    /// 0: every interval.
    #[arg(long, value_name = "ITEMS", default_value_t = 0.05, value_parser = items_per_event, env = "TOOLRANK_DYNAMODB_WRITES_PER_EVENT")]
    dynamodb_writes_per_event: f64,
    /// Write capacity units per second the DynamoDB sink may spend (one per item written;
    /// its items are under 1 KB), e.g. a provisioned table's share for the rankings: a
    /// large round is spread out instead of bursting (and being throttled). Default: no
    /// limit. Valkey is not held back.
    #[arg(long, value_name = "WCU", value_parser = crate::args::rate, env = "TOOLRANK_DYNAMODB_MAX_WCU")]
    dynamodb_max_wcu: Option<f64>,
}

/// How often the engine state is saved with the input positions it covers.
#[derive(clap::Args)]
struct Checkpointing {
    /// Seconds between checkpoints of the engine state (per partition or shard lineage,
    /// with its input position): a restart replays at most this much once caught up.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = crate::args::seconds, env = "TOOLRANK_CHECKPOINT_SECS")]
    checkpoint_secs: f64,
    /// While a backlog is read, checkpoints wait as long as its records are late, up to
    /// this many seconds: a catch-up's state grows fast and each save carries most of
    /// it, so saving every --checkpoint-secs would write it many times over (over twice
    /// the state table's write units on bench/stream.sh's backlog). A restart during a
    /// catch-up replays up to this much. At most --checkpoint-secs: no stretching.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = crate::args::seconds, env = "TOOLRANK_CHECKPOINT_MAX_SECS")]
    checkpoint_max_secs: f64,
}

impl Checkpointing {
    fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.checkpoint_secs)
    }

    fn max(&self) -> Duration {
        Duration::from_secs_f64(self.checkpoint_max_secs)
    }
}

/// How long the engine state remembers removed items.
#[derive(clap::Args)]
struct Retention {
    /// Seconds a removed item's tombstone is kept: within them, a late copy of an older
    /// record of the item (a redelivery) is refused; after them it would count again.
    /// Set it to at least the input's redelivery window: DynamoDB Streams keep records
    /// 24 h, Kinesis its retention, Kafka the topic's retention where producers re-send.
    /// State memory is the live items plus the removals of this window.
    #[arg(long, value_name = "SECS", default_value_t = toolrank_live::DEFAULT_TOMBSTONE_HORIZON.as_secs(), env = "TOOLRANK_TOMBSTONE_HORIZON_SECS")]
    tombstone_horizon_secs: u64,
}

impl Retention {
    fn horizon(&self) -> Duration {
        Duration::from_secs(self.tombstone_horizon_secs)
    }
}

/// A finite, non-negative number of items per event.
fn items_per_event(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("expected a number of items per event, 0 or more, not {s:?}")),
    }
}

impl DynamoDbPacing {
    fn interval(&self) -> Duration {
        Duration::from_millis(self.dynamodb_flush_ms)
    }

    fn max_defer(&self) -> Duration {
        Duration::from_millis(self.dynamodb_max_defer_ms)
    }

    fn writes_per_event(&self) -> Option<f64> {
        (self.dynamodb_writes_per_event > 0.0).then_some(self.dynamodb_writes_per_event)
    }
}

/// The flags every live consumer shares: pacing, checkpoints, retention, sinks.
#[derive(clap::Args)]
struct LiveArgs {
    /// Exit after SECS without a new record, once the whole input is read: every
    /// partition or shard, by this consumer or the others of its group (tests, batch use).
    #[arg(long, value_name = "SECS", value_parser = crate::args::seconds)]
    until_idle: Option<f64>,
    /// Milliseconds between Valkey writes (changes are coalesced per key in between).
    #[arg(long, default_value_t = 20, env = "TOOLRANK_FLUSH_MS")]
    flush_ms: u64,
    #[command(flatten)]
    dynamodb: DynamoDbPacing,
    #[command(flatten)]
    retention: Retention,
    #[command(flatten)]
    checkpoints: Checkpointing,
    /// This consumer's identity in leases and checkpoints (default: host, process id and
    /// start time, unique per start).
    #[arg(long, env = "TOOLRANK_CONSUMER_ID")]
    id: Option<String>,
    /// Records larger than this many bytes are dead-lettered before they are decoded
    /// (default: DynamoDB's item limit, 400 KB).
    #[arg(long, value_name = "BYTES", env = "TOOLRANK_MAX_RECORD_BYTES", default_value_t = toolrank_live::DEFAULT_MAX_RECORD_BYTES)]
    max_record_bytes: usize,
    /// When a partition's or shard's input no longer holds what follows its checkpoint
    /// (retention deleted records before they were read; the input ends before the
    /// checkpoint): `stop` stops that unit with an error naming it (the others go on;
    /// with --until-idle the consumer then exits non-zero), `skip` reads on from the
    /// oldest record the input holds, logging and counting what was skipped
    /// (toolrank_source_gaps_total).
    #[arg(long, value_name = "POLICY", env = "TOOLRANK_ON_GAP", default_value = "stop", value_parser = ["stop", "skip"])]
    on_gap: String,
    /// Splits the sink stage into N shards by user, each written by whichever consumer
    /// holds its lease, so that the sink writes and the rankings' memory spread over the
    /// group (docs/architecture.md, *Capacity*). Every consumer of a group must use the
    /// same N.
    #[arg(long, value_name = "N", env = "TOOLRANK_SINK_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    sink_shards: u32,
    #[command(flatten)]
    sinks: SinkArgs,
}

impl LiveArgs {
    /// The shared settings, with leases lasting `lease`, and each sink shard's sinks.
    fn config(self, lease: Duration) -> Result<(toolrank_live::LiveConfig, Vec<Vec<toolrank_live::Wired>>)> {
        let target = crate::namespace::target(&self.sinks);
        let sinks = toolrank_sink_wiring::SinkSettings {
            table: (!self.sinks.no_dynamodb).then(|| self.sinks.table.clone()),
            dynamodb_namespace: target.dynamodb,
            dynamodb_interval: self.dynamodb.interval(),
            dynamodb_max_defer: self.dynamodb.max_defer(),
            dynamodb_writes_per_event: self.dynamodb.writes_per_event(),
            dynamodb_max_wcu: self.dynamodb.dynamodb_max_wcu,
            valkey_url: (!self.sinks.no_valkey).then(|| self.sinks.valkey_url.clone()),
            valkey_prefix: target.name,
        };
        let live = toolrank_live::LiveConfig {
            writer: toolrank_live::WriterConfig {
                state_table: self.sinks.state_table.clone(),
                today: self.sinks.today()?,
                owner: self.id.unwrap_or_else(|| toolrank_live::unique_owner(&std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()))),
                lease,
                tombstone_horizon: self.retention.horizon(),
            },
            pacing: toolrank_live::Pacing {
                until_idle: self.until_idle.map(Duration::from_secs_f64),
                flush_interval: Duration::from_millis(self.flush_ms),
                checkpoint_interval: self.checkpoints.interval(),
                checkpoint_max: self.checkpoints.max(),
            },
            max_record_bytes: self.max_record_bytes,
            on_gap: self.on_gap.parse().map_err(anyhow::Error::msg)?,
        };
        Ok((live, sinks.wire_shards(self.sink_shards)?))
    }
}

#[derive(clap::Args)]
struct PollerArgs {
    /// The application: pollers with the same name share the shards (and one state).
    #[arg(long, env = "TOOLRANK_APPLICATION", default_value = "toolrank")]
    application: String,
    /// Seconds between reads of the shard listing (new shards, splits).
    #[arg(long, default_value_t = 10.0, value_parser = crate::args::seconds)]
    discover_secs: f64,
    /// Milliseconds to wait after a round of reads that found nothing (DynamoDB Streams
    /// allows about 5 reads per second per shard).
    #[arg(long, default_value_t = 250)]
    idle_poll_ms: u64,
    /// Seconds a lease (lineage or sink) lasts without renewal: how soon a dead poller's
    /// work is taken over.
    #[arg(long, default_value_t = 10.0, value_parser = crate::args::seconds)]
    lease_secs: f64,
    /// Rejected records, one JSON line each (reason, shard, sequence number, record).
    #[arg(long, env = "TOOLRANK_DEAD_LETTER_FILE", default_value = "toolrank-dead-letters.jsonl")]
    dead_letter_file: std::path::PathBuf,
    /// Send rejected records to this SQS queue (URL) instead of the file: whole, with
    /// message attributes toolrank-reason, toolrank-position (the sequence number) and
    /// toolrank-source. A letter the queue does not take is sent again before the poller
    /// reads past its record.
    #[arg(long, env = "TOOLRANK_DEAD_LETTER_QUEUE_URL")]
    dead_letter_queue_url: Option<String>,
    #[command(flatten)]
    live: LiveArgs,
}

impl PollerArgs {
    fn config(self) -> Result<(toolrank_consume_streams::Config, Vec<Vec<toolrank_live::Wired>>)> {
        let (live, sinks) = self.live.config(Duration::from_secs_f64(self.lease_secs))?;
        let config = toolrank_consume_streams::Config {
            application: self.application,
            discover_interval: Duration::from_secs_f64(self.discover_secs),
            idle_poll: Duration::from_millis(self.idle_poll_ms),
            dead_letter_file: self.dead_letter_file,
            dead_letter_queue_url: self.dead_letter_queue_url,
            live,
        };
        Ok((config, sinks))
    }
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
#[command(verbatim_doc_comment)]
struct KafkaArgs {
    #[command(flatten)]
    kafka: crate::kafka_connection::ConnectionArgs,
    /// The events topic.
    #[arg(long, env = "TOOLRANK_TOPIC", default_value = "toolrank-events")]
    topic: String,
    /// The consumer group.
    #[arg(long, env = "TOOLRANK_GROUP", default_value = "toolrank")]
    group: String,
    /// The dead-letter topic.
    #[arg(long, env = "TOOLRANK_DEAD_LETTER_TOPIC", default_value = "toolrank-dead-letters")]
    dead_letter_topic: String,
    /// Milliseconds a fetch that finds nothing new waits on the broker. Kafka answers as
    /// soon as records arrive, so this only paces idle polling there; brokers that answer
    /// at the deadline (tansu) add it to every record's latency.
    #[arg(long, value_name = "MS", default_value_t = toolrank_kafka::FETCH_WAIT_MS, value_parser = clap::value_parser!(u64).range(1..=60_000), env = "TOOLRANK_FETCH_WAIT_MS")]
    fetch_wait_ms: u64,
    /// Seconds the sink lease lasts without renewal (how soon another consumer takes
    /// over the sinks from a dead one).
    #[arg(long, default_value_t = 5.0, value_parser = crate::args::seconds)]
    lease_secs: f64,
    #[command(flatten)]
    live: LiveArgs,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let stop = args.shutdown.watch();
    let summary = match args.source {
        Source::Kafka(a) => kafka(a, stop)?,
        Source::DynamodbStreams(a) => {
            let (config, sinks) = a.poller.config()?;
            let sdk = toolrank_consume_streams::sdk_config();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let source = rt.block_on(toolrank_consume_streams::dynamodb_streams::DynamoStreams::of_table(&sdk, &a.source_table))?;
            toolrank_consume_streams::run(config, source, sinks, &stop)?
        }
        Source::Kinesis(a) => {
            let (config, sinks) = a.poller.config()?;
            let source = toolrank_consume_streams::kinesis::Kinesis::new(&toolrank_consume_streams::sdk_config(), a.stream);
            toolrank_consume_streams::run(config, source, sinks, &stop)?
        }
    };
    print_summary(&summary);
    Ok(ExitCode::SUCCESS)
}

fn kafka(a: KafkaArgs, stop: Arc<AtomicBool>) -> Result<toolrank_live::Summary> {
    let (live, sinks) = a.live.config(Duration::from_secs_f64(a.lease_secs))?;
    let config = toolrank_consume_kafka::Config {
        kafka: a.kafka.connect()?,
        topic: a.topic,
        group: a.group,
        dead_letter_topic: a.dead_letter_topic,
        fetch_wait: Duration::from_millis(a.fetch_wait_ms),
        live,
    };
    Ok(toolrank_consume_kafka::run(config, sinks, stop)?)
}

fn print_summary(s: &toolrank_live::Summary) {
    note!(
        "consumed {} messages: {} changes, {} stale, {} ignored, {} redeliveries skipped, {} dead-lettered; {} checkpoints, {} sink writes ({} DynamoDB requests in {} rounds, {} Valkey commands); {} state table writes",
        s.messages, s.changes, s.stale, s.ignored, s.skipped_redeliveries, s.dead_letters, s.checkpoints, s.sink_writes, s.dynamodb_requests, s.dynamodb_rounds, s.valkey_commands, s.state_writes
    );
    let st = &s.state;
    if st.sessions > 0 {
        note!(
            "state held at the last checkpoint: {} live executions in {} sessions, {} tombstones; ~{:.1} MB",
            st.live_rows,
            st.sessions,
            st.tombstones,
            st.heap_bytes as f64 / 1e6
        );
    }
    if s.tombstones_expired > 0 {
        note!("{} tombstones of removed items expired (--tombstone-horizon-secs)", s.tombstones_expired);
    }
    if s.names_collected > 0 {
        note!("{} interned names nothing referred to any more were forgotten", s.names_collected);
    }
    note!("write capacity units consumed: DynamoDB sink {:.0}, state table {:.0}", s.dynamodb_write_units, s.state_write_units);
    note!(
        "waited on: DynamoDB sink {:.1} s, Valkey sink {:.1} s, checkpoints {:.1} s",
        s.dynamodb_ms as f64 / 1e3,
        s.valkey_ms as f64 / 1e3,
        s.checkpoint_ms as f64 / 1e3
    );
    if s.read_ms > 0 || s.finish_ms > 0 {
        note!(
            "read for {:.1} s (first record applied to last), exit took {:.1} s (last checkpoint, then the sinks)",
            s.read_ms as f64 / 1e3,
            s.finish_ms as f64 / 1e3
        );
    }
    if let (Some(p50), Some(p99), Some(max)) = (s.latency_p50_ms, s.latency_p99_ms, s.latency_max_ms) {
        note!("latency from produce to visible in the sinks: p50 {p50} ms, p99 {p99} ms, max {max} ms");
    }
    if let (Some(p50), Some(p99)) = (s.own_latency_p50_ms, s.own_latency_p99_ms) {
        note!("  of which in toolrank, from reading a record to visible: p50 {p50} ms, p99 {p99} ms");
    }
    if s.retried_errors > 0 {
        note!("{} sink, checkpoint or lease errors were retried", s.retried_errors);
    }
}
