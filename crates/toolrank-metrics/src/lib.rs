//! Prometheus metrics: counters and gauges in one process-wide registry, served in the
//! text exposition format at `GET /metrics` on the address a command's `--metrics-addr`
//! names. Values are atomics, so the hot paths pay one relaxed add; rates (rows/s) are
//! left to Prometheus (`rate(toolrank_..._total[1m])`).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// One time series: a metric name with fixed labels. Holds an `f64` as bits.
#[derive(Debug)]
pub struct Metric {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    labels: String,
    bits: AtomicU64,
}

impl Metric {
    /// Adds to a counter (or a gauge).
    pub fn add(&self, by: f64) {
        let mut current = self.bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(current) + by).to_bits();
            match self.bits.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => current = now,
            }
        }
    }

    pub fn inc(&self) {
        self.add(1.0);
    }

    /// Sets the value: a gauge, or a counter kept elsewhere as a running total.
    pub fn set(&self, value: f64) {
        self.bits.store(value.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Relaxed))
    }
}

static REGISTRY: Mutex<Vec<Arc<Metric>>> = Mutex::new(Vec::new());

fn register(name: &'static str, help: &'static str, kind: Kind, labels: &[(&str, &str)]) -> Arc<Metric> {
    let labels = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect::<Vec<_>>().join(",");
    let mut all = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = all.iter().find(|m| m.name == name && m.labels == labels) {
        return m.clone();
    }
    let metric = Arc::new(Metric { name, help, kind, labels, bits: AtomicU64::new(0) });
    all.push(metric.clone());
    metric
}

/// The counter `name{labels}` (the same one on every call with the same name and labels).
pub fn counter(name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Arc<Metric> {
    register(name, help, Kind::Counter, labels)
}

/// The gauge `name{labels}`.
pub fn gauge(name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Arc<Metric> {
    register(name, help, Kind::Gauge, labels)
}

/// A batch job's running totals (`job` = replay, backfill, ...): records read, and bad
/// records dead-lettered. Rows/s is `rate(toolrank_job_records_total[1m])`.
pub fn job_progress(job: &str, records: u64, dead_letters: u64) {
    counter("toolrank_job_records_total", "Records (lines, items) a job read.", &[("job", job)]).set(records as f64);
    counter("toolrank_job_dead_letters_total", "Bad records a job dead-lettered.", &[("job", job)]).set(dead_letters as f64);
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Every metric in the text exposition format, grouped by name.
pub fn render() -> String {
    let all = REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut names: Vec<&'static str> = all.iter().map(|m| m.name).collect();
    names.sort_unstable();
    names.dedup();
    let mut out = String::new();
    for name in names {
        let series: Vec<&Arc<Metric>> = all.iter().filter(|m| m.name == name).collect();
        let kind = if series[0].kind == Kind::Counter { "counter" } else { "gauge" };
        out += &format!("# HELP {name} {}\n# TYPE {name} {kind}\n", series[0].help);
        for m in series {
            let labels = if m.labels.is_empty() { String::new() } else { format!("{{{}}}", m.labels) };
            out += &format!("{name}{labels} {}\n", m.get());
        }
    }
    out
}

/// Serves [`render`] at `GET /metrics` from a background thread; returns the bound address
/// (port 0 picks a free one).
pub fn serve(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            // Drain the headers.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let (status, body) = match request.split_whitespace().nth(1) {
                Some("/metrics") => ("200 OK", render()),
                _ => ("404 Not Found", "toolrank serves GET /metrics\n".to_owned()),
            };
            let mut stream = &stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn counters_and_gauges_are_served_in_the_text_format() {
        let c = counter("toolrank_test_rows_total", "Rows read.", &[("job", "replay")]);
        c.inc();
        c.add(2.0);
        assert!(Arc::ptr_eq(&c, &counter("toolrank_test_rows_total", "Rows read.", &[("job", "replay")])));
        gauge("toolrank_test_lag", "Lag.", &[]).set(1.5);
        let addr = serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains("# TYPE toolrank_test_rows_total counter\ntoolrank_test_rows_total{job=\"replay\"} 3\n"), "{response}");
        assert!(response.contains("# TYPE toolrank_test_lag gauge\ntoolrank_test_lag 1.5\n"), "{response}");
    }
}
