//! Logs and metrics the way Lambda takes them: the level and format from the function's
//! log controls, and metrics as CloudWatch embedded-metric-format lines on stdout
//! (nothing scrapes a function).

use serde_json::{json, Map, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Logs to stderr at `AWS_LAMBDA_LOG_LEVEL` (TRACE, DEBUG, INFO, WARN, ERROR, FATAL; else
/// `TOOLRANK_LOG`, an env filter; else INFO), as JSON when `AWS_LAMBDA_LOG_FORMAT` is
/// JSON (or unset: structured logs by default), as text when it is Text.
pub fn init_logging() {
    let (filter, json) = log_controls(|k| std::env::var(k).ok());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).without_time().with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The filter and whether to log JSON, from the variables `var` reads.
fn log_controls(var: impl Fn(&str) -> Option<String>) -> (String, bool) {
    let level = var("AWS_LAMBDA_LOG_LEVEL").map(|l| match l.to_ascii_uppercase().as_str() {
        "TRACE" => "trace",
        "DEBUG" => "debug",
        "WARN" => "warn",
        "ERROR" | "FATAL" => "error",
        _ => "info",
    });
    let filter = level.map(str::to_owned).or_else(|| var("TOOLRANK_LOG")).unwrap_or_else(|| "info".into());
    let json = !var("AWS_LAMBDA_LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("text"));
    (filter, json)
}

/// One embedded-metric-format record: CloudWatch turns its members into metrics of the
/// `toolrank` namespace, per function.
pub struct MetricLine {
    definitions: Vec<Value>,
    values: Map<String, Value>,
}

impl MetricLine {
    pub fn new(function: &str) -> MetricLine {
        let mut values = Map::new();
        values.insert("FunctionName".into(), json!(function));
        MetricLine { definitions: Vec::new(), values }
    }

    pub fn count(self, name: &str, n: usize) -> MetricLine {
        self.metric(name, "Count", json!(n))
    }

    pub fn seconds(self, name: &str, d: Duration) -> MetricLine {
        self.metric(name, "Seconds", json!(d.as_secs_f64()))
    }

    fn metric(mut self, name: &str, unit: &str, value: Value) -> MetricLine {
        self.definitions.push(json!({ "Name": name, "Unit": unit }));
        self.values.insert(name.into(), value);
        self
    }

    /// The record as one line of JSON.
    pub fn render(&self, at: SystemTime) -> String {
        let millis = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut record = self.values.clone();
        record.insert(
            "_aws".into(),
            json!({
                "Timestamp": millis,
                "CloudWatchMetrics": [{ "Namespace": "toolrank", "Dimensions": [["FunctionName"]], "Metrics": self.definitions }],
            }),
        );
        Value::Object(record).to_string()
    }

    /// Writes the record to stdout, where the Lambda service picks it up.
    pub fn print(&self) {
        println!("{}", self.render(SystemTime::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_line_is_embedded_metric_format() {
        let line =
            MetricLine::new("fn").count("Records", 3).seconds("InvocationSeconds", Duration::from_millis(1500)).render(UNIX_EPOCH + Duration::from_secs(2));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["FunctionName"], "fn");
        assert_eq!(v["Records"], 3);
        assert_eq!(v["InvocationSeconds"], 1.5);
        assert_eq!(v["_aws"]["Timestamp"], 2000);
        let m = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(m["Namespace"], "toolrank");
        assert_eq!(m["Dimensions"], json!([["FunctionName"]]));
        assert_eq!(m["Metrics"], json!([{ "Name": "Records", "Unit": "Count" }, { "Name": "InvocationSeconds", "Unit": "Seconds" }]));
        assert!(!line.contains('\n'));
    }

    #[test]
    fn logs_follow_the_function_s_log_controls() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        assert_eq!(log_controls(vars(&[])), ("info".into(), true));
        assert_eq!(log_controls(vars(&[("AWS_LAMBDA_LOG_LEVEL", "DEBUG"), ("AWS_LAMBDA_LOG_FORMAT", "Text")])), ("debug".into(), false));
        assert_eq!(log_controls(vars(&[("AWS_LAMBDA_LOG_LEVEL", "FATAL"), ("TOOLRANK_LOG", "trace")])), ("error".into(), true));
        assert_eq!(log_controls(vars(&[("TOOLRANK_LOG", "toolrank=debug"), ("AWS_LAMBDA_LOG_FORMAT", "JSON")])), ("toolrank=debug".into(), true));
    }
}
