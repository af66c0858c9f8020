//! `toolrank backfill`: the table's current contents onto the events topic, or into the
//! Lambda function's bucket logs.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use toolrank_backfill::{export, scan, Kafka, Progress, Run, Sender, Target};
use toolrank_dead_letters::DeadLetters;
use toolrank_dynamodb::Limiter;
use toolrank_state::CheckpointStore;

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
/// With --target lambda the copies go into the Lambda function's bucket logs instead
/// (the handler's own bucketing, --application and --buckets as the function's
/// TOOLRANK_APPLICATION and TOOLRANK_BUCKETS; TOOLRANK_COMPACT_BYTES and
/// TOOLRANK_TOMBSTONE_HORIZON_SECS are read as the function reads them, so set them as
/// the function has them), beside the running function: a Lambda
/// deployment becomes exact without Kafka. The function's next sink write (any
/// invocation once its interval is up, or the scheduled flush) shows them.
///
/// Incremental exports (lines with Metadata.WriteTimestampMicros) are changes at their
/// write time: give the full export first, then the incremental ones, in order.
///
///   toolrank backfill --from dynamodb --table AgentTable --segments 8 --max-rcu 500
///   toolrank backfill --from export ./AWSDynamoDB/01234-abcd/
///   toolrank backfill --from export s3://my-bucket/exports/AWSDynamoDB/01234-abcd/
///   toolrank consume kafka --topic toolrank-events --group rankings
///   toolrank backfill --from dynamodb --table AgentTable --target lambda --application toolrank
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
    #[command(flatten)]
    kafka: crate::kafka_connection::ConnectionArgs,
    #[command(flatten)]
    shutdown: crate::signals::ShutdownArgs,
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
    /// Where the items go: the events topic, or the Lambda function's bucket logs.
    #[arg(long, value_enum, default_value = "kafka")]
    target: TargetArg,
    /// The function's TOOLRANK_APPLICATION (--target lambda).
    #[arg(long, env = "TOOLRANK_APPLICATION", default_value = "lambda")]
    application: String,
    /// The function's TOOLRANK_BUCKETS (--target lambda): the items hash into its buckets.
    #[arg(long, env = "TOOLRANK_BUCKETS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    buckets: u32,
    /// Records per append to a bucket log (--target lambda), like a batch of the function.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    lambda_batch: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TargetArg {
    /// The events topic (--brokers, --topic): the Kafka consumers apply the copies.
    Kafka,
    /// The Lambda function's bucket logs in the state table.
    Lambda,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum From {
    /// A parallel Scan of --table.
    Dynamodb,
    /// A DynamoDB export (manifest + gzip data files), on disk or in S3.
    Export,
}

pub fn run(args: Args) -> Result<ExitCode> {
    match args.target {
        TargetArg::Kafka => {
            let kafka = args.kafka.connect()?;
            backfill(args, move |args| Kafka { kafka: kafka.clone(), topic: args.topic.clone() })
        }
        TargetArg::Lambda => {
            let buckets = Buckets::start(lambda_config(&args)?, args.lambda_batch as usize);
            backfill(args, move |_| buckets.clone())
        }
    }
}

/// The function's own settings, read from the same environment variables as the function
/// (so its compaction size and tombstone horizon hold for the logs the backfill appends
/// to), with this backfill's application, state table and buckets, and no sinks: the
/// function writes them.
fn lambda_config(args: &Args) -> Result<toolrank_lambda::Config> {
    let mut settings = toolrank_lambda::Settings::from_env().map_err(|e| anyhow::anyhow!("the function's settings: {}", e.render()))?;
    settings.application.clone_from(&args.application);
    settings.state_table.clone_from(&args.state_table);
    settings.buckets = args.buckets;
    settings.table.clear();
    settings.valkey_url = None;
    settings.namespace = Some(String::new());
    Ok(settings.config())
}

fn backfill<T: Target>(args: Args, target: impl Fn(&Args) -> T) -> Result<ExitCode> {
    match args.from {
        From::Export => anyhow::ensure!(!args.paths.is_empty(), "--from export needs the export directory or files"),
        From::Dynamodb => anyhow::ensure!(args.paths.is_empty(), "--from dynamodb reads --table, not paths: {:?}", args.paths),
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let stop = args.shutdown.watch();
    let progress = Arc::new(Progress::default());
    let every = Duration::from_secs_f64(args.checkpoint_secs.max(0.01));
    let owner = format!("backfill-{}", std::process::id());
    let started = Instant::now();
    let client = rt.block_on(toolrank_dynamodb::client());
    rt.block_on(toolrank_state::create_state_table(&client, &args.state_table))?;
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
                target: target(&args),
                limiter: Limiter::new(args.max_rcu),
                run: Run { store, scope, owner, checkpoint_every: every, progress: &progress, stop: &stop },
            };
            let outcome = rt.block_on(job.run()).with_context(|| format!("backfilling from table {}", args.table))?;
            if outcome.done_before > 0 {
                note!("{} of {} segments were finished by an earlier run", outcome.done_before, args.segments);
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
                    note!("{url}: {} data files", objects.len());
                    export::Files::S3 { client, objects }
                }
                paths if paths.iter().any(|p| p.starts_with("s3://")) => bail!("name one S3 export at a time (s3://BUCKET/PREFIX), without local paths"),
                paths => export::Files::Local(toolrank_source_file::expand(paths)?),
            };
            let job = export::Job { files, run: Run { store, scope, owner, checkpoint_every: every, progress: &progress, stop: &stop } };
            let mut sender = target(&args).sender()?;
            let done = rt.block_on(job.run(&mut sender, &mut |letter| {
                if let Err(e) = dead.reject(&mut bad, letter) {
                    failed.get_or_insert(e);
                }
            }));
            rt.block_on(sender.finish())?;
            if let Some(e) = failed {
                return Err(e.into());
            }
            done.context("backfilling from the export")?
        }
    };
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let items = progress.items();
    note!(
        "backfilled {items} items {} in {secs:.1} s ({:.0} items/s, {:.1} read capacity units){}",
        match args.target {
            TargetArg::Kafka => format!("onto {}", args.topic),
            TargetArg::Lambda => format!("into the bucket logs of {} in {}", args.application, args.state_table),
        },
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
            store.save(&scope, owner, claimed.generation, "", &[], 0).await?;
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
            Some(n) => ProgressBar::new(n as u64).with_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} items {per_sec} eta {eta}").expect("valid template"),
            ),
            None => ProgressBar::new_spinner()
                .with_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {pos} items {per_sec}").expect("valid template")),
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
            toolrank_metrics::describe_counter!("toolrank_backfill_read_capacity_units_total", "Read capacity units the Scan consumed (whole units).");
            toolrank_metrics::counter!("toolrank_backfill_read_capacity_units_total").absolute(progress.rcu().round() as u64);
            if hidden && last_log.elapsed() >= Duration::from_secs(10) {
                tracing::info!(items = progress.items(), rcu = progress.rcu(), "backfilling");
                last_log = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    bar
}

/// The Lambda function's bucket logs as a backfill target: a thread runs the function's
/// own handler (its bucketing, appends, lost races and compactions) on batches of base
/// copies, as if the stream delivered them; each sender buffers a batch.
#[derive(Clone)]
struct Buckets {
    jobs: std::sync::mpsc::Sender<Append>,
    batch: usize,
}

/// An event of base copies for the handler, and where its outcome goes.
type Append = (Vec<u8>, tokio::sync::oneshot::Sender<Result<toolrank_lambda::Outcome, String>>);

impl Buckets {
    fn start(config: toolrank_lambda::Config, batch: usize) -> Buckets {
        let (jobs, queue) = std::sync::mpsc::channel::<Append>();
        std::thread::spawn(move || {
            let mut handler = toolrank_lambda::Handler::new(config).map_err(|e| e.to_string());
            for (event, reply) in queue {
                let _ = reply.send(handler.as_mut().map_err(|e| e.clone()).and_then(|h| h.handle(&event)));
            }
        });
        Buckets { jobs, batch }
    }
}

struct BucketSender {
    buckets: Buckets,
    records: Vec<u8>,
    count: usize,
}

impl Target for Buckets {
    type Sender = BucketSender;
    fn sender(&self) -> Result<BucketSender, toolrank_backfill::Error> {
        Ok(BucketSender { buckets: self.clone(), records: Vec::new(), count: 0 })
    }
}

impl BucketSender {
    /// Appends the buffered records to the bucket logs, retrying (with backoff) from a
    /// failure: what was appended before is stale on a retry.
    async fn append(&mut self) -> Result<(), toolrank_backfill::Error> {
        if self.count == 0 {
            return Ok(());
        }
        let mut event = Vec::with_capacity(self.records.len() + 16);
        event.extend_from_slice(b"{\"Records\":[");
        event.extend_from_slice(&self.records);
        event.extend_from_slice(b"]}");
        let mut backoff = toolrank_live::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        for attempt in 1.. {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let outcome = match self.buckets.jobs.send((event.clone(), reply)) {
                Ok(()) => answer.await.unwrap_or_else(|_| Err("the bucket writer stopped".into())),
                Err(_) => Err("the bucket writer stopped".into()),
            };
            match outcome {
                Ok(o) if o.failures.is_empty() => break,
                Ok(_) if attempt < 20 => tracing::warn!(attempt, "a bucket log could not be appended to; retrying"),
                Err(e) if attempt < 20 => tracing::warn!(attempt, error = %e, "appending to the bucket logs failed; retrying"),
                Ok(_) => return Err(toolrank_backfill::Error::Input("the bucket logs could not be appended to after 20 attempts".into())),
                Err(e) => return Err(toolrank_backfill::Error::Input(format!("appending to the bucket logs: {e}"))),
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
        self.records.clear();
        self.count = 0;
        Ok(())
    }
}

impl Sender for BucketSender {
    async fn send(&mut self, _key: Option<&str>, record: &[u8]) -> Result<(), toolrank_backfill::Error> {
        if self.count > 0 {
            self.records.push(b',');
        }
        self.records.extend_from_slice(record);
        self.count += 1;
        if self.count >= self.buckets.batch {
            self.append().await?;
        }
        Ok(())
    }
    async fn settle(&mut self) -> Result<(), toolrank_backfill::Error> {
        self.append().await
    }
    async fn finish(mut self) -> Result<u64, toolrank_backfill::Error> {
        self.append().await?;
        Ok(0)
    }
}
