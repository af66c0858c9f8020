//! Records that do not decode, sent whole to an SQS queue with why and where: a Lambda
//! function has no disk that outlives it.

use serde_json::value::RawValue;
use toolrank_dead_letters::{Letter, Queue};

/// A record the handler could not decode.
pub struct Rejected<'a> {
    /// Its index in the event.
    pub index: usize,
    /// Its sequence number (`itemIdentifier`).
    pub id: String,
    /// Why: names a key by its digest, quotes no value.
    pub reason: String,
    pub raw: &'a RawValue,
}

/// Sends `rejected` to `queue`; the event index of the first one not sent, with the error.
pub async fn send(queue: &Queue, rejected: &[Rejected<'_>]) -> Result<(), (usize, String)> {
    let letters: Vec<Letter> = rejected.iter().map(|r| Letter { position: &r.id, reason: &r.reason, body: r.raw.get() }).collect();
    queue.send(&letters).await.map_err(|(i, e)| (rejected[i].index, e))
}
