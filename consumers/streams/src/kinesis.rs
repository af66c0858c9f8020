//! Kinesis Data Streams for DynamoDB (aws-sdk-kinesis) as a [`ShardSource`]: each Kinesis
//! record's data is one DynamoDB change record in JSON.

use crate::source::{Page, ShardInfo, ShardSource, SourceError, StreamRecord};
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::types::{Record, ShardIteratorType};
use aws_sdk_kinesis::Client;
use toolrank_engine::Engine;
use toolrank_events::decode_kinesis_data;
use toolrank_live::{apply_change, Summary};

pub struct Kinesis {
    client: Client,
    stream: String,
}

impl Kinesis {
    pub fn new(config: &aws_config::SdkConfig, stream: impl Into<String>) -> Kinesis {
        Kinesis { client: Client::new(config), stream: stream.into() }
    }
}

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(what: &str) -> impl FnOnce(SdkError<E, R>) -> SourceError + '_ {
    move |e| match e.code() {
        Some("ExpiredIteratorException") => SourceError::Expired,
        _ => SourceError::Other(format!("{what}: {}", DisplayErrorContext(&e))),
    }
}

impl ShardSource for Kinesis {
    type Record = Record;

    fn name(&self) -> &str {
        &self.stream
    }

    async fn shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            // ListShards takes either the stream name or a continuation token.
            let req = match &token {
                Some(t) => self.client.list_shards().next_token(t),
                None => self.client.list_shards().stream_name(&self.stream),
            };
            let page = req.send().await.map_err(classify("listing shards"))?;
            for s in page.shards() {
                out.push(ShardInfo {
                    id: s.shard_id().to_owned(),
                    parent: s.parent_shard_id().map(str::to_owned),
                    adjacent_parent: s.adjacent_parent_shard_id().map(str::to_owned),
                });
            }
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        Ok(out)
    }

    async fn iterator(&self, shard: &str, after: Option<&str>) -> Result<String, SourceError> {
        let req = self.client.get_shard_iterator().stream_name(&self.stream).shard_id(shard);
        let req = match after {
            Some(seq) => req.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).starting_sequence_number(seq),
            None => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        let got = req.send().await.map_err(classify(&format!("getting an iterator of {shard}")))?;
        got.shard_iterator.ok_or_else(|| SourceError::Other(format!("no iterator for {shard}")))
    }

    async fn read(&self, iterator: &str) -> Result<Page<Record>, SourceError> {
        let got = self.client.get_records().shard_iterator(iterator).limit(1000).send().await.map_err(classify("reading records"))?;
        Ok(Page { next: got.next_shard_iterator, records: got.records })
    }
}

impl StreamRecord for Record {
    fn sequence(&self) -> &str {
        self.sequence_number()
    }

    fn apply(&self, engine: &mut Engine, summary: &mut Summary) -> Result<Option<i64>, String> {
        let (change, created) = decode_kinesis_data(self.data().as_ref()).map_err(|e| e.to_string())?;
        apply_change(engine, &change, summary);
        Ok(created.or_else(|| self.approximate_arrival_timestamp().and_then(|t| t.to_millis().ok())))
    }

    fn describe(&self) -> String {
        String::from_utf8_lossy(self.data().as_ref()).into_owned()
    }

    fn size(&self) -> usize {
        self.data().as_ref().len()
    }
}
