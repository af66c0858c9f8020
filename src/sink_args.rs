//! The options of every command that writes or reads the sinks.

use anyhow::{Context, Result};
use toolrank_events::Day;

/// The namespace of the live pipeline until another is promoted.
pub const DEFAULT_NAMESPACE: &str = "tr";

#[derive(clap::Args, Clone)]
pub struct SinkArgs {
    /// The DynamoDB table that receives the rankings (the seed's own table).
    #[arg(long, global = true, env = "TOOLRANK_TABLE", default_value = "AgentTable")]
    pub table: String,
    /// The pipeline's state table (checkpoints, leases).
    #[arg(long, global = true, env = "TOOLRANK_STATE_TABLE", default_value = "toolrank-state")]
    pub state_table: String,
    /// Valkey URL.
    #[arg(long, global = true, env = "TOOLRANK_VALKEY_URL", hide_env_values = true, default_value = "redis://127.0.0.1:6379")]
    pub valkey_url: String,
    /// Valkey key prefix of the rankings (a namespace). Default: the one `toolrank
    /// promote` made active, else "tr".
    #[arg(long, global = true, env = "TOOLRANK_NAMESPACE")]
    pub namespace: Option<String>,
    /// With --namespace: a shadow namespace, registered as such, whose DynamoDB rankings
    /// are items of its own rather than the application's items (e.g. a consumer group
    /// rebuilding a namespace to promote later). Names `replay --namespace` wrote are
    /// shadows already.
    #[arg(long, global = true, requires = "namespace")]
    pub shadow: bool,
    /// Score for this UTC date (YYYY-MM-DD); default today.
    #[arg(long, global = true)]
    pub today: Option<String>,
    /// Do not write DynamoDB.
    #[arg(long, global = true)]
    pub no_dynamodb: bool,
    /// Do not write Valkey.
    #[arg(long, global = true)]
    pub no_valkey: bool,
}

impl SinkArgs {
    pub fn today(&self) -> Result<Option<Day>> {
        self.today.as_deref().map(|t| Day::parse_iso(t).with_context(|| format!("--today {t:?} is not a YYYY-MM-DD date"))).transpose()
    }
}
