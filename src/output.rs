//! Writing a report: `replay --out` JSONL files, and readable tables on stdout.

use crate::out_file::OutFile;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use toolrank_engine::{Engine, PatternRow, Report, StagingKey, StagingOrder, StagingRow};
use toolrank_events::Day;
use unicode_width::UnicodeWidthStr;

/// A row as serde writes it, as a JSON line.
fn serde_line<T: Serialize>(row: &T, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, row).expect("report rows serialize to a Vec");
    out.push(b'\n');
}

/// Sessions per piece of the staging table: pieces are rendered alternately by two
/// threads and written in order.
const STAGING_PIECE: usize = 1024;

/// The `replay --out` layout: one file per seed table. The staging table, by far the
/// largest, is put in order by this thread, then rendered in pieces by two threads and
/// written by a third, while a fourth builds and writes the report from the start. Each
/// renderer fills the buffers the writer hands back, so the output costs no fresh memory
/// beyond a few pieces; with `direct`, not even the page cache's ([`OutFile`]).
pub fn write_dir(dir: &Path, engine: &Engine, today: Day, direct: bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("staging.jsonl");
    let file = OutFile::create(&path, direct).with_context(|| format!("creating {}", path.display()))?;
    let started = std::time::Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let report = std::thread::Builder::new().name("report".into()).spawn_scoped(s, || -> Result<_> {
            let names = engine.pattern_sequence_names();
            let report = engine.borrowed_report(&names, today);
            let built = started.elapsed();
            write_report(dir, &report, direct)?;
            Ok((built, started.elapsed()))
        })?;
        let order = engine.staging_order();
        let ordered = started.elapsed();
        let written = write_staging(&order, file);
        let (built, reported) = report.join().expect("the report writer does not panic")?;
        tracing::debug!(
            staging_order_s = ordered.as_secs_f64(),
            report_built_s = built.as_secs_f64(),
            report_s = reported.as_secs_f64(),
            staging_s = started.elapsed().as_secs_f64(),
            "output phases"
        );
        written.with_context(|| format!("writing {}", path.display()))
    })
}

/// Renders the staging table in pieces on two threads and writes them in order on a third.
fn write_staging(order: &StagingOrder<'_>, file: OutFile) -> std::io::Result<()> {
    let pieces = order.len().div_ceil(STAGING_PIECE);
    const RENDERERS: usize = 2;
    std::thread::scope(|s| {
        let (mut rendered, mut returns) = (Vec::new(), Vec::new());
        for first in 0..RENDERERS {
            let (piece_tx, piece_rx) = mpsc::sync_channel::<Vec<u8>>(1);
            let (return_tx, return_rx) = mpsc::channel::<Vec<u8>>();
            rendered.push(piece_rx);
            returns.push(return_tx);
            let renderer = std::thread::Builder::new().name(format!("render-{first}"));
            renderer.spawn_scoped(s, move || {
                // One piece being rendered, one queued, one being written: then the
                // writer has handed one back.
                let mut created = 0;
                let mut shared = SharedParts::new(order.parts());
                for piece in (first..pieces).step_by(RENDERERS) {
                    let mut buf = match return_rx.try_recv() {
                        Ok(buf) => buf,
                        Err(_) if created < 3 => {
                            created += 1;
                            Vec::new()
                        }
                        Err(_) => match return_rx.recv() {
                            Ok(buf) => buf,
                            Err(_) => return,
                        },
                    };
                    let sessions = piece * STAGING_PIECE..((piece + 1) * STAGING_PIECE).min(order.len());
                    let _ = order.visit::<()>(sessions, |row, key| {
                        shared.staging_json(row, key, &mut buf);
                        Ok(())
                    });
                    if piece_tx.send(buf).is_err() {
                        return;
                    }
                }
            })?;
        }
        let writer = std::thread::Builder::new().name("write".into()).spawn_scoped(s, move || -> std::io::Result<()> {
            let mut w = file;
            for piece in 0..pieces {
                let mut buf = rendered[piece % RENDERERS].recv().expect("a renderer sends every piece");
                if piece == 0 {
                    preallocate(w.file(), buf.len() as u64 * pieces as u64);
                }
                w.write_all(&buf)?;
                buf.clear();
                let _ = returns[piece % RENDERERS].send(buf);
            }
            // Also gives back what the estimate reserved past the end.
            w.finish()
        })?;
        writer.join().expect("the staging writer does not panic")
    })
}

/// Reserves `len` bytes of the file's blocks before writing (an estimate: the file
/// grows past it as usual, and a shorter file is cut to size after). Written into
/// reserved blocks, a page costs ext4 no block reservation of its own: about a third
/// less kernel time per byte. A hint only: where it fails, writing goes on as before.
fn preallocate(file: &File, len: u64) {
    #[cfg(target_os = "linux")]
    if let Ok(len) = libc::off_t::try_from(len) {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate takes the open descriptor of a file this function borrows and
        // two integers; it touches no memory of the process.
        unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, len);
}

/// Appends a JSON string, copying it straight through unless it needs escaping.
fn json_str(s: &str, out: &mut Vec<u8>) {
    if toolrank_events::escape_at(s.as_bytes()).is_none() {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
    }
}

/// The parts of staging rows that many rows share, each rendered once: the session's
/// `userid` and `sessionid`, and the four ids an SK stands for.
struct SharedParts {
    session: Option<usize>,
    /// `{"userid":...,"sessionid":...` of `session`.
    head: Vec<u8>,
    /// `,"processid":...,"toolid":...` of each SK, where `ids[parts]` says (empty: not yet).
    ids: Vec<std::ops::Range<u32>>,
    rendered: Vec<u8>,
}

impl SharedParts {
    fn new(parts: usize) -> SharedParts {
        SharedParts { session: None, head: Vec::new(), ids: vec![0..0; parts], rendered: Vec::new() }
    }

    /// One staging row as a JSON line, byte for byte what serde writes for [`StagingRow`],
    /// at a fraction of the cost (it is most of `replay --out`'s output).
    fn staging_json(&mut self, r: &StagingRow<'_>, key: StagingKey, out: &mut Vec<u8>) {
        if self.session != Some(key.session) {
            self.session = Some(key.session);
            self.head.clear();
            json_fields(&[("{\"userid\":", r.user_id), (",\"sessionid\":", r.session_id)], &mut self.head);
        }
        out.extend_from_slice(&self.head);
        let ids = &mut self.ids[key.parts as usize];
        if ids.start == ids.end {
            let start = self.rendered.len() as u32;
            let fields = [(",\"processid\":", r.process_id), (",\"domainid\":", r.domain_id), (",\"agentid\":", r.agent_id), (",\"toolid\":", r.tool_id)];
            json_fields(&fields, &mut self.rendered);
            *ids = start..self.rendered.len() as u32;
        }
        out.extend_from_slice(&self.rendered[ids.start as usize..ids.end as usize]);
        json_fields(&[(",\"toolnm\":", r.tool_nm)], out);
        out.extend_from_slice(b",\"execution_date\":\"");
        out.extend_from_slice(&r.execution_date.iso_bytes());
        out.extend_from_slice(b"\",\"execution_datetime\":\"");
        out.extend_from_slice(&r.execution_datetime.datetime_bytes());
        out.extend_from_slice(if r.success_flag { b"\",\"success_flag\":true}\n" } else { b"\",\"success_flag\":false}\n" });
    }
}

/// Appends `"key":"value"` pairs, each key given with its punctuation.
fn json_fields(fields: &[(&str, &str)], out: &mut Vec<u8>) {
    for (key, value) in fields {
        out.extend_from_slice(key.as_bytes());
        json_str(value, out);
    }
}

/// One pattern row as a JSON line, byte for byte what serde writes for [`PatternRow`]
/// (the second-largest table).
fn pattern_json<S: AsRef<str>>(r: &PatternRow<S>, out: &mut Vec<u8>) {
    let names = [
        ("{\"userid\":", r.user_id.as_ref()),
        (",\"process_pattern\":", r.process_pattern.as_ref()),
        (",\"agent_sequence\":", r.agent_sequence.as_ref()),
        (",\"tool_sequence\":", r.tool_sequence.as_ref()),
    ];
    json_fields(&names, out);
    for (key, n) in [(",\"execution_count\":", r.execution_count), (",\"success_count\":", r.success_count)] {
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
    out.extend_from_slice(b",\"first_used_date\":\"");
    out.extend_from_slice(&r.first_used_date.iso_bytes());
    out.extend_from_slice(b"\",\"last_used_date\":\"");
    out.extend_from_slice(&r.last_used_date.iso_bytes());
    out.extend_from_slice(b"\",\"pattern_score\":");
    serde_json::to_writer(&mut *out, &r.pattern_score).expect("writing to a Vec cannot fail");
    out.extend_from_slice(if r.is_recommended { b",\"is_recommended\":true}\n" } else { b",\"is_recommended\":false}\n" });
}

/// Writes `rows` with `line`, which renders one row as a JSON line.
fn write_lines<T>(path: &Path, rows: &[T], line: fn(&T, &mut Vec<u8>), direct: bool) -> Result<()> {
    let mut file = OutFile::create(path, direct).with_context(|| format!("creating {}", path.display()))?;
    let mut buf = Vec::with_capacity(1 << 20);
    rows.chunks(4096)
        .try_for_each(|rows| {
            buf.clear();
            rows.iter().for_each(|row| line(row, &mut buf));
            file.write_all(&buf)
        })
        .and_then(|()| file.finish())
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes the three ranking tables of `report` into `dir` (created if missing), past the
/// page cache with `direct` ([`OutFile`]).
pub fn write_report<S: AsRef<str>>(dir: &Path, report: &Report<S>, direct: bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_lines(&dir.join("agent_score_summary.jsonl"), &report.agents, serde_line, direct)?;
    write_lines(&dir.join("user_process_patterns.jsonl"), &report.patterns, pattern_json::<S>, direct)?;
    write_lines(&dir.join("agent_tool_errors.jsonl"), &report.tool_errors, serde_line, direct)
}

/// A text table with display-width-aware columns (agent names are often Korean).
struct Table {
    title: String,
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    more: usize,
}

impl Table {
    fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.width()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.width());
            }
        }
        if !self.title.is_empty() {
            writeln!(out, "== {} ==", self.title)?;
        }
        let line = |out: &mut dyn Write, cells: &mut dyn Iterator<Item = &str>| -> std::io::Result<()> {
            let parts: Vec<String> = cells.zip(&widths).map(|(c, &w)| format!("{c}{}", " ".repeat(w.saturating_sub(c.width())))).collect();
            writeln!(out, "{}", parts.join("  ").trim_end())
        };
        line(out, &mut self.header.iter().copied())?;
        let dashes: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
        line(out, &mut dashes.iter().map(String::as_str))?;
        for row in &self.rows {
            line(out, &mut row.iter().map(String::as_str))?;
        }
        if self.more > 0 {
            writeln!(out, "... {} more rows (use --out DIR for all)", self.more)?;
        }
        writeln!(out)
    }
}

/// Prints rows under a header, without a title.
pub fn print_rows(header: &[&'static str], rows: &[Vec<String>], out: &mut impl Write) -> std::io::Result<()> {
    Table { title: String::new(), header: header.to_vec(), rows: rows.to_vec(), more: 0 }.print(out)
}

fn limited<T>(rows: &[T], top: usize, f: impl Fn(&T) -> Vec<String>) -> (Vec<Vec<String>>, usize) {
    (rows.iter().take(top).map(f).collect(), rows.len().saturating_sub(top))
}

/// Prints the top `top` rows of each table.
pub fn print_tables(report: &Report, top: usize, out: &mut impl Write) -> std::io::Result<()> {
    let opt = |s: &Option<String>| s.clone().unwrap_or_default();
    let (rows, more) = limited(&report.agents, top, |a| {
        vec![
            a.domain_id.clone(),
            a.agent_id.clone(),
            opt(&a.agent_name),
            a.total_executions.to_string(),
            a.success_count.to_string(),
            a.failure_count.to_string(),
            format!("{:.4}", a.success_rate),
            a.last_execution_date.to_string(),
            a.days_since_last_exec.to_string(),
            format!("{:.4}", a.calculated_score),
        ]
    });
    let header = vec!["domainid", "agentid", "agentnm", "total", "success", "failure", "rate", "last_execution", "days", "calculated_score"];
    Table { title: "agent_score_summary".into(), header, rows, more }.print(out)?;
    let (rows, more) = limited(&report.patterns, top, |p| {
        vec![
            p.user_id.clone(),
            p.process_pattern.clone(),
            p.agent_sequence.clone(),
            p.tool_sequence.clone(),
            p.execution_count.to_string(),
            p.success_count.to_string(),
            p.last_used_date.to_string(),
            format!("{:.4}", p.pattern_score),
            if p.is_recommended { "TRUE" } else { "FALSE" }.into(),
        ]
    });
    let header = vec!["userid", "process_pattern", "agent", "tool_sequence", "count", "success", "last_used", "pattern_score", "recommended"];
    Table { title: "user_process_patterns".into(), header, rows, more }.print(out)?;
    let (rows, more) = limited(&report.tool_errors, top, |e| {
        vec![
            e.agent_id.clone(),
            opt(&e.agent_name),
            e.total_executions.to_string(),
            e.total_errors.to_string(),
            format!("{:.4}", e.error_rate),
            e.failed_tools.clone(),
        ]
    });
    let header = vec!["agentid", "agent_name", "rows", "errors", "error_rate", "failed_tools"];
    Table { title: "agent_tool_errors".into(), header, rows, more }.print(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use toolrank_events::Timestamp;

    #[test]
    fn staging_json_is_what_serde_writes() {
        let at = Timestamp::parse("20250614140605").unwrap();
        let row = |user, session, agent, tool| StagingRow {
            user_id: user,
            session_id: session,
            process_id: "P",
            domain_id: "D",
            agent_id: agent,
            tool_id: "T",
            tool_nm: tool,
            execution_date: at.day,
            execution_datetime: at,
            success_flag: tool != "FIND_LOC",
        };
        // Rows that share their session or their SK's ids with rows before them, and
        // strings that need escaping.
        let rows = [
            (row("USR001", "S1", "A", "FIND_LOC"), StagingKey { session: 0, parts: 1 }),
            (row("USR001", "S1", "A", "도구\n\u{1}"), StagingKey { session: 0, parts: 1 }),
            (row("USR001", "S1", "A\"\\", "FIND_LOC"), StagingKey { session: 0, parts: 0 }),
            (row("U\"1\\", "S2", "A", "FIND_LOC"), StagingKey { session: 1, parts: 1 }),
            (row("U\"1\\", "S2", "A\"\\", "X"), StagingKey { session: 1, parts: 0 }),
        ];
        let mut shared = SharedParts::new(2);
        for (row, key) in &rows {
            let mut ours = Vec::new();
            shared.staging_json(row, *key, &mut ours);
            assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(row).unwrap() + "\n");
        }
    }

    #[test]
    fn pattern_json_is_what_serde_writes() {
        let day = Timestamp::parse("20250614140605").unwrap().day;
        for (user, score, recommended) in [("USR001", 0.1 + 0.2, true), ("U\"1\\\u{1}", 1e-300, false), ("사용자", 0.0, false)] {
            let row = PatternRow {
                user_id: user,
                process_pattern: "PRC001 -> PRC002",
                agent_sequence: "AGT001",
                tool_sequence: "FIND_LOC -> \"X\"",
                execution_count: u64::MAX,
                success_count: 7,
                first_used_date: day,
                last_used_date: day,
                pattern_score: score,
                is_recommended: recommended,
            };
            let mut ours = Vec::new();
            pattern_json(&row, &mut ours);
            assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&row).unwrap() + "\n");
        }
    }
}
