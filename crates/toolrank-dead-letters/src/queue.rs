//! Dead letters sent whole to an SQS queue with why and where: for consumers with no disk
//! that outlives them (Lambda) or whose operators want letters in one place (the stream
//! pollers). A log is no place for a record's contents (user profiles, prompts, tool
//! arguments).

use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};

/// SQS takes at most 256 KiB a message; a longer record is cut, and says so.
const MAX_BODY: usize = 250 * 1024;

/// One letter for the queue.
pub struct Letter<'a> {
    /// Where the record was (a sequence number): `toolrank-position`.
    pub position: &'a str,
    /// Why: names a key by its digest, quotes no value (`toolrank-reason`).
    pub reason: &'a str,
    /// The record, whole (cut at 250 KiB).
    pub body: &'a str,
}

/// The dead-letter queue.
pub struct Queue {
    client: aws_sdk_sqs::Client,
    url: String,
    /// Names the consumer in each letter (`toolrank-source`).
    source: String,
}

impl Queue {
    pub fn new(config: &aws_config::SdkConfig, url: String, source: String) -> Queue {
        Queue { client: aws_sdk_sqs::Client::new(config), url, source }
    }

    /// Sends the letters, ten a call; returns the index of the first one not sent (the
    /// caller reads again from its record) with the error.
    pub async fn send(&self, letters: &[Letter<'_>]) -> Result<(), (usize, String)> {
        for (n, chunk) in letters.chunks(10).enumerate() {
            let entries: Vec<SendMessageBatchRequestEntry> = chunk.iter().enumerate().map(|(i, l)| self.entry(i, l)).collect();
            let out = self.client.send_message_batch().queue_url(&self.url).set_entries(Some(entries)).send().await;
            match out {
                Ok(out) => {
                    if let Some(first) = out.failed().iter().filter_map(|f| f.id().parse::<usize>().ok()).min() {
                        let why = out.failed().iter().map(|f| f.code().to_owned()).collect::<Vec<_>>().join(", ");
                        return Err((n * 10 + first, format!("SQS refused dead letters: {why}")));
                    }
                }
                Err(e) => return Err((n * 10, format!("sending dead letters to SQS: {}", aws_sdk_sqs::error::DisplayErrorContext(&e)))),
            }
        }
        Ok(())
    }

    fn entry(&self, i: usize, letter: &Letter<'_>) -> SendMessageBatchRequestEntry {
        let text = |v: &str| MessageAttributeValue::builder().data_type("String").string_value(v).build().expect("a string attribute");
        let raw = letter.body;
        let mut entry = SendMessageBatchRequestEntry::builder()
            .id(i.to_string())
            .message_attributes("toolrank-reason", text(letter.reason))
            .message_attributes("toolrank-source", text(&self.source))
            .message_attributes("toolrank-position", text(letter.position));
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
