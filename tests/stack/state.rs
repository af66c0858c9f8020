//! The state store: bucket logs and owned checkpoints.

use crate::support::*;

/// A state table of its own, and a client for it.
async fn fresh_state_table() -> (aws_sdk_dynamodb::Client, String) {
    let client = toolrank_dynamodb::client().await;
    let table = unique("state");
    toolrank_state::create_state_table(&client, &table).await.unwrap();
    (client, table)
}

/// A checkpoint store on a state table of its own.
async fn fresh_state_store() -> toolrank_state::CheckpointStore {
    let (client, table) = fresh_state_table().await;
    toolrank_state::CheckpointStore::new(client, table)
}

#[test]
fn bucket_logs_take_appends_in_turn_and_compact() {
    use toolrank_state::{Error, LogHead};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = fresh_state_store().await;
        let scope = "lambda/test/bucket/00000";
        assert_eq!(store.log_head(scope).await.unwrap(), None);
        store.claim(scope, "lambda").await.unwrap();
        let d = |i: u8| vec![i; 100];
        let start = store.log_head(scope).await.unwrap().unwrap();
        let two = store.append(scope, &start, &[d(1), d(2)], 30).await.unwrap();
        assert_eq!((two.head, two.log_bytes, two.records), (2, 200, 30));
        // A writer that read head 0 too loses the race.
        assert!(matches!(store.append(scope, &start, &[d(9)], 5).await, Err(Error::Fenced(_))));
        // The head is the last delta item: the manifest was not written.
        assert_eq!(store.log_head(scope).await.unwrap(), Some(two));
        let many: Vec<Vec<u8>> = (3..14).map(d).collect();
        let head = store.append(scope, &two, &many, 12).await.unwrap();
        assert_eq!(store.log_head(scope).await.unwrap(), Some(head));
        // The records appended add up; the lost race's are not among them.
        assert_eq!((head.head, head.base_at, head.log_bytes, head.records, head.total_bytes), (13, 0, 1300, 42, 1300));
        assert_eq!(store.deltas(scope, 11, 13).await.unwrap(), vec![d(12), d(13)]);
        // A base covering deltas up to 12; 13 stays after it. Within the grace the
        // covered deltas stay too: a writer that read head 5 still loses its race.
        let at12 = LogHead { head: 12, log_bytes: 1200, total_bytes: 1200, records: 42, ..head };
        store.compact(scope, "lambda", head.generation, &at12, b"base", 0).await.unwrap();
        let after = store.log_head(scope).await.unwrap().unwrap();
        assert_eq!(after, LogHead { generation: 1, base_at: 12, head: 13, base_bytes: 4, log_bytes: 100, records: 42, total_bytes: 1300 });
        assert_eq!(store.deltas(scope, 5, 7).await.unwrap(), vec![d(6), d(7)], "kept for the grace");
        assert!(matches!(store.append(scope, &LogHead { head: 5, ..head }, &[d(9)], 1).await, Err(Error::Fenced(_))));
        assert!(matches!(store.compact(scope, "lambda", head.generation, &head, b"late", 0).await, Err(Error::Fenced(_))), "a base from a stale head");
        let log = store.load_log(scope).await.unwrap();
        assert_eq!((log.base, log.deltas, log.at.head), (b"base".to_vec(), vec![d(13)], 13));
        // The next append counts on from the last delta.
        let fourteen = store.append(scope, &after, &[d(14)], 1).await.unwrap();
        assert_eq!((fourteen.head, fourteen.log_bytes, fourteen.records, fourteen.total_bytes), (14, 200, 43, 1400));
        assert_eq!(store.log_head(scope).await.unwrap(), Some(fourteen));
        // Past the grace, the compaction after next deletes what the first one covered:
        // the first makes its base pending, a later one past the grace deletes its deltas.
        let store = store.with_delete_grace(std::time::Duration::ZERO);
        store.compact(scope, "lambda", 1, &fourteen, b"base14", 0).await.unwrap();
        assert!(matches!(store.deltas(scope, 0, 2).await, Err(Error::Input(_))), "deleted past the grace");
        assert_eq!(store.deltas(scope, 12, 14).await.unwrap(), vec![d(13), d(14)], "covered by the pending base: kept");
        let log = store.load_log(scope).await.unwrap();
        assert_eq!((log.base, log.deltas.len(), log.at.head, log.at.base_at, log.at.log_bytes), (b"base14".to_vec(), 0, 14, 14, 0));
        let fifteen = store.append(scope, &log.at, &[d(15)], 2).await.unwrap();
        assert_eq!((fifteen.head, fifteen.log_bytes, fifteen.records, fifteen.total_bytes), (15, 100, 45, 1500));
        assert_eq!(store.log_head(scope).await.unwrap(), Some(fifteen));
        assert_eq!(store.log_heads(&[scope.to_owned()]).await.unwrap(), [Some(fifteen)], "a shared log's head is its last delta");
    });
}

#[test]
fn owned_checkpoints_append_with_their_position_and_rebase_whole() {
    use toolrank_state::{Error, LogHead};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = fresh_state_store().await;
        let scope = "kafka/g/t/0";
        let d = |i: u8| vec![i; 100];
        let ck = store.claim(scope, "a").await.unwrap();
        assert_eq!((ck.position, ck.at), (None, LogHead::default()));
        // Appends move the position with the deltas; none: the position alone.
        assert_eq!(store.append_owned(scope, "a", "10", 0, &[d(1), d(2)]).await.unwrap(), 2);
        assert_eq!(store.append_owned(scope, "a", "12", 2, &[]).await.unwrap(), 2);
        assert!(matches!(store.append_owned(scope, "a", "13", 2, &vec![d(3); 11]).await, Err(Error::Input(_))), "one transaction at most");
        let ck = store.claim(scope, "a").await.unwrap();
        assert_eq!((ck.position.as_deref(), ck.state.len(), ck.deltas, ck.at.head), (Some("12"), 0, vec![d(1), d(2)], 2));
        // A whole save covers the deltas and whatever was not appended: it takes the next
        // position, so a reader at head 2 sees that it moved; the deltas are deleted.
        let at = store.save(scope, "a", ck.at.generation, "20", b"state", 0).await.unwrap();
        assert_eq!(at, LogHead { generation: 1, base_at: 3, head: 3, base_bytes: 5, log_bytes: 0, records: 0, total_bytes: 0 });
        assert_eq!(store.log_head(scope).await.unwrap(), Some(at));
        assert!(matches!(store.deltas(scope, 0, 2).await, Err(Error::Input(_))), "deleted");
        assert_eq!(store.append_owned(scope, "a", "25", 3, &[d(4)]).await.unwrap(), 4);
        // Another consumer takes the unit over: the old owner's appends and saves fail.
        let ck = store.claim(scope, "b").await.unwrap();
        assert_eq!(
            (ck.position.as_deref(), ck.state, ck.deltas, ck.at),
            (Some("25"), b"state".to_vec(), vec![d(4)], LogHead { log_bytes: 100, total_bytes: 100, head: 4, ..at })
        );
        assert!(matches!(store.append_owned(scope, "a", "30", 4, &[d(5)]).await, Err(Error::Fenced(_))));
        assert!(matches!(store.save(scope, "a", 1, "30", b"zombie", 0).await, Err(Error::Fenced(_))));
        let log = store.load_log(scope).await.unwrap();
        assert_eq!((log.base, log.deltas), (b"state".to_vec(), vec![d(4)]));
    });
}

/// The heads of many logs read together equal each one's read alone: owned logs and
/// shared ones, logs that do not exist, more than one batch of them.
#[test]
fn log_heads_read_together_equal_each_read_alone() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = fresh_state_store().await;
        let d = |i: u8| vec![i; 100];
        store.claim("kafka/g/t/0", "a").await.unwrap();
        store.append_owned("kafka/g/t/0", "a", "10", 0, &[d(1), d(2)]).await.unwrap();
        store.claim("kafka/g/t/1", "a").await.unwrap();
        store.claim("lambda/b/00000", "lambda").await.unwrap();
        let start = store.log_head("lambda/b/00000").await.unwrap().unwrap();
        store.append("lambda/b/00000", &start, &[d(3)], 7).await.unwrap();
        let mut scopes: Vec<String> = (0..150).map(|i| format!("kafka/g/none/{i}")).collect();
        scopes.insert(40, "kafka/g/t/0".into());
        scopes.insert(120, "lambda/b/00000".into());
        scopes.push("kafka/g/t/1".into());
        let mut alone = Vec::new();
        for scope in &scopes {
            alone.push(store.log_head(scope).await.unwrap());
        }
        let together = store.log_heads(&scopes).await.unwrap();
        assert_eq!(together, alone);
        assert_eq!(together.iter().flatten().map(|h| (h.head, h.records)).collect::<Vec<_>>(), [(2, 0), (1, 7), (0, 0)]);
    });
}

/// A base saved with where its figures (the catalog and aggregates) end reads back whole
/// for its owner, and as its figures alone for a copy, from fewer chunks; one whose
/// figures attributes are of another generation, or that has none, reads back whole.
#[test]
fn a_base_reads_back_whole_or_as_its_figures_alone() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, table) = fresh_state_table().await;
        let store = toolrank_state::CheckpointStore::new(client.clone(), table.clone());
        let scope = "kafka/g/t/1";
        // Bytes that hardly compress, a repeated marker every KB: sequences of about a KB,
        // and chunks (350 KB each) that hold the figures and others that do not.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let state: Vec<u8> = (0..3_000_000)
            .map(|i| match i % 1024 {
                0..8 => b"MARKER!!"[i % 1024],
                _ => {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect();
        let figures = 500_000;
        let ck = store.claim(scope, "a").await.unwrap();
        let at = store.save(scope, "a", ck.at.generation, "7", &state, figures).await.unwrap();
        store.append_owned(scope, "a", "8", at.head, &[vec![1; 10]]).await.unwrap();
        let log = store.load_log(scope).await.unwrap();
        assert_eq!((log.base == state, log.figures_only, log.deltas.len()), (true, false, 1));
        let part = store.load_log_figures(scope).await.unwrap();
        assert_eq!((part.base == state[..figures], part.figures_only, part.deltas, part.at), (true, true, log.deltas, log.at));
        // Sets the manifest's figures attributes to (generation, stored bytes), then
        // reads the log as a copy does: whole, both times below.
        let read_with = |generation: u64, stored: u64| {
            let (client, table, store, state) = (&client, &table, &store, &state);
            async move {
                let n = |v: u64| AttributeValue::N(v.to_string());
                let manifest = [("PK", AttributeValue::S(scope.into())), ("SK", AttributeValue::S("manifest".into()))];
                let update = client.update_item().table_name(table).set_key(Some(manifest.map(|(k, v)| (k.to_owned(), v)).into()));
                let update = update.update_expression("SET FiguresGeneration = :g, FiguresStored = :s");
                update.expression_attribute_values(":g", n(generation)).expression_attribute_values(":s", n(stored)).send().await.unwrap();
                let log = store.load_log_figures(scope).await.unwrap();
                (log.base == *state, log.figures_only)
            }
        };
        let generation = store.log_head(scope).await.unwrap().unwrap().generation;
        // A base saved by an earlier release keeps the manifest's figures attributes of
        // the base before: they name another generation.
        assert_eq!(read_with(generation - 1, 600_000).await, (true, false));
        // Attributes that do not decode to the figures.
        assert_eq!(read_with(generation, 40).await, (true, false));
        assert_eq!(store.claim(scope, "b").await.unwrap().state, state, "its next owner restores it whole");
        // Saved with no figures to read apart: a copy reads all of it.
        let at = store.log_head(scope).await.unwrap().unwrap();
        store.save(scope, "b", at.generation, "9", b"small", 0).await.unwrap();
        let part = store.load_log_figures(scope).await.unwrap();
        assert_eq!((part.base, part.figures_only), (b"small".to_vec(), false));
    });
}

/// Every take of a lease by a new holder increments its generation, a renewal keeps it,
/// and a holder renewing a generation taken over since learns it lost the lease: the
/// generation is the fencing token the sinks compare.
#[test]
fn a_lease_hands_every_new_holder_a_larger_generation() {
    use toolrank_state::{Lease, Taken};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, table) = fresh_state_table().await;
        let lease = |owner: &str, ms: u64| Lease::new(client.clone(), table.clone(), "kafka/g/t/sink-writer", owner, std::time::Duration::from_millis(ms));
        let (a, b) = (lease("a", 400), lease("b", 400));
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let Some(Taken { continued: false, generation: first }) = a.take(None).await.unwrap() else { panic!("a takes a new lease") };
        // A new lease item starts at the clock: a state table made anew still orders later holders after earlier ones.
        assert!(first > started, "{first} after {started}");
        assert_eq!(a.take(Some(first)).await.unwrap(), Some(Taken { continued: true, generation: first }), "a renewal keeps the generation");
        assert_eq!(b.take(None).await.unwrap(), None, "held by a");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(b.take(None).await.unwrap(), Some(Taken { continued: false, generation: first + 1 }), "b takes the lapsed lease over");
        assert_eq!(a.take(Some(first)).await.unwrap(), None, "a's renewal finds b's generation: lost");
        b.release().await.unwrap();
        assert_eq!(a.take(None).await.unwrap(), Some(Taken { continued: false, generation: first + 2 }), "a again, after b");
        assert_eq!(a.take(None).await.unwrap(), Some(Taken { continued: true, generation: first + 3 }), "a take that is not a renewal always moves on");
        client.delete_table().table_name(&table).send().await.unwrap();
    });
}
