//! The sinks a binary runs with, built from their settings: the runtime
//! (`toolrank-live`) writes whatever it is given; the binaries (`toolrank`, the Lambda
//! function's `bootstrap`) decide what that is, here.

use std::time::Duration;
use toolrank_sink::{Pace, Wired};
use toolrank_sink_dynamodb::DynamoSink;
pub use toolrank_sink_dynamodb::Namespace;
pub use toolrank_sink_valkey::Namespaces;
use toolrank_sink_valkey::ValkeySink;

/// Where the rankings go and how often.
#[derive(Clone, Debug)]
pub struct SinkSettings {
    /// The DynamoDB sink's table; `None` disables the sink.
    pub table: Option<String>,
    /// Where in the table: the live items, or a shadow namespace's.
    pub dynamodb_namespace: Namespace,
    /// How often changes reach DynamoDB: every write costs money, so it coalesces longer
    /// than Valkey.
    pub dynamodb_interval: Duration,
    /// While a backlog is read, DynamoDB writes wait as long as its records are late, up
    /// to this; also the longest a round waits for the write budget. Zero disables.
    pub dynamodb_max_defer: Duration,
    /// A DynamoDB round waits (up to `dynamodb_max_defer`) until it writes at most this
    /// many items per event read since the last round. `None`: every interval.
    pub dynamodb_writes_per_event: Option<f64>,
    /// Write capacity units per second the DynamoDB sink may spend (one per item written;
    /// its items are under 1 KB): a round is spread out instead of bursting. `None`: no limit.
    pub dynamodb_max_wcu: Option<f64>,
    /// Valkey URL; `None` disables the sink.
    pub valkey_url: Option<String>,
    /// The Valkey key prefix (the namespace).
    pub valkey_prefix: String,
}

/// A sink's settings that do not make a sink.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error(#[from] toolrank_sink_valkey::Error);

impl SinkSettings {
    /// The configured sinks, DynamoDB first, then Valkey (whose writes make records
    /// visible: the latency is measured there).
    pub fn wire(&self) -> Result<Vec<Wired>, Error> {
        self.wire_shard(0, 1)
    }

    /// Every sink shard's sinks, by shard ([`wire_shard`](Self::wire_shard)).
    pub fn wire_shards(&self, count: u32) -> Result<Vec<Vec<Wired>>, Error> {
        (0..count).map(|shard| self.wire_shard(shard, count)).collect()
    }

    /// The sinks of shard `shard` of `count`: they write the keys of its users only, and
    /// fence their writes with its lease's tokens.
    pub fn wire_shard(&self, shard: u32, count: u32) -> Result<Vec<Wired>, Error> {
        let mut sinks = Vec::new();
        if let Some(table) = &self.table {
            let client = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime").block_on(toolrank_dynamodb::client());
            // A shard writes its share of the items: its share of the budget and capacity.
            let share = f64::from(count.max(1));
            let max_wcu = self.dynamodb_max_wcu.map(|w| w / share);
            let sink = DynamoSink::in_namespace(client, table.clone(), self.dynamodb_namespace.clone()).with_max_wcu(max_wcu).for_shard(shard, count);
            let writes_per_event = self.dynamodb_writes_per_event.map(|w| w / share);
            let pace = Pace::Paced { interval: self.dynamodb_interval, max_defer: self.dynamodb_max_defer, writes_per_event };
            sinks.push(Wired::new(sink, pace));
        }
        if let Some(url) = &self.valkey_url {
            let mut sink = ValkeySink::new(url, self.valkey_prefix.clone())?.for_shard(shard, count);
            sink.verify()?;
            sinks.push(Wired::new(sink, Pace::Live));
        }
        Ok(sinks)
    }
}
