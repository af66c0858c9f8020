//! `toolrank lambda`: the Lambda handler under any Lambda Runtime API endpoint.

use anyhow::{anyhow, Result};
use std::process::ExitCode;

/// Serve the Lambda handler for DynamoDB Streams and Kinesis events.
///
/// This is what the function's `bootstrap` binary (crate toolrank-lambda, built by
/// `infra/aws/package` or `cargo lambda build -p toolrank-lambda`) does, for container
/// images and local runs against a Runtime API endpoint. It reads AWS_LAMBDA_RUNTIME_API,
/// AWS_LAMBDA_FUNCTION_NAME, AWS_LAMBDA_FUNCTION_MEMORY_SIZE and
/// AWS_LAMBDA_FUNCTION_VERSION like every Lambda runtime, and the settings below, which
/// the function takes from the same environment variables (bootstrap also follows
/// AWS_LAMBDA_LOG_LEVEL and AWS_LAMBDA_LOG_FORMAT). Enable ReportBatchItemFailures on the
/// event source mapping, and invoke the function on a schedule (EventBridge, e.g. every
/// minute): an event without `Records` writes the sinks with what the interval held back.
/// Each invocation prints its figures to stdout as a CloudWatch embedded-metric-format line.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    settings: toolrank_lambda::Settings,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    let config = args.settings.config();
    rt.block_on(toolrank_lambda::serve(config, std::time::Instant::now())).map_err(|e| anyhow!("lambda runtime: {e}"))?;
    Ok(ExitCode::SUCCESS)
}
