//! Line sources for replay and backfill: files (gzip detected by magic bytes, not by
//! name), stdin (`-`), and DynamoDB export directories (`manifest-files.json` + `data/`).
//!
//! It yields raw lines with their 1-based number; decoding is the events crate's job. A
//! file that holds JSON documents spread over many lines (a Lambda test event as the
//! console or `sam local generate-event` writes it, a JSON array of records or items)
//! yields each document, or each array element, as one "line" numbered by the line it
//! starts on.

use flate2::read::MultiGzDecoder;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A failure to find or read input. Always fatal: input must never be lost silently.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0}: a directory input must be a DynamoDB export (manifest-files.json or data/)")]
    NotExport(String),
    #[error("{manifest}, line {line}: {reason}")]
    Manifest { manifest: String, line: usize, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SourceError + '_ {
    move |source| SourceError::Io { path: path.display().to_string(), source }
}

/// One input stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Stdin,
    File(PathBuf),
}

impl Input {
    /// The name used in positions and dead letters.
    pub fn name(&self) -> String {
        match self {
            Input::Stdin => "-".to_owned(),
            Input::File(p) => p.display().to_string(),
        }
    }

    /// Size on disk, when known (for progress bars).
    pub fn byte_len(&self) -> Option<u64> {
        match self {
            Input::Stdin => None,
            Input::File(p) => std::fs::metadata(p).ok().map(|m| m.len()),
        }
    }
}

/// Expands command-line arguments: `-` is stdin, a directory is a DynamoDB export.
pub fn expand(args: &[String]) -> Result<Vec<Input>, SourceError> {
    let mut inputs = Vec::new();
    for arg in args {
        if arg == "-" {
            inputs.push(Input::Stdin);
            continue;
        }
        let path = PathBuf::from(arg);
        let meta = std::fs::metadata(&path).map_err(io_err(&path))?;
        if meta.is_dir() {
            inputs.extend(export_files(&path)?.into_iter().map(Input::File));
        } else {
            inputs.push(Input::File(path));
        }
    }
    Ok(inputs)
}

/// The data files of a DynamoDB export, in manifest order.
pub fn export_files(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    if let Some(manifest) = find_manifest(dir, 3) {
        return manifest_files(&manifest);
    }
    let data = dir.join("data");
    if data.is_dir() {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&data).map_err(io_err(&data))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
        files.sort();
        return Ok(files);
    }
    Err(SourceError::NotExport(dir.display().to_string()))
}

fn find_manifest(dir: &Path, depth: u32) -> Option<PathBuf> {
    let direct = dir.join("manifest-files.json");
    if direct.is_file() {
        return Some(direct);
    }
    if depth == 0 {
        return None;
    }
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    subdirs.sort();
    subdirs.into_iter().find_map(|d| find_manifest(&d, depth - 1))
}

#[derive(serde::Deserialize)]
struct ManifestLine {
    #[serde(rename = "dataFileS3Key")]
    data_file_s3_key: String,
}

/// Resolves each `dataFileS3Key` against the manifest's folder: as given relative to an
/// ancestor (exports keep `AWSDynamoDB/<id>/data/...`), else as `data/<file name>`.
fn manifest_files(manifest: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let text = std::fs::read_to_string(manifest).map_err(io_err(manifest))?;
    let base = manifest.parent().unwrap_or(Path::new("."));
    let name = manifest.display().to_string();
    let mut files = Vec::new();
    for (line, key) in manifest_keys(&text, &name)? {
        let key = Path::new(&key);
        let by_name = key.file_name().map(|n| base.join("data").join(n));
        let found = base.ancestors().map(|a| a.join(key)).chain(by_name).find(|p| p.is_file());
        let path = found.ok_or_else(|| SourceError::Manifest {
            manifest: name.clone(),
            line,
            reason: format!("data file {} not found under {}", key.display(), base.display()),
        })?;
        files.push(path);
    }
    Ok(files)
}

/// The `dataFileS3Key` of each line of a `manifest-files.json` (named `manifest` in
/// errors), with its line number.
pub fn manifest_keys(text: &str, manifest: &str) -> Result<Vec<(usize, String)>, SourceError> {
    let bad = |line, reason: String| SourceError::Manifest { manifest: manifest.to_owned(), line, reason };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| serde_json::from_str::<ManifestLine>(line).map(|e| (i + 1, e.data_file_s3_key)).map_err(|e| bad(i + 1, e.to_string())))
        .collect()
}

/// Counts bytes read from the underlying (possibly compressed) stream.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Reads lines of one input, decompressing gzip transparently. Lines are slices of a
/// large buffer, found with `memchr`: no per-line copy.
pub struct LineReader {
    name: String,
    reader: Box<dyn Read>,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[pos..end]`.
    pos: usize,
    end: usize,
    eof: bool,
    line: u64,
    /// For an input of multi-line JSON documents: every record's `(line, start, end)` in
    /// `buf`, and how many were handed out.
    documents: Option<(Vec<Span>, usize)>,
}

/// A record's `(line, start, end)` in a buffer.
type Span = (u64, usize, usize);

const BUF: usize = 1 << 22;

impl LineReader {
    /// Opens `input`; `bytes_read` accumulates the raw bytes consumed (for progress).
    pub fn open(input: &Input, bytes_read: Arc<AtomicU64>) -> Result<LineReader, SourceError> {
        let name = input.name();
        let raw: Box<dyn Read> = match input {
            Input::Stdin => Box::new(io::stdin()),
            Input::File(p) => Box::new(File::open(p).map_err(io_err(p))?),
        };
        Self::from_read(name, raw, bytes_read)
    }

    /// Reads lines from any byte stream (gzip detected here too), named `name` in positions.
    pub fn from_read(name: String, raw: Box<dyn Read>, bytes_read: Arc<AtomicU64>) -> Result<LineReader, SourceError> {
        let mut raw = BufReader::with_capacity(1 << 16, Counting { inner: raw, count: bytes_read });
        let head = raw.fill_buf().map_err(io_err(Path::new(&name)))?;
        let reader: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) { Box::new(MultiGzDecoder::new(raw)) } else { Box::new(raw) };
        let mut lines = LineReader { name, reader, buf: vec![0; BUF], pos: 0, end: 0, eof: false, line: 0, documents: None };
        lines.refill()?;
        if lines.holds_documents() {
            while !lines.eof {
                lines.refill()?;
            }
            let (spans, parsed_all) = document_spans(&lines.buf[..lines.end]);
            // Not even a first document: JSON lines whose first line is cut short, read as
            // lines so that every other line still counts.
            let lines_after_all = !parsed_all && spans.len() == 1 && lines.buf[..lines.end].trim_ascii_start().starts_with(b"{");
            if !lines_after_all {
                lines.documents = Some((spans, 0));
            }
        }
        Ok(lines)
    }

    /// Whether the input is JSON documents over many lines rather than one value a line:
    /// it opens an array (a line of JSON lines is an object), or its first line is the
    /// start of an object that does not end on it.
    fn holds_documents(&self) -> bool {
        let text = &self.buf[..self.end];
        let Some(first) = text.iter().position(|b| !b.is_ascii_whitespace()) else { return false };
        match text[first] {
            b'[' => true,
            b'{' => match memchr::memchr(b'\n', &text[first..]) {
                Some(n) => serde_json::from_slice::<serde::de::IgnoredAny>(&text[first..first + n]).is_err_and(|e| e.is_eof()),
                None => false,
            },
            _ => false,
        }
    }

    /// The input's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the unconsumed tail to the front (growing the buffer for long lines) and reads more.
    fn refill(&mut self) -> Result<(), SourceError> {
        self.buf.copy_within(self.pos..self.end, 0);
        self.end -= self.pos;
        self.pos = 0;
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        while self.end < self.buf.len() {
            let n = match self.reader.read(&mut self.buf[self.end..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(SourceError::Io { path: format!("{}, line {}", self.name, self.line + 1), source }),
            };
            if n == 0 {
                self.eof = true;
                break;
            }
            self.end += n;
        }
        Ok(())
    }

    /// The next non-blank line without its line terminator, with its 1-based number.
    pub fn next_line(&mut self) -> Result<Option<(u64, &[u8])>, SourceError> {
        if let Some((spans, next)) = &mut self.documents {
            let Some(&(line, a, b)) = spans.get(*next) else { return Ok(None) };
            *next += 1;
            return Ok(Some((line, &self.buf[a..b])));
        }
        while let Some((start, stop)) = self.next_span()? {
            if !is_blank(&self.buf[start..stop]) {
                return Ok(Some((self.line, &self.buf[start..stop])));
            }
        }
        Ok(None)
    }

    /// Every complete non-blank line now buffered (reading more first if there is none),
    /// as `(number, start, end)` in `lines`, and the buffer that holds them, which is
    /// handed over whole: `spare` becomes the reader's buffer and only the unfinished last
    /// line is copied into it, so a line's bytes are never copied. `None` at the end.
    pub fn next_block(&mut self, mut spare: Vec<u8>, lines: &mut Vec<(u64, usize, usize)>) -> Result<Option<Vec<u8>>, SourceError> {
        lines.clear();
        if let Some((spans, next)) = &mut self.documents {
            if *next >= spans.len() {
                return Ok(None);
            }
            lines.extend_from_slice(&spans[*next..]);
            *next = spans.len();
            return Ok(Some(std::mem::replace(&mut self.buf, spare)));
        }
        loop {
            while let Some((start, stop)) = self.buffered_span() {
                if !is_blank(&self.buf[start..stop]) {
                    lines.push((self.line, start, stop));
                }
            }
            if !lines.is_empty() {
                break;
            }
            if self.eof {
                return Ok(None);
            }
            self.refill()?;
        }
        let tail = self.end - self.pos;
        if spare.len() < tail.max(BLOCK) {
            spare.resize(tail.max(BLOCK), 0);
        }
        spare[..tail].copy_from_slice(&self.buf[self.pos..self.end]);
        let block = std::mem::replace(&mut self.buf, spare);
        (self.pos, self.end) = (0, tail);
        Ok(Some(block))
    }

    /// Bounds of the next line in `buf`, terminators excluded, reading more when the
    /// buffer holds no complete line.
    fn next_span(&mut self) -> Result<Option<(usize, usize)>, SourceError> {
        loop {
            if let Some(span) = self.buffered_span() {
                return Ok(Some(span));
            }
            if self.eof {
                return Ok(None);
            }
            self.refill()?;
        }
    }

    /// Bounds of the next complete line already in `buf` (at the end of the input, the
    /// unterminated last one too), terminators excluded.
    fn buffered_span(&mut self) -> Option<(usize, usize)> {
        let (start, mut stop, next) = match memchr::memchr(b'\n', &self.buf[self.pos..self.end]) {
            Some(i) => (self.pos, self.pos + i, self.pos + i + 1),
            None if self.eof && self.pos < self.end => (self.pos, self.end, self.end),
            None => return None,
        };
        self.pos = next;
        self.line += 1;
        while stop > start && self.buf[stop - 1] == b'\r' {
            stop -= 1;
        }
        Some((start, stop))
    }
}

/// The records of a text of JSON documents: each document, or each element of a
/// document that is an array, as `(line it starts on, start, end)`. Where the text stops
/// being JSON, the rest from the record that does not parse is one more record, which
/// then fails to decode with the parser's reason: nothing is dropped unseen. Also says
/// whether the whole text parsed.
fn document_spans(text: &[u8]) -> (Vec<(u64, usize, usize)>, bool) {
    let mut spans = Vec::new();
    let (mut line, mut counted) = (1u64, 0usize);
    let mut at_line = |offset: usize| {
        line += memchr::memchr_iter(b'\n', &text[counted..offset]).count() as u64;
        counted = offset;
        line
    };
    let skip_ws = |mut i: usize| {
        while i < text.len() && text[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    // The end of the JSON value starting at `start`, if one does.
    let value_end = |start: usize| -> Option<usize> {
        let mut values = serde_json::Deserializer::from_slice(&text[start..]).into_iter::<serde::de::IgnoredAny>();
        matches!(values.next(), Some(Ok(_))).then(|| start + values.byte_offset())
    };
    // The end of the text without trailing blanks: where a record that does not parse ends.
    let tail = text.len() - text.iter().rev().take_while(|b| b.is_ascii_whitespace()).count();
    let mut i = skip_ws(0);
    while i < text.len() {
        if text[i] == b'[' {
            let mut j = skip_ws(i + 1);
            if text.get(j) == Some(&b']') {
                i = skip_ws(j + 1);
                continue;
            }
            loop {
                let Some(end) = value_end(j) else {
                    spans.push((at_line(j), j, tail.max(j)));
                    return (spans, false);
                };
                spans.push((at_line(j), j, end));
                j = skip_ws(end);
                match text.get(j) {
                    Some(b',') => j = skip_ws(j + 1),
                    Some(b']') => break,
                    _ => {
                        let j = j.min(tail);
                        spans.push((at_line(j), j, tail));
                        return (spans, false);
                    }
                }
            }
            i = skip_ws(j + 1);
        } else {
            let Some(end) = value_end(i) else {
                spans.push((at_line(i), i, tail.max(i)));
                return (spans, false);
            };
            spans.push((at_line(i), i, end));
            i = skip_ws(end);
        }
    }
    (spans, true)
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Smallest buffer [`LineReader::next_block`] hands the reader: blocks are about this size.
const BLOCK: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn lines(input: &Input) -> Vec<(u64, String)> {
        let mut r = LineReader::open(input, Arc::default()).unwrap();
        let mut out = Vec::new();
        while let Some((n, l)) = r.next_line().unwrap() {
            out.push((n, String::from_utf8(l.to_vec()).unwrap()));
        }
        out
    }

    #[test]
    fn plain_and_gzip_files_read_alike() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("a.jsonl");
        std::fs::write(&plain, "one\r\n\n  \ntwo").unwrap();
        let gz = dir.path().join("a.bin");
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        enc.write_all(b"one\r\n\n  \ntwo").unwrap();
        enc.finish().unwrap();
        let want = vec![(1, "one".to_owned()), (4, "two".to_owned())];
        assert_eq!(lines(&Input::File(plain)), want);
        assert_eq!(lines(&Input::File(gz)), want);
    }

    #[test]
    fn lines_longer_than_the_buffer_survive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.jsonl");
        let long = "x".repeat(BUF * 2 + 17);
        std::fs::write(&path, format!("a\n{long}\nb\n")).unwrap();
        let got = lines(&Input::File(path));
        assert_eq!(got, vec![(1, "a".to_owned()), (2, long), (3, "b".to_owned())]);
    }

    #[test]
    fn blocks_hold_the_same_lines_as_line_by_line_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("many.jsonl");
        let mut text = String::new();
        for i in 0..60_000 {
            match i % 1000 {
                7 => text.push_str("  \r\n"),
                500 => text.push_str(&format!("{}\n", "y".repeat(BLOCK + i))),
                _ => text.push_str(&format!("{{\"line\":{i}}}\r\n")),
            }
        }
        text.push_str("last, unterminated");
        std::fs::write(&path, &text).unwrap();
        let input = Input::File(path);
        let mut reader = LineReader::open(&input, Arc::default()).unwrap();
        let (mut got, mut lines, mut spare, mut blocks) = (Vec::new(), Vec::new(), Vec::new(), 0);
        while let Some(block) = reader.next_block(spare, &mut lines).unwrap() {
            got.extend(lines.iter().map(|&(n, a, b)| (n, String::from_utf8(block[a..b].to_vec()).unwrap())));
            spare = block;
            blocks += 1;
        }
        assert!(blocks > 3, "{blocks} blocks");
        assert_eq!(got, self::lines(&input));
    }

    fn read_text(text: &str) -> Vec<(u64, String)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc.json");
        std::fs::write(&path, text).unwrap();
        lines(&Input::File(path))
    }

    #[test]
    fn multi_line_documents_and_arrays_yield_a_record_each_at_the_line_it_starts() {
        let event = "{\n  \"Records\": [\n    {\"eventName\": \"INSERT\"},\n    {\"eventName\": \"REMOVE\"}\n  ]\n}\n";
        assert_eq!(read_text(event), vec![(1, event.trim_end().to_owned())]);
        assert_eq!(read_text("[\n  {\"a\": 1},\n\n  {\"b\":\n 2}\n]\n"), vec![(2, "{\"a\": 1}".to_owned()), (4, "{\"b\":\n 2}".to_owned())]);
        assert_eq!(read_text("  [ ]\n[{\"c\":3}]"), vec![(2, "{\"c\":3}".to_owned())]);
        // Two documents one after the other.
        assert_eq!(read_text("{\n\"x\": 1\n}\n{\n\"y\": 2\n}"), vec![(1, "{\n\"x\": 1\n}".to_owned()), (4, "{\n\"y\": 2\n}".to_owned())]);
    }

    #[test]
    fn a_malformed_document_is_one_record_from_where_it_stops_parsing() {
        assert_eq!(
            read_text("[\n{\"a\": 1},\n{\"b\": oops},\n{\"c\": 3}\n]"),
            vec![(2, "{\"a\": 1}".to_owned()), (3, "{\"b\": oops},\n{\"c\": 3}\n]".to_owned())]
        );
        assert_eq!(read_text("[{\"a\": 1} {\"b\": 2}]"), vec![(1, "{\"a\": 1}".to_owned()), (1, "{\"b\": 2}]".to_owned())]);
        assert_eq!(read_text("{\n\"x\": 1\n}\n{\n\"unclosed\": [1,\n"), vec![(1, "{\n\"x\": 1\n}".to_owned()), (4, "{\n\"unclosed\": [1,".to_owned())]);
    }

    #[test]
    fn json_lines_stay_lines_even_when_one_is_truncated() {
        assert_eq!(read_text("{\"a\":1}\n{\"b\":\n{\"c\":3}\n"), vec![(1, "{\"a\":1}".to_owned()), (2, "{\"b\":".to_owned()), (3, "{\"c\":3}".to_owned())]);
        // A first line cut short: not a document either, so still lines.
        assert_eq!(read_text("{\"b\":\n{\"c\":3}\n"), vec![(1, "{\"b\":".to_owned()), (2, "{\"c\":3}".to_owned())]);
    }

    #[test]
    fn export_directories_follow_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("AWSDynamoDB/0170-abc");
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::write(root.join("data/b.json.gz"), b"").unwrap();
        std::fs::write(root.join("data/a.json.gz"), b"").unwrap();
        std::fs::write(
            root.join("manifest-files.json"),
            "{\"itemCount\":1,\"dataFileS3Key\":\"AWSDynamoDB/0170-abc/data/b.json.gz\"}\n{\"dataFileS3Key\":\"elsewhere/a.json.gz\"}\n",
        )
        .unwrap();
        let files = expand(&[dir.path().display().to_string()]).unwrap();
        assert_eq!(files, vec![Input::File(root.join("data/b.json.gz")), Input::File(root.join("data/a.json.gz"))]);
        std::fs::write(root.join("manifest-files.json"), "{\"dataFileS3Key\":\"x/missing.json.gz\"}\n").unwrap();
        assert!(matches!(expand(&[root.display().to_string()]), Err(SourceError::Manifest { line: 1, .. })));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(export_files(empty.path()), Err(SourceError::NotExport(_))));
    }
}
