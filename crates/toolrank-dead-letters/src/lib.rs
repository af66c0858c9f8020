//! Where bad records go, for every job and consumer: counted, the first few logged, each
//! appended as a JSON line ([`DeadLetter`]) to a file only its owner may read (records
//! carry user data) or sent to an SQS [`Queue`], or, in strict mode, the error that ends
//! the run.

mod queue;

pub use queue::{Letter, Queue};

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use toolrank_events::DeadLetter;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("dead-letter file {}: {source}", path.display())]
    File { path: PathBuf, source: std::io::Error },
    /// Strict mode: the first bad record ends the run.
    #[error("bad record at {at}: {reason}")]
    Strict { at: String, reason: String },
}

/// How many bad records are logged one by one; the rest are only counted.
const LOGGED: u64 = 10;

/// A dead-letter file (or none: bad records are then only counted and logged).
pub struct DeadLetters {
    path: Option<PathBuf>,
    writer: Option<BufWriter<File>>,
    strict: bool,
    /// Each letter reaches the file before `reject` returns (a live consumer's letters
    /// must be there before the checkpoint that moves past them).
    durable: bool,
    logged: u64,
}

impl DeadLetters {
    /// For a batch job: the file is opened (created if missing) now, and written through
    /// a buffer that [`flush`](Self::flush) empties.
    pub fn open(path: Option<&Path>, strict: bool) -> Result<DeadLetters, Error> {
        let mut letters = DeadLetters { path: path.map(Path::to_owned), writer: None, strict, durable: false, logged: 0 };
        if path.is_some() {
            letters.writer = Some(letters.create()?);
        }
        Ok(letters)
    }

    /// For a live consumer: the file is created at the first bad record, and every letter
    /// is written out before [`reject`](Self::reject) returns.
    pub fn durable(path: &Path) -> DeadLetters {
        DeadLetters { path: Some(path.to_owned()), writer: None, strict: false, durable: true, logged: 0 }
    }

    fn create(&self) -> Result<BufWriter<File>, Error> {
        let path = self.path.as_ref().expect("a file");
        let file = File::options().create(true).append(true).mode(0o600).open(path).map_err(|source| Error::File { path: path.clone(), source })?;
        Ok(BufWriter::new(file))
    }

    /// Records one bad record, counting it in `bad`; in strict mode it becomes the error
    /// that ends the run.
    pub fn reject(&mut self, bad: &mut u64, letter: DeadLetter) -> Result<(), Error> {
        *bad += 1;
        let at = match letter.record {
            Some(i) => format!("{}:{} (record {i})", letter.source, letter.line),
            None => format!("{}:{}", letter.source, letter.line),
        };
        if self.strict {
            return Err(Error::Strict { at, reason: letter.reason });
        }
        self.logged += 1;
        if self.logged <= LOGGED {
            tracing::warn!(position = %at, at = letter.position.as_deref().unwrap_or_default(), reason = %letter.reason, "skipping bad record");
        } else if self.logged == LOGGED + 1 {
            tracing::warn!("more bad records; counting them without logging each");
        }
        if self.path.is_none() {
            return Ok(());
        }
        if self.writer.is_none() {
            self.writer = Some(self.create()?);
        }
        let (Some(path), Some(w)) = (&self.path, &mut self.writer) else { unreachable!("opened above") };
        let io = |source| Error::File { path: path.clone(), source };
        serde_json::to_writer(&mut *w, &letter).map_err(|e| io(e.into()))?;
        w.write_all(b"\n").map_err(io)?;
        if self.durable {
            w.flush().map_err(io)?;
        }
        Ok(())
    }

    /// Writes out what is buffered.
    pub fn flush(&mut self) -> Result<(), Error> {
        match (&mut self.writer, &self.path) {
            (Some(w), Some(path)) => w.flush().map_err(|source| Error::File { path: path.clone(), source }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn letter(line: u64) -> DeadLetter {
        DeadLetter { source: "in.jsonl".into(), line, record: None, position: None, reason: "not JSON".into(), raw: "{".into() }
    }

    #[test]
    fn letters_are_counted_appended_and_readable_by_the_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dl.jsonl");
        let mut bad = 0;
        let mut letters = DeadLetters::open(Some(&path), false).unwrap();
        letters.reject(&mut bad, letter(3)).unwrap();
        letters.reject(&mut bad, letter(7)).unwrap();
        letters.flush().unwrap();
        assert_eq!(bad, 2);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<DeadLetter> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.iter().map(|l| l.line).collect::<Vec<_>>(), [3, 7]);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_durable_file_appears_with_the_first_letter_and_holds_it_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("live.jsonl");
        let mut letters = DeadLetters::durable(&path);
        assert!(!path.exists());
        let mut bad = 0;
        letters.reject(&mut bad, DeadLetter { position: Some("49".into()), ..letter(1) }).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    #[test]
    fn strict_mode_makes_the_first_bad_record_the_error() {
        let mut letters = DeadLetters::open(None, true).unwrap();
        let mut bad = 0;
        let e = letters.reject(&mut bad, letter(2)).unwrap_err();
        assert_eq!(e.to_string(), "bad record at in.jsonl:2: not JSON");
    }
}
