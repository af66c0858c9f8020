//! The table's items by a parallel Scan: one task per segment, each with its own
//! sender and checkpoint (LastEvaluatedKey), all under one read-capacity budget.

use crate::{base_record, Error, Run, Sender, Target};
use aws_sdk_dynamodb::types::{AttributeValue, ReturnConsumedCapacity};
use aws_sdk_dynamodb::Client;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;
use toolrank_dynamodb::{attribute_json, attribute_value, aws, item_json, Limiter};

/// What one Scan backfill reads and where it sends the items.
pub struct Job<'a, T> {
    pub client: Client,
    pub table: String,
    pub segments: u32,
    /// Items per Scan page (None: DynamoDB's 1 MB pages).
    pub page_items: Option<i32>,
    pub target: T,
    pub limiter: Limiter,
    pub run: Run<'a>,
}

/// How the segments ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    /// Segments read to the end (now or by an earlier run).
    pub done: u32,
    /// Segments that were already done when this run started.
    pub done_before: u32,
    /// Deliveries the broker failed that were sent again.
    pub resent: u64,
}

/// The checkpoint position of a finished segment.
const DONE: &str = "done";

/// A LastEvaluatedKey as the text of a checkpoint position, and back.
fn key_text(key: &HashMap<String, AttributeValue>) -> String {
    item_json(key).to_string()
}

fn key_of(text: &str) -> Result<HashMap<String, AttributeValue>, Error> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Input(format!("checkpointed key {text:?}: {e}")))?;
    let map = v.as_object().ok_or_else(|| Error::Input(format!("checkpointed key {text:?} is not an object")))?;
    map.iter().map(|(k, v)| Ok((k.clone(), attribute_value(v).map_err(Error::Input)?))).collect()
}

impl<T: Target> Job<'_, T> {
    /// Scans every segment not finished by an earlier run, concurrently.
    pub async fn run(&self) -> Result<Outcome, Error> {
        let runs = (0..self.segments).map(|segment| self.segment(segment));
        let results = futures_util::future::join_all(runs).await;
        let mut outcome = Outcome::default();
        for r in results {
            let (done, before, resent) = r?;
            outcome.done += u32::from(done);
            outcome.done_before += u32::from(before);
            outcome.resent += resent;
        }
        Ok(outcome)
    }

    /// Returns (finished, finished before this run, deliveries resent).
    async fn segment(&self, segment: u32) -> Result<(bool, bool, u64), Error> {
        let scope = format!("{}/segment/{segment}", self.run.scope);
        let claimed = self.run.store.claim(&scope, &self.run.owner).await?;
        let mut generation = claimed.generation;
        let mut start = match claimed.position.as_deref() {
            Some(DONE) => return Ok((true, true, 0)),
            Some("") | None => None,
            Some(text) => Some(key_of(text)?),
        };
        if start.is_some() {
            tracing::info!(segment, "resuming after the checkpointed key");
        }
        let mut sender = self.target.sender()?;
        let mut saved = Instant::now();
        let mut done = false;
        while !self.run.stop.load(Ordering::Relaxed) {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .segment(segment as i32)
                .total_segments(self.segments as i32)
                .set_limit(self.page_items)
                .set_exclusive_start_key(start.clone())
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(aws(format!("scanning segment {segment} of {}", self.table)))?;
            let mut bytes = 0;
            for item in page.items() {
                let (Some(pk), Some(sk)) = (item.get("PK"), item.get("SK")) else { continue };
                let image = item_json(item).to_string();
                bytes += image.len();
                let line = base_record(&attribute_json(pk), &attribute_json(sk), &image);
                sender.send(pk.as_s().ok().map(String::as_str), line.as_bytes()).await?;
            }
            // DynamoDB reports what the page consumed; where it does not (DynamoDB Local),
            // estimate it as DynamoDB bills a Scan: 0.5 unit per 4 KB read.
            let units = page.consumed_capacity().and_then(|c| c.capacity_units()).unwrap_or_else(|| (bytes as f64 / 4096.0).ceil().max(1.0) * 0.5);
            self.run.progress.rcu_milli.fetch_add((units * 1000.0) as u64, Ordering::Relaxed);
            self.run.progress.items.fetch_add(page.items().len() as u64, Ordering::Relaxed);
            start = page.last_evaluated_key;
            done = start.is_none();
            if done || saved.elapsed() >= self.run.checkpoint_every {
                generation = self.save(&scope, generation, start.as_ref(), &mut sender).await?;
                saved = Instant::now();
            }
            if done {
                break;
            }
            self.limiter.spend(units).await;
        }
        if !done {
            // Stopped: what was published is checkpointed, the rest resumes next time.
            self.save(&scope, generation, start.as_ref(), &mut sender).await?;
        }
        let resent = sender.finish().await?;
        Ok((done, false, resent))
    }

    /// Checkpoints `next` (None: the segment is done) once every record sent before it
    /// is durable (acknowledged by the broker, appended to a bucket log).
    async fn save(&self, scope: &str, generation: u64, next: Option<&HashMap<String, AttributeValue>>, sender: &mut T::Sender) -> Result<u64, Error> {
        sender.settle().await?;
        let position = next.map_or_else(|| DONE.to_owned(), key_text);
        Ok(self.run.store.save(scope, &self.run.owner, generation, &position, &[], 0).await?.generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpointed_keys_round_trip() {
        let key = HashMap::from([("PK".to_owned(), AttributeValue::S("U#S".into())), ("SK".to_owned(), AttributeValue::S("P#\"A\"#T".into()))]);
        assert_eq!(key_of(&key_text(&key)).unwrap(), key);
        assert!(key_of("{").is_err());
    }
}
