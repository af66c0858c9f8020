//! `toolrank setup`: the Kafka topics and the DynamoDB table the live pipeline uses.

use anyhow::Result;
use std::process::ExitCode;
use toolrank_dynamodb::TableStatusReport;
use toolrank_kafka::TopicStatus;

/// Create, if missing, the Kafka topics and the DynamoDB table. Idempotent.
///
/// Topics: the events topic and its dead-letter topic, with --partitions partitions
/// (partitions bound how many consumers of a group share the work). Table: AgentTable
/// with PK/SK, GSI1 on GSI1_PK/GSI1_SK, a NEW_AND_OLD_IMAGES stream and TTL on ExpireAt,
/// and the pipeline's state table.
/// Endpoints come from the environment; `eval "$(infra/local/up)"` sets them locally.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub kafka: crate::kafka_connection::ConnectionArgs,
    /// The events topic.
    #[arg(long, env = "TOOLRANK_TOPIC", default_value = "toolrank-events")]
    pub topic: String,
    /// The dead-letter topic.
    #[arg(long, env = "TOOLRANK_DEAD_LETTER_TOPIC", default_value = "toolrank-dead-letters")]
    pub dead_letter_topic: String,
    /// Partitions of each new topic.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// The DynamoDB table.
    #[arg(long, env = "TOOLRANK_TABLE", default_value = "AgentTable")]
    pub table: String,
    /// The pipeline's state table (checkpoints and leases; no stream).
    #[arg(long, env = "TOOLRANK_STATE_TABLE", default_value = "toolrank-state")]
    pub state_table: String,
    /// Leave Kafka alone.
    #[arg(long)]
    pub no_kafka: bool,
    /// Leave DynamoDB alone.
    #[arg(long)]
    pub no_dynamodb: bool,
    /// Create the table without a stream: when only Kafka feeds the pipeline, nothing
    /// reads it (DynamoDB Streams, Lambda and Kinesis consumers need it).
    #[arg(long)]
    pub no_stream: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    tokio::runtime::Runtime::new()?.block_on(async {
        if !args.no_kafka {
            let topics = [(args.topic.as_str(), args.partitions), (args.dead_letter_topic.as_str(), args.partitions)];
            for (name, status) in toolrank_kafka::create_topics(&args.kafka.connect()?, &topics).await? {
                let what = if status == TopicStatus::Created { "created" } else { "exists:" };
                note!("kafka topic {what} {name}");
            }
        }
        if !args.no_dynamodb {
            let client = toolrank_dynamodb::client().await;
            let status = toolrank_dynamodb::create_table(&client, &args.table, !args.no_stream).await?;
            let what = if status == TableStatusReport::Created { "created" } else { "exists:" };
            note!("dynamodb table {what} {}", args.table);
            let status = toolrank_state::create_state_table(&client, &args.state_table).await?;
            let what = if status == TableStatusReport::Created { "created" } else { "exists:" };
            note!("dynamodb table {what} {}", args.state_table);
        }
        Ok(ExitCode::SUCCESS)
    })
}
