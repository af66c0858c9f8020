//! One input line into the mirror, whatever the source.

use anyhow::Result;
use toolrank_dead_letters::DeadLetters;
use toolrank_events::DeadLetter;
use toolrank_warehouse::mirror::{self, Mirror};

/// Feeds one line to the mirror; rejected records go to the dead letters.
pub fn mirror_line(mirror: &mut Mirror, line: &[u8], source: &str, line_no: u64, dead: &mut DeadLetters, bad: &mut u64) -> Result<()> {
    let letter = |record, reason: String, raw: Option<String>| DeadLetter {
        source: source.to_owned(),
        line: line_no,
        record,
        position: None,
        reason,
        raw: raw.unwrap_or_else(|| String::from_utf8_lossy(line).into_owned()),
    };
    match mirror::decode(line) {
        Err(e) => dead.reject(bad, letter(None, e.to_string(), None))?,
        Ok(records) => {
            for r in records {
                match r {
                    Ok(change) => mirror.push(change),
                    Err(rejected) => dead.reject(bad, letter(rejected.index, rejected.reason, rejected.raw))?,
                }
            }
        }
    }
    Ok(())
}
