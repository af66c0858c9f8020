//! Checkpoints and leases in the pipeline's state table.
//!
//! A checkpoint is an engine snapshot and the input position it covers (a Kafka offset,
//! a shard sequence number), written atomically: the snapshot goes into chunk items of a
//! new generation, then one conditional update of the manifest item switches to it. The
//! manifest names its owner, so a consumer that lost a partition (a zombie after a
//! rebalance) cannot overwrite the new owner's checkpoint: its save fails as `Fenced`.

use crate::{aws, batch_write, Error};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, PutRequest, ReturnValue, WriteRequest};
use aws_sdk_dynamodb::Client;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Items stay well under DynamoDB's 400 KB limit.
const CHUNK_BYTES: usize = 350 * 1024;

/// The state of one scope (e.g. `kafka/<group>/<topic>/<partition>`) as last saved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Increases with every save; 0 before the first.
    pub generation: u64,
    /// Where the input resumes; `None` before the first save.
    pub position: Option<String>,
    /// The engine snapshot; empty before the first save.
    pub state: Vec<u8>,
}

/// Checkpoints in a DynamoDB table (see the module docs).
#[derive(Clone)]
pub struct CheckpointStore {
    client: Client,
    table: String,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn chunk_sk(generation: u64, i: usize) -> String {
    format!("chunk#{generation:020}#{i:06}")
}

impl CheckpointStore {
    pub fn new(client: Client, table: impl Into<String>) -> CheckpointStore {
        CheckpointStore { client, table: table.into() }
    }

    async fn manifest(&self, scope: &str) -> Result<Option<HashMap<String, AttributeValue>>, Error> {
        let got = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(scope))
            .key("SK", s("manifest"))
            .consistent_read(true)
            .send()
            .await
            .map_err(aws(format!("reading the checkpoint of {scope}")))?;
        Ok(got.item)
    }

    /// The generation of `scope`'s latest checkpoint (0 if none), without claiming it.
    pub async fn generation(&self, scope: &str) -> Result<u64, Error> {
        Ok(self.manifest(scope).await?.as_ref().map_or(0, generation_of))
    }

    /// The position of `scope`'s latest checkpoint, without its state.
    pub async fn position(&self, scope: &str) -> Result<Option<String>, Error> {
        Ok(self.manifest(scope).await?.and_then(|m| m.get("Position").and_then(|v| v.as_s().ok()).cloned()))
    }

    /// Adds `members` to the string set `name` of the item (`scope`, `sk`), e.g. the
    /// registry of a stream's shard lineages.
    pub async fn add_to_set(&self, scope: &str, sk: &str, name: &str, members: Vec<String>) -> Result<(), Error> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(scope))
            .key("SK", s(sk))
            .update_expression("ADD #n :m")
            .expression_attribute_names("#n", name)
            .expression_attribute_values(":m", AttributeValue::Ss(members))
            .send()
            .await
            .map_err(aws(format!("adding to {scope} {sk}")))?;
        Ok(())
    }

    /// The string set `name` of the item (`scope`, `sk`); empty when absent.
    pub async fn set(&self, scope: &str, sk: &str, name: &str) -> Result<Vec<String>, Error> {
        let got = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(scope))
            .key("SK", s(sk))
            .consistent_read(true)
            .send()
            .await
            .map_err(aws(format!("reading {scope} {sk}")))?;
        Ok(got.item.and_then(|i| i.get(name).and_then(|v| v.as_ss().ok()).cloned()).unwrap_or_default())
    }

    /// Records that `owner` is alive until `duration` from now, and returns how many
    /// owners of `scope` are alive (e.g. pollers sharing a stream's shards).
    pub async fn heartbeat(&self, scope: &str, owner: &str, duration: Duration) -> Result<usize, Error> {
        let now = now_ms();
        self.client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(scope))
            .item("SK", s(owner))
            .item("Expires", n(now + duration.as_millis() as u64))
            .send()
            .await
            .map_err(aws(format!("heartbeat in {scope}")))?;
        let got = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk")
            .filter_expression("Expires > :now")
            .expression_attribute_values(":pk", s(scope))
            .expression_attribute_values(":now", n(now))
            .consistent_read(true)
            .send()
            .await
            .map_err(aws(format!("reading {scope}")))?;
        Ok(got.items().len().max(1))
    }

    /// Reads `scope`'s latest checkpoint without claiming it (a sink writer merging the
    /// partitions other consumers own).
    pub async fn peek(&self, scope: &str) -> Result<Checkpoint, Error> {
        // The owner may switch generations (and delete the old chunks) while we read:
        // read again from the new manifest.
        let mut tries = 0;
        loop {
            let Some(m) = self.manifest(scope).await? else { return Ok(Checkpoint::default()) };
            match self.load(scope, &m).await {
                Err(Error::Input(_)) if tries < 10 && self.generation(scope).await? != generation_of(&m) => tries += 1,
                result => return result,
            }
        }
    }

    /// Takes `scope` over for `owner` and returns its latest checkpoint. From now on only
    /// `owner` can save it.
    pub async fn claim(&self, scope: &str, owner: &str) -> Result<Checkpoint, Error> {
        loop {
            let manifest = self.manifest(scope).await?;
            // Unchanged since we read it (or still absent): then it is ours.
            let condition = if manifest.is_some() { "#g = :g" } else { "attribute_not_exists(PK)" };
            let claimed = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("PK", s(scope))
                .key("SK", s("manifest"))
                .update_expression("SET #o = :o, #g = :g")
                .condition_expression(condition)
                .expression_attribute_names("#o", "Owner")
                .expression_attribute_names("#g", "Generation")
                .expression_attribute_values(":o", s(owner))
                .expression_attribute_values(":g", n(manifest.as_ref().map_or(0, generation_of)))
                .send()
                .await;
            match claimed {
                Ok(_) => {}
                Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => continue,
                Err(e) => return Err(aws(format!("claiming {scope}"))(e)),
            }
            return match manifest {
                Some(m) => self.load(scope, &m).await,
                None => Ok(Checkpoint::default()),
            };
        }
    }

    async fn load(&self, scope: &str, manifest: &HashMap<String, AttributeValue>) -> Result<Checkpoint, Error> {
        let generation = generation_of(manifest);
        let position = manifest.get("Position").and_then(|v| v.as_s().ok()).cloned();
        let chunks: usize = manifest.get("Chunks").and_then(|v| v.as_n().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut state = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        let mut got = 0;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("PK = :pk AND begins_with(SK, :prefix)")
                .expression_attribute_values(":pk", s(scope))
                .expression_attribute_values(":prefix", s(format!("chunk#{generation:020}#")))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(aws(format!("reading the checkpoint of {scope}")))?;
            for item in page.items() {
                let blob = item.get("Data").and_then(|v| v.as_b().ok()).ok_or_else(|| Error::Input(format!("checkpoint chunk of {scope} without Data")))?;
                state.extend_from_slice(blob.as_ref());
                got += 1;
            }
            start = page.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        if got != chunks {
            return Err(Error::Input(format!("checkpoint {generation} of {scope} has {got} of its {chunks} chunks")));
        }
        Ok(Checkpoint { generation, position, state })
    }

    /// Saves `state` at `position` as the checkpoint after `generation`, if `owner` still
    /// owns `scope`. Returns the new generation.
    pub async fn save(&self, scope: &str, owner: &str, generation: u64, position: &str, state: &[u8]) -> Result<u64, Error> {
        let next = generation + 1;
        let chunks: Vec<&[u8]> = state.chunks(CHUNK_BYTES).collect();
        let puts = chunks.iter().enumerate().map(|(i, c)| {
            let item = HashMap::from([("PK".to_owned(), s(scope)), ("SK".to_owned(), s(chunk_sk(next, i))), ("Data".to_owned(), AttributeValue::B(Blob::new(*c)))]);
            WriteRequest::builder().put_request(PutRequest::builder().set_item(Some(item)).build().expect("item set")).build()
        });
        batch_write(&self.client, &self.table, puts.collect()).await.map_err(aws(format!("writing the checkpoint of {scope}")))?;
        let switched = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(scope))
            .key("SK", s("manifest"))
            .update_expression("SET #g = :next, #p = :p, #c = :c, #b = :b")
            .condition_expression("#o = :o AND #g = :g")
            .expression_attribute_names("#g", "Generation")
            .expression_attribute_names("#p", "Position")
            .expression_attribute_names("#c", "Chunks")
            .expression_attribute_names("#b", "Bytes")
            .expression_attribute_names("#o", "Owner")
            .expression_attribute_values(":next", n(next))
            .expression_attribute_values(":g", n(generation))
            .expression_attribute_values(":p", s(position))
            .expression_attribute_values(":c", n(chunks.len()))
            .expression_attribute_values(":b", n(state.len()))
            .expression_attribute_values(":o", s(owner))
            .return_values(ReturnValue::UpdatedOld)
            .send()
            .await;
        let count = match switched {
            Ok(out) => out.attributes().and_then(|a| a.get("Chunks")).and_then(|v| v.as_n().ok()).and_then(|v| v.parse().ok()).unwrap_or(0),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => {
                self.delete_chunks(scope, next, chunks.len()).await;
                return Err(Error::Fenced(scope.to_owned()));
            }
            Err(e) => return Err(aws(format!("saving the checkpoint of {scope}"))(e)),
        };
        self.delete_chunks(scope, generation, count).await;
        Ok(next)
    }

    /// Best-effort removal of a generation's chunks: leftovers are unreachable garbage.
    async fn delete_chunks(&self, scope: &str, generation: u64, count: usize) {
        let deletes = (0..count)
            .map(|i| {
                let key = HashMap::from([("PK".to_owned(), s(scope)), ("SK".to_owned(), s(chunk_sk(generation, i)))]);
                WriteRequest::builder().delete_request(DeleteRequest::builder().set_key(Some(key)).build().expect("key set")).build()
            })
            .collect();
        if let Err(e) = batch_write(&self.client, &self.table, deletes).await {
            tracing::warn!(scope, generation, error = %e, "could not delete old checkpoint chunks");
        }
    }
}

fn generation_of(manifest: &HashMap<String, AttributeValue>) -> u64 {
    manifest.get("Generation").and_then(|v| v.as_n().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A time-limited exclusive role (e.g. the one consumer of a group that writes the
/// sinks), held by renewing it before it expires; a dead holder's lease lapses.
#[derive(Clone)]
pub struct Lease {
    client: Client,
    table: String,
    scope: String,
    owner: String,
    duration: Duration,
}

impl Lease {
    pub fn new(client: Client, table: impl Into<String>, scope: impl Into<String>, owner: impl Into<String>, duration: Duration) -> Lease {
        Lease { client, table: table.into(), scope: scope.into(), owner: owner.into(), duration }
    }

    /// Takes or renews the lease; `false` while another live owner holds it.
    pub async fn acquire(&self) -> Result<bool, Error> {
        Ok(self.take().await?.is_some())
    }

    /// Takes or renews the lease: `None` while another live owner holds it, else whether
    /// this owner was its last holder (nobody held it in between).
    pub async fn take(&self) -> Result<Option<bool>, Error> {
        let now = now_ms();
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(&self.scope))
            .item("SK", s("lease"))
            .item("Owner", s(&self.owner))
            .item("Expires", n(now + self.duration.as_millis() as u64))
            .condition_expression("attribute_not_exists(PK) OR #o = :me OR #e < :now")
            .expression_attribute_names("#o", "Owner")
            .expression_attribute_names("#e", "Expires")
            .expression_attribute_values(":me", s(&self.owner))
            .expression_attribute_values(":now", n(now))
            .return_values(ReturnValue::AllOld)
            .send()
            .await;
        match put {
            Ok(out) => Ok(Some(out.attributes().and_then(|a| a.get("Owner")).and_then(|v| v.as_s().ok()) == Some(&self.owner))),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(None),
            Err(e) => Err(aws(format!("taking the lease {}", self.scope))(e)),
        }
    }

    /// Gives the lease up so that another owner need not wait for it to lapse.
    pub async fn release(&self) -> Result<(), Error> {
        // Expired rather than deleted: the next holder learns who held it last.
        let expired = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(&self.scope))
            .key("SK", s("lease"))
            .update_expression("SET #e = :zero")
            .condition_expression("#o = :me")
            .expression_attribute_names("#o", "Owner")
            .expression_attribute_names("#e", "Expires")
            .expression_attribute_values(":me", s(&self.owner))
            .expression_attribute_values(":zero", n(0))
            .send()
            .await;
        match expired {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(()),
            Err(e) => Err(aws(format!("releasing the lease {}", self.scope))(e)),
        }
    }
}
