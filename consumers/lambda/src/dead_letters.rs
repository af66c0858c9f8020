//! Records that do not decode, sent whole to an SQS queue with why and where: a Lambda
//! function has no disk that outlives it, and a log is no place for a record's contents
//! (user profiles, prompts, tool arguments).

use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use serde_json::value::RawValue;

/// SQS takes at most 256 KiB a message; a longer record is cut, and says so.
const MAX_BODY: usize = 250 * 1024;

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

/// The dead-letter queue.
pub struct Queue {
    client: aws_sdk_sqs::Client,
    url: String,
    /// Names the function in each letter (`toolrank-source`).
    source: String,
}

impl Queue {
    pub async fn new(url: String, source: String) -> Queue {
        let client = aws_sdk_sqs::Client::new(&toolrank_dynamodb::sdk_config().await);
        Queue { client, url, source }
    }

    /// Sends the letters, ten a call; returns the first one not sent (the batch is
    /// retried from it) with the error.
    pub async fn send(&self, letters: &[Rejected<'_>]) -> Result<(), (usize, String)> {
        for chunk in letters.chunks(10) {
            let entries: Vec<SendMessageBatchRequestEntry> = chunk.iter().enumerate().map(|(i, r)| self.entry(i, r)).collect();
            let out = self.client.send_message_batch().queue_url(&self.url).set_entries(Some(entries)).send().await;
            match out {
                Ok(out) => {
                    if let Some(first) = out.failed().iter().filter_map(|f| f.id().parse::<usize>().ok()).min() {
                        let why = out.failed().iter().map(|f| f.code().to_owned()).collect::<Vec<_>>().join(", ");
                        return Err((chunk[first].index, format!("SQS refused dead letters: {why}")));
                    }
                }
                Err(e) => return Err((chunk[0].index, format!("sending dead letters to SQS: {}", aws_sdk_sqs::error::DisplayErrorContext(&e)))),
            }
        }
        Ok(())
    }

    fn entry(&self, i: usize, r: &Rejected<'_>) -> SendMessageBatchRequestEntry {
        let text = |v: &str| MessageAttributeValue::builder().data_type("String").string_value(v).build().expect("a string attribute");
        let raw = r.raw.get();
        let mut entry = SendMessageBatchRequestEntry::builder()
            .id(i.to_string())
            .message_attributes("toolrank-reason", text(&r.reason))
            .message_attributes("toolrank-source", text(&self.source))
            .message_attributes("toolrank-position", text(&r.id));
        let body = if raw.len() > MAX_BODY {
            entry = entry.message_attributes("toolrank-truncated-from", text(&raw.len().to_string()));
            let mut end = MAX_BODY;
            while !raw.is_char_boundary(end) {
                end -= 1;
            }
            &raw[..end]
        } else {
            raw
        };
        entry.message_body(body).build().expect("id and body")
    }
}
