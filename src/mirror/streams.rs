//! `toolrank mirror --follow dynamodb-streams`: the mirror fed by the table's stream, one
//! process reading every shard (parents before children), resuming from the sequence
//! numbers its last committed batch recorded in the warehouse.

use super::line::mirror_line;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use toolrank_consume_streams::dynamodb_streams::{record_json, DynamoStreams};
use toolrank_consume_streams::{ShardSource, SourceError, StreamRecord};
use toolrank_dead_letters::DeadLetters;
use toolrank_warehouse::mirror::Mirror;
use toolrank_warehouse::DataApi;

/// How long changes may wait before they are applied, and how often shards are listed.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const DISCOVER_EVERY: Duration = Duration::from_secs(10);
/// A shard's recorded position once it is closed and fully read.
const DONE: &str = "done";

/// Where one shard stands: the last sequence number mirrored, and whether it is finished.
#[derive(Default)]
struct Shard {
    last: Option<String>,
    done: bool,
    iterator: Option<String>,
}

impl Shard {
    fn parse(position: &str) -> Shard {
        let (seq, done) = match position.strip_suffix(DONE) {
            Some(rest) => (rest.trim_end_matches(' '), true),
            None => (position, false),
        };
        Shard { last: (!seq.is_empty()).then(|| seq.to_owned()), done, iterator: None }
    }

    fn position(&self) -> String {
        match (&self.last, self.done) {
            (Some(seq), true) => format!("{seq} {DONE}"),
            (None, true) => DONE.to_owned(),
            (seq, false) => seq.clone().unwrap_or_default(),
        }
    }
}

pub fn follow(
    rt: &tokio::runtime::Runtime,
    api: &DataApi,
    table: &str,
    until_idle: Option<f64>,
    stop: &AtomicBool,
    dead: &mut DeadLetters,
) -> Result<(Mirror, u64)> {
    let config = rt.block_on(toolrank_dynamodb::sdk_config());
    let stream = rt.block_on(DynamoStreams::of_table(&config, table)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let source = format!("dynamodb-streams:{}", stream.name());
    let mut mirror = rt.block_on(Mirror::open(api, &source))?;
    let mut shards: BTreeMap<String, Shard> = rt.block_on(Mirror::positions(api, &source))?.into_iter().map(|(id, p)| (id, Shard::parse(&p))).collect();
    tracing::info!(stream = stream.name(), resumed = shards.len(), "following");

    let idle = until_idle.map(Duration::from_secs_f64);
    let (mut last_record, mut last_flush) = (Instant::now(), Instant::now());
    let mut parents: HashMap<String, Option<String>> = HashMap::new();
    let mut discovered: Option<Instant> = None;
    let mut bad = 0;
    while !stop.load(Ordering::Relaxed) {
        if discovered.is_none_or(|t| t.elapsed() >= DISCOVER_EVERY) {
            for s in rt.block_on(stream.shards()).map_err(|e| anyhow::anyhow!("listing shards: {e}"))? {
                shards.entry(s.id.clone()).or_default();
                parents.insert(s.id, s.parent);
            }
            discovered = Some(Instant::now());
        }
        // Parents first: a child is read once its parent (if still listed) is done.
        let ready: Vec<String> = shards
            .iter()
            .filter(|(id, s)| !s.done && parents.contains_key(*id))
            .filter(|(id, _)| parents[*id].as_ref().is_none_or(|p| !parents.contains_key(p) || shards.get(p).is_some_and(|s| s.done)))
            .map(|(id, _)| id.clone())
            .collect();
        let mut read_any = false;
        for id in ready {
            let shard = shards.get_mut(&id).expect("listed");
            let iterator = match shard.iterator.take() {
                Some(it) => it,
                None => rt.block_on(stream.iterator(&id, shard.last.as_deref())).map_err(|e| anyhow::anyhow!("shard {id}: {e}"))?,
            };
            let page = match rt.block_on(stream.read(&iterator)) {
                Ok(page) => page,
                Err(SourceError::Expired) => continue,
                Err(e) => return Err(anyhow::anyhow!("reading shard {id}: {e}")),
            };
            for record in &page.records {
                let line = record_json(record).to_string();
                mirror_line(&mut mirror, line.as_bytes(), &format!("{table}[{id}]"), 0, dead, &mut bad)?;
                shard.last = Some(record.sequence().to_owned());
            }
            read_any |= !page.records.is_empty();
            shard.done = page.next.is_none();
            shard.iterator = page.next;
            if !page.records.is_empty() || shard.done {
                mirror.advance(&id, &shard.position());
            }
        }
        if read_any {
            last_record = Instant::now();
        } else if idle.is_some_and(|idle| last_record.elapsed() >= idle) {
            break;
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
        if mirror.full() || (!mirror.is_empty() && last_flush.elapsed() >= FLUSH_EVERY) {
            rt.block_on(mirror.flush(api)).context("applying a mirror batch")?;
            last_flush = Instant::now();
        }
    }
    rt.block_on(mirror.flush(api))?;
    Ok((mirror, bad))
}
