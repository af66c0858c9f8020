#!/usr/bin/env bash
# The DynamoDB Streams poller against DynamoDB Local, next to the Kafka path on the same
# history. A generated history (SESSIONS sessions, ~3 writes each) is
#   1. written into a fresh table with `toolrank produce --to dynamodb`, then read by one
#      `toolrank consume dynamodb-streams --until-idle IDLE` into both sinks (the same
#      table, so its own writes come back too);
#   2. published to a fresh topic and read by one `toolrank consume kafka --until-idle
#      IDLE` into both sinks (a second table holding the Agent items).
# Prints, for each: records, wall and CPU time (/usr/bin/time), records/s of wall time
# without the idle wait, CPU µs per record, DynamoDB sink requests per record, peak RSS,
# and whether both sinks then equal `toolrank replay` of the history (the script fails if not).
# Usage: bench/streams.sh   (SESSIONS=6000 IDLE=3)
set -euo pipefail
SESSIONS="${SESSIONS:-6000}"
IDLE="${IDLE:-3}"
source "$(dirname "$0")/prelude.sh"
RUN="bench$$"
"$BIN/toolrank" setup --topic "$RUN-events" --dead-letter-topic "$RUN-dl" --partitions 2 --table "$RUN-Streams" >&2
"$BIN/toolrank" setup --no-kafka --table "$RUN-Kafka" >&2
"$BIN/toolrank" generate --sessions "$SESSIONS" --seed 6 --out "$WORK/history.jsonl" >&2
grep '"SK":{"S":"METADATA"}' "$WORK/history.jsonl" > "$WORK/catalog.jsonl"
"$BIN/toolrank" produce --to dynamodb --table "$RUN-Kafka" "$WORK/catalog.jsonl" 2>&1 | tail -1 >&2
"$BIN/toolrank" produce --to dynamodb --table "$RUN-Streams" "$WORK/history.jsonl" 2>&1 | tail -2 >&2
"$BIN/toolrank" produce --topic "$RUN-events" "$WORK/history.jsonl" 2>&1 | tail -1 >&2
measure() {
  local name="$1"; shift
  /usr/bin/time -f "%e %U %S %M" -o "$WORK/time" "$BIN/toolrank" "$@" --until-idle "$IDLE" --today "$TODAY" 2> "$WORK/log"
  grep -E "^consumed" "$WORK/log" >&2
  python3 - "$name" "$WORK/log" $(cat "$WORK/time") "$IDLE" <<'PY'
import re, sys
name, log = sys.argv[1], open(sys.argv[2]).read()
wall, user, sys_, rss, idle = map(float, sys.argv[3:])
records = int(re.search(r"consumed (\d+) messages", log).group(1))
requests = int(re.search(r"\((\d+) DynamoDB requests", log).group(1))
busy = max(wall - idle, 1e-9)
print(f"{name}: {records} records, wall {wall:.2f} s ({records / busy:.0f} records/s without the {idle:.0f} s idle wait), "
      f"CPU {user + sys_:.2f} s = {(user + sys_) * 1e6 / records:.1f} µs/record, "
      f"{requests / records:.3f} DynamoDB sink requests/record, peak RSS {rss / 1024:.0f} MiB")
PY
}
measure "dynamodb-streams" consume dynamodb-streams --source-table "$RUN-Streams" --table "$RUN-Streams" \
  --application "$RUN" --namespace "$RUN-s" --dead-letter-file "$WORK/dl.jsonl"
exact "$RUN-s" "$RUN-Streams" "$WORK/history.jsonl"
measure "kafka" consume kafka --topic "$RUN-events" --dead-letter-topic "$RUN-dl" --group "$RUN" --table "$RUN-Kafka" --namespace "$RUN-k"
exact "$RUN-k" "$RUN-Kafka" "$WORK/history.jsonl"
