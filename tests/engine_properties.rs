//! The backbone: the incremental engine, fed a history in any delivery order, with
//! redeliveries, flushes and snapshot/restore at arbitrary points, equals the batch
//! reference evaluated over the final table state.

mod common;

use common::{canonical, evaluate, final_state, from_engine, Event, Item};
use proptest::prelude::*;
use toolrank_engine::{shard_of, AggregateCopy, Aggregates, Contributions, Engine, Shards, StateError};
use toolrank_events::{decode_line, Day};

const TODAY: &str = "2025-07-14";

fn hist_key() -> impl Strategy<Value = (String, String)> {
    (0..3u8, 0..2u8, 1..4u8, 1..5u8, 1..4u8).prop_map(|(u, s, p, a, t)| (format!("USR{u}#SESS{s}"), format!("PRC00{p}#AGT{a}#TL{t}")))
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        8 => (hist_key(), 0..3u8, 0..4u8, 0..2u8, prop::bool::weighted(0.75)).prop_map(|((pk, sk), nm, day, hour, succ)| Event {
            pk,
            sk,
            item: Some(Item::Hist { tool_nm: format!("TOOL_{nm}"), dt: format!("2025061{day}{:02}0000", 9 + hour), succ }),
            ttl: false,
        }),
        2 => (hist_key(), any::<bool>()).prop_map(|((pk, sk), ttl)| Event { pk, sk, item: None, ttl }),
        3 => (1..5u8, 1..3u8, 0..2u8).prop_map(|(a, d, n)| Event {
            pk: format!("AGT{a}"),
            sk: "METADATA".into(),
            item: Some(Item::Agent { domain: format!("DMN{d}"), name: format!("agent {a}.{n}") }),
            ttl: false,
        }),
        1 => (1..5u8).prop_map(|a| Event { pk: format!("AGT{a}"), sk: "METADATA".into(), item: None, ttl: false }),
        1 => prop_oneof![
            (1..5u8).prop_map(|a| (format!("AGT{a}"), "METADATA".to_owned())),
            hist_key(),
        ].prop_map(|(pk, sk)| Event { pk, sk, item: Some(Item::Other), ttl: false }),
    ]
}

/// A history, its delivery order (a permutation with redeliveries spliced in), and one
/// control byte per delivery deciding flushes and snapshot/restore.
fn scenario() -> impl Strategy<Value = (Vec<Event>, Vec<usize>, Vec<u8>)> {
    prop::collection::vec(event(), 1..70).prop_flat_map(|history| {
        let n = history.len();
        let order = Just((0..n).collect::<Vec<_>>()).prop_shuffle();
        let dups = prop::collection::vec((0..n, any::<u16>()), 0..=n / 2);
        (Just(history), order, dups, prop::collection::vec(any::<u8>(), 2 * n)).prop_map(|(h, mut order, dups, ctl)| {
            for (idx, at) in dups {
                let pos = at as usize % (order.len() + 1);
                order.insert(pos, idx);
            }
            (h, order, ctl)
        })
    })
}

/// Applies `event`, the history's `idx`th, as the stream record it would be.
fn deliver(engine: &mut Engine, event: &Event, idx: usize) {
    let line = event.stream_record(idx as u64 + 1);
    decode_line(line.as_bytes(), &mut |rec| {
        engine.apply(&rec.result.expect("generated records are valid"));
    })
    .expect("generated lines decode");
}

fn replay(history: &[Event], order: &[usize], ctl: &[u8]) -> Engine {
    let mut engine = Engine::new();
    for (i, &idx) in order.iter().enumerate() {
        deliver(&mut engine, &history[idx], idx);
        match ctl[i] % 8 {
            0 => engine.flush(),
            1 => engine = Engine::restore(&engine.snapshot()).expect("own snapshot restores"),
            3 => {
                engine.collect_names();
            }
            _ => {}
        }
    }
    engine
}

/// Cases: ENGINE_CASES (256 by default; scripts/test runs 1000). Not PROPTEST_CASES:
/// proptest lets that override every explicit config, the fuzz harness's included.
fn engine_cases() -> u32 {
    std::env::var("ENGINE_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: engine_cases(), ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_batch_reference((history, order, ctl) in scenario()) {
        let mut engine = replay(&history, &order, &ctl);
        let report = engine.report(Day::parse_iso(TODAY).unwrap());
        let got = from_engine(&report, &engine.staging_sorted());
        let want = canonical(evaluate(&final_state(&history), TODAY));
        prop_assert_eq!(got, want);
    }

    /// What replay does: flushes that hand their contributions to aggregates summed
    /// elsewhere, adopted at the end, here mixed with flushes into the engine's own.
    #[test]
    fn contributions_summed_aside_equal_the_batch_reference((history, order, ctl) in scenario()) {
        let mut engine = Engine::new();
        let (mut aside, mut batch) = (Aggregates::default(), Contributions::default());
        for (i, &idx) in order.iter().enumerate() {
            deliver(&mut engine, &history[idx], idx);
            match ctl[i] % 4 {
                0 => engine.flush(),
                1 | 2 => {
                    engine.flush_aside(&mut batch);
                    batch.apply_to(&mut aside);
                    batch.clear();
                }
                _ => {}
            }
        }
        engine.flush_aside(&mut batch);
        batch.apply_to(&mut aside);
        engine.adopt_aggregates(aside);
        let report = engine.report(Day::parse_iso(TODAY).unwrap());
        let got = from_engine(&report, &engine.staging_sorted());
        prop_assert_eq!(got, canonical(evaluate(&final_state(&history), TODAY)));
    }

    /// A checkpoint's reader may decode only a snapshot's catalog and aggregates, its
    /// first part: that part alone gives a copy the figures of the whole, which restores.
    #[test]
    fn a_snapshots_figures_part_makes_the_copy_the_whole_makes((history, order, ctl) in scenario()) {
        let mut engine = replay(&history, &order, &ctl);
        let (whole, figures) = engine.snapshot_split();
        let today = Day::parse_iso(TODAY).unwrap();
        let copied = |base: &[u8]| {
            let mut view = Engine::new();
            view.absorb_copy(&mut AggregateCopy::from_log(base, &[], None).expect("loads"));
            view.report(today)
        };
        let report = engine.report(today);
        prop_assert_eq!(copied(&whole[..figures]), report.clone());
        prop_assert_eq!(copied(&whole), report);
        let mut restored = Engine::restore(&whole).expect("restores");
        prop_assert_eq!(restored.staging_sorted(), engine.staging_sorted());
        prop_assert_eq!(restored.report(today), engine.report(today));
    }

    #[test]
    fn delivery_order_and_snapshots_do_not_matter((history, order, ctl) in scenario()) {
        let in_order: Vec<usize> = (0..history.len()).collect();
        let mut a = replay(&history, &in_order, &vec![2; in_order.len()]);
        let mut b = replay(&history, &order, &ctl);
        let today = Day::parse_iso(TODAY).unwrap();
        prop_assert_eq!(a.report(today), b.report(today));
        prop_assert_eq!(a.staging_sorted(), b.staging_sorted());
    }
}

type SinkAgents = std::collections::BTreeMap<String, Option<toolrank_engine::AgentFigures>>;
type SinkPatterns = std::collections::BTreeMap<(String, String, u32), Option<toolrank_engine::PatternFigures>>;

/// What a sink that writes only the reported changes does.
fn write_changes(live: &mut Engine, agents: &mut SinkAgents, patterns: &mut SinkPatterns) {
    let changes = live.take_changes();
    for a in changes.agents {
        agents.insert(live.name(a).to_owned(), live.agent_figures(a));
    }
    for k in changes.patterns {
        patterns.insert((live.name(k.user).to_owned(), live.name(k.agent).to_owned(), k.sequence), live.pattern_figures(k));
    }
}

/// Whether a sink written by [`write_changes`] holds `engine`'s full figures.
fn sink_holds_figures(engine: &Engine, agents: SinkAgents, patterns: SinkPatterns) -> Result<(), TestCaseError> {
    let all = engine.everything();
    let full_agents: std::collections::BTreeMap<_, _> =
        all.agents.iter().filter_map(|&a| Some((engine.name(a).to_owned(), engine.agent_figures(a)?))).collect();
    let agents: std::collections::BTreeMap<_, _> = agents.into_iter().filter_map(|(k, v)| Some((k, v?))).collect();
    prop_assert_eq!(agents, full_agents);
    let full_patterns: std::collections::BTreeMap<_, _> = all.patterns.iter().filter_map(|&k| engine.pattern_figures(k).map(|f| (f.id(), f))).collect();
    let patterns: std::collections::BTreeMap<_, _> = patterns.into_values().flatten().map(|f| (f.id(), f)).collect();
    prop_assert_eq!(patterns, full_patterns);
    Ok(())
}

type Figures = (std::collections::BTreeMap<String, toolrank_engine::AgentFigures>, std::collections::BTreeMap<String, toolrank_engine::PatternFigures>);

/// Every agent's and pattern's figures of `engine` (what a sink shows of it).
fn figures(engine: &Engine) -> Figures {
    let all = engine.everything();
    let agents = all.agents.iter().filter_map(|&a| Some((engine.name(a).to_owned(), engine.agent_figures(a)?))).collect();
    let patterns = all.patterns.iter().filter_map(|&k| engine.pattern_figures(k)).map(|f| (f.id(), f)).collect();
    (agents, patterns)
}

/// [`figures`] of the agents and of the patterns of the users of `shard` of `count`.
fn figures_of_shard(engine: &Engine, shard: u32, count: u32) -> Figures {
    let (agents, mut patterns) = figures(engine);
    patterns.retain(|_, f| shard_of(&f.user_id, count) == shard);
    (agents, patterns)
}

/// An engine holding `sessions` one-execution sessions, applied in order.
fn one_row_sessions(sessions: usize) -> Engine {
    let history: Vec<Event> = (0..sessions)
        .map(|i| Event {
            pk: format!("USR{}#SESS{i}", i % 17),
            sk: format!("PRC00{}#AGT{}#TL1", i % 3 + 1, i % 4 + 1),
            item: Some(Item::Hist { tool_nm: "T".into(), dt: "20250614090000".into(), succ: true }),
            ttl: false,
        })
        .collect();
    let order: Vec<usize> = (0..history.len()).collect();
    replay(&history, &order, &vec![2; order.len()])
}

/// A copy read again from a base that holds what it held changes nothing in the view:
/// the sinks rewrite nothing after a whole save.
#[test]
fn a_copy_read_again_unchanged_changes_nothing() {
    let mut engine = one_row_sessions(60);
    let base = engine.snapshot();
    let mut view = Engine::new();
    view.track_changes();
    let mut copy = AggregateCopy::from_log(&base, &[], None).expect("loads");
    view.absorb_copy(&mut copy);
    let today = Day::parse_iso(TODAY).unwrap();
    let report = view.report(today);
    assert!(!view.take_changes().patterns.is_empty());
    let mut again = AggregateCopy::from_log(&base, &[], None).expect("loads");
    view.replace_copy(&mut copy, &mut again);
    let changes = view.take_changes();
    assert!(changes.agents.is_empty() && changes.patterns.is_empty(), "{changes:?}");
    assert_eq!(view.report(today), report);
}

#[test]
fn state_is_compact_and_reported() {
    let engine = one_row_sessions(200);
    let st = engine.stats();
    assert_eq!((st.live_sessions, st.live_rows), (200, 200));
    assert!(st.heap_bytes / st.live_sessions < 1024, "{st:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: engine_cases(), ..ProptestConfig::default() })]

    /// Consumers of disjoint key ranges (Kafka partitions, stream shards) each keep an
    /// engine; summing their results gives the single-engine results.
    #[test]
    fn partitioned_engines_merge_into_the_whole((history, order, ctl) in scenario(), parts in 1..4usize, shards in 1..4u32, live_sharded: bool) {
        let partition = |e: &Event| e.pk.bytes().map(usize::from).sum::<usize>() % parts;
        let mut engines: Vec<Engine> = (0..parts)
            .map(|_| {
                let mut e = Engine::new();
                e.track_deltas();
                e
            })
            .collect();
        // A merged view kept current by forwarding, and what a sink that writes only the
        // reported changes would hold.
        let mut live = Engine::new();
        live.track_changes();
        // The view of sink shard 0 only, where it is sharded: the units forward their
        // changes to it as to a whole view.
        if live_sharded {
            live.keep_shards(Shards::only(0, shards));
        }
        // Another consumer's view of the same units: copies of their aggregates, moved by
        // the deltas of their checkpoints.
        let mut copies: Vec<AggregateCopy> = (0..parts).map(|_| AggregateCopy::from_log(&[], &[], None).expect("empty log")).collect();
        let mut held = Engine::new();
        held.track_changes();
        for c in &mut copies {
            held.absorb_copy(c);
        }
        // Each sink shard's holder of the same copies: its views keep its users' patterns only.
        let mut sharded: Vec<(Engine, Vec<AggregateCopy>)> = (0..shards)
            .map(|s| {
                let (mut view, only) = (Engine::new(), Shards::only(s, shards));
                view.keep_shards(only.clone());
                let mut copies: Vec<AggregateCopy> = (0..parts).map(|_| AggregateCopy::from_log(&[], &[], Some(&only)).expect("empty log")).collect();
                copies.iter_mut().for_each(|c| view.absorb_copy(c));
                (view, copies)
            })
            .collect();
        let mut sink_agents = SinkAgents::new();
        let mut sink_patterns = SinkPatterns::new();
        let (mut held_agents, mut held_patterns) = (SinkAgents::new(), SinkPatterns::new());
        for (n, &idx) in order.iter().enumerate() {
            let event = &history[idx];
            let line = event.stream_record(idx as u64 + 1);
            let p = partition(event);
            let engine = &mut engines[p];
            decode_line(line.as_bytes(), &mut |rec| {
                engine.apply(&rec.result.expect("valid"));
            })
            .expect("decodes");
            match ctl[n] % 6 {
                0 | 3 => {
                    engine.flush_into(&mut live);
                    write_changes(&mut live, &mut sink_agents, &mut sink_patterns);
                }
                // A unit renumbers its names, with changes not yet forwarded.
                1 => {
                    engine.collect_names();
                }
                // A checkpoint: the unit forwards, then appends its delta.
                4 if ctl[n] < 128 => {
                    engine.flush_into(&mut live);
                    for delta in engine.delta(usize::from(ctl[n] % 3) * 60) {
                        copies[p].apply_delta(&delta, Some(&mut held)).expect("applies");
                        for (view, copies) in &mut sharded {
                            copies[p].apply_delta(&delta, Some(view)).expect("applies");
                        }
                    }
                    engine.delta_saved();
                    write_changes(&mut held, &mut held_agents, &mut held_patterns);
                }
                // A whole save: the copy is read again from the new base, in place of the
                // one that followed the deltas.
                4 => {
                    engine.flush_into(&mut live);
                    engine.delta_saved();
                    let base = engine.snapshot();
                    let mut fresh = AggregateCopy::from_log(&base, &[], None).expect("loads");
                    held.replace_copy(&mut copies[p], &mut fresh);
                    copies[p] = fresh;
                    for (s, (view, copies)) in sharded.iter_mut().enumerate() {
                        let mut fresh = AggregateCopy::from_log(&base, &[], Some(&Shards::only(s as u32, shards))).expect("loads");
                        view.replace_copy(&mut copies[p], &mut fresh);
                        copies[p] = fresh;
                    }
                    write_changes(&mut held, &mut held_agents, &mut held_patterns);
                }
                _ => {}
            }
        }
        for (p, e) in engines.iter_mut().enumerate() {
            e.flush_into(&mut live);
            for delta in e.delta(usize::MAX) {
                copies[p].apply_delta(&delta, Some(&mut held)).expect("applies");
                for (view, copies) in &mut sharded {
                    copies[p].apply_delta(&delta, Some(view)).expect("applies");
                }
            }
            e.delta_saved();
        }
        write_changes(&mut live, &mut sink_agents, &mut sink_patterns);
        write_changes(&mut held, &mut held_agents, &mut held_patterns);
        let mut merged = Engine::new();
        for e in &mut engines {
            merged.absorb(e);
        }
        let mut whole = replay(&history, &order, &ctl);
        let today = Day::parse_iso(TODAY).unwrap();
        let expected = whole.report(today);
        prop_assert_eq!(&merged.report(today), &expected);
        prop_assert_eq!(&held.report(today), &expected);
        // Sinks that write only the reported changes hold exactly the full figures.
        sink_holds_figures(&held, held_agents, held_patterns)?;
        sink_holds_figures(&live, sink_agents, sink_patterns)?;
        // A sharded view holds the whole's figures of its shard's users, every agent's,
        // and the census of its patterns; the shards' censuses add up to the whole's.
        let mut census = toolrank_engine::ScoreCensus::default();
        for (s, (view, _)) in sharded.iter().enumerate() {
            prop_assert_eq!(figures(view), figures_of_shard(&whole, s as u32, shards));
            prop_assert_eq!(&whole.census_by_shard(shards)[s], &view.census());
            census.merge(&view.census());
        }
        prop_assert_eq!(census, whole.census());
        if live_sharded {
            prop_assert_eq!(figures(&live), figures_of_shard(&whole, 0, shards));
        } else {
            prop_assert_eq!(&live.report(today), &expected);
        }
        // A view of the units a writer owns, as it takes a shard and gives one up.
        let mut units: Vec<Engine> = engines.iter_mut().map(|e| Engine::restore(&e.snapshot()).expect("restores")).collect();
        let mut merged_shard = Engine::new();
        merged_shard.keep_shards(Shards::only(shards - 1, shards));
        for e in &mut units {
            merged_shard.absorb(e);
        }
        prop_assert_eq!(figures(&merged_shard), figures_of_shard(&whole, shards - 1, shards));
        merged_shard.take_shard(0, &mut units.iter_mut().collect::<Vec<_>>());
        let (agents, mut both) = figures_of_shard(&whole, 0, shards);
        both.append(&mut figures_of_shard(&whole, shards - 1, shards).1);
        prop_assert_eq!(figures(&merged_shard), (agents, both));
        if shards > 1 {
            merged_shard.give_up_shard(shards - 1, shards);
            prop_assert_eq!(figures(&merged_shard), figures_of_shard(&whole, 0, shards));
        }
        // A partition that moves away is taken back out exactly.
        merged.unabsorb(&mut engines[0]);
        merged.absorb(&mut engines[0]);
        prop_assert_eq!(merged.report(today), expected);
    }
}

/// An engine kept like a Lambda container keeps its bucket: loaded from a base snapshot
/// and the deltas after it, appending a delta after each batch it applies.
struct Container {
    engine: Engine,
    /// How many deltas of the log `engine` holds.
    at: usize,
}

impl Container {
    fn load(base: &[u8], base_at: usize, log: &[Vec<u8>]) -> Container {
        let mut engine = Engine::restore(base).expect("base restores");
        engine.track_deltas();
        let mut c = Container { engine, at: base_at };
        c.catch_up(log);
        c
    }

    fn catch_up(&mut self, log: &[Vec<u8>]) {
        for delta in &log[self.at..] {
            self.engine.apply_delta(delta).expect("own deltas apply");
        }
        self.at = log.len();
    }
}

/// Containers sharing one delta log (concurrent Lambda invocations on a bucket): each
/// catches up on the log, applies a batch and appends what changed; some lose the race
/// and reload, some start cold from a compacted base. With `horizon`, each container's
/// clock is the batch number and it expires tombstones before it appends. Returns the
/// results of a merged view fed only the deltas, then of every container caught up.
fn share_a_delta_log(history: &[Event], order: &[usize], ctl: &[u8], containers: usize, horizon: Option<u32>) -> Vec<(toolrank_engine::Report, String)> {
    let mut base = Engine::new().snapshot();
    let mut base_at = 0;
    let mut log: Vec<Vec<u8>> = Vec::new();
    let mut pool: Vec<Container> = (0..containers).map(|_| Container::load(&base, 0, &log)).collect();
    let lines: Vec<String> = order.iter().map(|&idx| history[idx].stream_record(idx as u64 + 1)).collect();
    let mut batches = Vec::new();
    let mut start = 0;
    for (i, c) in ctl.iter().take(lines.len()).enumerate() {
        if c % 3 == 0 || i + 1 == lines.len() {
            batches.push((start..i + 1, *c));
            start = i + 1;
        }
    }
    let apply = |engine: &mut Engine, lines: &[String], clock: u32| {
        engine.set_clock(clock);
        for line in lines {
            decode_line(line.as_bytes(), &mut |rec| {
                engine.apply(&rec.result.expect("valid"));
            })
            .expect("decodes");
        }
        if let Some(h) = horizon {
            engine.expire_tombstones(h);
            engine.collect_names();
        }
    };
    for (n, (range, c)) in batches.into_iter().enumerate() {
        let k = usize::from(c) % containers;
        let clock = n as u32 + 1;
        if c % 7 == 1 {
            // Another invocation appended since this one read the log: its batch is
            // applied on a stale state and its append refused. It applies the deltas it
            // missed over its unsaved changes, then the batch again.
            apply(&mut pool[k].engine, &lines[range.clone()], clock);
        } else if c % 5 == 2 {
            // A cold start.
            pool[k] = Container::load(&base, base_at, &log);
        }
        pool[k].catch_up(&log);
        apply(&mut pool[k].engine, &lines[range], clock);
        // Small parts: a batch's delta often spans several.
        log.extend(pool[k].engine.delta(usize::from(c % 4) * 40));
        pool[k].engine.delta_saved();
        pool[k].at = log.len();
        if c % 11 == 3 {
            base = pool[k].engine.snapshot();
            base_at = log.len();
        }
    }
    let mut merged = Engine::new();
    merged.track_changes();
    let mut view = Engine::new();
    // Copies of the aggregates only, as a sink writer keeps another consumer's unit: one
    // following the whole log, one read from the last base and the deltas after it.
    let mut following = Engine::new();
    following.track_changes();
    let mut copy = AggregateCopy::from_log(&[], &[], None).expect("empty log");
    following.absorb_copy(&mut copy);
    for delta in &log {
        view.apply_delta(delta).expect("applies");
        view.flush_into(&mut merged);
        copy.apply_delta(delta, Some(&mut following)).expect("applies");
    }
    let mut from_base = Engine::new();
    from_base.absorb_copy(&mut AggregateCopy::from_log(&base, &log[base_at..], None).expect("loads"));
    let today = Day::parse_iso(TODAY).unwrap();
    let staging = format!("{:?}", view.staging_sorted());
    let mut results = vec![(merged.report(today), staging.clone())];
    results.push((following.report(today), staging.clone()));
    results.push((from_base.report(today), staging));
    for c in &mut pool {
        c.catch_up(&log);
        let report = c.engine.report(today);
        results.push((report, format!("{:?}", c.engine.staging_sorted())));
    }
    results
}

proptest! {
    #![proptest_config(ProptestConfig { cases: engine_cases(), ..ProptestConfig::default() })]

    /// Every container sharing a delta log, and a merged view fed only the deltas, ends at
    /// the single-engine results.
    #[test]
    fn engines_sharing_a_delta_log_equal_one_engine((history, order, ctl) in scenario(), containers in 1..4usize) {
        let mut whole = replay(&history, &order, &ctl);
        let today = Day::parse_iso(TODAY).unwrap();
        let expected = (whole.report(today), format!("{:?}", whole.staging_sorted()));
        for got in share_a_delta_log(&history, &order, &ctl, containers, None) {
            prop_assert_eq!(&got, &expected);
        }
    }

    /// Containers expiring tombstones on their own clocks (with races and cold starts)
    /// stay copies of one state: what one forgot reaches the others through the log, and
    /// a drop never undoes what another container appended meanwhile. (Against the
    /// reference only within the redelivery window: see the tombstone property above.)
    #[test]
    fn engines_sharing_a_delta_log_expire_tombstones_alike((history, order, ctl) in scenario(), containers in 2..4usize, horizon in 0..3u32) {
        let results = share_a_delta_log(&history, &order, &ctl, containers, Some(horizon));
        for got in &results[1..] {
            prop_assert_eq!(got, &results[0]);
        }
    }
}

#[test]
fn deltas_hold_only_what_changed_and_refuse_garbage() {
    let mut engine = one_row_sessions(300);
    engine.track_deltas();
    assert!(engine.delta(usize::MAX).is_empty(), "nothing changed yet");
    let whole = engine.snapshot().len();
    let line = Event {
        pk: "USR1#SESS1".into(),
        sk: "PRC001#AGT9#TL1".into(),
        item: Some(Item::Hist { tool_nm: "T".into(), dt: "20250614090000".into(), succ: false }),
        ttl: false,
    }
    .stream_record(9999);
    decode_line(line.as_bytes(), &mut |rec| {
        engine.apply(&rec.result.expect("valid"));
    })
    .unwrap();
    let delta = engine.delta(usize::MAX).pop().expect("one session changed");
    assert_eq!(engine.delta(usize::MAX), vec![delta.clone()], "kept until saved");
    assert_eq!(engine.delta_within(usize::MAX, delta.len()), Some(vec![delta.clone()]), "within its limit");
    assert_eq!(engine.delta_within(usize::MAX, delta.len() / 2), None, "past its limit");
    engine.delta_saved();
    assert!(engine.delta(usize::MAX).is_empty(), "saved");
    assert!(delta.len() * 50 < whole, "a one-session delta ({} bytes) is a sliver of the state ({whole} bytes)", delta.len());
    let mut other = Engine::new();
    assert!(other.apply_delta(&delta[..delta.len() - 1]).is_err(), "truncated");
    assert!(other.apply_delta(b"\x09\0\0\0").is_err(), "unknown version");
    assert!(other.apply_delta(&[]).is_err(), "empty");
}

/// A history, its deliveries as (event index, clock), the redelivery window, control bytes.
type LateCopies = (Vec<Event>, Vec<(usize, u32)>, u32, Vec<u8>);

/// A history on few hist keys (so removals often fall between an item's record and its
/// late copy), delivered in order with late copies (redeliveries) at most `window` events
/// after their original, as (event index, clock) deliveries: the clock counts originals.
fn late_copies() -> impl Strategy<Value = LateCopies> {
    let few_keys = |mut e: Event| {
        if e.sk != "METADATA" {
            let k = e.pk.len() + e.sk.bytes().map(usize::from).sum::<usize>();
            (e.pk, e.sk) = (format!("USR{}#SESS1", k % 2), format!("PRC001#AGT{}#TL{}", k / 2 % 2 + 1, k / 4 % 2));
        }
        e
    };
    (prop::collection::vec(event().prop_map(few_keys), 1..70), 1..8u32).prop_flat_map(|(history, window)| {
        let n = history.len();
        let copies = prop::collection::vec((0..n, 0..window), 0..=n / 2);
        (Just(history), copies, Just(window), prop::collection::vec(any::<u8>(), 3 * n)).prop_map(|(h, copies, window, ctl)| {
            let mut deliveries = Vec::new();
            for i in 0..h.len() {
                let clock = i as u32 + 1;
                deliveries.push((i, clock));
                deliveries.extend(copies.iter().filter(|&&(src, delay)| src + delay as usize == i).map(|&(src, _)| (src, clock)));
            }
            (h, deliveries, window, ctl)
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: engine_cases(), ..ProptestConfig::default() })]

    /// Tombstones kept for the redelivery window and then forgotten, with the sessions
    /// they leave empty, change no result; a copy of the engine fed its deltas (a
    /// checkpoint log) forgets the same; in the end only live items remain.
    #[test]
    fn tombstones_expired_after_the_redelivery_window_change_nothing((history, deliveries, window, ctl) in late_copies()) {
        let mut engine = Engine::new();
        engine.track_deltas();
        let mut follower = Engine::new();
        for (n, &(idx, clock)) in deliveries.iter().enumerate() {
            engine.set_clock(clock);
            decode_line(history[idx].stream_record(idx as u64 + 1).as_bytes(), &mut |rec| {
                engine.apply(&rec.result.expect("valid"));
            })
            .expect("decodes");
            match ctl[n] % 6 {
                0 => engine.flush(),
                1 => {
                    engine = Engine::restore(&engine.snapshot()).expect("restores");
                    engine.track_deltas();
                    follower = Engine::restore(&engine.snapshot()).expect("restores");
                }
                2 => {
                    engine.expire_tombstones(window);
                }
                3 => {
                    engine.expire_tombstones(window);
                    engine.collect_names();
                    follower.collect_names();
                }
                _ => {}
            }
            if ctl[n + deliveries.len()] % 3 == 0 {
                for delta in engine.delta(usize::from(ctl[n] % 4) * 40) {
                    follower.apply_delta(&delta).expect("applies");
                }
                engine.delta_saved();
                follower.flush();
            }
        }
        let today = Day::parse_iso(TODAY).unwrap();
        let want = canonical(evaluate(&final_state(&history), TODAY));
        let report = engine.report(today);
        prop_assert_eq!(from_engine(&report, &engine.staging_sorted()), want.clone());
        // Long after the last removal, only live items remain, in the follower too.
        engine.set_clock(u32::MAX / 2);
        engine.expire_tombstones(window);
        engine.flush();
        for delta in engine.delta(usize::MAX) {
            follower.apply_delta(&delta).expect("applies");
        }
        let report = follower.report(today);
        prop_assert_eq!(from_engine(&report, &follower.staging_sorted()), want);
        for st in [engine.stats(), follower.stats()] {
            prop_assert_eq!(st.tombstones, 0);
            prop_assert_eq!(st.sessions, st.live_sessions);
        }
        prop_assert_eq!(engine.stats().live_rows, follower.stats().live_rows);
    }
}

/// Checkpoints written before deltas carried the aggregates' difference (a version 6
/// base, a version 2 delta, of the bundled sample's first 20 and last 14 lines) still
/// restore, in full and as a copy of the aggregates.
#[test]
fn checkpoints_of_the_previous_format_still_restore() {
    let base = include_bytes!("fixtures/engine-v6-snapshot.bin");
    let delta = include_bytes!("fixtures/engine-v2-delta.bin").to_vec();
    let mut whole = Engine::new();
    for line in include_str!("../examples/seed-sample.jsonl").lines() {
        decode_line(line.as_bytes(), &mut |rec| {
            whole.apply(&rec.result.expect("valid"));
        })
        .expect("decodes");
    }
    let today = Day::parse_iso(TODAY).unwrap();
    let expected = whole.report(today);
    assert!(!expected.agents.is_empty());
    let mut restored = Engine::restore(base).expect("a version 6 snapshot restores");
    restored.apply_delta(&delta).expect("a version 2 delta applies");
    assert_eq!(restored.report(today), expected);
    let mut view = Engine::new();
    view.absorb_copy(&mut AggregateCopy::from_log(base, std::slice::from_ref(&delta), None).expect("an old log loads as a copy"));
    assert_eq!(view.report(today), expected);
    // An engine appending to a shared log cannot take such a delta's figures out of its
    // own: it must load the log instead.
    let mut tracking = Engine::restore(base).expect("restores");
    tracking.track_deltas();
    assert!(matches!(tracking.apply_delta(&delta), Err(StateError::DeltaWithoutFigures)));
}
