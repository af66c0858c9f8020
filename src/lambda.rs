//! `toolrank lambda`: the Lambda handler under any Lambda Runtime API endpoint.

use anyhow::{anyhow, Result};
use std::process::ExitCode;

/// Serve the Lambda handler for DynamoDB Streams and Kinesis events.
///
/// This is what the function's `bootstrap` binary (crate toolrank-lambda, built with
/// `cargo lambda build -p toolrank-lambda` or `cargo build -p toolrank-lambda --bin
/// bootstrap`) does, for container images and local runs against a Runtime API
/// endpoint. It reads AWS_LAMBDA_RUNTIME_API, AWS_LAMBDA_FUNCTION_NAME,
/// AWS_LAMBDA_FUNCTION_MEMORY_SIZE and AWS_LAMBDA_FUNCTION_VERSION like every Lambda
/// runtime, and its own settings from the environment: TOOLRANK_STATE_TABLE,
/// TOOLRANK_TABLE (empty disables the DynamoDB sink), TOOLRANK_VALKEY_URL (unset
/// disables Valkey), TOOLRANK_NAMESPACE, TOOLRANK_BUCKETS (1: bucket logs the
/// invocations append to; more when many shards race for one), TOOLRANK_COMPACT_BYTES,
/// TOOLRANK_SINK_INTERVAL_MS (1000: the sinks are written at most this often),
/// TOOLRANK_APPLICATION, TOOLRANK_TODAY. Enable ReportBatchItemFailures on the event
/// source mapping, and invoke the function on a schedule (EventBridge, e.g. every
/// minute): an event without `Records` writes the sinks with what the interval held back.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(toolrank_lambda::serve(std::time::Instant::now())).map_err(|e| anyhow!("lambda runtime: {e}"))?;
    Ok(ExitCode::SUCCESS)
}
