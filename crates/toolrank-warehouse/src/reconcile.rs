//! Stream versus batch: two [`Report`]s compared table by table, row by row.
//!
//! Rows are matched by their table's key; counts, names and dates must be equal and
//! floating-point columns equal to 1e-9 relative (the warehouse and the engine compute
//! the same formulas in different orders of operations).

use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use toolrank_engine::Report;

/// The key columns of each compared table.
const KEYS: [(&str, &[&str]); 3] = [
    ("agent_score_summary", &["domainid", "agentid"]),
    ("user_process_patterns", &["userid", "process_pattern", "agent_sequence", "tool_sequence"]),
    ("agent_tool_errors", &["agentid"]),
];

/// One value that differs between the two sides.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub key: String,
    pub column: String,
    pub stream: Value,
    pub warehouse: Value,
    /// |stream − warehouse| for numbers, +∞ for text, dates and missing values: what
    /// "largest" sorts by.
    pub magnitude: f64,
}

/// How one table compares.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TableReport {
    pub table: &'static str,
    pub equal: usize,
    /// Rows present on both sides with at least one differing value.
    pub differing_rows: usize,
    /// Every differing value, largest first.
    pub differences: Vec<Difference>,
    pub only_in_stream: Vec<String>,
    pub only_in_warehouse: Vec<String>,
}

impl TableReport {
    pub fn agrees(&self) -> bool {
        self.differing_rows == 0 && self.only_in_stream.is_empty() && self.only_in_warehouse.is_empty()
    }
}

fn rows<T: Serialize>(table: &[T]) -> Vec<Map<String, Value>> {
    table
        .iter()
        .map(|r| match serde_json::to_value(r) {
            Ok(Value::Object(m)) => m,
            other => unreachable!("report rows serialize as objects, got {other:?}"),
        })
        .collect()
}

fn keyed(rows: Vec<Map<String, Value>>, key: &[&str]) -> BTreeMap<String, Map<String, Value>> {
    rows.into_iter()
        .map(|r| {
            let k: Vec<String> = key.iter().map(|c| r.get(*c).and_then(Value::as_str).unwrap_or_default().to_owned()).collect();
            (k.join(" | "), r)
        })
        .collect()
}

fn difference(a: &Value, b: &Value) -> Option<f64> {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => {
            let d = (x - y).abs();
            let tolerance = if a.is_f64() || b.is_f64() { 1e-12_f64.max(1e-9 * x.abs().max(y.abs())) } else { 0.0 };
            (d > tolerance).then_some(d)
        }
        _ => (a != b).then_some(f64::INFINITY),
    }
}

fn table(name: &'static str, key: &[&str], stream: Vec<Map<String, Value>>, warehouse: Vec<Map<String, Value>>) -> TableReport {
    let (stream, mut warehouse) = (keyed(stream, key), keyed(warehouse, key));
    let mut out = TableReport { table: name, ..TableReport::default() };
    for (k, s) in stream {
        let Some(w) = warehouse.remove(&k) else {
            out.only_in_stream.push(k);
            continue;
        };
        let before = out.differences.len();
        for (column, sv) in &s {
            let wv = w.get(column).unwrap_or(&Value::Null);
            if let Some(magnitude) = difference(sv, wv) {
                out.differences.push(Difference { key: k.clone(), column: column.clone(), stream: sv.clone(), warehouse: wv.clone(), magnitude });
            }
        }
        if out.differences.len() > before {
            out.differing_rows += 1;
        } else {
            out.equal += 1;
        }
    }
    out.only_in_warehouse = warehouse.into_keys().collect();
    out.differences.sort_by(|a, b| b.magnitude.total_cmp(&a.magnitude));
    out
}

/// Compares every table of `stream` with `warehouse`.
pub fn compare(stream: &Report, warehouse: &Report) -> Vec<TableReport> {
    let sides = [
        (rows(&stream.agents), rows(&warehouse.agents)),
        (rows(&stream.patterns), rows(&warehouse.patterns)),
        (rows(&stream.tool_errors), rows(&warehouse.tool_errors)),
    ];
    KEYS.iter().zip(sides).map(|((name, key), (s, w))| table(name, key, s, w)).collect()
}

/// The report as text: a line per table, then the largest differences and missing rows.
pub fn render(tables: &[TableReport], show: usize) -> String {
    let mut out = String::new();
    for t in tables {
        out.push_str(&format!(
            "{:<22} {:>7} equal  {:>5} differing  {:>5} only in stream  {:>5} only in warehouse  {}\n",
            t.table,
            t.equal,
            t.differing_rows,
            t.only_in_stream.len(),
            t.only_in_warehouse.len(),
            if t.agrees() { "OK" } else { "DIFFERENT" }
        ));
    }
    for t in tables.iter().filter(|t| !t.agrees()) {
        out.push_str(&format!("\n{}:\n", t.table));
        for d in t.differences.iter().take(show) {
            out.push_str(&format!("  differs   {}  {}: stream {} vs warehouse {}\n", d.key, d.column, d.stream, d.warehouse));
        }
        for k in t.only_in_stream.iter().take(show) {
            out.push_str(&format!("  only in stream     {k}\n"));
        }
        for k in t.only_in_warehouse.iter().take(show) {
            out.push_str(&format!("  only in warehouse  {k}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use toolrank_engine::{AgentScore, ToolErrors};
    use toolrank_events::Day;

    fn agent(id: &str, total: u64, score: f64) -> AgentScore {
        AgentScore {
            domain_id: "D".into(),
            agent_id: id.into(),
            agent_name: None,
            total_executions: total,
            success_count: total,
            failure_count: 0,
            success_rate: 1.0,
            last_execution_date: Day(0),
            days_since_last_exec: 1,
            time_decay_factor: 0.9,
            calculated_score: score,
        }
    }

    #[test]
    fn equal_reports_agree_within_float_tolerance() {
        let a = Report { agents: vec![agent("A", 2, 1.0)], ..Report::default() };
        let b = Report { agents: vec![agent("A", 2, 1.0 + 1e-13)], ..Report::default() };
        assert!(compare(&a, &b).iter().all(TableReport::agrees));
    }

    #[test]
    fn differences_are_found_and_ranked() {
        let errors = ToolErrors { agent_id: "A".into(), agent_name: None, total_executions: 1, total_errors: 1, error_rate: 1.0, failed_tools: "T".into() };
        let a = Report { agents: vec![agent("A", 2, 1.0), agent("B", 1, 0.5)], patterns: vec![], tool_errors: vec![errors] };
        let b = Report { agents: vec![agent("A", 3, 1.5), agent("C", 1, 0.5)], ..Report::default() };
        let t = compare(&a, &b);
        assert_eq!((t[0].equal, t[0].differing_rows), (0, 1));
        assert_eq!(t[0].only_in_stream, vec!["D | B"]);
        assert_eq!(t[0].only_in_warehouse, vec!["D | C"]);
        let columns: Vec<(&str, f64)> = t[0].differences.iter().map(|d| (d.column.as_str(), d.magnitude)).collect();
        assert_eq!(columns, vec![("success_count", 1.0), ("total_executions", 1.0), ("calculated_score", 0.5)]);
        assert_eq!(t[2].only_in_stream, vec!["A"]);
        assert!(t[1].agrees() && !t[0].agrees());
        assert!(render(&t, 5).contains("only in warehouse  D | C"));
    }
}
