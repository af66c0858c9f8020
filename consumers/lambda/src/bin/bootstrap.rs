//! The Lambda function: `bootstrap` for the `provided.al2023` runtime (cargo-lambda
//! layout). Settings from the environment (`toolrank lambda --help` lists them), logs by
//! the function's log controls, metrics as embedded-metric-format lines.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let started = std::time::Instant::now();
    toolrank_lambda::init_logging();
    let settings = toolrank_lambda::Settings::from_env().map_err(|e| e.render().to_string())?;
    toolrank_lambda::serve(settings.config(), started).await
}
