//! `toolrank replay`: files in, the seed's tables out, with no service at all.

use crate::output;
use crate::sinks::SinkArgs;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::cell::Cell;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;
use toolrank_dead_letters::DeadLetters;
use toolrank_engine::{Aggregates, Applied, Contributions, Engine, StateStats};
use toolrank_events::{decode_line, Action, Change, Day, DeadLetter, DecodeError, Entity, Format, Record};
use toolrank_source_file::{expand, Input, LineReader, SourceError};

/// Replay history files into the seed's tables.
///
/// Each line may be a DynamoDB export line ({"Item":{...}}), a bare typed item, a
/// DynamoDB stream record, a whole Lambda event ({"Records":[...]}) or a flat event;
/// the format is detected per line. Gzip is read transparently, a directory is read as a
/// DynamoDB export (manifest-files.json + data/), and - is stdin. Later lines win; stream
/// records are ordered per item by SequenceNumber, so duplicates and late redeliveries
/// change nothing.
///
/// Bad lines are skipped, counted and written to --dead-letter; the exit code stays 0
/// (with a warning) unless --strict.
///
/// With --from-kafka, the records of a topic instead of files (offsets by time per
/// partition); with --namespace, the rankings go into a namespace (Valkey keys, DynamoDB
/// items) that readers do not see until `toolrank promote` (a recomputation beside the live pipeline).
///
/// Examples:
///   toolrank replay --today 2025-07-14 --out results/ examples/seed-sample.jsonl
///   toolrank replay --from-kafka --topic toolrank-events --since 2025-07-01 --namespace v2
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The date scores are computed for (YYYY-MM-DD). Default: today in UTC.
    #[arg(long, env = "TOOLRANK_TODAY")]
    today: Option<String>,
    /// Write agent_score_summary.jsonl, user_process_patterns.jsonl,
    /// agent_tool_errors.jsonl and staging.jsonl into DIR instead of printing tables.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// With --out: write the files past the page cache (O_DIRECT), from buffers reused
    /// block to block. Faster where fresh page-cache memory is expensive (a VM whose host
    /// takes free memory back: most of a large replay's kernel time) and the disk is fast;
    /// slower on a slow disk (a network volume), which the replay then waits for. Where
    /// the file system refuses direct writes, they go through the page cache.
    #[arg(long, env = "TOOLRANK_DIRECT_IO", value_parser = clap::builder::BoolishValueParser::new())]
    direct_io: bool,
    /// Append rejected records to FILE as {"source","line","reason","raw"} JSON lines.
    #[arg(long, value_name = "FILE")]
    dead_letter: Option<PathBuf>,
    /// Stop at the first bad record, naming its position.
    #[arg(long)]
    strict: bool,
    /// Rows per table when printing (without --out).
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// Input files, DynamoDB export directories, or - for stdin.
    #[arg(required_unless_present = "from_kafka", value_name = "FILE|DIR|-")]
    inputs: Vec<String>,
    #[command(flatten)]
    kafka: crate::replay_kafka::KafkaArgs,
    /// Write the rankings into this namespace (Valkey keys and DynamoDB items of its
    /// own), which readers do not see until `toolrank promote NAME` (see `toolrank diff
    /// NAME`). The active namespace is refused.
    #[arg(long, value_name = "NAME")]
    namespace: Option<String>,
    /// Valkey URL (with --namespace).
    #[arg(long, env = "TOOLRANK_VALKEY_URL", default_value = "redis://127.0.0.1:6379")]
    valkey_url: String,
    /// The DynamoDB table (with --namespace).
    #[arg(long, env = "TOOLRANK_TABLE", default_value = "AgentTable")]
    table: String,
    /// The pipeline's state table, which holds a copy of the active-namespace pointer.
    #[arg(long, env = "TOOLRANK_STATE_TABLE", default_value = "toolrank-state")]
    state_table: String,
    /// With --namespace: write Valkey only.
    #[arg(long)]
    no_dynamodb: bool,
    /// Compute and report, write nothing (no --out, no namespace); with --namespace,
    /// print what promoting the result would change.
    #[arg(long)]
    dry_run: bool,
}

/// What a replay read and did, for the summary.
#[derive(Default)]
struct Counts {
    lines: u64,
    by_format: [u64; Format::ALL.len()],
    executions: u64,
    agents: u64,
    other_entities: u64,
    deletes: u64,
    ttl_deletes: u64,
    stale: u64,
    bad: u64,
}

/// A decoded record, borrowing from its chunk's text.
enum Decoded<'a> {
    Change(Change<'a>),
    Bad(DeadLetter),
}

/// A chunk's decoded records, and how many of its lines had each format.
struct DecodedLines<'a> {
    items: Vec<Decoded<'a>>,
    by_format: [u64; Format::ALL.len()],
}

self_cell::self_cell!(
    /// A chunk with its records decoded in place: the changes borrow from its text, so
    /// decoding copies no strings, and the chunk goes back to the reader once applied.
    struct DecodedBatch {
        owner: Chunk,
        #[covariant]
        dependent: DecodedLines,
    }
);

/// Whole lines of one input, read but not yet decoded.
#[derive(Default)]
struct Chunk {
    source: Arc<str>,
    /// A buffer taken over from the line reader.
    text: Vec<u8>,
    /// (line number, start, end) of each line in `text`.
    lines: Vec<(u64, usize, usize)>,
    /// The storage of the decoded records of the last time round, emptied: taken by the
    /// decoder, handed back by the applier (a fresh one per chunk would cost page faults).
    items: Cell<Vec<Decoded<'static>>>,
}

type Batch = Result<DecodedBatch, SourceError>;

/// Reads every input in blocks of whole lines and deals them round-robin to the
/// decoders, so that the applier can collect the decoded batches round-robin in input
/// order. A read error travels in the chunk's place and ends the run there. Chunks come
/// back once applied, through `recycled`, and are filled again: fresh buffers would cost
/// a page fault per 4 KiB of input.
fn read_inputs(inputs: &[Input], read: Arc<AtomicU64>, decoders: Vec<mpsc::SyncSender<Result<Chunk, SourceError>>>, recycled: mpsc::Receiver<Chunk>) {
    let mut next = 0;
    let mut send = |item: Result<Chunk, SourceError>| {
        let ok = decoders[next % decoders.len()].send(item).is_ok();
        next += 1;
        ok
    };
    for input in inputs {
        let mut reader = match LineReader::open(input, read.clone()) {
            Ok(r) => r,
            Err(e) => {
                send(Err(e));
                return;
            }
        };
        let source: Arc<str> = reader.name().into();
        loop {
            let mut chunk = recycled.try_recv().unwrap_or_default();
            chunk.source = source.clone();
            match reader.next_block(std::mem::take(&mut chunk.text), &mut chunk.lines) {
                Ok(Some(text)) => chunk.text = text,
                Ok(None) => break,
                Err(e) => {
                    send(Err(e));
                    return;
                }
            }
            if !send(Ok(chunk)) {
                return;
            }
        }
    }
}

/// Decodes chunks, in order.
fn decode_chunks(chunks: mpsc::Receiver<Result<Chunk, SourceError>>, out: mpsc::SyncSender<Batch>) {
    for chunk in chunks {
        if out.send(chunk.map(|chunk| DecodedBatch::new(chunk, decode_chunk))).is_err() {
            return;
        }
    }
}

fn decode_chunk(chunk: &Chunk) -> DecodedLines<'_> {
    let mut items: Vec<Decoded<'_>> = chunk.items.take();
    items.reserve(chunk.lines.len() + chunk.lines.len() / 4);
    let mut by_format = [0; Format::ALL.len()];
    for &(line_no, start, end) in &chunk.lines {
        let bytes = &chunk.text[start..end];
        let bad = |record, raw: Option<&str>, e: DecodeError| {
            let raw = raw.map_or_else(|| String::from_utf8_lossy(bytes).into_owned(), str::to_owned);
            Decoded::Bad(DeadLetter { source: chunk.source.to_string(), line: line_no, record, position: None, reason: e.to_string(), raw })
        };
        match decode_line(bytes, &mut |rec: Record<'_>| {
            items.push(match rec.result {
                Ok(change) => Decoded::Change(change),
                Err(e) => bad(rec.index, rec.raw, e),
            })
        }) {
            Ok(format) => by_format[format as usize] += 1,
            Err(e) => items.push(bad(None, None, e)),
        }
    }
    DecodedLines { items, by_format }
}

/// Reads, decodes and applies files: a reader thread, one decoder per core, this thread
/// applying batches in input order to the sessions, and a thread summing what they
/// contribute into the aggregates. Returns the bytes read.
fn ingest_files(inputs: &[Input], engine: &mut Engine, counts: &mut Counts, dead: &mut DeadLetters) -> Result<u64> {
    let total_bytes: u64 = inputs.iter().filter_map(Input::byte_len).sum();
    // Sessions take ~800 bytes of a DynamoDB export each (more in other formats, more
    // when gzipped): room for that many up front is room enough, and what stays unused
    // is never touched.
    engine.reserve_sessions(usize::try_from(total_bytes / SESSION_BYTES).unwrap_or(usize::MAX));
    let read = Arc::new(AtomicU64::new(0));
    let progress = (std::io::stderr().is_terminal() && total_bytes >= 64 << 20).then(|| {
        let bar = ProgressBar::new(total_bytes);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}").expect("valid template"),
        );
        bar
    });

    // A reader thread, one decoder per core, this thread applying batches in input order,
    // and an aggregating thread: this thread's share is the longest, so it hands the
    // summing on.
    let decoders = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
    let (mut to_decoders, mut from_decoders) = (Vec::new(), Vec::new());
    let (reader_read, all_inputs) = (read.clone(), inputs);
    let (recycle, recycled) = mpsc::channel();
    std::thread::scope(|scope| -> Result<()> {
        for i in 0..decoders {
            let (chunk_tx, chunk_rx) = mpsc::sync_channel(2);
            let (batch_tx, batch_rx) = mpsc::sync_channel::<Batch>(2);
            to_decoders.push(chunk_tx);
            from_decoders.push(batch_rx);
            std::thread::Builder::new()
                .name(format!("decode-{i}"))
                .spawn_scoped(scope, move || decode_chunks(chunk_rx, batch_tx))
                .context("starting a decode thread")?;
        }
        std::thread::Builder::new()
            .name("read".into())
            .spawn_scoped(scope, move || read_inputs(all_inputs, reader_read, to_decoders, recycled))
            .context("starting the read thread")?;
        let (to_aggregator, deltas) = mpsc::sync_channel::<Contributions>(4);
        let (spent, spent_batches) = mpsc::channel::<Contributions>();
        let aggregator = std::thread::Builder::new()
            .name("aggregate".into())
            .spawn_scoped(scope, move || {
                let mut aggregates = Aggregates::default();
                for mut batch in deltas {
                    batch.apply_to(&mut aggregates);
                    batch.clear();
                    let _ = spent.send(batch);
                }
                aggregates
            })
            .context("starting the aggregating thread")?;
        // The contributions of what was applied so far, handed to the aggregating thread.
        let hand_on = |engine: &mut Engine| -> Result<()> {
            let mut batch = spent_batches.try_recv().unwrap_or_default();
            engine.flush_aside(&mut batch);
            to_aggregator.send(batch).map_err(|_| anyhow::anyhow!("the aggregating thread stopped"))
        };
        let batches = (0..).map_while(|i: usize| from_decoders[i % decoders].recv().ok());
        for batch in batches {
            let mut batch = batch?;
            counts.lines += batch.borrow_owner().lines.len() as u64;
            let decoded = batch.borrow_dependent();
            for (total, n) in counts.by_format.iter_mut().zip(decoded.by_format) {
                *total += n;
            }
            for item in &decoded.items {
                match item {
                    Decoded::Change(change) => apply(engine, counts, change),
                    Decoded::Bad(letter) => dead.reject(&mut counts.bad, letter.clone())?,
                }
            }
            let items = batch.with_dependent_mut(|_, decoded| emptied(std::mem::take(&mut decoded.items)));
            let chunk = batch.into_owner();
            chunk.items.set(items);
            let _ = recycle.send(chunk);
            hand_on(engine)?;
            toolrank_metrics::job_progress("replay", counts.lines, counts.bad);
            if let Some(bar) = &progress {
                bar.set_position(read.load(Ordering::Relaxed));
            }
        }
        hand_on(engine)?;
        drop(to_aggregator);
        engine.adopt_aggregates(aggregator.join().expect("the aggregating thread does not panic"));
        Ok(())
    })?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(read.load(Ordering::Relaxed))
}

/// The fewest input bytes a session takes, for sizing the session table up front.
const SESSION_BYTES: u64 = 512;

/// The storage of decoded records, emptied, to go back with its chunk: collecting an
/// empty vector into one of the same layout keeps its allocation.
fn emptied(mut items: Vec<Decoded<'_>>) -> Vec<Decoded<'static>> {
    items.clear();
    items.into_iter().map(|_| unreachable!("the vector was emptied")).collect()
}

fn apply(engine: &mut Engine, counts: &mut Counts, change: &Change<'_>) {
    let applied = engine.apply(change);
    count_applied(counts, &change.action, applied);
}

fn count_applied(counts: &mut Counts, action: &Action<'_>, applied: Applied) {
    if applied == Applied::Stale {
        counts.stale += 1;
        return;
    }
    match action {
        Action::Put(Entity::Execution(_)) => counts.executions += 1,
        Action::Put(Entity::Agent(_)) => counts.agents += 1,
        Action::Put(Entity::Other) => counts.other_entities += 1,
        Action::Delete { ttl } => {
            counts.deletes += 1;
            counts.ttl_deletes += u64::from(*ttl);
        }
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let today = match &args.today {
        Some(t) => Day::parse_iso(t).with_context(|| format!("--today {t:?} is not a date YYYY-MM-DD"))?,
        None => Day::today_utc(),
    };
    let mut dead = DeadLetters::open(args.dead_letter.as_deref(), args.strict)?;
    let started = Instant::now();
    let mut engine = Engine::new();
    let mut counts = Counts::default();
    let (bytes, inputs) = match &args.kafka.topic {
        Some(topic) if args.kafka.from_kafka => {
            let each = &mut |record: Result<&Change<'_>, DeadLetter>| match record {
                Ok(change) => {
                    apply(&mut engine, &mut counts, change);
                    Ok(())
                }
                Err(letter) => dead.reject(&mut counts.bad, letter).map_err(anyhow::Error::from),
            };
            let (by_format, bytes) = crate::replay_kafka::ingest(&args.kafka, topic, each)?;
            counts.by_format = by_format;
            counts.lines = by_format.iter().sum::<u64>() + counts.bad;
            (bytes, 1)
        }
        _ => {
            let inputs = expand(&args.inputs)?;
            (ingest_files(&inputs, &mut engine, &mut counts, &mut dead)?, inputs.len())
        }
    };
    engine.flush();
    let ingested = started.elapsed();
    dead.flush()?;
    std::thread::scope(|scope| -> Result<()> {
        // The summary's figures of the state walk every session: beside the output, not after it.
        let stats = scope.spawn(|| engine.stats());
        if let Some(dir) = args.out.as_ref().filter(|_| !args.dry_run) {
            output::write_dir(dir, &engine, today, args.direct_io)?;
        }
        if args.namespace.is_some() {
            let sinks = SinkArgs {
                table: args.table.clone(),
                state_table: args.state_table.clone(),
                valkey_url: args.valkey_url.clone(),
                namespace: args.namespace.clone(),
                shadow: true,
                today: None,
                no_dynamodb: args.no_dynamodb,
                no_valkey: false,
            };
            crate::namespace::write_shadow(&engine, &sinks, today, args.dry_run)?;
        }
        if args.out.is_none() && args.namespace.is_none() {
            output::print_tables(&engine.build_report(today), args.top, &mut crate::stdout())?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        tracing::debug!(ingest_s = ingested.as_secs_f64(), output_s = elapsed - ingested.as_secs_f64(), "replay phases");
        summary(&counts, &stats.join().expect("counting the state does not panic"), bytes, elapsed, inputs, today);
        Ok(())
    })?;
    // The process ends here: the OS takes the state back at once, where dropping it
    // would free every session one by one (a tenth of a second at 200k sessions).
    std::mem::forget(engine);
    if counts.bad > 0 {
        let hint = match &args.dead_letter {
            Some(p) => format!("written to {}", p.display()),
            None => "use --dead-letter FILE to keep them".to_owned(),
        };
        tracing::warn!("{} bad records were skipped ({hint})", counts.bad);
    }
    Ok(ExitCode::SUCCESS)
}

fn summary(c: &Counts, st: &StateStats, bytes: u64, secs: f64, inputs: usize, today: Day) {
    let mb = bytes as f64 / 1e6;
    let formats: Vec<String> = Format::ALL.iter().map(|f| format!("{} {}", f.name(), c.by_format[*f as usize])).collect();
    note!("replayed {inputs} input(s), {} lines, {mb:.1} MB in {secs:.2} s ({:.1} MB/s); scores for {today}", c.lines, mb / secs.max(1e-9));
    note!("  records: {}; bad {}", formats.join(", "), c.bad);
    note!(
        "  changes: executions {}, agents {}, other entities {} (ignored), deletes {} ({} by TTL), stale or duplicate {}",
        c.executions,
        c.agents,
        c.other_entities,
        c.deletes,
        c.ttl_deletes,
        c.stale
    );
    note!(
        "  state: {} live executions in {} sessions, {} agents, {} tombstones; ~{:.1} MB ({} B per live session)",
        st.live_rows,
        st.live_sessions,
        st.agents,
        st.tombstones,
        st.heap_bytes as f64 / 1e6,
        st.heap_bytes.checked_div(st.live_sessions).unwrap_or(0)
    );
}
