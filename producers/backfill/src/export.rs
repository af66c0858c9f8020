//! The table's items from a DynamoDB export (`manifest-files.json` + `data/*.json.gz`, or
//! export files, on disk or in S3): one `{"Item": {...}}` per line, checkpointed by file
//! and line. A full export's items become base copies; an incremental export's lines
//! (`Metadata.WriteTimestampMicros`, `Keys`, `NewImage` unless deleted) become changes at
//! their write time, which outrank the base copies of the full export before them.

use crate::{base_record, change_record, Error, Run, Sender};
use serde_json::value::RawValue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use toolrank_events::DeadLetter;
use toolrank_source_file::{Input, LineReader};

/// Where an export's data files are.
pub enum Files {
    Local(Vec<Input>),
    S3 { client: aws_sdk_s3::Client, objects: Vec<crate::s3::Object> },
}

impl Files {
    fn len(&self) -> usize {
        match self {
            Files::Local(inputs) => inputs.len(),
            Files::S3 { objects, .. } => objects.len(),
        }
    }

    /// The name of file `index` in positions and dead letters.
    fn name(&self, index: usize) -> String {
        match self {
            Files::Local(inputs) => inputs[index].name(),
            Files::S3 { objects, .. } => objects[index].url(),
        }
    }

    /// A reader of file `index`; an S3 object is downloaded first, into a temporary file
    /// that lives as long as the returned guard.
    async fn open(&self, index: usize, read: Arc<AtomicU64>) -> Result<(LineReader, Option<tempfile::NamedTempFile>), Error> {
        match self {
            Files::Local(inputs) => Ok((LineReader::open(&inputs[index], read)?, None)),
            Files::S3 { client, objects } => {
                let object = &objects[index];
                let file = crate::s3::download(client, object).await?;
                let raw = file.reopen().map_err(|e| Error::Input(format!("{}: {e}", object.url())))?;
                Ok((LineReader::from_read(object.url(), Box::new(raw), read)?, Some(file)))
            }
        }
    }
}

/// What one export backfill reads and where it publishes.
pub struct Job<'a> {
    pub files: Files,
    pub run: Run<'a>,
}

#[derive(serde::Deserialize)]
struct Line<'a> {
    #[serde(rename = "Item", borrow)]
    item: Option<&'a RawValue>,
    #[serde(rename = "Metadata")]
    metadata: Option<Metadata>,
    #[serde(rename = "Keys", borrow)]
    keys: Option<&'a RawValue>,
    #[serde(rename = "NewImage", borrow)]
    new_image: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
struct Metadata {
    #[serde(rename = "WriteTimestampMicros")]
    write_timestamp_micros: Option<Number>,
}

#[derive(serde::Deserialize)]
struct Number {
    #[serde(rename = "N")]
    n: String,
}

#[derive(serde::Deserialize)]
struct Keys<'a> {
    #[serde(rename = "PK", borrow)]
    pk: &'a RawValue,
    #[serde(rename = "SK", borrow)]
    sk: &'a RawValue,
}

/// Whether a read failed on the file's bytes (a broken gzip stream, a truncated file)
/// rather than on the reading itself.
fn corrupt(e: &toolrank_source_file::SourceError) -> bool {
    use std::io::ErrorKind::{InvalidData, InvalidInput, UnexpectedEof};
    matches!(e, toolrank_source_file::SourceError::Io { source, .. } if matches!(source.kind(), InvalidData | InvalidInput | UnexpectedEof))
}

/// A checkpoint position: the file's index in the inputs and its last line published.
fn position(file: usize, line: u64) -> String {
    format!("{file}:{line}")
}

fn parse_position(text: &str) -> Result<(usize, u64), Error> {
    let bad = || Error::Input(format!("checkpointed export position {text:?} is not FILE:LINE"));
    let (f, l) = text.split_once(':').ok_or_else(bad)?;
    Ok((f.parse().map_err(|_| bad())?, l.parse().map_err(|_| bad())?))
}

/// The record of one export line (a base copy, or an incremental export's change), and
/// the item's PK (the record key).
fn record(line: &[u8]) -> Result<(String, String), String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8 text".to_owned())?;
    let not_export =
        |e: &dyn std::fmt::Display| format!("not an export line {{\"Item\": ...}} or an incremental export line {{\"Metadata\": ..., \"Keys\": ...}}: {e}");
    let line = serde_json::from_str::<Line>(text).map_err(|e| not_export(&e))?;
    let keys_of = |raw: &RawValue| -> Result<(serde_json::Value, serde_json::Value, String), String> {
        let keys: Keys = serde_json::from_str(raw.get()).map_err(|e| format!("the item has no PK and SK: {e}"))?;
        let pk: serde_json::Value = serde_json::from_str(keys.pk.get()).map_err(|e| e.to_string())?;
        let key = pk["S"].as_str().ok_or("PK is not a string attribute {\"S\": ...}")?.to_owned();
        Ok((pk, serde_json::from_str(keys.sk.get()).map_err(|e| e.to_string())?, key))
    };
    if let Some(item) = line.item {
        let (pk, sk, key) = keys_of(item)?;
        return Ok((key, base_record(&pk, &sk, item.get())));
    }
    let micros = line.metadata.and_then(|m| m.write_timestamp_micros).ok_or_else(|| not_export(&"no Item and no Metadata.WriteTimestampMicros"))?.n;
    if micros.is_empty() || !micros.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("Metadata.WriteTimestampMicros {micros:?} is not a decimal number"));
    }
    let (pk, sk, key) = keys_of(line.keys.or(line.new_image).ok_or("an incremental export line without Keys")?)?;
    Ok((key, change_record(&pk, &sk, line.new_image.map(RawValue::get), &micros)))
}

/// The dead letter of an export file whose bytes are corrupt after line `last`: the rest
/// of it is lost either way, and the backfill goes on with the next file.
fn corrupt_file(name: &str, last: u64, e: &toolrank_source_file::SourceError) -> DeadLetter {
    DeadLetter {
        source: name.to_owned(),
        line: last + 1,
        record: None,
        position: None,
        reason: format!("the file is corrupt after line {last}, the rest of it is skipped: {e}"),
        raw: String::new(),
    }
}

impl Job<'_> {
    /// Counts a dead letter and hands it to `reject`.
    fn reject(&self, reject: &mut dyn FnMut(DeadLetter), letter: DeadLetter) {
        self.run.progress.dead_letters.fetch_add(1, Ordering::Relaxed);
        reject(letter);
    }

    /// Publishes every line after the checkpoint; bad lines go to `reject`. Returns
    /// whether the export was read to its end.
    pub async fn run(&self, sender: &mut impl Sender, reject: &mut dyn FnMut(DeadLetter)) -> Result<bool, Error> {
        let claimed = self.run.store.claim(&self.run.scope, &self.run.owner).await?;
        let mut generation = claimed.generation;
        let (from_file, from_line) = match claimed.position.as_deref() {
            Some("") | None => (0, 0),
            Some(p) => parse_position(p)?,
        };
        let read = Arc::new(AtomicU64::new(0));
        let mut saved = Instant::now();
        for index in from_file..self.files.len() {
            let mut last = if index == from_file { from_line } else { 0 };
            let (mut reader, _download) = match self.files.open(index, read.clone()).await {
                Ok(opened) => opened,
                Err(Error::Source(e)) if corrupt(&e) => {
                    self.reject(reject, corrupt_file(&self.files.name(index), 0, &e));
                    generation = self.run.store.save(&self.run.scope, &self.run.owner, generation, &position(index + 1, 0), &[], 0).await?.generation;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let name = reader.name().to_owned();
            loop {
                let (line_no, line) = match reader.next_line() {
                    Ok(Some(next)) => next,
                    Ok(None) => break,
                    Err(e) if corrupt(&e) => {
                        self.reject(reject, corrupt_file(&name, last, &e));
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
                if line_no <= last {
                    continue;
                }
                match record(line) {
                    Ok((key, line)) => sender.send(Some(&key), line.as_bytes()).await?,
                    Err(reason) => self.reject(
                        reject,
                        DeadLetter {
                            source: name.clone(),
                            line: line_no,
                            record: None,
                            position: None,
                            reason,
                            raw: String::from_utf8_lossy(line).into_owned(),
                        },
                    ),
                }
                self.run.progress.items.fetch_add(1, Ordering::Relaxed);
                last = line_no;
                if saved.elapsed() >= self.run.checkpoint_every || self.run.stop.load(Ordering::Relaxed) {
                    sender.settle().await?;
                    generation = self.run.store.save(&self.run.scope, &self.run.owner, generation, &position(index, last), &[], 0).await?.generation;
                    saved = Instant::now();
                    if self.run.stop.load(Ordering::Relaxed) {
                        return Ok(false);
                    }
                }
            }
            sender.settle().await?;
            generation = self.run.store.save(&self.run.scope, &self.run.owner, generation, &position(index + 1, 0), &[], 0).await?.generation;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_lines_become_base_copies_and_bad_ones_say_why() {
        let (key, line) = record(br#"{"Item":{"PK":{"S":"U#S"},"SK":{"S":"P#A#T"},"ToolNM":{"S":"x"}}}"#).unwrap();
        assert_eq!(key, "U#S");
        assert!(line.contains(r#""NewImage":{"PK":{"S":"U#S"},"SK":{"S":"P#A#T"},"ToolNM":{"S":"x"}}"#) && line.contains(r#""SequenceNumber":"0""#));
        assert!(record(b"{}").unwrap_err().contains("export line"));
        let keys = r#""Keys":{"PK":{"S":"U#S"},"SK":{"S":"P#A#T"}}"#;
        let (key, line) = record(
            format!(r#"{{"Metadata":{{"WriteTimestampMicros":{{"N":"1700000000000001"}}}},{keys},"NewImage":{{"PK":{{"S":"U#S"}},"SK":{{"S":"P#A#T"}}}}}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(key, "U#S");
        assert!(line.contains(r#""eventName":"INSERT""#) && line.contains(r#""SequenceNumber":"1700000000000001""#));
        let (_, line) =
            record(format!(r#"{{"Metadata":{{"WriteTimestampMicros":{{"N":"1700000000000002"}}}},{keys},"OldImage":{{"PK":{{"S":"U#S"}}}}}}"#).as_bytes())
                .unwrap();
        assert!(line.contains(r#""eventName":"REMOVE""#) && line.contains(r#""SequenceNumber":"1700000000000002""#) && !line.contains("NewImage"));
        assert!(record(format!(r#"{{"Metadata":{{"WriteTimestampMicros":{{"N":"x"}}}},{keys}}}"#).as_bytes()).unwrap_err().contains("WriteTimestampMicros"));
        assert!(record(br#"{"Item":{"PK":{"N":"1"},"SK":{"S":"x"}}}"#).unwrap_err().contains("PK"));
        assert_eq!(parse_position(&position(2, 41)).unwrap(), (2, 41));
    }
}
