//! `toolrank`: turns AI-agent tool-execution history into the seed's rankings.

/// `eprintln!` that ignores a closed stderr: `toolrank ... 2>&1 | head` must not panic
/// when the reader has gone.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that returns the error of a closed stdout (`?`) where `println!` panics:
/// `main` ends a run whose reader went away quietly ([`stdout`]).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(crate::stdout(), $($arg)*)?
    }};
}

mod args;
mod backfill;
mod checkpoint;
mod consume;
mod generate;
mod kafka_connection;
mod lambda;
mod mirror;
mod namespace;
mod out_file;
mod output;
mod produce;
mod replay;
mod replay_kafka;
mod setup;
mod signals;
mod sink_args;
mod sinks;
mod warehouse;

use clap::{Parser, Subcommand};

/// Replay allocates many small strings and rows; mimalloc halves the allocator's share.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

/// Rankings of AI agents and their tool patterns from DynamoDB tool-execution history.
///
/// toolrank reads the AgentTable single-table design (SPEC §1) as exports, stream
/// records, Lambda events or flat events, and keeps the seed's decayed success scores
/// exact and up to date. Start with:
///
///   toolrank replay --today 2025-07-14 examples/seed-sample.jsonl
#[derive(Parser)]
#[command(name = "toolrank", version, propagate_version = true)]
struct Cli {
    /// Log format on stderr (filter with TOOLRANK_LOG, e.g. TOOLRANK_LOG=debug).
    #[arg(long, global = true, value_enum, default_value = "text", env = "TOOLRANK_LOG_FORMAT")]
    log_format: LogFormat,
    /// Serve Prometheus metrics (records, rows/s as counters, errors, dead letters, sink
    /// writes, latency histograms, the process) at http://ADDR/metrics, and a health check
    /// at http://ADDR/healthz, while the command runs.
    #[arg(long, global = true, env = "TOOLRANK_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    Replay(replay::Args),
    Setup(setup::Args),
    Produce(produce::Args),
    Generate(generate::Args),
    Consume(consume::Args),
    Lambda(lambda::Args),
    Top(sinks::TopArgs),
    Results(sinks::ResultsArgs),
    Backfill(backfill::Args),
    /// Manage the checkpoints the live consumers keep in the state table.
    #[command(subcommand)]
    Checkpoint(checkpoint::Command),
    Promote(namespace::PromoteArgs),
    Diff(namespace::DiffArgs),
    Warehouse(warehouse::Args),
    Mirror(mirror::MirrorArgs),
    Reconcile(warehouse::ReconcileArgs),
}

/// Transparent huge pages off for this process: mimalloc asks for them, and then the
/// first touch of each fresh 2 MB region (a sink's buffers, a growing table) zeroes all
/// of it, which cost the Kafka path about a third of its CPU per event. Replay too: it
/// fills every page it takes, and huge pages halve its kernel time on memory the kernel
/// has ready, but a huge-page fault may compact memory first (the `madvise` defrag
/// setting), and then a replay spends a second in the kernel instead of a tenth.
///
/// It runs as a constructor, before the runtime's first allocations: called from `main`
/// it came too late, after mimalloc's first arena had been faulted in as huge pages.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static NO_HUGE_PAGES: extern "C" fn() = no_huge_pages;

#[cfg(target_os = "linux")]
extern "C" fn no_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes no pointers and only sets a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Ends a successful run at once. Returning from `main` would run the allocator's exit
/// handler, which hands its heaps back to the OS range by range (after a replay,
/// hundreds of `madvise` calls) just before the OS takes the whole address space back
/// anyway.
fn exit_now() -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // SAFETY: _exit ends the process. It skips only the exit handlers (the allocator's)
    // and the runtime's cleanup, whose one effect, flushing stdout, is done just above.
    unsafe { libc::_exit(0) }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOOLRANK_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match cli.log_format {
        LogFormat::Text => builder.without_time().init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some(addr) = cli.metrics_addr {
        match toolrank_metrics::serve(addr) {
            Ok(bound) => tracing::info!(%bound, "serving Prometheus metrics at /metrics, health at /healthz"),
            Err(e) => {
                note!("toolrank: error: serving metrics on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let result = match cli.command {
        Command::Replay(args) => replay::run(args),
        Command::Setup(args) => setup::run(args),
        Command::Produce(args) => produce::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Consume(args) => consume::run(args),
        Command::Lambda(args) => lambda::run(args),
        Command::Top(args) => sinks::top(args),
        Command::Results(args) => sinks::results(args),
        Command::Backfill(args) => backfill::run(args),
        Command::Checkpoint(args) => checkpoint::run(args),
        Command::Promote(args) => namespace::promote(args),
        Command::Diff(args) => namespace::diff(args),
        Command::Warehouse(args) => warehouse::run(args),
        Command::Mirror(args) => mirror::mirror(args),
        Command::Reconcile(args) => warehouse::reconcile(args),
    };
    match result {
        Ok(code) if code == ExitCode::SUCCESS => exit_now(),
        Ok(code) => code,
        // The reader of the output went away (`toolrank replay | head`): the end it
        // asked for, not a failure.
        Err(_) if READER_GONE.load(std::sync::atomic::Ordering::Relaxed) => exit_now(),
        Err(e) => {
            note!("toolrank: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Set once a write to stdout found its reader gone (`toolrank replay | head`).
static READER_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Standard output, for everything a command prints: a write that finds the reader gone
/// is noted, so that `main` ends that run quietly, while a broken pipe anywhere else (a
/// connection to a service) stays an error.
struct Stdout(std::io::StdoutLock<'static>);

fn stdout() -> Stdout {
    Stdout(std::io::stdout().lock())
}

impl Stdout {
    fn noted<T>(result: std::io::Result<T>) -> std::io::Result<T> {
        if result.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) {
            READER_GONE.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }
}

impl std::io::Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Stdout::noted(self.0.write(buf))
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        Stdout::noted(self.0.write_all(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Stdout::noted(self.0.flush())
    }
}
