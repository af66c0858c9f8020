//! The Redshift SQL of `sql/redshift/`, built into the binary so that `toolrank warehouse`
//! runs the same text a user would paste into the query editor.

use toolrank_events::Day;

/// The session settings the shipped SQL needs: mixed-case quoted identifiers ("PK") and
/// SUPER attributes ("value"."PK"."S") as written.
pub const SESSION: [&str; 2] = ["SET enable_case_sensitive_identifier TO true", "SET enable_case_sensitive_super_attribute TO true"];

/// A file of `sql/redshift/`.
pub struct File {
    pub name: &'static str,
    pub text: &'static str,
}

macro_rules! file {
    ($name:literal) => {
        File { name: $name, text: include_str!(concat!("../../../sql/redshift/", $name)) }
    };
}

/// The tables (idempotent DDL).
pub const SCHEMA: File = file!("00_schema.sql");
/// Mirror → agent catalog and staging, in full.
pub const STAGING: File = file!("10_staging.sql");
/// Staging → the three analysis tables, in full.
pub const SCORES: File = file!("20_scores.sql");
/// The today-dependent columns and the recommendation cut, after either of the above.
pub const TODAY: File = file!("25_today.sql");
/// 10 and 20 for what changed since the last run only.
pub const INCREMENTAL: File = file!("30_incremental.sql");
/// Each analysis table against a recount from staging: rows that disagree.
pub const RECONCILE: File = file!("40_reconcile.sql");
/// The mirror's tables (what Zero-ETL creates in Redshift, plus the mirror's own).
pub const MIRROR: File = file!("mirror_schema.sql");

/// Splits a script into statements on `;` outside string literals, quoted identifiers
/// and comments; comments are dropped.
pub fn statements(script: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = script.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                cur.push(c);
                for d in chars.by_ref() {
                    cur.push(d);
                    if d == c {
                        break;
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        cur.push('\n');
                        break;
                    }
                }
            }
            ';' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
}

/// The statements of `file` with `:today` bound, preceded by the session settings, ready
/// for one BatchExecuteStatement (which takes no parameters).
pub fn batch(file: &File, today: Day) -> Vec<String> {
    let date = format!("'{}'", std::str::from_utf8(&today.iso_bytes()).expect("ASCII"));
    SESSION.iter().map(|s| s.to_string()).chain(statements(file.text).into_iter().map(|s| s.replace(":today", &date))).collect()
}

/// A string as a Redshift literal. Redshift reads backslashes in literals as escapes,
/// so they are doubled along with quotes.
pub fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_outside_literals_and_comments() {
        let s = statements("-- a; comment\nSELECT 'a;b' AS \"x;y\"; \n\nDELETE FROM t -- why; not\n;;");
        assert_eq!(s, vec!["SELECT 'a;b' AS \"x;y\"", "DELETE FROM t"]);
    }

    #[test]
    fn every_file_splits_and_binds_today() {
        for f in [SCHEMA, STAGING, SCORES, TODAY, INCREMENTAL, RECONCILE, MIRROR] {
            let b = batch(&f, Day::parse_iso("2025-07-14").unwrap());
            assert!(b.len() > SESSION.len(), "{}", f.name);
            assert!(b.iter().all(|s| !s.contains(":today")), "{}", f.name);
            // BatchExecuteStatement takes at most 40 statements.
            assert!(b.len() <= 40, "{}", f.name);
        }
    }

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(literal(r#"a'b\"c"#), r#"'a''b\\"c'"#);
    }
}
