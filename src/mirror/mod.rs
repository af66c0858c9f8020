//! `toolrank mirror`: the warehouse's copy of the table, from files or following a live
//! source (Zero-ETL's job, for where it is not set up).

mod kafka;
mod line;
mod streams;

use anyhow::{bail, Result};
use line::mirror_line;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use toolrank_dead_letters::DeadLetters;
use toolrank_source_file::{expand, LineReader};
use toolrank_warehouse::mirror::Mirror;
use toolrank_warehouse::DataApi;

/// Keep the warehouse's "AgentTable"("PK","SK","value") current, as Zero-ETL does: from
/// files (any replay format, gzip, export directories, - for stdin) or by following a
/// Kafka topic or the table's DynamoDB stream.
///
/// Every record is validated like everywhere else (bad ones go to --dead-letter, counted);
/// the item's whole image becomes "value", DynamoDB's typed JSON as Zero-ETL writes it.
/// Inserts, modifies and removes (TTL ones included) apply per key, the last write wins
/// and an older stream record than the one applied is ignored. Changes are applied in
/// batches, each one transaction with the source positions it covers: a restarted
/// --follow mirror resumes exactly where its last batch committed.
///
///   toolrank mirror examples/seed-sample.jsonl
///   toolrank mirror --follow kafka --topic toolrank-events --until-idle 5
///   toolrank mirror --follow dynamodb-streams --source-table AgentTable
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct MirrorArgs {
    #[command(flatten)]
    warehouse: crate::warehouse::WarehouseArgs,
    /// Follow a live source instead of reading files.
    #[arg(long, value_enum)]
    follow: Option<Follow>,
    /// The topic to follow (--follow kafka).
    #[arg(long, env = "TOOLRANK_TOPIC", default_value = "toolrank-events")]
    topic: String,
    #[command(flatten)]
    kafka: crate::kafka_connection::ConnectionArgs,
    /// The table whose stream is followed (--follow dynamodb-streams).
    #[arg(long, env = "TOOLRANK_SOURCE_TABLE", default_value = "AgentTable")]
    source_table: String,
    /// Exit after SECS without a new record (--follow; tests and batch use).
    #[arg(long, value_name = "SECS", value_parser = crate::args::seconds)]
    until_idle: Option<f64>,
    /// Append rejected records here as JSON lines.
    #[arg(long, value_name = "FILE")]
    dead_letter: Option<PathBuf>,
    /// Empty "AgentTable" (and the recorded positions) first: a new load rather than
    /// changes to the current table.
    #[arg(long)]
    fresh: bool,
    #[command(flatten)]
    shutdown: crate::signals::ShutdownArgs,
    /// Files to mirror, in order.
    inputs: Vec<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Follow {
    /// The topic's partitions, from the offsets the last batch recorded.
    Kafka,
    /// The table's DynamoDB stream, every shard, parents before children.
    DynamodbStreams,
}

pub fn mirror(args: MirrorArgs) -> Result<ExitCode> {
    let mut dead = DeadLetters::open(args.dead_letter.as_deref(), false)?;
    let rt = crate::warehouse::runtime()?;
    let api = rt.block_on(args.warehouse.connect())?;
    if args.fresh {
        rt.block_on(Mirror::clear(&api))?;
    }
    let started = Instant::now();
    let (mirror, bad) = match args.follow {
        None => {
            if args.inputs.is_empty() {
                bail!("nothing to mirror: name files (or - for stdin), or --follow a source");
            }
            mirror_files(&rt, &api, &args.inputs, &mut dead)?
        }
        Some(follow) => {
            let stop = args.shutdown.watch();
            match follow {
                Follow::Kafka => kafka::follow(&rt, &api, &args.kafka.connect()?, &args.topic, args.until_idle, &stop, &mut dead)?,
                Follow::DynamodbStreams => streams::follow(&rt, &api, &args.source_table, args.until_idle, &stop, &mut dead)?,
            }
        }
    };
    let s = mirror.stats;
    note!(
        "mirrored {} item writes and {} removes in {} batches ({} stale records ignored, {bad} rejected) in {:.1} s",
        s.items_written,
        s.items_removed,
        s.batches,
        s.stale,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn mirror_files(rt: &tokio::runtime::Runtime, api: &DataApi, inputs: &[String], dead: &mut DeadLetters) -> Result<(Mirror, u64)> {
    let inputs = expand(inputs)?;
    let mut mirror = rt.block_on(Mirror::open(api, "files"))?;
    let mut bad = 0;
    let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for input in &inputs {
        let mut reader = LineReader::open(input, read.clone())?;
        let name = reader.name().to_owned();
        while let Some((line_no, line)) = reader.next_line()? {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            mirror_line(&mut mirror, line, &name, line_no, dead, &mut bad)?;
            if mirror.full() {
                rt.block_on(mirror.flush(api))?;
            }
        }
    }
    rt.block_on(mirror.flush(api))?;
    Ok((mirror, bad))
}
