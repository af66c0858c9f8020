//! `toolrank generate`: synthetic histories for demos, tests and benchmarks.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use toolrank_generate::{generate, Config, Style};

/// Write a synthetic, deterministic AgentTable history.
///
/// Zipf agent popularity and user activity, multi-tool sessions following a few
/// workflows per agent, per-agent failure rates, and late Agent items. The stream style
/// adds modifies, removes (half by TTL) and redeliveries.
///
/// Example: toolrank generate --sessions 200000 --style export --out history.jsonl
#[derive(clap::Args)]
pub struct Args {
    /// Number of user sessions.
    #[arg(long, default_value_t = 1000)]
    sessions: u64,
    /// Random seed; the same seed gives the same history.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Number of agents.
    #[arg(long, default_value_t = 200)]
    agents: u32,
    /// Number of domains.
    #[arg(long, default_value_t = 8)]
    domains: u32,
    /// Days of history, ending at --end.
    #[arg(long, default_value_t = 60)]
    days: u32,
    /// Last day of history (YYYY-MM-DD).
    #[arg(long, default_value = "2025-07-14")]
    end: String,
    /// Line format.
    #[arg(long, value_enum, default_value = "stream")]
    style: StyleArg,
    /// Stream style: remove each session's executions by TTL (REMOVE records, as
    /// DynamoDB emits them) once N later sessions were written. The live items stay a
    /// sliding window however long the stream: a soak test of bounded memory.
    #[arg(long, value_name = "N")]
    ttl_after: Option<u64>,
    /// Output file (default: stdout).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StyleArg {
    /// DynamoDB export lines of the final state.
    Export,
    /// DynamoDB stream records with modifies, removes and redeliveries.
    Stream,
    /// Flat staging-shaped events.
    Flat,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let cfg = Config {
        sessions: args.sessions,
        seed: args.seed,
        agents: args.agents,
        domains: args.domains,
        days: args.days,
        end: args.end,
        ttl_after: args.ttl_after,
        ..Config::default()
    };
    let style = match args.style {
        StyleArg::Export => Style::Export,
        StyleArg::Stream => Style::Stream,
        StyleArg::Flat => Style::Flat,
    };
    if args.ttl_after.is_some() && style != Style::Stream {
        bail!("--ttl-after needs --style stream: only stream records carry removals");
    }
    let stats = match &args.out {
        Some(p) => generate(&cfg, style, File::create(p).with_context(|| format!("creating {}", p.display()))?)?,
        None => generate(&cfg, style, crate::stdout())?,
    };
    note!("generated {} lines, {} live executions, {:.1} MB", stats.lines, stats.executions, stats.bytes as f64 / 1e6);
    Ok(ExitCode::SUCCESS)
}
