#!/usr/bin/env bash
# The Lambda handler's cost:
#   1. decode + apply of every record of a generated stream-style history (SESSIONS
#      sessions, ~3 records each; 30000 gives ~90k records), cut into DynamoDB Streams
#      events of 100, 1000 and 10,000 records (BATCHES), into in-memory bucket engines;
#   2. whole invocations against DynamoDB Local (one warm container, its bucket log in the
#      state table, the DynamoDB sink on) on the first INVOKE_RECORDS records arriving at
#      RATE records/s: ms per invocation, DynamoDB write requests and units per record;
#   3. the same records published at the same rate to a topic and read by `consume kafka`
#      into a DynamoDB sink: its write requests and units per record, for comparison.
# Both write the DynamoDB sink at most every SINK_INTERVAL_MS (1000, the Kafka path's
# default) and keep to the same write budget, WRITES_PER_EVENT items per record (0.05,
# both paths' default; 0 writes at every interval): the same pacing.
# RATE=0 SINK_INTERVAL_MS=600000 compares them writing the sink once, at the end.
# Usage: bench/lambda.sh   (SESSIONS=30000 INVOKE_RECORDS=50000 RATE=5000 SINK_INTERVAL_MS=1000 WRITES_PER_EVENT=0.05
#                           BATCHES=100,1000,10000: the batch sizes of steps 1 and 2;
#                           10,000 is what a 2 s batching window collects at 5,000/s)
set -euo pipefail
SESSIONS="${SESSIONS:-30000}"
INVOKE_RECORDS="${INVOKE_RECORDS:-50000}"
RATE="${RATE:-5000}"
SINK_INTERVAL_MS="${SINK_INTERVAL_MS:-1000}"
WRITES_PER_EVENT="${WRITES_PER_EVENT:-0.05}"
source "$(dirname "$0")/prelude.sh"
cargo build --release --locked -p toolrank-lambda --bin lambda-bench >&2
"$BIN/toolrank" generate --sessions "$SESSIONS" --seed 5 --style stream --out "$WORK/history.jsonl" >&2
TOOLRANK_SINK_INTERVAL_MS="$SINK_INTERVAL_MS" TOOLRANK_DYNAMODB_WRITES_PER_EVENT="$WRITES_PER_EVENT" BATCHES="${BATCHES:-100,1000,10000}" "$BIN/lambda-bench" "$WORK/history.jsonl" "$INVOKE_RECORDS" "$RATE"
RUN="lbench$$"
head -n "$INVOKE_RECORDS" "$WORK/history.jsonl" > "$WORK/subset.jsonl"
"$BIN/toolrank" setup --topic "$RUN-events" --dead-letter-topic "$RUN-dl" --partitions 2 --table "$RUN-Kafka" >&2
"$BIN/toolrank" produce --topic "$RUN-events" --rate "$RATE" "$WORK/subset.jsonl" 2> /dev/null &
PRODUCER=$!
"$BIN/toolrank" consume kafka --topic "$RUN-events" --dead-letter-topic "$RUN-dl" --group "$RUN" --table "$RUN-Kafka" \
  --namespace "$RUN" --until-idle 3 --dynamodb-flush-ms "$SINK_INTERVAL_MS" --dynamodb-writes-per-event "$WRITES_PER_EVENT" 2> "$WORK/kafka.log"
wait "$PRODUCER"
python3 - "$WORK/kafka.log" <<'PY'
import re, sys
log = open(sys.argv[1]).read()
records = int(re.search(r"consumed (\d+) messages", log).group(1))
sink, rounds = map(int, re.search(r"\((\d+) DynamoDB requests in (\d+) rounds", log).groups())
state = int(re.search(r"(\d+) state table writes", log).group(1))
sink_units, state_units = map(float, re.search(r"units consumed: DynamoDB sink (\d+), state table (\d+)", log).groups())
print(f"consume kafka on the same {records} records at the same rate: DynamoDB write requests/record: "
      f"{(sink + state) / records:.4f} (sink {sink / records:.4f} in {rounds} writes, state table {state / records:.4f}: checkpoints and the lease)")
print(f"  DynamoDB write units/record: {(sink_units + state_units) / records:.4f} (sink {sink_units / records:.4f}, state table {state_units / records:.4f})")
PY
