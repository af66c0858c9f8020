//! Prometheus metrics of every command. The code records through the [`metrics`] facade
//! (`counter!`, `gauge!`, `histogram!`; nothing is kept when no command serves them); a
//! command given `--metrics-addr` installs the Prometheus recorder ([`serve`]) and answers
//! `GET /metrics` (the text exposition format, with the process's CPU, memory, threads and
//! open files) and `GET /healthz`. Latencies are histograms in seconds; rates (rows/s) are
//! left to Prometheus (`rate(toolrank_..._total[1m])`).

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

pub use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};

/// Histogram buckets in seconds: a millisecond to five minutes.
const SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// How long a scrape may take to send its request or read the answer: a client that
/// connects and sends nothing holds only its own thread, for this long.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Why metrics could not be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("installing the metrics recorder: {0}")]
    Recorder(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Installs the Prometheus recorder and serves it at `GET /metrics` (and `GET /healthz`)
/// from background threads, one per connection; returns the bound address (port 0 picks
/// a free one).
pub fn serve(addr: SocketAddr) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let handle = PrometheusBuilder::new().set_buckets(SECONDS).and_then(PrometheusBuilder::install_recorder).map_err(|e| Error::Recorder(e.to_string()))?;
    describe_process();
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let handle = handle.clone();
            // A slow or idle client holds its own thread, never the next scrape.
            let _ = std::thread::Builder::new().name("metrics-scrape".into()).spawn(move || answer(stream, &handle));
        }
    })?;
    Ok(bound)
}

/// Answers one request.
fn answer(stream: TcpStream, handle: &PrometheusHandle) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut reader = BufReader::new(&stream);
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    // Drain the headers.
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    let (status, body) = match request.split_whitespace().nth(1) {
        Some("/metrics") => {
            record_process();
            ("200 OK", handle.render())
        }
        Some("/healthz") => ("200 OK", "ok\n".to_owned()),
        _ => ("404 Not Found", "toolrank serves GET /metrics and GET /healthz\n".to_owned()),
    };
    let mut stream = &stream;
    let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
}

/// A batch job's running totals (`job` = replay, backfill, ...): records read, and bad
/// records dead-lettered. Rows/s is `rate(toolrank_job_records_total[1m])`.
pub fn job_progress(job: &'static str, records: u64, dead_letters: u64) {
    describe_counter!("toolrank_job_records_total", "Records (lines, items) a job read.");
    describe_counter!("toolrank_job_dead_letters_total", "Bad records a job dead-lettered.");
    counter!("toolrank_job_records_total", "job" => job).absolute(records);
    counter!("toolrank_job_dead_letters_total", "job" => job).absolute(dead_letters);
}

fn describe_process() {
    describe_counter!("process_cpu_seconds_total", Unit::Seconds, "User and system CPU time the process spent.");
    describe_gauge!("process_resident_memory_bytes", Unit::Bytes, "Resident memory of the process.");
    describe_gauge!("process_virtual_memory_bytes", Unit::Bytes, "Virtual memory of the process.");
    describe_gauge!("process_threads", "Threads of the process.");
    describe_gauge!("process_open_fds", "Open file descriptors of the process.");
}

/// The process's own figures, read from /proc at each scrape (Linux; elsewhere nothing).
fn record_process() {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return };
    // The fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else { return };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // SAFETY: sysconf only reads a system constant.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK) as f64, libc::sysconf(libc::_SC_PAGESIZE) as f64) };
    // Fields 14 and 15 (utime, stime) of proc(5), 20 (threads), 23 (vsize), 24 (rss), counted from the state (3).
    if let (Some(utime), Some(stime)) = (field(11), field(12)) {
        if ticks > 0.0 {
            metrics::counter!("process_cpu_seconds_total").absolute(((utime + stime) / ticks) as u64);
        }
    }
    if let Some(threads) = field(17) {
        metrics::gauge!("process_threads").set(threads);
    }
    if let Some(vsize) = field(20) {
        metrics::gauge!("process_virtual_memory_bytes").set(vsize);
    }
    if let Some(rss) = field(21) {
        metrics::gauge!("process_resident_memory_bytes").set(rss * page);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(fds.count() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut conn = TcpStream::connect(addr).unwrap();
        write!(conn, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn counters_gauges_histograms_and_the_process_are_served_while_an_idle_client_waits() {
        let addr = serve("127.0.0.1:0".parse().unwrap()).unwrap();
        describe_counter!("toolrank_test_rows_total", "Rows read.");
        counter!("toolrank_test_rows_total", "job" => "replay").increment(3);
        gauge!("toolrank_test_lag").set(1.5);
        histogram!("toolrank_test_seconds").record(0.02);
        // A client that connects and sends nothing does not hold up the next scrape.
        let _idle = TcpStream::connect(addr).unwrap();
        let response = get(addr, "/metrics");
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains("# TYPE toolrank_test_rows_total counter\ntoolrank_test_rows_total{job=\"replay\"} 3\n"), "{response}");
        assert!(response.contains("toolrank_test_lag 1.5\n"), "{response}");
        assert!(response.contains("toolrank_test_seconds_bucket{le=\"0.025\"} 1\n"), "{response}");
        assert!(response.contains("process_resident_memory_bytes "), "{response}");
        assert!(get(addr, "/healthz").ends_with("\r\n\r\nok\n"));
        assert!(get(addr, "/other").starts_with("HTTP/1.1 404"));
    }
}
