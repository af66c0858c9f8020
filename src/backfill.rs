//! `toolrank backfill`: the table's current contents onto the events topic.

use crate::replay::DeadLetters;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use toolrank_backfill::{export, scan, Progress, Run};
use toolrank_dynamodb::{CheckpointStore, Limiter};

/// Build the rankings from a table's current contents (a parallel Scan) or from a DynamoDB
/// export, beside the live pipeline.
///
/// Every item is published onto the events topic as a *base copy*: a stream record with
/// sequence number 0, keyed by its PK like every record. The consumers apply a base copy
/// only to a key they hold nothing for, and every live change outranks it, so a backfill
/// and `consume kafka` can start in any order and the result after both equals `replay` of
/// the table's final state: nothing counted twice or missed at the hand-over.
///
/// Progress is checkpointed in the state table (per Scan segment its LastEvaluatedKey,
/// per export its file and line) once the broker acknowledged what came before: a
/// backfill killed or stopped with SIGINT resumes there when run again with the same
/// --id (default: the table, or the export's first path). --restart starts over.
///
///   toolrank backfill --from dynamodb --table AgentTable --segments 8 --max-rcu 500
///   toolrank backfill --from export ./AWSDynamoDB/01234-abcd/
///   toolrank backfill --from export s3://my-bucket/exports/AWSDynamoDB/01234-abcd/
///   toolrank consume kafka --topic toolrank-events --group rankings
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Where the items come from.
    #[arg(long, value_enum)]
    from: From,
    /// The table to scan (--from dynamodb).
    #[arg(long, env = "TOOLRANK_SOURCE_TABLE", default_value = "AgentTable")]
    table: String,
    /// Parallel Scan segments (--from dynamodb): each has its own checkpoint.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    segments: u32,
    /// Read capacity units per second, across all segments (--from dynamodb; default: no
    /// limit; 0 too). Keeps a backfill from starving the application on a provisioned table.
    #[arg(long, value_parser = crate::args::rate)]
    max_rcu: Option<f64>,
    /// Items per Scan page (default: DynamoDB's 1 MB pages).
    #[arg(long)]
    page_items: Option<i32>,
    /// Export directory (with manifest-files.json) or export files (--from export); or
    /// one export in S3: s3://BUCKET/PREFIX (the export's folder, a prefix holding one
    /// export, its manifest-files.json or a data file), read file by file.
    paths: Vec<String>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "TOOLRANK_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The events topic the live consumers read.
    #[arg(long, env = "TOOLRANK_TOPIC", default_value = "toolrank-events")]
    topic: String,
    /// The pipeline's state table, where the checkpoints live.
    #[arg(long, env = "TOOLRANK_STATE_TABLE", default_value = "toolrank-state")]
    state_table: String,
    /// Names this backfill's checkpoints.
    #[arg(long)]
    id: Option<String>,
    /// Forget this backfill's checkpoints and start over.
    #[arg(long)]
    restart: bool,
    /// Seconds between checkpoints.
    #[arg(long, default_value_t = 1.0, value_parser = crate::args::seconds)]
    checkpoint_secs: f64,
    /// Append lines that are not export items here as JSON lines (--from export).
    #[arg(long, value_name = "FILE")]
    dead_letter: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum From {
    /// A parallel Scan of --table.
    Dynamodb,
    /// A DynamoDB export (manifest + gzip data files), on disk or in S3.
    Export,
}

pub fn run(args: Args) -> Result<ExitCode> {
    match args.from {
        From::Export => anyhow::ensure!(!args.paths.is_empty(), "--from export needs the export directory or files"),
        From::Dynamodb => anyhow::ensure!(args.paths.is_empty(), "--from dynamodb reads --table, not paths: {:?}", args.paths),
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let stop = Arc::new(AtomicBool::new(false));
    crate::consume::watch_signals(stop.clone());
    let progress = Arc::new(Progress::default());
    let every = Duration::from_secs_f64(args.checkpoint_secs.max(0.01));
    let owner = format!("backfill-{}", std::process::id());
    let started = Instant::now();
    let client = rt.block_on(toolrank_dynamodb::client());
    rt.block_on(toolrank_dynamodb::create_state_table(&client, &args.state_table))?;
    let store = CheckpointStore::new(client.clone(), args.state_table.clone());
    let bar = bar(&rt, &client, &args, progress.clone());
    let finished = match args.from {
        From::Dynamodb => {
            let id = args.id.clone().unwrap_or_else(|| format!("dynamodb/{}", args.table));
            let scope = format!("backfill/{id}/{}", args.segments);
            if args.restart {
                rt.block_on(forget(&store, &owner, (0..args.segments).map(|s| format!("{scope}/segment/{s}"))))?;
            }
            let job = scan::Job {
                client,
                table: args.table.clone(),
                segments: args.segments,
                page_items: args.page_items,
                brokers: args.brokers.clone(),
                topic: args.topic.clone(),
                limiter: Limiter::new(args.max_rcu),
                run: Run { store, scope, owner, checkpoint_every: every, progress: &progress, stop: &stop },
            };
            let outcome = rt.block_on(job.run()).with_context(|| format!("backfilling from table {}", args.table))?;
            if outcome.done_before > 0 {
                eprintln!("{} of {} segments were finished by an earlier run", outcome.done_before, args.segments);
            }
            outcome.done == args.segments
        }
        From::Export => {
            let id = args.id.clone().unwrap_or_else(|| format!("export/{}", args.paths[0]));
            let scope = format!("backfill/{id}");
            if args.restart {
                rt.block_on(forget(&store, &owner, [scope.clone()]))?;
            }
            let mut dead = DeadLetters::open(args.dead_letter.as_deref(), false)?;
            let (mut bad, mut failed) = (0, None);
            let files = match args.paths.as_slice() {
                [url] if url.starts_with("s3://") => {
                    let client = rt.block_on(toolrank_backfill::s3::client());
                    let objects = rt.block_on(toolrank_backfill::s3::export_objects(&client, url))?;
                    eprintln!("{url}: {} data files", objects.len());
                    export::Files::S3 { client, objects }
                }
                paths if paths.iter().any(|p| p.starts_with("s3://")) => bail!("name one S3 export at a time (s3://BUCKET/PREFIX), without local paths"),
                paths => export::Files::Local(toolrank_source_file::expand(paths)?),
            };
            let job = export::Job { files, run: Run { store, scope, owner, checkpoint_every: every, progress: &progress, stop: &stop } };
            let mut publisher = toolrank_kafka::Publisher::new(&args.brokers, &args.topic)?;
            let done = rt.block_on(job.run(&mut publisher, &mut |letter| {
                if let Err(e) = dead.reject(&mut bad, letter) {
                    failed.get_or_insert(e);
                }
            }));
            rt.block_on(publisher.finish())?;
            if let Some(e) = failed {
                return Err(e);
            }
            done.context("backfilling from the export")?
        }
    };
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let items = progress.items();
    eprintln!(
        "backfilled {items} items onto {} in {secs:.1} s ({:.0} items/s, {:.1} read capacity units){}",
        args.topic,
        items as f64 / secs.max(1e-9),
        progress.rcu(),
        if finished { "" } else { "; stopped before the end: run the same command again to resume" }
    );
    Ok(ExitCode::SUCCESS)
}

/// Resets checkpoints to the start (an empty position).
async fn forget(store: &CheckpointStore, owner: &str, scopes: impl IntoIterator<Item = String>) -> Result<()> {
    for scope in scopes {
        let claimed = store.claim(&scope, owner).await?;
        if claimed.position.is_some() {
            store.save(&scope, owner, claimed.generation, "", &[]).await?;
        }
    }
    Ok(())
}

/// A progress bar on a terminal: items, items/s and, for a Scan, the ETA from the table's
/// item count. Off a terminal, a log line every 10 s instead.
fn bar(rt: &tokio::runtime::Runtime, client: &aws_sdk_dynamodb::Client, args: &Args, progress: Arc<Progress>) -> ProgressBar {
    let total = match args.from {
        From::Dynamodb => rt.block_on(client.describe_table().table_name(&args.table).send()).ok().and_then(|t| t.table?.item_count).filter(|&n| n > 0),
        From::Export => None,
    };
    let bar = if std::io::stderr().is_terminal() {
        match total {
            Some(n) => ProgressBar::new(n as u64).with_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} items {per_sec} eta {eta}").expect("valid template")),
            None => ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {pos} items {per_sec}").expect("valid template")),
        }
    } else {
        ProgressBar::hidden()
    };
    let (shown, hidden) = (bar.clone(), bar.is_hidden());
    std::thread::spawn(move || {
        let mut last_log = Instant::now();
        while !shown.is_finished() {
            shown.set_position(progress.items());
            toolrank_metrics::job_progress("backfill", progress.items(), progress.dead_letters.load(std::sync::atomic::Ordering::Relaxed));
            toolrank_metrics::counter("toolrank_backfill_read_capacity_units_total", "Read capacity the Scan consumed.", &[]).set(progress.rcu());
            if hidden && last_log.elapsed() >= Duration::from_secs(10) {
                tracing::info!(items = progress.items(), rcu = progress.rcu(), "backfilling");
                last_log = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    bar
}
