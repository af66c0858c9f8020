//! The batch path: `toolrank warehouse score` and `toolrank reconcile` (`toolrank mirror`
//! keeps the warehouse's copy of the table).

use crate::output;
use crate::sinks::{read_sink, From, SinkArgs};
use anyhow::{bail, Context, Result};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use toolrank_engine::{Engine, Report, StagingRow};
use toolrank_events::{Action, AgentItem, Change, Day, Entity, Execution, METADATA_SK};
use toolrank_warehouse::{reconcile, results, sql, DataApi, Target, Value};

/// Where the warehouse is: a Redshift Serverless workgroup or a provisioned cluster, and
/// the database holding the mirror ("AgentTable") and the analysis tables. The Data API
/// endpoint comes from the AWS configuration (AWS_ENDPOINT_URL_REDSHIFT_DATA for the local
/// one that infra/local/up starts; there, the workgroup defaults to "local").
#[derive(clap::Args, Clone)]
pub struct WarehouseArgs {
    /// Redshift Serverless workgroup.
    #[arg(long, env = "TOOLRANK_REDSHIFT_WORKGROUP", conflicts_with = "cluster_identifier")]
    workgroup: Option<String>,
    /// Provisioned cluster identifier.
    #[arg(long, env = "TOOLRANK_REDSHIFT_CLUSTER")]
    cluster_identifier: Option<String>,
    /// Database user (provisioned cluster with temporary credentials).
    #[arg(long, env = "TOOLRANK_REDSHIFT_DB_USER")]
    db_user: Option<String>,
    /// Secrets Manager secret with the database credentials.
    #[arg(long, env = "TOOLRANK_REDSHIFT_SECRET_ARN")]
    secret_arn: Option<String>,
    /// Database name.
    #[arg(long, env = "TOOLRANK_REDSHIFT_DATABASE", default_value = "dev")]
    database: String,
    /// Seconds a statement may run before it is cancelled and the command fails.
    #[arg(long, env = "TOOLRANK_STATEMENT_TIMEOUT", default_value_t = 600.0, value_parser = crate::args::seconds)]
    statement_timeout: f64,
}

impl WarehouseArgs {
    pub async fn connect(&self) -> Result<DataApi> {
        let target = match (&self.workgroup, &self.cluster_identifier) {
            (Some(name), _) => Target::Workgroup { name: name.clone(), secret_arn: self.secret_arn.clone() },
            (None, Some(id)) => Target::Cluster { id: id.clone(), db_user: self.db_user.clone(), secret_arn: self.secret_arn.clone() },
            // The local endpoint (infra/local/up) takes any workgroup.
            (None, None) if std::env::var_os("AWS_ENDPOINT_URL_REDSHIFT_DATA").is_some() => Target::Workgroup { name: "local".into(), secret_arn: None },
            (None, None) => bail!("no warehouse: set --workgroup (TOOLRANK_REDSHIFT_WORKGROUP) or --cluster-identifier (TOOLRANK_REDSHIFT_CLUSTER)"),
        };
        if self.statement_timeout.is_nan() || self.statement_timeout <= 0.0 {
            bail!("--statement-timeout must be positive");
        }
        Ok(DataApi::connect(target, &self.database, Duration::from_secs_f64(self.statement_timeout)).await)
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn today(sinks: &SinkArgs) -> Result<Day> {
    Ok(sinks.today()?.unwrap_or_else(Day::today_utc))
}

/// Run the seed's analysis in the warehouse (sql/redshift through the Redshift Data API).
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    Score(ScoreArgs),
}

/// Score in the warehouse: run sql/redshift over the mirrored "AgentTable" and read the
/// analysis tables back.
///
/// Each SQL file runs as one transaction (BatchExecuteStatement): 00_schema (tables and
/// views, idempotent), 10_staging and 20_scores (or 30_incremental with --incremental),
/// then 25_today for --today. Statements are polled until done and cancelled after
/// --statement-timeout; results are paged through GetStatementResult.
///
///   eval "$(infra/local/up)"
///   toolrank mirror examples/seed-sample.jsonl
///   toolrank warehouse score --today 2025-07-14 --out /tmp/batch
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
struct ScoreArgs {
    #[command(flatten)]
    warehouse: WarehouseArgs,
    /// Write the tables (and staging) in `toolrank replay --out` format.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the results into DynamoDB and Valkey through the streaming sinks (the seed's
    /// batch path). Not beside a live consumer writing the same table and namespace.
    #[arg(long)]
    push: bool,
    /// Apply only what changed in the mirror since the last run (30_incremental.sql).
    #[arg(long)]
    incremental: bool,
    #[command(flatten)]
    sinks: SinkArgs,
}

pub fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        Command::Score(args) => score(args),
    }
}

/// Runs the scoring files; the full recomputation or the incremental one.
async fn run_scoring(api: &DataApi, today: Day, incremental: bool) -> Result<()> {
    let files = if incremental { vec![sql::SCHEMA, sql::INCREMENTAL, sql::TODAY] } else { vec![sql::SCHEMA, sql::STAGING, sql::SCORES, sql::TODAY] };
    for file in files {
        let started = Instant::now();
        api.batch(sql::batch(&file, today))
            .await
            .with_context(|| format!("running sql/redshift/{} (it reads \"AgentTable\": Zero-ETL's, or `toolrank mirror`'s)", file.name))?;
        tracing::info!(file = file.name, secs = started.elapsed().as_secs_f64(), "ran");
    }
    Ok(())
}

fn score(args: ScoreArgs) -> Result<ExitCode> {
    let today = today(&args.sinks)?;
    let rt = runtime()?;
    let (report, staging, catalog) = rt.block_on(async {
        let api = args.warehouse.connect().await?;
        run_scoring(&api, today, args.incremental).await?;
        let report = results::read(&api).await?;
        let (staging, catalog) =
            if args.out.is_some() || args.push { (results::staging(&api).await?, results::catalog(&api).await?) } else { Default::default() };
        anyhow::Ok((report, staging, catalog))
    })?;
    if let Some(dir) = &args.out {
        output::write_report(dir, &report, false)?;
        write_staging(&dir.join("staging.jsonl"), &staging)?;
        note!(
            "wrote {} agents, {} patterns, {} tool-error rows, {} staging rows to {}",
            report.agents.len(),
            report.patterns.len(),
            report.tool_errors.len(),
            staging.len(),
            dir.display()
        );
    } else {
        output::print_tables(&report, 20, &mut crate::stdout())?;
    }
    if args.push {
        push(&rt, &args.sinks, &staging, &catalog, today)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn write_staging(path: &Path, rows: &[results::Staging]) -> Result<()> {
    use std::io::Write;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    for r in rows {
        let row = StagingRow {
            user_id: &r.user_id,
            session_id: &r.session_id,
            process_id: &r.process_id,
            domain_id: &r.domain_id,
            agent_id: &r.agent_id,
            tool_id: &r.tool_id,
            tool_nm: &r.tool_nm,
            execution_date: r.at.day,
            execution_datetime: r.at,
            success_flag: r.success,
        };
        serde_json::to_writer(&mut w, &row)?;
        w.write_all(b"\n")?;
    }
    w.flush().with_context(|| format!("writing {}", path.display()))
}

/// The warehouse's staging table and catalog as an engine, written through the sinks.
fn push(rt: &tokio::runtime::Runtime, sinks: &SinkArgs, staging: &[results::Staging], catalog: &[results::CatalogEntry], today: Day) -> Result<()> {
    let mut engine = Engine::new();
    for a in catalog {
        let agent = AgentItem { domain_id: Cow::Borrowed(&a.domain_id), name: a.agent_name.as_deref().map(Cow::Borrowed), partial: false };
        engine.apply(&Change { pk: Cow::Borrowed(&a.agent_id), sk: Cow::Borrowed(METADATA_SK), seq: None, action: Action::Put(Entity::Agent(agent)) });
    }
    for r in staging {
        let execution = Execution { tool_nm: Cow::Borrowed(&r.tool_nm), at: r.at, success: r.success };
        let (pk, sk) = (format!("{}#{}", r.user_id, r.session_id), format!("{}#{}#{}", r.process_id, r.agent_id, r.tool_id));
        engine.apply(&Change { pk: pk.into(), sk: sk.into(), seq: None, action: Action::Put(Entity::Execution(execution)) });
    }
    engine.flush();
    let everything = engine.everything();
    let target = crate::namespace::target(sinks);
    if !sinks.no_dynamodb {
        rt.block_on(async {
            let mut sink = toolrank_sink_dynamodb::DynamoSink::in_namespace(toolrank_dynamodb::client().await, sinks.table.clone(), target.dynamodb);
            sink.write(&engine, &everything, today).await
        })
        .context("writing the DynamoDB sink")?;
    }
    if !sinks.no_valkey {
        toolrank_sink_valkey::ValkeySink::new(&sinks.valkey_url, target.name)?.write(&engine, &everything).context("writing the Valkey sink")?;
    }
    note!("pushed {} agents and {} patterns to the sinks", everything.agents.len(), everything.patterns.len());
    Ok(())
}

/// Compare the streaming sinks with the warehouse, table by table.
///
/// Sets the warehouse's today-dependent columns for --today (25_today.sql; --score runs
/// the whole scoring first), checks the warehouse's tables against a recount from its
/// staging table (40_reconcile.sql), then compares every row the sink holds with the
/// warehouse's: counts, names and dates exactly, scores to 1e-9 relative. DynamoDB holds
/// only the recommended patterns, so only those are compared with it. Exit code 0 when
/// everything agrees, 1 otherwise.
///
///   toolrank reconcile --today 2025-07-14 --from valkey
#[derive(clap::Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    warehouse: WarehouseArgs,
    /// The streaming sink to compare.
    #[arg(long, value_enum, default_value = "valkey")]
    from: From,
    /// Run the full warehouse scoring first.
    #[arg(long)]
    score: bool,
    /// Differences and missing rows listed per table.
    #[arg(long, default_value_t = 10)]
    show: usize,
    #[command(flatten)]
    sinks: SinkArgs,
}

pub fn reconcile(args: ReconcileArgs) -> Result<ExitCode> {
    let today = today(&args.sinks)?;
    let rt = runtime()?;
    let (mut warehouse, self_check) = rt.block_on(async {
        let api = args.warehouse.connect().await?;
        if args.score {
            run_scoring(&api, today, false).await?;
        } else {
            api.batch(sql::batch(&sql::TODAY, today)).await.context("running sql/redshift/25_today.sql (run `toolrank warehouse score` first)")?;
        }
        let check = sql::statements(sql::RECONCILE.text).concat();
        let self_check = api.query(&check, &[]).await.context("running sql/redshift/40_reconcile.sql")?;
        anyhow::Ok((results::read(&api).await?, self_check))
    })?;
    let stream: Report = read_sink(args.from, &args.sinks, today)?;
    if args.from == From::Dynamodb {
        warehouse.patterns.retain(|p| p.is_recommended);
    }
    let tables = reconcile::compare(&stream, &warehouse);
    out!(
        "stream ({}) versus warehouse, scored for {}:",
        if args.from == From::Valkey { "valkey" } else { "dynamodb" },
        String::from_utf8_lossy(&today.iso_bytes())
    );
    std::io::Write::write_all(&mut crate::stdout(), reconcile::render(&tables, args.show).as_bytes())?;
    let mut agree = tables.iter().all(reconcile::TableReport::agrees);
    if !self_check.rows.is_empty() {
        agree = false;
        out!("\nwarehouse self-check (40_reconcile.sql): {} rows disagree with a recount from staging:", self_check.rows.len());
        for row in self_check.rows.iter().take(args.show) {
            let cells: Vec<String> = row.iter().map(|v| if let Value::Text(s) = v { s.clone() } else { format!("{v:?}") }).collect();
            out!("  {}", cells.join("  "));
        }
    }
    out!("\n{}", if agree { "AGREE" } else { "DISAGREE" });
    Ok(if agree { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
