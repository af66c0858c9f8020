//! `toolrank replay` end to end, through the built binary.

use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/seed-sample.jsonl");

fn toolrank(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_toolrank"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("toolrank runs");
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or_default()).unwrap();
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Replays `inputs` with --out `dir`, asserting that it succeeds.
fn replay_into(dir: &Path, inputs: &[&str], extra: &[&str]) -> Output {
    let mut args = vec!["replay", "--today", "2025-07-14", "--out", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(inputs);
    let output = toolrank(&args, None);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    output
}

/// Replays `inputs` with --out and returns the four tables.
fn replay_tables(inputs: &[&str], extra: &[&str]) -> (Output, [Vec<Value>; 4]) {
    let out = tempfile::tempdir().unwrap();
    let output = replay_into(out.path(), inputs, extra);
    let t = |name: &str| read_jsonl(&out.path().join(name));
    let tables = [t("agent_score_summary.jsonl"), t("user_process_patterns.jsonl"), t("agent_tool_errors.jsonl"), t("staging.jsonl")];
    (output, tables)
}

fn seed_records() -> Vec<Value> {
    std::fs::read_to_string(SEED).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn write_lines(dir: &Path, name: &str, lines: impl IntoIterator<Item = String>) -> PathBuf {
    let path = dir.join(name);
    let text: String = lines.into_iter().map(|l| l + "\n").collect();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn seed_sample_reproduces_the_published_tables() {
    let (_, [agents, patterns, errors, staging]) = replay_tables(&[SEED], &[]);
    assert_eq!(agents.len(), 2);
    let (a2, a1) = (&agents[0], &agents[1]);
    assert_eq!(
        (a2["agentid"].as_str(), a2["total_executions"].as_u64(), a2["success_count"].as_u64(), a2["failure_count"].as_u64()),
        (Some("AGT002"), Some(1), Some(1), Some(0))
    );
    assert_eq!(
        (a1["agentid"].as_str(), a1["total_executions"].as_u64(), a1["success_count"].as_u64(), a1["failure_count"].as_u64()),
        (Some("AGT001"), Some(2), Some(1), Some(1))
    );
    assert!((a1["calculated_score"].as_f64().unwrap() - 0.0249).abs() < 5e-5);
    assert!((a2["calculated_score"].as_f64().unwrap() - 0.0498).abs() < 5e-5);
    assert_eq!(a1["calculated_score"].as_f64().unwrap(), 2.0 * (-3.0f64).exp() * 0.25);
    assert_eq!(a1["last_execution_date"], "2025-06-14");
    assert_eq!(a1["days_since_last_exec"], 30);
    assert_eq!(a1["domainid"], "DMN001");
    assert_eq!(a1["agentnm"], "매장 검색 에이전트");
    let rec: Vec<(&str, bool)> = patterns.iter().map(|p| (p["userid"].as_str().unwrap(), p["is_recommended"].as_bool().unwrap())).collect();
    assert_eq!(rec, vec![("USR001", true), ("USR003", true), ("USR002", false)]);
    assert_eq!(patterns[0]["process_pattern"], "PRC001->PRC002->PRC003");
    assert_eq!(patterns[0]["tool_sequence"], "FIND_LOC->USE_SEARCH_ENGINE_API->FORMAT_RESULTS");
    assert_eq!(patterns[0]["agent_sequence"], "AGT001");
    assert_eq!(
        errors,
        vec![
            json!({"agentid":"AGT001","agent_name":"매장 검색 에이전트","total_executions":6,"total_errors":1,"error_rate":1.0/6.0,"failed_tools":"USE_SEARCH_ENGINE_API"})
        ]
    );
    assert_eq!(staging.len(), 9);
    assert_eq!(
        staging[0],
        json!({"userid":"USR001","sessionid":"SESS20250614001","processid":"PRC001","domainid":"DMN001","agentid":"AGT001","toolid":"TL001","toolnm":"FIND_LOC","execution_date":"2025-06-14","execution_datetime":"2025-06-14 14:06:05","success_flag":true})
    );
}

#[test]
fn seed_sample_prints_readable_tables() {
    let out = toolrank(&["replay", "--today", "2025-07-14", SEED], None);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("agent_score_summary") && text.contains("0.0249") && text.contains("0.0498"), "{text}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("stream-record 34") && stderr.contains("B per live session"), "{stderr}");
}

/// A reader that goes away (`toolrank replay ... 2>&1 | head -1`) ends the run quietly
/// and successfully, as it ends other Unix tools: no error, no panic.
#[test]
fn a_reader_that_goes_away_ends_the_run_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    // No reader from the start: the first write to either stream fails with a broken pipe.
    drop(reader);
    let mut child = Command::new(env!("CARGO_BIN_EXE_toolrank"))
        .args(["replay", "--today", "2025-07-14", SEED])
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// The seed's final items, as `(PK, SK, NewImage)`.
fn seed_items() -> Vec<Value> {
    seed_records().into_iter().map(|r| r["dynamodb"]["NewImage"].clone()).collect()
}

#[test]
fn every_format_gives_the_same_tables() {
    let (_, want) = replay_tables(&[SEED], &[]);
    let dir = tempfile::tempdir().unwrap();
    let items = seed_items();
    let export = write_lines(dir.path(), "export.json", items.iter().map(|i| json!({"Item": i}).to_string()));
    let typed = write_lines(dir.path(), "typed.jsonl", items.iter().map(|i| i.to_string()));
    let lambda = write_lines(dir.path(), "lambda.json", [json!({"Records": seed_records()}).to_string()]);
    let flat = write_lines(
        dir.path(),
        "flat.jsonl",
        items.iter().filter(|i| i["EntityType"]["S"] == "UserSessPrcToolMappHist").map(|i| {
            let s = |k: &str| i[k]["S"].as_str().unwrap().to_owned();
            let (pk, sk) = (s("PK"), s("SK"));
            let p: Vec<&str> = pk.split('#').collect();
            let k: Vec<&str> = sk.split('#').collect();
            let name = if k[1] == "AGT001" { "매장 검색 에이전트" } else { "매장 검색 에이전트2" };
            json!({"event_id": format!("{pk}/{sk}"), "op": "upsert", "user_id": p[0], "session_id": p[1], "process_id": k[0],
                "domain_id": "DMN001", "agent_id": k[1], "agent_name": name, "tool_id": k[2], "tool_name": s("ToolNM"),
                "success": s("SuccYN") == "Y", "transact_dt": s("TransactDT"), "tool_values": s("ToolValues"), "result_message": s("ResultMsg")})
            .to_string()
        }),
    );
    // A gzip file with no telling extension, and an export directory with its manifest.
    let gz = dir.path().join("stream.data");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::default());
    enc.write_all(&std::fs::read(SEED).unwrap()).unwrap();
    enc.finish().unwrap();
    let export_dir = dir.path().join("AWSDynamoDB/01749-x");
    std::fs::create_dir_all(export_dir.join("data")).unwrap();
    let mut manifest = String::new();
    for (n, chunk) in items.chunks(10).enumerate() {
        let name = format!("part{n}.json.gz");
        let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(export_dir.join("data").join(&name)).unwrap(), flate2::Compression::fast());
        for i in chunk {
            writeln!(enc, "{}", json!({"Item": i})).unwrap();
        }
        enc.finish().unwrap();
        manifest += &format!("{}\n", json!({"itemCount": chunk.len(), "dataFileS3Key": format!("AWSDynamoDB/01749-x/data/{name}")}));
    }
    std::fs::write(export_dir.join("manifest-files.json"), manifest).unwrap();

    for input in [&export, &typed, &lambda, &flat, &gz, &dir.path().join("AWSDynamoDB")] {
        let (out, got) = replay_tables(&[input.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(got, want, "{}: {stderr}", input.display());
        assert!(stderr.contains("bad 0"), "{stderr}");
    }
    let stdin = toolrank(&["replay", "--today", "2025-07-14", "-"], Some(&std::fs::read(&gz).unwrap()));
    assert!(stdin.status.success());
    assert!(String::from_utf8(stdin.stdout).unwrap().contains("0.0249"));
}

/// One line per bad-input class, with the reason it must be rejected for.
fn bad_lines() -> Vec<(Vec<u8>, &'static str)> {
    let rec = |f: &dyn Fn(&mut Value)| {
        let mut r = seed_records().into_iter().find(|r| r["dynamodb"]["NewImage"]["EntityType"]["S"] == "UserSessPrcToolMappHist").unwrap();
        f(&mut r);
        r.to_string().into_bytes()
    };
    let truncated = {
        let full = rec(&|_| {});
        full[..full.len() / 2].to_vec()
    };
    vec![
        (b"this is not json".to_vec(), "not valid JSON"),
        (truncated, "EOF while parsing"),
        (
            rec(&|r| {
                r["dynamodb"].as_object_mut().unwrap().remove("NewImage");
            }),
            "missing dynamodb.NewImage",
        ),
        (
            rec(&|r| {
                r["dynamodb"]["NewImage"].as_object_mut().unwrap().remove("TransactDT");
            }),
            "missing TransactDT",
        ),
        (rec(&|r| r["dynamodb"]["NewImage"]["TransactDT"] = json!({"N": "20250614140605"})), "TransactDT must be a string"),
        (rec(&|r| r["dynamodb"]["NewImage"]["SuccYN"] = json!({"S": 1})), "invalid type"),
        (rec(&|r| r["eventName"] = json!("UPSERT")), "unknown eventName"),
        (rec(&|r| r["dynamodb"]["NewImage"]["SK"] = json!({"S": "PRC009#AGT001"})), "SK is not PROCESS#AGENT#TOOL"),
        (rec(&|r| r["dynamodb"]["NewImage"]["TransactDT"] = json!({"S": "20251345140605"})), "not a valid YYYYMMDDHHMMSS"),
        (b"{\"Item\": \xff\xfe}".to_vec(), "not UTF-8"),
        (b"{\"hello\": 1}".to_vec(), "unrecognized record"),
    ]
}

#[test]
fn bad_input_is_dead_lettered_and_changes_nothing() {
    let (_, want) = replay_tables(&[SEED], &[]);
    let dir = tempfile::tempdir().unwrap();
    let bad = bad_lines();
    let mut text = std::fs::read(SEED).unwrap();
    for (line, _) in &bad {
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    // One good and one bad record inside a Lambda event.
    let mut good = seed_records()[0].clone();
    good["dynamodb"]["SequenceNumber"] = json!("1");
    text.extend_from_slice(json!({"Records": [good, {"eventName": "INSERT"}]}).to_string().as_bytes());
    text.push(b'\n');
    let input = dir.path().join("mixed.jsonl");
    std::fs::write(&input, &text).unwrap();
    let dlq = dir.path().join("dead.jsonl");
    let (out, got) = replay_tables(&[input.to_str().unwrap()], &["--dead-letter", dlq.to_str().unwrap()]);
    assert_eq!(got, want, "bad input must not change any table");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("bad {}", bad.len() + 1)), "{stderr}");
    let letters = read_jsonl(&dlq);
    assert_eq!(letters.len(), bad.len() + 1);
    for (i, (letter, (_, reason))) in letters.iter().zip(&bad).enumerate() {
        assert_eq!(letter["line"], 35 + i as u64);
        assert_eq!(letter["source"], input.to_str().unwrap());
        let got = letter["reason"].as_str().unwrap();
        assert!(got.contains(reason), "line {}: {got:?} should mention {reason:?}", 35 + i);
        assert!(letter["raw"].is_string());
    }
    let last = letters.last().unwrap();
    assert_eq!((last["record"].as_u64(), last["reason"].as_str()), (Some(1), Some("missing dynamodb")));
    assert_eq!(last["raw"], json!({"eventName": "INSERT"}).to_string());
}

#[test]
fn strict_stops_at_the_first_bad_record_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = std::fs::read_to_string(SEED).unwrap();
    text += "{\"eventName\":\"INSERT\"}\n";
    let input = write_lines(dir.path(), "bad.jsonl", [text.trim_end().to_owned()]);
    let out = toolrank(&["replay", "--strict", input.to_str().unwrap()], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains(&format!("{}:35", input.display())) && stderr.contains("missing dynamodb"), "{stderr}");
}

#[test]
fn io_errors_are_fatal_and_clear() {
    let out = toolrank(&["replay", "/nonexistent/history.jsonl"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("/nonexistent/history.jsonl") && stderr.contains("No such file"), "{stderr}");
    let out = toolrank(&["replay", "--today", "2025-13-01", SEED], None);
    assert!(!out.status.success());
}

#[test]
fn generated_stream_replays_with_stale_redeliveries() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gen.jsonl");
    let out = toolrank(&["generate", "--sessions", "300", "--seed", "7", "--style", "stream", "--out", file.to_str().unwrap()], None);
    assert!(out.status.success());
    let (out, [agents, patterns, _, staging]) = replay_tables(&[file.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!agents.is_empty() && !patterns.is_empty() && !staging.is_empty());
    assert!(patterns.iter().any(|p| p["is_recommended"] == true));
    assert!(stderr.contains("bad 0") && !stderr.contains("stale or duplicate 0"), "{stderr}");
}

/// `--direct-io` writes the same bytes: a staging file of several direct writes and a
/// partial last block, into files that were longer before.
#[test]
fn direct_io_writes_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gen.jsonl");
    let out = toolrank(&["generate", "--sessions", "6000", "--seed", "3", "--out", file.to_str().unwrap()], None);
    assert!(out.status.success());
    let (buffered, direct) = (dir.path().join("buffered"), dir.path().join("direct"));
    replay_into(&buffered, &[file.to_str().unwrap()], &[]);
    std::fs::create_dir_all(&direct).unwrap();
    for name in ["staging.jsonl", "user_process_patterns.jsonl"] {
        std::fs::write(direct.join(name), vec![b'x'; 20 << 20]).unwrap();
    }
    replay_into(&direct, &[file.to_str().unwrap()], &["--direct-io"]);
    let staging = std::fs::read(buffered.join("staging.jsonl")).unwrap();
    assert!(staging.len() > 4 << 20 && staging.len() % 4096 != 0, "{} bytes", staging.len());
    for name in ["agent_score_summary.jsonl", "user_process_patterns.jsonl", "agent_tool_errors.jsonl", "staging.jsonl"] {
        assert!(std::fs::read(buffered.join(name)).unwrap() == std::fs::read(direct.join(name)).unwrap(), "{name} differs");
    }
}

/// A Lambda test event as `sam local generate-event dynamodb update` writes it: one
/// document over many lines, records carrying every envelope field Lambda sends.
fn sam_event(records: &[Value]) -> String {
    let records: Vec<Value> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut dynamodb = r["dynamodb"].clone();
            dynamodb["ApproximateCreationDateTime"] = json!(1_749_900_000 + i);
            dynamodb["SizeBytes"] = json!(26);
            dynamodb["StreamViewType"] = json!("NEW_AND_OLD_IMAGES");
            json!({"eventID": format!("{}", i + 1), "eventVersion": "1.0", "dynamodb": dynamodb, "awsRegion": "us-east-1",
                "eventName": r["eventName"], "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/AgentTable/stream/2025-06-14T00:00:00.000",
                "eventSource": "aws:dynamodb"})
        })
        .collect();
    serde_json::to_string_pretty(&json!({ "Records": records })).unwrap()
}

/// Writes a DynamoDB export directory (`manifest-files.json` + gzip `data/`) of `lines`.
fn export_dir(root: &Path, id: &str, lines: &[String]) -> PathBuf {
    let dir = root.join("AWSDynamoDB").join(id);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let name = "part0.json.gz";
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(dir.join("data").join(name)).unwrap(), flate2::Compression::fast());
    for line in lines {
        writeln!(enc, "{line}").unwrap();
    }
    enc.finish().unwrap();
    let manifest = json!({"itemCount": lines.len(), "dataFileS3Key": format!("AWSDynamoDB/{id}/data/{name}")});
    std::fs::write(dir.join("manifest-files.json"), format!("{manifest}\n")).unwrap();
    dir
}

#[test]
fn aws_documents_over_many_lines_give_the_same_tables() {
    let (_, want) = replay_tables(&[SEED], &[]);
    let dir = tempfile::tempdir().unwrap();
    let event = dir.path().join("event.json");
    std::fs::write(&event, sam_event(&seed_records())).unwrap();
    let records = dir.path().join("records.json");
    std::fs::write(&records, serde_json::to_string_pretty(&seed_records()).unwrap()).unwrap();
    let items = dir.path().join("items.json");
    std::fs::write(&items, serde_json::to_string_pretty(&seed_items()).unwrap()).unwrap();
    for input in [&event, &records, &items] {
        let (out, got) = replay_tables(&[input.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(got, want, "{}: {stderr}", input.display());
        assert!(stderr.contains("bad 0"), "{}: {stderr}", input.display());
    }
}

#[test]
fn a_malformed_document_is_dead_lettered_with_its_position_and_the_rest_is_read() {
    let (_, want) = replay_tables(&[SEED], &[]);
    let dir = tempfile::tempdir().unwrap();
    // The seed's records as a pretty array whose last element is cut off, then the whole
    // seed once more as JSON lines in a second file.
    let mut records = seed_records();
    records.push(json!({"eventName": "INSERT", "dynamodb": {"Keys": {}}}));
    let text = serde_json::to_string_pretty(&records).unwrap();
    let cut = text.rfind("\"Keys\"").unwrap();
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, &text[..cut]).unwrap();
    // The cut element starts on the line after the last "\n  {" before the cut.
    let element_line = text[..=text[..cut].rfind("\n  {").unwrap()].matches('\n').count() as u64 + 1;
    let dlq = dir.path().join("dead.jsonl");
    let (out, got) = replay_tables(&[broken.to_str().unwrap(), SEED], &["--dead-letter", dlq.to_str().unwrap()]);
    assert_eq!(got, want, "{}", String::from_utf8_lossy(&out.stderr));
    let letters = read_jsonl(&dlq);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["source"], broken.to_str().unwrap());
    assert_eq!(letters[0]["line"].as_u64(), Some(element_line));
    assert!(letters[0]["reason"].as_str().unwrap().contains("EOF"), "{}", letters[0]);
}

#[test]
fn incremental_exports_apply_after_the_full_export_they_follow() {
    let dir = tempfile::tempdir().unwrap();
    let items = seed_items();
    let hist: Vec<&Value> = items.iter().filter(|i| i["EntityType"]["S"] == "UserSessPrcToolMappHist").collect();
    let keys = |i: &Value| json!({"PK": i["PK"], "SK": i["SK"]});
    let line = |micros: u64, i: &Value, new: Option<&Value>| {
        let mut l = json!({"Metadata": {"WriteTimestampMicros": {"N": micros.to_string()}}, "Keys": keys(i), "OldImage": i});
        if let Some(new) = new {
            l["NewImage"] = new.clone();
        }
        l.to_string()
    };
    // The full export holds the seed minus its first execution.
    let full = export_dir(dir.path(), "01-full", &items.iter().filter(|i| *i != hist[0]).map(|i| json!({"Item": i}).to_string()).collect::<Vec<_>>());
    // The first incremental export adds it back, removes the second and flips the third;
    // the second removes the third again, with a write time between (older: ignored) and
    // then a later one.
    let mut flipped = hist[2].clone();
    flipped["SuccYN"] = json!({"S": if hist[2]["SuccYN"]["S"] == "Y" { "N" } else { "Y" }});
    let inc1 = export_dir(
        dir.path(),
        "02-inc",
        &[
            line(1_750_000_000_000_010, hist[0], Some(hist[0])),
            line(1_750_000_000_000_020, hist[1], None),
            line(1_750_000_000_000_030, hist[2], Some(&flipped)),
        ],
    );
    let inc2 = export_dir(dir.path(), "03-inc", &[line(1_750_000_000_000_025, hist[2], None), line(1_750_000_000_000_040, hist[1], Some(hist[1]))]);

    // The table at the end of the last export: the seed with the third execution flipped.
    let expected: Vec<String> = items.iter().map(|i| if i == hist[2] { flipped.to_string() } else { i.to_string() }).collect();
    let typed = write_lines(dir.path(), "expected.jsonl", expected);
    let (_, want) = replay_tables(&[typed.to_str().unwrap()], &[]);
    let (out, got) = replay_tables(&[full.to_str().unwrap(), inc1.to_str().unwrap(), inc2.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(got, want, "{stderr}");
    assert!(stderr.contains("incremental-export 5") && stderr.contains("bad 0") && stderr.contains("stale or duplicate 1"), "{stderr}");
}
