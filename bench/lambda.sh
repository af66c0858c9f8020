#!/usr/bin/env bash
# The Lambda handler's cost (issue: ≥ 100k records/s of CPU per core, sinks aside):
#   1. decode + apply of every record of a generated stream-style history (SESSIONS
#      sessions, ~3 records each; 30000 gives ~90k records), cut into DynamoDB Streams
#      events of 100 and of 1000 records, into in-memory bucket engines;
#   2. whole invocations against DynamoDB Local (bucket state loaded and saved in the
#      state table, sinks off) on the first INVOKE_RECORDS records: ms per invocation.
# Usage: bench/lambda.sh   (SESSIONS=30000 INVOKE_RECORDS=20000)
set -euo pipefail
SESSIONS="${SESSIONS:-30000}"
INVOKE_RECORDS="${INVOKE_RECORDS:-20000}"
source "$(dirname "$0")/prelude.sh"
cargo build --release --locked -p toolrank-lambda --bin lambda-bench >&2
"$BIN/toolrank" generate --sessions "$SESSIONS" --seed 5 --style stream --out "$WORK/history.jsonl" >&2
"$BIN/lambda-bench" "$WORK/history.jsonl" "$INVOKE_RECORDS"
