//! Namespaces of rankings: `toolrank promote` and `toolrank diff`, and which namespace a
//! command reads or writes when none is named.
//!
//! A namespace is a Valkey key prefix. Recomputations (`replay --namespace NAME`) write a
//! shadow namespace that readers do not see; `promote NAME` switches readers to it with one
//! command (an active-namespace pointer in Valkey, copied to the state table in DynamoDB
//! for readers that cannot reach Valkey). DynamoDB's rankings live on the application's
//! own Agent items, which its readers query directly: they stay the live pipeline's.

use crate::sinks::{SinkArgs, DEFAULT_NAMESPACE};
use anyhow::{bail, Context, Result};
use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;
use toolrank_engine::{Engine, Report};
use toolrank_events::Day;
use toolrank_sink_valkey::{Namespaces, ValkeyReader, ValkeySink};

/// The state-table item that mirrors the pointer.
const POINTER_PK: &str = "toolrank/namespace";
const POINTER_SK: &str = "active";

/// The namespace to use: the one named, else the promoted one (Valkey's pointer, else the
/// state table's copy), else the default.
pub fn resolve(sinks: &SinkArgs) -> String {
    if let Some(name) = &sinks.namespace {
        return name.clone();
    }
    let from_valkey = Namespaces::connect(&sinks.valkey_url, Duration::from_secs(1)).and_then(|mut n| n.active());
    let active = match from_valkey {
        Ok(active) => active,
        Err(_) => runtime().ok().and_then(|rt| rt.block_on(pointer_in_dynamodb(&sinks.state_table)).ok().flatten()),
    };
    active.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

async fn pointer_in_dynamodb(state_table: &str) -> Result<Option<String>> {
    let client = toolrank_dynamodb::client().await;
    let got = client
        .get_item()
        .table_name(state_table)
        .key("PK", AttributeValue::S(POINTER_PK.into()))
        .key("SK", AttributeValue::S(POINTER_SK.into()))
        .send()
        .await
        .context("reading the active namespace from the state table")?;
    Ok(got.item.and_then(|i| i.get("Namespace").and_then(|v| v.as_s().ok()).cloned()))
}

/// Switch readers to a namespace written by `toolrank replay --namespace NAME`.
///
/// One Valkey command moves the active-namespace pointer, so every reader (`toolrank top`,
/// `toolrank results`, and writers started without --namespace) sees the new rankings at
/// once; the state table gets a copy for readers that fall back to DynamoDB. Refuses a
/// namespace that holds nothing. --drop-previous deletes the namespace it replaces.
///
///   toolrank replay --from-kafka --topic toolrank-events --from-beginning --namespace v2
///   toolrank diff v2
///   toolrank promote v2 --drop-previous
#[derive(clap::Args)]
pub struct PromoteArgs {
    /// The namespace to make active.
    name: String,
    /// Delete the namespace that was active before.
    #[arg(long)]
    drop_previous: bool,
    #[command(flatten)]
    sinks: SinkArgs,
}

pub fn promote(args: PromoteArgs) -> Result<ExitCode> {
    let mut ns = Namespaces::connect(&args.sinks.valkey_url, Duration::from_secs(5)).context("connecting to Valkey")?;
    if ns.size(&args.name)? == 0 {
        bail!("namespace {:?} holds no rankings: write it first (toolrank replay --namespace {})", args.name, args.name);
    }
    let previous = ns.promote(&args.name)?.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    let rt = runtime()?;
    rt.block_on(async {
        let client = toolrank_dynamodb::client().await;
        toolrank_dynamodb::create_state_table(&client, &args.sinks.state_table).await?;
        client
            .put_item()
            .table_name(&args.sinks.state_table)
            .item("PK", AttributeValue::S(POINTER_PK.into()))
            .item("SK", AttributeValue::S(POINTER_SK.into()))
            .item("Namespace", AttributeValue::S(args.name.clone()))
            .item("Previous", AttributeValue::S(previous.clone()))
            .send()
            .await
            .context("copying the pointer to the state table")?;
        anyhow::Ok(())
    })?;
    eprintln!("active namespace: {} (was {previous})", args.name);
    if args.drop_previous && previous != args.name {
        let dropped = ns.drop(&previous)?;
        eprintln!("dropped namespace {previous} ({dropped} keys)");
    }
    Ok(ExitCode::SUCCESS)
}

/// What promoting a namespace would change: rows changed per table, and per domain the
/// top agents that differ, against the active namespace (or --against).
///
///   toolrank diff v2 --top 5
#[derive(clap::Args)]
pub struct DiffArgs {
    /// The namespace to inspect.
    name: String,
    /// Compare with this namespace instead of the active one.
    #[arg(long)]
    against: Option<String>,
    /// Agents per domain compared by rank.
    #[arg(long, default_value_t = 10)]
    top: usize,
    #[command(flatten)]
    sinks: SinkArgs,
}

fn read(url: &str, namespace: &str, today: Day) -> Result<Report> {
    let mut v = ValkeyReader::connect(url, namespace.to_owned(), Duration::from_secs(5))?;
    Ok(Report::from_figures(v.agents()?, v.patterns()?, today))
}

/// Agent ids per domain, best first, the first `top` of each.
fn top_agents(report: &Report, top: usize) -> BTreeMap<String, Vec<String>> {
    let mut by_domain: BTreeMap<String, Vec<(f64, String)>> = BTreeMap::new();
    for a in &report.agents {
        by_domain.entry(a.domain_id.clone()).or_default().push((a.calculated_score, a.agent_id.clone()));
    }
    by_domain
        .into_iter()
        .map(|(d, mut v)| {
            v.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            (d, v.into_iter().take(top).map(|(_, id)| id).collect())
        })
        .collect()
}

pub fn diff(args: DiffArgs) -> Result<ExitCode> {
    let today = args.sinks.today()?.unwrap_or_else(Day::today_utc);
    let against = match &args.against {
        Some(name) => name.clone(),
        None => resolve(&SinkArgs { namespace: None, ..args.sinks.clone() }),
    };
    let (new, old) = (read(&args.sinks.valkey_url, &args.name, today)?, read(&args.sinks.valkey_url, &against, today)?);
    print_diff((&new, &args.name), (&old, &against), args.top, today);
    Ok(ExitCode::SUCCESS)
}

/// Rows changed per table, then the domains whose top agents change.
fn print_diff((new, name): (&Report, &str), (old, against): (&Report, &str), top: usize, today: Day) {
    println!("{name} (new) against {against} (current), scored for {}:", String::from_utf8_lossy(&today.iso_bytes()));
    let tables = toolrank_warehouse::reconcile::compare(new, old);
    for t in &tables {
        println!(
            "{:<22} {:>7} rows unchanged  {:>5} changed  {:>5} added  {:>5} removed",
            t.table,
            t.equal,
            t.differing_rows,
            t.only_in_stream.len(),
            t.only_in_warehouse.len()
        );
    }
    let (new_top, old_top) = (top_agents(new, top), top_agents(old, top));
    let domains: std::collections::BTreeSet<&String> = new_top.keys().chain(old_top.keys()).collect();
    let mut moved = 0;
    for d in domains {
        let (n, o) = (new_top.get(d).cloned().unwrap_or_default(), old_top.get(d).cloned().unwrap_or_default());
        if n != o {
            moved += 1;
            println!("\ntop {top} of {d} changes:\n  current: {}\n  new:     {}", o.join(" "), n.join(" "));
        }
    }
    if moved == 0 {
        println!("\nthe top {top} agents of every domain stay the same");
    }
}

/// Writes `engine`'s rankings into namespace `name` (replacing what it held), or with
/// `dry_run` prints what promoting them would change.
pub fn write_shadow(engine: &Engine, url: &str, name: &str, today: Day, dry_run: bool) -> Result<()> {
    let mut ns = Namespaces::connect(url, Duration::from_secs(5)).context("connecting to Valkey")?;
    let active = ns.active()?.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    if name == active {
        bail!("{name} is the active namespace, which readers use: write another and promote it");
    }
    if dry_run {
        print_diff((&engine.build_report(today), name), (&read(url, &active, today)?, &active), 10, today);
        eprintln!("dry run: nothing written");
        return Ok(());
    }
    let everything = engine.everything();
    ValkeySink::new(url, name)?.write(engine, &everything)?;
    eprintln!("wrote {} agents and {} patterns into namespace {name}; readers use {active} until `toolrank promote {name}`", everything.agents.len(), everything.patterns.len());
    Ok(())
}
