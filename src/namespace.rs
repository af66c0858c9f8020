//! Namespaces of rankings: `toolrank promote` and `toolrank diff`, and which namespace a
//! command reads or writes when none is named.
//!
//! A namespace is a set of rankings. In Valkey it is a key prefix. In DynamoDB the active
//! namespace is the one on the application's own items, which the seed's access patterns
//! read; any other lives in items of its own under `toolrank#NAME#` keys that those
//! readers never meet. Recomputations (`replay --namespace NAME`) write a shadow
//! namespace; `promote NAME` copies it onto the table's live items (only the items that
//! differ), keeps what they held as the previous namespace's shadow (for a rollback), then
//! switches the active-namespace pointer in one Valkey command, copied to the state table
//! for readers that cannot reach Valkey.
//!
//! The state table registers each table's shadow namespaces. A consumer or reader given a
//! registered shadow's name writes or reads its items; any other name only picks the
//! Valkey prefix, with DynamoDB's rankings on the live items.

use crate::sink_args::{SinkArgs, DEFAULT_NAMESPACE};
use anyhow::{bail, Context, Result};
use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;
use toolrank_engine::{Engine, Report};
use toolrank_events::Day;
use toolrank_sink_dynamodb::{DynamoSink, Namespace};
use toolrank_sink_valkey::{Namespaces, ValkeyReader, ValkeySink};

/// The state-table item that mirrors the pointer.
const POINTER_PK: &str = "toolrank/namespace";
const POINTER_SK: &str = "active";

/// A namespace a command reads or writes, and where its rankings are in DynamoDB.
pub struct Target {
    /// Its name: the Valkey key prefix.
    pub name: String,
    pub dynamodb: Namespace,
}

/// The namespace to use: the one named, else the active one.
pub fn target(sinks: &SinkArgs) -> Target {
    let active = active(sinks);
    let name = sinks.namespace.clone().unwrap_or_else(|| active.clone());
    let shadow = name != active
        && runtime().is_ok_and(|rt| {
            rt.block_on(async {
                let client = toolrank_dynamodb::client().await;
                if !sinks.shadow {
                    return is_shadow(&client, &sinks.state_table, &sinks.table, &name).await;
                }
                toolrank_state::create_state_table(&client, &sinks.state_table).await?;
                register(&client, &sinks.state_table, &sinks.table, &name, true).await?;
                Ok(true)
            })
            .unwrap_or(sinks.shadow)
        });
    Target { dynamodb: if shadow { Namespace::Shadow(name.clone()) } else { Namespace::Live }, name }
}

/// The registry item of a table's shadow namespace.
fn shadow_key(table: &str, name: &str) -> std::collections::HashMap<String, AttributeValue> {
    [("PK".to_owned(), AttributeValue::S(POINTER_PK.into())), ("SK".to_owned(), AttributeValue::S(format!("shadow#{table}#{name}")))].into()
}

async fn is_shadow(client: &aws_sdk_dynamodb::Client, state_table: &str, table: &str, name: &str) -> Result<bool> {
    let got = client.get_item().table_name(state_table).set_key(Some(shadow_key(table, name))).send().await?;
    Ok(got.item.is_some())
}

/// Records (or with `registered` false, forgets) that `name` is a shadow namespace of `table`.
async fn register(client: &aws_sdk_dynamodb::Client, state_table: &str, table: &str, name: &str, registered: bool) -> Result<()> {
    let key = shadow_key(table, name);
    if registered {
        client.put_item().table_name(state_table).set_item(Some(key)).send().await.context("registering a shadow namespace")?;
    } else {
        client.delete_item().table_name(state_table).set_key(Some(key)).send().await.context("unregistering a shadow namespace")?;
    }
    Ok(())
}

/// The promoted namespace (Valkey's pointer, else the state table's copy), else the default.
fn active(sinks: &SinkArgs) -> String {
    let from_valkey = Namespaces::connect(&sinks.valkey_url, Duration::from_secs(1)).and_then(|mut n| n.active());
    let active = match from_valkey {
        Ok(active) => active,
        Err(_) => runtime().ok().and_then(|rt| rt.block_on(pointer_in_dynamodb(&sinks.state_table)).ok().flatten()),
    };
    active.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
}

/// A namespace name must be usable as a key prefix in Valkey and DynamoDB.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        bail!("namespace {name:?}: use 1 to 64 letters, digits, '-' or '_'");
    }
    Ok(())
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
/// DynamoDB first: the namespace's rankings are copied onto the table's live items (the
/// ones the seed's access patterns read; only items that differ are written) and what
/// those held is kept as the previous namespace's shadow, so `toolrank promote PREVIOUS`
/// rolls back. Then one Valkey command moves the active-namespace pointer, so every
/// Valkey reader (`toolrank top`, `toolrank results`, writers started without
/// --namespace) sees the new rankings at once; the state table gets a copy of the
/// pointer. Refuses a namespace that holds nothing. Safe to run again after a failure.
///
///   toolrank replay --from-kafka --topic toolrank-events --from-beginning --namespace v2
///   toolrank diff v2
///   toolrank promote v2 --drop-previous
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct PromoteArgs {
    /// The namespace to make active.
    name: String,
    /// Delete the namespace that was active before (no rollback).
    #[arg(long)]
    drop_previous: bool,
    #[command(flatten)]
    sinks: SinkArgs,
}

pub fn promote(args: PromoteArgs) -> Result<ExitCode> {
    check_name(&args.name)?;
    let sinks = &args.sinks;
    let previous = active(sinks);
    if previous == args.name {
        note!("{} is already the active namespace", args.name);
        return Ok(ExitCode::SUCCESS);
    }
    let mut ns = (!sinks.no_valkey).then(|| Namespaces::connect(&sinks.valkey_url, Duration::from_secs(5)).context("connecting to Valkey")).transpose()?;
    if let Some(ns) = &mut ns {
        if ns.size(&args.name)? == 0 {
            bail!("namespace {:?} holds no rankings in Valkey: write it first (toolrank replay --namespace {})", args.name, args.name);
        }
    }
    let today = sinks.today()?.unwrap_or_else(Day::today_utc);
    let rt = runtime()?;
    rt.block_on(async {
        let client = toolrank_dynamodb::client().await;
        toolrank_state::create_state_table(&client, &sinks.state_table).await?;
        if !sinks.no_dynamodb {
            promote_in_table(&client, sinks, &args.name, &previous, args.drop_previous, today).await?;
        }
        if let Some(ns) = &mut ns {
            ns.promote(&args.name)?;
        }
        client
            .put_item()
            .table_name(&sinks.state_table)
            .item("PK", AttributeValue::S(POINTER_PK.into()))
            .item("SK", AttributeValue::S(POINTER_SK.into()))
            .item("Namespace", AttributeValue::S(args.name.clone()))
            .item("Previous", AttributeValue::S(previous.clone()))
            .send()
            .await
            .context("copying the pointer to the state table")?;
        if !sinks.no_dynamodb {
            // Its items are the live ones now; the shadow copy goes only after the switch,
            // so a promotion that fails midway can be run again.
            drop_in_table(&client, &sinks.table, &args.name).await?;
            register(&client, &sinks.state_table, &sinks.table, &args.name, false).await?;
        }
        anyhow::Ok(())
    })?;
    note!("active namespace: {} (was {previous})", args.name);
    if args.drop_previous {
        if let Some(ns) = &mut ns {
            note!("dropped namespace {previous} from Valkey ({} keys)", ns.drop(&previous)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Copies namespace `name` onto the table's live items, keeping what they held as
/// `previous`'s shadow unless `drop_previous`.
async fn promote_in_table(client: &aws_sdk_dynamodb::Client, sinks: &SinkArgs, name: &str, previous: &str, drop_previous: bool, today: Day) -> Result<()> {
    let (table, state_table) = (sinks.table.as_str(), sinks.state_table.as_str());
    let shadow = Namespace::Shadow(name.to_owned());
    let (agents, patterns) = toolrank_sink_dynamodb::read_table(client, table, &shadow, &[]).await?;
    if agents.is_empty() && patterns.is_empty() {
        bail!("namespace {name:?} holds no rankings in DynamoDB table {table}: write it first (toolrank replay --namespace {name}), or promote Valkey alone with --no-dynamodb");
    }
    let kept = Namespace::Shadow(previous.to_owned());
    if drop_previous {
        drop_in_table(client, table, previous).await?;
        register(client, state_table, table, previous, false).await?;
    } else if !is_shadow(client, state_table, table, previous).await? {
        // Once registered, an earlier attempt kept it: the live items may be half promoted
        // by now, so they are not copied again.
        let domains: Vec<String> = agents.iter().map(|a| a.domain_id.clone()).collect();
        let (live_agents, live_patterns) = toolrank_sink_dynamodb::read_table(client, table, &Namespace::Live, &domains).await?;
        DynamoSink::in_namespace(client.clone(), table, kept).write_figures(live_agents, live_patterns, today).await?;
        register(client, state_table, table, previous, true).await?;
    }
    let n = (agents.len(), patterns.len());
    DynamoSink::in_namespace(client.clone(), table, Namespace::Live).write_figures(agents, patterns, today).await?;
    note!("{table}: the live items now hold {name} ({} agents, {} recommended patterns)", n.0, n.1);
    Ok(())
}

async fn drop_in_table(client: &aws_sdk_dynamodb::Client, table: &str, name: &str) -> Result<()> {
    let n = toolrank_sink_dynamodb::drop_namespace(client, table, name).await?;
    if n > 0 {
        tracing::info!(namespace = name, items = n, "dropped a shadow namespace from DynamoDB");
    }
    Ok(())
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
    let mut v = ValkeyReader::connect(url, namespace, Duration::from_secs(5))?;
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
        None => active(&args.sinks),
    };
    let (new, old) = (read(&args.sinks.valkey_url, &args.name, today)?, read(&args.sinks.valkey_url, &against, today)?);
    print_diff((&new, &args.name), (&old, &against), args.top, today)?;
    Ok(ExitCode::SUCCESS)
}

/// Rows changed per table, then the domains whose top agents change.
fn print_diff((new, name): (&Report, &str), (old, against): (&Report, &str), top: usize, today: Day) -> std::io::Result<()> {
    out!("{name} (new) against {against} (current), scored for {}:", String::from_utf8_lossy(&today.iso_bytes()));
    let tables = toolrank_warehouse::reconcile::compare(new, old);
    for t in &tables {
        out!(
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
            out!("\ntop {top} of {d} changes:\n  current: {}\n  new:     {}", o.join(" "), n.join(" "));
        }
    }
    if moved == 0 {
        out!("\nthe top {top} agents of every domain stay the same");
    }
    Ok(())
}

/// Writes `engine`'s rankings into shadow namespace `sinks.namespace` (replacing what it
/// held) in Valkey and DynamoDB, or with `dry_run` prints what promoting them would change.
pub fn write_shadow(engine: &Engine, sinks: &SinkArgs, today: Day, dry_run: bool) -> Result<()> {
    let name = sinks.namespace.as_deref().context("no namespace to write")?;
    check_name(name)?;
    let active = active(sinks);
    if name == active {
        bail!("{name} is the active namespace, which readers use: write another and promote it");
    }
    if dry_run {
        print_diff((&engine.build_report(today), name), (&read(&sinks.valkey_url, &active, today)?, &active), 10, today)?;
        note!("dry run: nothing written");
        return Ok(());
    }
    let everything = engine.everything();
    if !sinks.no_valkey {
        let url = &sinks.valkey_url;
        Namespaces::connect(url, Duration::from_secs(5))?.drop(name)?;
        ValkeySink::new(url, name)?.write(engine, &everything)?;
    }
    if !sinks.no_dynamodb {
        runtime()?
            .block_on(async {
                let client = toolrank_dynamodb::client().await;
                toolrank_state::create_state_table(&client, &sinks.state_table).await?;
                register(&client, &sinks.state_table, &sinks.table, name, true).await?;
                drop_in_table(&client, &sinks.table, name).await?;
                DynamoSink::in_namespace(client, &sinks.table, Namespace::Shadow(name.to_owned())).write(engine, &everything, today).await?;
                anyhow::Ok(())
            })
            .with_context(|| format!("writing namespace {name} into DynamoDB table {}", sinks.table))?;
    }
    note!(
        "wrote {} agents and {} patterns into namespace {name}; readers use {active} until `toolrank promote {name}`",
        everything.agents.len(),
        everything.patterns.len()
    );
    Ok(())
}
