//! Fuzz harness for the line decoder (cargo-fuzz needs a nightly toolchain, which this
//! project's machines do not have): arbitrary bytes and byte-level mutations of valid
//! lines of every format must decode or be rejected, never panic, and whatever decodes
//! must apply to the engine without panicking. `FUZZ_CASES` sets the iterations
//! (default 3000; CI runs more).

use proptest::prelude::*;
use toolrank_engine::Engine;
use toolrank_events::{decode_line, Day};

const SEEDS: &[&str] = &[
    r#"{"Item":{"PK":{"S":"USR001#S1"},"SK":{"S":"PRC001#AGT001#TL001"},"EntityType":{"S":"UserSessPrcToolMappHist"},"ToolNM":{"S":"FIND"},"TransactDT":{"S":"20250614140605"},"SuccYN":{"S":"Y"}}}"#,
    r#"{"PK":{"S":"AGT001"},"SK":{"S":"METADATA"},"EntityType":{"S":"Agent"},"AgentNM":{"S":"a"},"GSI1_PK":{"S":"DMN001"}}"#,
    r#"{"eventName":"REMOVE","dynamodb":{"Keys":{"PK":{"S":"USR001#S1"},"SK":{"S":"PRC001#AGT001#TL001"}},"SequenceNumber":"12"},"userIdentity":{"type":"Service","principalId":"dynamodb.amazonaws.com"}}"#,
    r#"{"Records":[{"eventName":"INSERT","dynamodb":{"Keys":{"PK":{"S":"U#S"},"SK":{"S":"P#A#T"}},"NewImage":{"PK":{"S":"U#S"},"SK":{"S":"P#A#T"},"EntityType":{"S":"UserSessPrcToolMappHist"},"ToolNM":{"S":"x"},"TransactDT":{"S":"20250101000000"},"SuccYN":{"S":"N"}},"SequenceNumber":"5"}}]}"#,
    r#"{"event_id":"e1","op":"upsert","user_id":"U","session_id":"S","process_id":"P","domain_id":"D","agent_id":"A","agent_name":"n","tool_id":"T","tool_name":"x","success":true,"transact_dt":"2025-06-14T14:06:05Z"}"#,
];

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000)
}

fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (0..SEEDS.len(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..4u8), 1..8)).prop_map(|(i, edits)| {
        let mut b = SEEDS[i].as_bytes().to_vec();
        for (at, byte, kind) in edits {
            if b.is_empty() {
                b.push(byte);
                continue;
            }
            let pos = at.index(b.len());
            match kind {
                0 => b[pos] = byte,
                1 => b.insert(pos, byte),
                2 => {
                    b.remove(pos);
                }
                _ => b.truncate(pos),
            }
        }
        b
    })
}

fn decode_and_apply(line: &[u8], engine: &mut Engine) {
    let _ = decode_line(line, &mut |rec| {
        if let Ok(change) = rec.result {
            engine.apply(&change);
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(line in prop::collection::vec(any::<u8>(), 0..300)) {
        decode_and_apply(&line, &mut Engine::new());
    }

    #[test]
    fn mutated_valid_lines_never_panic(lines in prop::collection::vec(mutated(), 1..6)) {
        let mut engine = Engine::new();
        for line in &lines {
            decode_and_apply(line, &mut engine);
        }
        let _ = engine.report(Day(20_300));
        let restored = Engine::restore(&engine.snapshot()).expect("snapshot restores");
        prop_assert_eq!(restored.stats().live_rows, engine.stats().live_rows);
    }

    #[test]
    fn corrupt_snapshots_are_errors_not_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = Engine::restore(&bytes);
        // Deltas too, behind a valid version so that their body is what gets decoded.
        let _ = Engine::new().apply_delta(&bytes);
        let _ = Engine::new().apply_delta(&[&1u32.to_le_bytes()[..], &bytes].concat());
    }
}
