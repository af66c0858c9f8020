//! The sinks on their own: DynamoDB rounds and budgets, Valkey differences.

use crate::support::*;
use std::time::{Duration, Instant};

/// Applies the lines of a history file to `engine`.
fn apply_lines(engine: &mut toolrank_engine::Engine, lines: &[&str]) {
    for line in lines {
        toolrank_events::decode_line(line.as_bytes(), &mut |rec| {
            engine.apply(&rec.result.expect("a generated record decodes"));
        })
        .unwrap();
    }
}

/// A history `toolrank generate` makes of `sessions` sessions over 30 agents.
fn generated_history(sessions: &str, seed: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.jsonl");
    toolrank(&["generate", "--sessions", sessions, "--seed", seed, "--agents", "30", "--out", path.to_str().unwrap()]);
    std::fs::read_to_string(&path).unwrap()
}

/// An engine that applied `lines`, flushed.
fn engine_of(lines: &[&str]) -> toolrank_engine::Engine {
    let mut engine = toolrank_engine::Engine::new();
    apply_lines(&mut engine, lines);
    engine.flush();
    engine
}

/// What a Valkey namespace holds, through the reader: agents (with tools), patterns, and
/// each domain's ranking (a member left behind in a domain an agent moved out of shows).
fn valkey_holds(url: &str, prefix: &str, domains: &[String]) -> (Vec<toolrank_engine::AgentFigures>, Vec<toolrank_engine::PatternFigures>, Vec<Vec<String>>) {
    let mut reader = toolrank_sink_valkey::ValkeyReader::connect(url, prefix, Duration::from_secs(5)).unwrap();
    let mut agents = reader.agents().unwrap();
    agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
    let mut patterns = reader.patterns().unwrap();
    patterns
        .sort_by(|a, b| (&a.user_id, &a.process_pattern, &a.agent_id, &a.tool_sequence).cmp(&(&b.user_id, &b.process_pattern, &b.agent_id, &b.tool_sequence)));
    let rankings = domains.iter().map(|d| reader.top_agents(d, 0).unwrap().into_iter().map(|a| a.agent_id).collect()).collect();
    (agents, patterns, rankings)
}

/// The pattern items (`UserPrcToolMapp`) a table holds, without their TTL (it counts
/// from the moment of writing).
async fn pattern_items(client: &aws_sdk_dynamodb::Client, table: &str) -> std::collections::BTreeMap<String, String> {
    let mut items = std::collections::BTreeMap::new();
    let mut start = None;
    loop {
        let page = client.scan().table_name(table).set_exclusive_start_key(start).send().await.unwrap();
        for item in page.items() {
            if item.get("EntityType").and_then(|v| v.as_s().ok()).is_some_and(|e| e == toolrank_sink_dynamodb::PATTERN_ENTITY) {
                let key = format!("{:?} {:?}", item["PK"], item["SK"]);
                let rest: std::collections::BTreeMap<&String, String> =
                    item.iter().filter(|(k, _)| k.as_str() != toolrank_dynamodb::TTL_ATTRIBUTE).map(|(k, v)| (k, format!("{v:?}"))).collect();
                items.insert(key, format!("{rest:?}"));
            }
        }
        start = page.last_evaluated_key;
        if start.is_none() {
            return items;
        }
    }
}

/// A DynamoDB sink written round after round (each round plans only the patterns that
/// changed or crossed a cut since the last) holds, after every round, the same pattern
/// items as a sink that writes everything into an empty table: entering, leaving and
/// top-flag moves included.
#[test]
fn dynamodb_sink_rounds_hold_what_a_full_write_holds() {
    let text = generated_history("600", "17");
    let lines: Vec<&str> = text.lines().collect();
    let today = toolrank_events::Day::parse_iso(TODAY).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = toolrank_dynamodb::client().await;
        let rounds = unique("Rounds");
        toolrank_dynamodb::create_table(&client, &rounds, false).await.unwrap();
        let mut sink = toolrank_sink_dynamodb::DynamoSink::new(client.clone(), rounds.clone());
        let mut engine = toolrank_engine::Engine::new();
        engine.track_changes();
        for (i, slice) in lines.chunks(lines.len() / 6 + 1).enumerate() {
            apply_lines(&mut engine, slice);
            engine.flush();
            let changes = engine.take_changes();
            sink.write(&engine, &changes, today).await.unwrap();
            assert!(!sink.needs_write());
            let full = unique("Full");
            toolrank_dynamodb::create_table(&client, &full, false).await.unwrap();
            toolrank_sink_dynamodb::DynamoSink::new(client.clone(), full.clone()).write(&engine, &engine.everything(), today).await.unwrap();
            let (held, expected) = (pattern_items(&client, &rounds).await, pattern_items(&client, &full).await);
            assert!(!expected.is_empty());
            assert_eq!(held, expected, "round {i}");
        }
    });
}

/// A write capacity budget (`--dynamodb-max-wcu`) spreads a round out: its items go at
/// most that many per second, and the table ends holding what an unlimited write holds.
#[test]
fn a_dynamodb_write_capacity_budget_spreads_a_round_out() {
    let _pace = dynamodb_pace();
    const WCU: f64 = 40.0;
    let text = generated_history("300", "19");
    let engine = engine_of(&text.lines().collect::<Vec<_>>());
    let today = toolrank_events::Day::parse_iso(TODAY).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = toolrank_dynamodb::client().await;
        let (limited, free) = (unique("Limited"), unique("Free"));
        for table in [&limited, &free] {
            toolrank_dynamodb::create_table(&client, table, false).await.unwrap();
        }
        let mut sink = toolrank_sink_dynamodb::DynamoSink::new(client.clone(), limited.clone()).with_max_wcu(Some(WCU));
        let started = Instant::now();
        loop {
            sink.write(&engine, &engine.everything(), today).await.unwrap();
            if !sink.needs_write() {
                break;
            }
        }
        let (took, items) = (started.elapsed(), sink.stats.requests);
        toolrank_sink_dynamodb::DynamoSink::new(client.clone(), free.clone()).write(&engine, &engine.everything(), today).await.unwrap();
        assert_eq!(pattern_items(&client, &limited).await, pattern_items(&client, &free).await);
        // The last batch of 25 goes once the ones before it have had their time.
        eprintln!("{items} items in {took:?} at {WCU} WCU");
        assert!(items > 50 && took.as_secs_f64() >= (items as f64 - 25.0) / WCU, "{items} items in {took:?}");
    });
}

/// Adds execution items (the history's shape, ~200 bytes each) to `table` until it holds
/// `total` such padding items.
async fn pad_history(client: &aws_sdk_dynamodb::Client, table: &str, from: usize, total: usize) {
    use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
    let s = |v: String| AttributeValue::S(v);
    let puts: Vec<WriteRequest> = (from..total)
        .map(|i| {
            let item = std::collections::HashMap::from([
                ("PK".to_owned(), s(format!("USRPAD{:04}#SESS{i:09}", i % 1000))),
                ("SK".to_owned(), s("PRC001#AGT001#TL001".to_owned())),
                ("EntityType".to_owned(), s("UserSessPrcToolMappHist".to_owned())),
                ("ToolValues".to_owned(), s("x".repeat(100))),
                ("TransactDT".to_owned(), s("20250614101500".to_owned())),
                ("SuccYN".to_owned(), s("Y".to_owned())),
            ]);
            WriteRequest::builder().put_request(PutRequest::builder().set_item(Some(item)).build().unwrap()).build()
        })
        .collect();
    toolrank_dynamodb::batch_write(client, table, puts, &Default::default()).await.unwrap();
}

/// A DynamoDB sink starting on a table (a consumer's start, a takeover of the sink lease)
/// reads back what it wrote at what the rankings cost, never what the history costs: the
/// same read units within 10% on a table with 20,000 history items and with 200,000, and
/// no Scan; and the start finds the table as the sink left it (nothing to write).
#[test]
fn a_dynamodb_sink_start_reads_what_the_rankings_cost_not_the_history() {
    let _pace = dynamodb_pace();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.jsonl");
    toolrank(&["generate", "--sessions", "300", "--seed", "23", "--agents", "30", "--out", path.to_str().unwrap()]);
    let table = unique("Reads");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // No stream: DynamoDB Local slows down with every stream record it holds, and the sink
    // reads none.
    rt.block_on(async { toolrank_dynamodb::create_table(&toolrank_dynamodb::client().await, &table, false).await.unwrap() });
    toolrank(&["produce", "--to", "dynamodb", "--table", &table, path.to_str().unwrap()]);
    let text = std::fs::read_to_string(&path).unwrap();
    let engine = engine_of(&text.lines().collect::<Vec<_>>());
    let today = toolrank_events::Day::parse_iso(TODAY).unwrap();
    rt.block_on(async {
        let client = toolrank_dynamodb::client().await;
        let mut sink = toolrank_sink_dynamodb::DynamoSink::new(client.clone(), table.clone());
        while sink.needs_write() {
            sink.write(&engine, &engine.everything(), today).await.unwrap();
        }
        let mut reads = Vec::new();
        let mut padded = 0;
        for padding in [20_000, 200_000] {
            let started = Instant::now();
            pad_history(&client, &table, padded, padding).await;
            eprintln!("padded {} items in {:?}", padding - padded, started.elapsed());
            padded = padding;
            let (counted, usage) = toolrank_dynamodb::client_with_usage().await;
            let mut start = toolrank_sink_dynamodb::DynamoSink::new(counted, table.clone());
            start.write(&engine, &engine.everything(), today).await.unwrap();
            let by_op = usage.by_op();
            eprintln!("{padding} history items: {by_op:?}");
            assert!(!by_op.contains_key("Scan"), "{by_op:?}");
            assert_eq!(start.stats.requests, 0, "the table holds what the sink wrote");
            assert!(!start.needs_write());
            reads.push(usage.read_units());
        }
        // DynamoDB Local keeps every table in its heap, and slows down as they pile up.
        client.delete_table().table_name(&table).send().await.unwrap();
        assert!(reads[0] > 0.0, "reads are counted");
        assert!((reads[1] - reads[0]).abs() <= 0.1 * reads[0], "read units at 20k and 200k history items: {reads:?}");
    });
}

#[test]
fn valkey_sink_writes_only_differences_and_holds_what_a_full_write_holds() {
    let url = env("TOOLRANK_VALKEY_URL");
    let text = generated_history("800", "11");
    let lines: Vec<&str> = text.lines().collect();
    let (first, second) = lines.split_at(lines.len() / 2);
    let mut engine = toolrank_engine::Engine::new();
    engine.track_changes();
    apply_lines(&mut engine, first);
    engine.flush();
    let (diffed, full) = (unique("vdiff"), unique("vfull"));
    let mut sink = toolrank_sink_valkey::ValkeySink::new(&url, diffed.as_str()).unwrap();
    let changes = engine.take_changes();
    sink.write(&engine, &changes).unwrap();
    let domains_before: Vec<String> =
        engine.build_report(toolrank_events::Day::parse_iso("2026-11-30").unwrap()).agents.iter().map(|a| a.domain_id.clone()).collect();
    let initial = sink.commands;
    // The second half: more executions, modifies, removes and late or changed Agent items;
    // then the busiest agent moves to a new domain and loses its name.
    apply_lines(&mut engine, second);
    let moved = r#"{"eventID":"moved","eventName":"MODIFY","dynamodb":{"Keys":{"PK":{"S":"AGT0001"},"SK":{"S":"METADATA"}},"NewImage":{"PK":{"S":"AGT0001"},"SK":{"S":"METADATA"},"EntityType":{"S":"Agent"},"GSI1_PK":{"S":"DMN999"},"GSI1_SK":{"S":"AGTSCORE#0"}},"SequenceNumber":"9000000000000000000","StreamViewType":"NEW_AND_OLD_IMAGES"}}"#;
    apply_lines(&mut engine, &[moved]);
    engine.flush();
    let changes = engine.take_changes();
    assert!(!changes.agents.is_empty() && !changes.patterns.is_empty());
    sink.write(&engine, &changes).unwrap();
    let incremental = sink.commands - initial;
    let mut rewrite = toolrank_sink_valkey::ValkeySink::new(&url, full.as_str()).unwrap();
    rewrite.write(&engine, &engine.everything()).unwrap();
    assert!(incremental < rewrite.commands, "the second write sent only differences: {incremental} commands against {} for everything", rewrite.commands);
    let mut domains: Vec<String> =
        engine.build_report(toolrank_events::Day::parse_iso("2026-11-30").unwrap()).agents.iter().map(|a| a.domain_id.clone()).chain(domains_before).collect();
    domains.sort();
    domains.dedup();
    let (held, expected) = (valkey_holds(&url, &diffed, &domains), valkey_holds(&url, &full, &domains));
    assert!(!held.1.is_empty());
    let moved = held.0.iter().find(|a| a.agent_id == "AGT0001").expect("the moved agent");
    assert_eq!((moved.domain_id.as_str(), moved.agent_name.as_deref()), ("DMN999", None));
    assert!(domains.iter().any(|d| d == "DMN001"), "the domain it left is compared too");
    for (a, b) in held.0.iter().zip(&expected.0) {
        assert_eq!(a, b, "agent {} as written by differences, and by a full write", a.agent_id);
    }
    assert_eq!(held.0.len(), expected.0.len());
    assert_eq!(held.1.len(), expected.1.len());
    for (a, b) in held.1.iter().zip(&expected.1) {
        assert_eq!(a, b);
    }
    assert_eq!(held.2, expected.2, "each domain's ranking");
}

/// A full rewrite (a new holder's first write, a resynchronization) lists its namespace
/// with SCAN, which walks every key of the server: another namespace's 50,000 keys cost
/// it some fifty round trips, not five thousand.
#[test]
fn a_valkey_full_rewrite_lists_its_namespace_in_few_round_trips() {
    let url = env("TOOLRANK_VALKEY_URL");
    let lines: Vec<&str> = include_str!("../../examples/seed-sample.jsonl").lines().collect();
    let engine = engine_of(&lines);
    let rewrite = || {
        let mut sink = toolrank_sink_valkey::ValkeySink::new(&url, unique("vscan").as_str()).unwrap();
        sink.write(&engine, &engine.everything()).unwrap();
        sink.commands
    };
    let before = rewrite();
    let mut conn = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let other = unique("vscan-other");
    let keys: Vec<String> = (0..50_000).map(|i| format!("{other}:{i}")).collect();
    for chunk in keys.chunks(1000) {
        let _: () = redis::cmd("MSET").arg(chunk.iter().flat_map(|k| [k.as_str(), "x"]).collect::<Vec<_>>()).query(&mut conn).unwrap();
    }
    let after = rewrite();
    for chunk in keys.chunks(1000) {
        let _: () = redis::cmd("DEL").arg(chunk).query(&mut conn).unwrap();
    }
    // The same figures into an empty namespace: the same commands but for the SCAN calls.
    let scans = after - before;
    assert!(scans < 1000, "another namespace's 50,000 keys took {scans} more commands to list past");
}

/// Everything namespace `prefix` holds but its fence, by key without the prefix: each
/// key's type and content in a canonical order.
fn valkey_dump(conn: &mut redis::Connection, prefix: &str) -> std::collections::BTreeMap<String, String> {
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query(conn).unwrap();
    let mut dump = std::collections::BTreeMap::new();
    for key in keys.into_iter().filter(|k| *k != format!("{prefix}:fence")) {
        let kind: String = redis::cmd("TYPE").arg(&key).query(conn).unwrap();
        let content = match kind.as_str() {
            "hash" => format!("{:?}", redis::cmd("HGETALL").arg(&key).query::<std::collections::BTreeMap<String, String>>(conn).unwrap()),
            "zset" => format!("{:?}", redis::cmd("ZRANGE").arg(&key).arg(0).arg(-1).arg("WITHSCORES").query::<Vec<String>>(conn).unwrap()),
            "set" => format!("{:?}", redis::cmd("SMEMBERS").arg(&key).query::<std::collections::BTreeSet<String>>(conn).unwrap()),
            other => format!("{other}: {:?}", redis::cmd("DUMP").arg(&key).query::<Vec<u8>>(conn).unwrap()),
        };
        dump.insert(key[prefix.len()..].to_owned(), format!("{kind} {content}"));
    }
    dump
}

/// A full rewrite larger than one transaction goes out in several, over a namespace that
/// holds older rankings and keys, set members and fields no ranking has any more (and a
/// set of all patterns a cut-off rewrite left): afterwards the namespace holds exactly
/// what a rewrite into an empty namespace writes, key by key.
#[test]
fn a_valkey_full_rewrite_goes_out_in_bounded_transactions_and_leaves_exactly_the_rankings() {
    use toolrank_sink::Sink;
    use toolrank_sink_valkey::ValkeySink;
    let url = env("TOOLRANK_VALKEY_URL");
    let text = generated_history("1500", "23");
    let lines: Vec<&str> = text.lines().collect();
    // The older rankings: another part of the history, so that users, patterns and tools
    // of theirs are missing from the newer ones.
    let (older, newer) = (engine_of(&lines[lines.len() / 2..]), engine_of(&lines));
    let (prefix, reference) = (unique("vpieces"), unique("vwhole"));
    let mut conn = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    ValkeySink::new(&url, prefix.as_str()).unwrap().write(&older, &older.everything()).unwrap();
    let agent = newer.everything().agents.iter().find(|&&a| newer.agent_figures(a).is_some()).map(|&a| newer.name(a).to_owned()).unwrap();
    let _: () = redis::pipe()
        .hset(format!("{prefix}:pattern:gone|P|A|T"), "executions", 1)
        .zadd(format!("{prefix}:patterns:gone"), "gone|P|A|T", 1.0)
        .zadd(format!("{prefix}:patterns"), "gone|P|A|T", 1.0)
        .zadd(format!("{prefix}:rebuild:patterns"), "left|P|A|T", 2.0)
        .zadd(format!("{prefix}:tools:{agent}"), "GONE_TOOL", 3.0)
        .hset(format!("{prefix}:agent:{agent}"), "stray", "x")
        .sadd(format!("{prefix}:domains"), "DMN_GONE")
        .query(&mut conn)
        .unwrap();

    let mut sink = ValkeySink::new(&url, prefix.as_str()).unwrap();
    sink.hold(5);
    sink.set_rewrite_bytes(64 << 10);
    let prepared = sink.prepare(&newer, &newer.everything()).unwrap();
    sink.send(prepared).unwrap();
    // At least four of the rewrite's own, and one deleting the keys it did not write.
    assert!(sink.transactions >= 5, "{} transactions", sink.transactions);
    let mut whole = ValkeySink::new(&url, reference.as_str()).unwrap();
    let prepared = whole.prepare(&newer, &newer.everything()).unwrap();
    whole.send(prepared).unwrap();
    assert_eq!(whole.transactions, 1);

    let (held, expected) = (valkey_dump(&mut conn, &prefix), valkey_dump(&mut conn, &reference));
    assert!(expected.len() > 1000, "{} keys", expected.len());
    let differ: Vec<&String> = held.keys().chain(expected.keys()).filter(|k| held.get(*k) != expected.get(*k)).collect();
    assert!(differ.is_empty(), "{} keys differ, e.g. {:?}: {:?} against {:?}", differ.len(), differ[0], held.get(differ[0]), expected.get(differ[0]));
    let fence: Option<u64> = redis::cmd("GET").arg(format!("{prefix}:fence")).query(&mut conn).unwrap();
    assert_eq!(fence, Some(5));
    for p in [&prefix, &reference] {
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{p}:*")).query(&mut conn).unwrap();
        let _: () = redis::cmd("DEL").arg(keys).query(&mut conn).unwrap();
    }
}

/// Two writers of one table and one Valkey namespace hold the sink lease in turn: the
/// first (fencing token 7) writes, plans its next write, and is deposed before that
/// write arrives; the second (token 8) writes the newer figures. The late write is
/// refused by both sinks, which keep the newer figures.
#[test]
fn a_write_carrying_an_older_fencing_token_is_refused_by_both_sinks() {
    use toolrank_sink_dynamodb::{DynamoSink, Namespace};
    use toolrank_sink_valkey::ValkeySink;
    let url = env("TOOLRANK_VALKEY_URL");
    let text = generated_history("300", "37");
    let lines: Vec<&str> = text.lines().collect();
    let upto = |n: usize| engine_of(&lines[..n]);
    let (first, stale, last) = (upto(lines.len() / 3), upto(lines.len() * 2 / 3), upto(lines.len()));
    let today = toolrank_events::Day::parse_iso(TODAY).unwrap();
    let scope = toolrank_sink::Scope::of(today);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _inside = rt.enter();
    let client = rt.block_on(toolrank_dynamodb::client());
    let (table, reference) = (unique("Fenced"), unique("Reference"));
    for t in [&table, &reference] {
        rt.block_on(toolrank_dynamodb::create_table(&client, t, false)).unwrap();
    }
    let namespace = Namespace::Shadow("fenced".into());
    let (prefix, reference_prefix) = (unique("vfenced"), unique("vreference"));
    let mut deposed: [Box<dyn toolrank_sink::AnySink>; 2] =
        [Box::new(DynamoSink::in_namespace(client.clone(), table.clone(), namespace.clone())), Box::new(ValkeySink::new(&url, prefix.as_str()).unwrap())];
    let mut holder: [Box<dyn toolrank_sink::AnySink>; 2] =
        [Box::new(DynamoSink::in_namespace(client.clone(), table.clone(), namespace.clone())), Box::new(ValkeySink::new(&url, prefix.as_str()).unwrap())];
    for (old, new) in deposed.iter_mut().zip(holder.iter_mut()) {
        old.hold(7);
        let plan = old.plan(&first, &first.everything(), scope).unwrap();
        old.send(plan).unwrap();
        let late = old.plan(&stale, &stale.everything(), scope).unwrap();
        new.hold(8);
        let plan = new.plan(&last, &last.everything(), scope).unwrap();
        new.send(plan).unwrap();
        let refused = old.send(late).unwrap_err();
        assert!(refused.fenced, "{} refused the late write as fenced: {refused}", old.name());
    }
    // What an unfenced writer makes of the newest figures.
    let mut plain = DynamoSink::in_namespace(client.clone(), reference.clone(), namespace.clone());
    rt.block_on(plain.write(&last, &last.everything(), today)).unwrap();
    ValkeySink::new(&url, reference_prefix.as_str()).unwrap().write(&last, &last.everything()).unwrap();
    let read = |t: &str| {
        let (mut agents, mut patterns) = rt.block_on(toolrank_sink_dynamodb::read_table(&client, t, &namespace, &[])).unwrap();
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        patterns.sort_by_cached_key(|p| format!("{p:?}"));
        (agents, patterns)
    };
    assert_eq!(read(&table), read(&reference), "DynamoDB holds the newest figures");
    let domains: Vec<String> = last.build_report(today).agents.iter().map(|a| a.domain_id.clone()).collect();
    assert_eq!(valkey_holds(&url, &prefix, &domains), valkey_holds(&url, &reference_prefix, &domains), "Valkey holds the newest figures");
    for t in [&table, &reference] {
        rt.block_on(client.delete_table().table_name(t).send()).unwrap();
    }
}
