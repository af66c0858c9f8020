//! The Lambda function: `bootstrap` for the `provided.al2023` runtime (cargo-lambda
//! layout). Configuration from the environment: see `toolrank_lambda::Config::from_env`.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let started = std::time::Instant::now();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOOLRANK_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().json().with_env_filter(filter).with_target(false).without_time().init();
    toolrank_lambda::serve(started).await
}
