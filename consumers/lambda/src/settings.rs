//! The function's settings: one clap definition, read from the environment by `bootstrap`
//! and from flags or the environment by `toolrank lambda`, so `toolrank lambda --help`
//! lists every variable the function reads.

use clap::{Args, Parser};
use std::time::Duration;
use toolrank_events::Day;
use toolrank_state::COMPACT_MIN_BYTES;

/// The DynamoDB sink's write budget by default: `consume kafka`'s.
pub const DEFAULT_WRITES_PER_EVENT: f64 = 0.05;

/// What the handler needs, from the function's environment.
#[derive(Clone, Debug)]
pub struct Config {
    pub application: String,
    pub state_table: String,
    pub table: Option<String>,
    pub valkey_url: Option<String>,
    pub valkey_prefix: String,
    pub today: Option<Day>,
    pub buckets: u32,
    /// A bucket's log is compacted once its deltas add up to the base's size, or this.
    pub compact_bytes: u64,
    /// How long an invocation waits for the sink lease.
    pub sink_wait: Duration,
    /// The sinks are written at most this often, by whichever container is invoked once
    /// the interval is up; in between, invocations only append to the bucket logs, and
    /// the next write (or a flush event) carries their changes. Coalesces sink writes
    /// across invocations, as the long-running consumers do across their flush interval.
    pub sink_interval: Duration,
    /// The DynamoDB sink's write budget (items per record appended to the bucket logs
    /// since its last write; `None`: every sink interval), as `consume kafka
    /// --dynamodb-writes-per-event`: a due write waits for later invocations until it
    /// keeps to it, at most `dynamodb_max_defer`. Valkey is written at every interval.
    pub dynamodb_writes_per_event: Option<f64>,
    pub dynamodb_max_defer: Duration,
    /// `TOOLRANK_DYNAMODB_MAX_WCU`: the sink's write capacity budget per second, if any
    /// (as `consume kafka --dynamodb-max-wcu`).
    pub dynamodb_max_wcu: Option<f64>,
    /// How long a removed item's tombstone is kept in a bucket.
    pub tombstone_horizon: Duration,
    /// The SQS queue records that do not decode are sent to; `None`: they are counted
    /// and logged by sequence number and reason only.
    pub dead_letter_queue_url: Option<String>,
    /// Records larger than this are dead-lettered before they are decoded.
    pub max_record_bytes: usize,
}

/// The Lambda function's settings (each also a `TOOLRANK_*` environment variable).
#[derive(Args, Clone, Debug)]
pub struct Settings {
    /// Names the function's state: its bucket logs and sink lease in the state table.
    #[arg(long, env = "TOOLRANK_APPLICATION", default_value = "lambda")]
    pub application: String,
    /// The pipeline's own table: bucket logs, leases.
    #[arg(long, env = "TOOLRANK_STATE_TABLE", default_value = "toolrank-state")]
    pub state_table: String,
    /// The application table the rankings are written to (Agent items, UserPrcToolMapp
    /// items). Set to an empty value to write no DynamoDB sink.
    #[arg(long, env = "TOOLRANK_TABLE", default_value = "AgentTable")]
    pub table: String,
    /// Valkey for the live rankings (redis:// URL); unset writes no Valkey sink.
    #[arg(long, env = "TOOLRANK_VALKEY_URL", hide_env_values = true)]
    pub valkey_url: Option<String>,
    /// The namespace (Valkey key prefix); default: the one `toolrank promote` made active,
    /// read at cold start, else `tr`.
    #[arg(long, env = "TOOLRANK_NAMESPACE")]
    pub namespace: Option<String>,
    /// Score for this day (YYYY-MM-DD); default: the day of each write.
    #[arg(long, env = "TOOLRANK_TODAY", value_parser = parse_day)]
    pub today: Option<Day>,
    /// Bucket logs the records hash into (by PK); more when many shards or a
    /// ParallelizationFactor above 1 make invocations race for one log.
    #[arg(long, env = "TOOLRANK_BUCKETS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub buckets: u32,
    /// A bucket's log is compacted into a new base once its deltas add up to the base's
    /// size, and at least this many bytes.
    #[arg(long, env = "TOOLRANK_COMPACT_BYTES", default_value_t = COMPACT_MIN_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub compact_bytes: u64,
    /// The sinks are written at most this often (ms), by whichever invocation comes once
    /// it is up; 0 writes them at every invocation.
    #[arg(long, env = "TOOLRANK_SINK_INTERVAL_MS", default_value_t = 1000.0, value_parser = non_negative)]
    pub sink_interval_ms: f64,
    /// The DynamoDB sink's write budget: items per record appended since its last write
    /// (0 turns it off), as `consume kafka --dynamodb-writes-per-event`.
    #[arg(long, env = "TOOLRANK_DYNAMODB_WRITES_PER_EVENT", default_value_t = DEFAULT_WRITES_PER_EVENT, value_parser = non_negative)]
    pub dynamodb_writes_per_event: f64,
    /// The longest a DynamoDB write waits for the budget (ms).
    #[arg(long, env = "TOOLRANK_DYNAMODB_MAX_DEFER_MS", default_value_t = 60_000.0, value_parser = non_negative)]
    pub dynamodb_max_defer_ms: f64,
    /// Write capacity units a second the DynamoDB sink may spend (unset: no limit).
    #[arg(long, env = "TOOLRANK_DYNAMODB_MAX_WCU", value_parser = non_negative)]
    pub dynamodb_max_wcu: Option<f64>,
    /// How long a removed item's tombstone is kept (s): at least the stream's retention
    /// (24 h) plus the longest a failed batch is retried.
    #[arg(long, env = "TOOLRANK_TOMBSTONE_HORIZON_SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub tombstone_horizon_secs: Option<u64>,
    /// The SQS queue (URL) a record that does not decode is sent to, whole, with its
    /// reason and sequence number; a failed send fails the batch from that record. Unset:
    /// such records are counted and logged by sequence number and reason only (never
    /// their contents).
    #[arg(long, env = "TOOLRANK_DEAD_LETTER_QUEUE_URL")]
    pub dead_letter_queue_url: Option<String>,
    /// Records larger than this many bytes (a Kinesis record's data, a stream record's
    /// JSON) are dead-lettered before they are decoded (default: DynamoDB's item limit).
    #[arg(long, env = "TOOLRANK_MAX_RECORD_BYTES", default_value_t = toolrank_live::DEFAULT_MAX_RECORD_BYTES)]
    pub max_record_bytes: usize,
}

/// `bootstrap`'s command line: the settings alone, from the environment.
#[derive(Parser)]
#[command(name = "bootstrap")]
struct FromEnv {
    #[command(flatten)]
    settings: Settings,
}

impl Settings {
    /// The settings from the environment alone (the function's configuration).
    pub fn from_env() -> Result<Settings, clap::Error> {
        FromEnv::try_parse_from(["bootstrap"]).map(|f| f.settings)
    }

    /// The handler's configuration; reads the active namespace from Valkey when none is set.
    pub fn config(self) -> Config {
        let valkey_prefix = self
            .namespace
            .or_else(|| {
                let url = self.valkey_url.as_deref()?;
                toolrank_sink_wiring::Namespaces::connect(url, Duration::from_secs(1)).and_then(|mut n| n.active()).ok().flatten()
            })
            .unwrap_or_else(|| "tr".into());
        Config {
            application: self.application,
            state_table: self.state_table,
            table: Some(self.table).filter(|t| !t.is_empty()),
            valkey_url: self.valkey_url,
            valkey_prefix,
            today: self.today,
            buckets: self.buckets,
            compact_bytes: self.compact_bytes,
            sink_wait: Duration::from_secs(20),
            sink_interval: Duration::from_millis(self.sink_interval_ms as u64),
            dynamodb_writes_per_event: Some(self.dynamodb_writes_per_event).filter(|&b| b > 0.0),
            dynamodb_max_defer: Duration::from_millis(self.dynamodb_max_defer_ms as u64),
            dynamodb_max_wcu: self.dynamodb_max_wcu,
            tombstone_horizon: self.tombstone_horizon_secs.map_or(toolrank_live::DEFAULT_TOMBSTONE_HORIZON, Duration::from_secs),
            dead_letter_queue_url: self.dead_letter_queue_url.filter(|u| !u.is_empty()),
            max_record_bytes: self.max_record_bytes,
        }
    }
}

fn parse_day(s: &str) -> Result<Day, String> {
    Day::parse_iso(s).ok_or_else(|| format!("{s:?} is not a YYYY-MM-DD date"))
}

fn non_negative(s: &str) -> Result<f64, String> {
    s.parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0).ok_or_else(|| format!("{s:?} is not a number, 0 or more"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, clap::Error> {
        FromEnv::try_parse_from(std::iter::once("bootstrap").chain(args.iter().copied())).map(|f| f.settings)
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = parse(&["--namespace", "tr"]).unwrap().config();
        assert_eq!((c.application.as_str(), c.state_table.as_str(), c.table.as_deref()), ("lambda", "toolrank-state", Some("AgentTable")));
        assert_eq!((c.buckets, c.compact_bytes, c.sink_interval), (1, COMPACT_MIN_BYTES, Duration::from_secs(1)));
        assert_eq!(c.dynamodb_writes_per_event, Some(DEFAULT_WRITES_PER_EVENT));
        assert_eq!((c.dynamodb_max_defer, c.dynamodb_max_wcu), (Duration::from_secs(60), None));
        assert_eq!(c.tombstone_horizon, toolrank_live::DEFAULT_TOMBSTONE_HORIZON);
    }

    #[test]
    fn an_empty_table_writes_no_dynamodb_sink_and_a_zero_budget_is_none() {
        let c = parse(&["--table", "", "--dynamodb-writes-per-event", "0", "--namespace", "x"]).unwrap().config();
        assert_eq!((c.table, c.dynamodb_writes_per_event, c.valkey_prefix.as_str()), (None, None, "x"));
    }

    #[test]
    fn bad_values_are_refused_with_their_variable() {
        for args in [&["--buckets", "0"][..], &["--today", "2025-13-01"], &["--sink-interval-ms=-1"], &["--compact-bytes", "x"]] {
            let e = parse(args).unwrap_err().to_string();
            let flag = args[0].split('=').next().unwrap();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
    }
}
