//! Where a job's bad records go: counted, the first few logged, each appended to the
//! dead-letter file as a JSON line (or, in strict mode, the error that ends the run).

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use toolrank_events::DeadLetter;

/// The dead-letter file of a file-reading job: bad records are logged (the first ten),
/// counted and appended as JSON lines.
pub struct DeadLetters {
    writer: Option<BufWriter<File>>,
    strict: bool,
}

impl DeadLetters {
    pub fn open(path: Option<&std::path::Path>, strict: bool) -> Result<DeadLetters> {
        let writer = match path {
            // Records may carry user data: readable by the owner only.
            Some(p) => Some(BufWriter::new(File::options().create(true).append(true).mode(0o600).open(p).with_context(|| format!("opening {}", p.display()))?)),
            None => None,
        };
        Ok(DeadLetters { writer, strict })
    }

    /// Records one bad record; in strict mode it becomes the error that ends the run.
    pub fn reject(&mut self, bad: &mut u64, letter: DeadLetter) -> Result<()> {
        *bad += 1;
        let bad = *bad;
        let at = match letter.record {
            Some(i) => format!("{}:{} (record {i})", letter.source, letter.line),
            None => format!("{}:{}", letter.source, letter.line),
        };
        if self.strict {
            bail!("bad record at {at}: {}", letter.reason);
        }
        if bad <= 10 {
            tracing::warn!(position = %at, reason = %letter.reason, "skipping bad record");
        } else if bad == 11 {
            tracing::warn!("more bad records; counting them without logging each");
        }
        if let Some(w) = &mut self.writer {
            serde_json::to_writer(&mut *w, &letter)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Writes out what is buffered.
    pub fn flush(&mut self) -> Result<()> {
        if let Some(w) = &mut self.writer {
            w.flush().context("writing the dead-letter file")?;
        }
        Ok(())
    }
}
