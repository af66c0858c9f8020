//! Options shared by the commands that write or read the sinks, and the readers
//! `toolrank top` and `toolrank results`.

use crate::output;
pub use crate::sink_args::SinkArgs;
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use toolrank_engine::{AgentFigures, PatternFigures, Report};
use toolrank_events::Day;
use toolrank_sink_valkey::ValkeyReader;

/// Read the rankings: Valkey first, DynamoDB when Valkey is unreachable.
#[derive(clap::Args)]
pub struct TopArgs {
    #[command(subcommand)]
    what: TopWhat,
    /// Rows to show.
    #[arg(long, global = true, default_value_t = 5)]
    limit: usize,
    #[command(flatten)]
    sinks: SinkArgs,
}

#[derive(clap::Subcommand)]
enum TopWhat {
    /// The top agents of a domain (the seed's access pattern 2).
    Agents {
        #[arg(long)]
        domain: String,
    },
    /// An agent's tools by rows × success rate².
    Tools {
        #[arg(long)]
        agent: String,
    },
    /// A user's patterns (access pattern 7), or everyone's without --user.
    Patterns {
        #[arg(long)]
        user: Option<String>,
    },
}

pub fn top(args: TopArgs) -> Result<ExitCode> {
    let today = args.sinks.today()?.unwrap_or_else(Day::today_utc);
    let target = crate::namespace::target(&args.sinks);
    let valkey = ValkeyReader::connect(&args.sinks.valkey_url, &target.name, Duration::from_secs(1));
    let (source, rows): (&str, Vec<Vec<String>>) = match valkey {
        Ok(mut v) => ("valkey", top_from_valkey(&mut v, &args.what, args.limit, today)?),
        Err(e) => {
            note!("valkey unreachable ({e}); reading DynamoDB");
            ("dynamodb", top_from_dynamodb(&args.sinks.table, &target.dynamodb, &args.what, args.limit, today)?)
        }
    };
    let header = match args.what {
        TopWhat::Agents { .. } => vec!["rank", "agentid", "agent_name", "executions", "successes", "last_execution_date", "calculated_score"],
        TopWhat::Tools { .. } => vec!["rank", "toolnm", "rows", "failed", "score"],
        TopWhat::Patterns { .. } => vec!["rank", "userid", "process_pattern", "agent", "tool_sequence", "executions", "pattern_score"],
    };
    out!("source: {source}");
    output::print_rows(&header, &rows, &mut crate::stdout())?;
    Ok(ExitCode::SUCCESS)
}

fn agent_row(i: usize, f: &AgentFigures, today: Day) -> Vec<String> {
    let score = f.last.map_or(0.0, |l| toolrank_engine::score::agent_score(f.executions, f.successes, i64::from(today.0) - i64::from(l.0)));
    let last = f.last.map(|d| d.to_string()).unwrap_or_default();
    vec![
        (i + 1).to_string(),
        f.agent_id.clone(),
        f.agent_name.clone().unwrap_or_default(),
        f.executions.to_string(),
        f.successes.to_string(),
        last,
        format!("{score:.4}"),
    ]
}

fn pattern_row(i: usize, f: &PatternFigures, today: Day) -> Vec<String> {
    vec![
        (i + 1).to_string(),
        f.user_id.clone(),
        f.process_pattern.clone(),
        f.agent_id.clone(),
        f.tool_sequence.clone(),
        f.executions.to_string(),
        format!("{:.4}", f.score(today)),
    ]
}

fn top_from_valkey(v: &mut ValkeyReader, what: &TopWhat, limit: usize, today: Day) -> Result<Vec<Vec<String>>> {
    Ok(match what {
        TopWhat::Agents { domain } => v.top_agents(domain, limit)?.iter().enumerate().map(|(i, f)| agent_row(i, f, today)).collect(),
        TopWhat::Tools { agent } => {
            let mut tools = v.agent(agent)?.tools;
            tools.sort_by(|a, b| b.score().total_cmp(&a.score()).then_with(|| a.tool_nm.cmp(&b.tool_nm)));
            tools
                .iter()
                .take(limit)
                .enumerate()
                .map(|(i, t)| vec![(i + 1).to_string(), t.tool_nm.clone(), t.rows.to_string(), t.failed.to_string(), format!("{:.4}", t.score())])
                .collect()
        }
        TopWhat::Patterns { user } => v.top_patterns(user.as_deref(), limit)?.iter().enumerate().map(|(i, f)| pattern_row(i, f, today)).collect(),
    })
}

fn top_from_dynamodb(table: &str, namespace: &toolrank_sink_dynamodb::Namespace, what: &TopWhat, limit: usize, today: Day) -> Result<Vec<Vec<String>>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let client = toolrank_dynamodb::client().await;
        Ok(match what {
            TopWhat::Agents { domain } => toolrank_sink_dynamodb::top_agents(&client, table, namespace, domain, limit)
                .await?
                .iter()
                .enumerate()
                .map(|(i, f)| agent_row(i, f, today))
                .collect(),
            TopWhat::Tools { .. } => bail!("per-tool rankings live in Valkey only, and Valkey is unreachable"),
            TopWhat::Patterns { user } => {
                let mut ps = toolrank_sink_dynamodb::patterns(&client, table, namespace, user.as_deref()).await?;
                ps.sort_by(|a, b| b.rank_key().total_cmp(&a.rank_key()).then_with(|| a.id().cmp(&b.id())));
                ps.iter().take(limit).enumerate().map(|(i, f)| pattern_row(i, f, today)).collect()
            }
        })
    })
}

/// Write what a sink holds in `toolrank replay --out` format, to compare sinks with replay.
///
/// Valkey holds every table (agent_score_summary, user_process_patterns with the
/// recommendation cut recomputed for --today, agent_tool_errors); DynamoDB holds
/// agent_score_summary, agent_tool_errors and the recommended rows of
/// user_process_patterns. Neither holds the staging table.
#[derive(clap::Args)]
pub struct ResultsArgs {
    /// The sink to read.
    #[arg(long, value_enum)]
    from: From,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    sinks: SinkArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum From {
    Valkey,
    Dynamodb,
}

pub fn results(args: ResultsArgs) -> Result<ExitCode> {
    let today = args.sinks.today()?.unwrap_or_else(Day::today_utc);
    let report = read_sink(args.from, &args.sinks, today)?;
    output::write_report(&args.out, &report, false)?;
    note!("wrote {} agents, {} patterns, {} tool-error rows to {}", report.agents.len(), report.patterns.len(), report.tool_errors.len(), args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// What a sink holds, as the seed's tables for `today`.
pub fn read_sink(from: From, sinks: &SinkArgs, today: Day) -> Result<Report> {
    let target = crate::namespace::target(sinks);
    Ok(match from {
        From::Valkey => {
            let mut v = ValkeyReader::connect(&sinks.valkey_url, &target.name, Duration::from_secs(5))?;
            Report::from_figures(v.agents()?, v.patterns()?, today)
        }
        From::Dynamodb => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (agents, patterns) = rt.block_on(async {
                let client = toolrank_dynamodb::client().await;
                toolrank_sink_dynamodb::read_table(&client, &sinks.table, &target.dynamodb, &[]).await
            })?;
            let mut report = Report::from_figures(agents, patterns.into_iter().map(|(f, _)| f).collect(), today);
            // The table holds the recommended patterns only: all of them are.
            report.patterns.iter_mut().for_each(|p| p.is_recommended = true);
            report
        }
    })
}
