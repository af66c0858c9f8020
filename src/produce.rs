//! `toolrank produce`: history into Kafka or into the DynamoDB table.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use toolrank_generate::{generate, Config, Style};
use toolrank_source_file::{expand, LineReader};

/// Publish history records to Kafka, or write them into the DynamoDB table.
///
/// Inputs are replay-format files (any format `toolrank replay` reads; a Lambda event
/// line is split into its records). Each Kafka record is keyed by the PK of the item it
/// changes (user#session for executions), so one session stays in one partition, in
/// order. Lines that do not decode are still published, unkeyed, so that consumers
/// dead-letter them. With --to dynamodb each record becomes the PutItem, UpdateItem or
/// DeleteItem an agent application would make, and bad lines are refused.
///
/// Examples:
///   toolrank produce --topic toolrank-events examples/seed-sample.jsonl
///   toolrank produce --generate --sessions 10000 --rate 5000 --seed 7
///   toolrank produce --to dynamodb --table AgentTable history.jsonl
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Where records go.
    #[arg(long, value_enum, default_value = "kafka")]
    to: Target,
    #[command(flatten)]
    kafka: crate::kafka_connection::ConnectionArgs,
    /// Kafka topic.
    #[arg(long, env = "TOOLRANK_TOPIC", default_value = "toolrank-events")]
    topic: String,
    /// DynamoDB table (with --to dynamodb).
    #[arg(long, env = "TOOLRANK_TABLE", default_value = "AgentTable")]
    table: String,
    /// At most this many records per second (0: as fast as possible).
    #[arg(long, default_value_t = 0.0, value_parser = crate::args::rate)]
    rate: f64,
    /// Generate a synthetic workload (stream records with modifies, removes,
    /// redeliveries and late Agent items) instead of reading files.
    #[arg(long)]
    generate: bool,
    /// Sessions to generate.
    #[arg(long, default_value_t = 1000, requires = "generate")]
    sessions: u64,
    /// Seed of the generated workload.
    #[arg(long, default_value_t = 1, requires = "generate")]
    seed: u64,
    /// Remove each generated session's executions by TTL once N later sessions were
    /// published (see `toolrank generate --ttl-after`): a stream of any length whose
    /// live items stay a sliding window.
    #[arg(long, value_name = "N", requires = "generate")]
    ttl_after: Option<u64>,
    /// Input files, export directories, or - for stdin.
    #[arg(value_name = "FILE|DIR|-", required_unless_present = "generate")]
    inputs: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Target {
    Kafka,
    Dynamodb,
}

/// The key and stream sequence number of each record of a line that has one, in the
/// order of [`toolrank_dynamodb::write_ops`].
fn sequenced_keys(line: &[u8]) -> Vec<Option<((String, String), u128)>> {
    let mut keys = Vec::new();
    let _ = toolrank_events::decode_line(line, &mut |rec| {
        keys.push(rec.result.ok().and_then(|c| Some(((c.pk.into_owned(), c.sk.into_owned()), c.seq?))));
    });
    keys
}

/// Paces a loop to `rate` iterations per second.
struct Pacer {
    rate: f64,
    start: Instant,
    n: u64,
}

impl Pacer {
    async fn tick(&mut self) {
        self.n += 1;
        if self.rate > 0.0 {
            let due = Duration::from_secs_f64(self.n as f64 / self.rate);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

enum Sink {
    Kafka(toolrank_kafka::Publisher),
    Dynamodb(aws_sdk_dynamodb::Client),
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.generate && !args.inputs.is_empty() {
        bail!("give either --generate or input files, not both");
    }
    let mut readers = Vec::new();
    if args.generate {
        let (reader, writer) = std::io::pipe()?;
        let cfg = Config { sessions: args.sessions, seed: args.seed, ttl_after: args.ttl_after, ..Config::default() };
        std::thread::spawn(move || generate(&cfg, Style::Stream, writer));
        readers.push(LineReader::from_read("generated".into(), Box::new(reader), Arc::default())?);
    } else {
        for input in expand(&args.inputs)? {
            readers.push(LineReader::open(&input, Arc::default())?);
        }
    }
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut sink = match args.to {
            Target::Kafka => Sink::Kafka(toolrank_kafka::Publisher::new(&args.kafka.connect()?, &args.topic)?),
            Target::Dynamodb => Sink::Dynamodb(toolrank_dynamodb::client().await),
        };
        let mut pacer = Pacer { rate: args.rate, start: Instant::now(), n: 0 };
        let (mut written, mut unkeyed, mut refused, mut stale) = (0u64, 0u64, 0u64, 0u64);
        // The last stream sequence number written per key: an application never writes
        // an older version of an item, so redelivered or reordered records are skipped.
        let mut latest: HashMap<(String, String), u128> = HashMap::new();
        for mut reader in readers {
            let source = reader.name().to_owned();
            while let Some((line_no, line)) = reader.next_line()? {
                match &mut sink {
                    Sink::Kafka(publisher) => {
                        for (key, payload) in toolrank_kafka::records(line) {
                            pacer.tick().await;
                            unkeyed += u64::from(key.is_none());
                            publisher.send(key.as_deref(), &payload).await?;
                            written += 1;
                        }
                    }
                    Sink::Dynamodb(client) => match toolrank_dynamodb::write_ops(line) {
                        Ok(ops) => {
                            for (op, key) in ops.into_iter().zip(sequenced_keys(line)) {
                                if let Some((key, seq)) = key {
                                    if latest.get(&key).is_some_and(|&last| seq <= last) {
                                        stale += 1;
                                        continue;
                                    }
                                    latest.insert(key, seq);
                                }
                                pacer.tick().await;
                                toolrank_dynamodb::write(client, &args.table, op).await.with_context(|| format!("{source}:{line_no}"))?;
                                written += 1;
                            }
                        }
                        Err(e) => {
                            refused += 1;
                            tracing::warn!(position = %format!("{source}:{line_no}"), reason = %e, "not writing a bad record");
                        }
                    },
                }
            }
        }
        let mut resent = 0;
        if let Sink::Kafka(publisher) = sink {
            resent = publisher.finish().await?.1;
        }
        let secs = pacer.start.elapsed().as_secs_f64();
        let target = match args.to {
            Target::Kafka => format!("kafka topic {}", args.topic),
            Target::Dynamodb => format!("dynamodb table {}", args.table),
        };
        note!(
            "produced {written} records to {target} in {secs:.2} s ({:.0}/s); {unkeyed} unkeyed (undecodable), {refused} refused, {resent} sent again after a failed delivery",
            written as f64 / secs.max(1e-9)
        );
        if stale > 0 {
            note!("{stale} stream records older than one already written for their key were skipped");
        }
        Ok(ExitCode::SUCCESS)
    })
}
