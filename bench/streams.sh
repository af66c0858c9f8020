#!/usr/bin/env bash
# The DynamoDB Streams poller's cost against DynamoDB Local: a generated history is written
# into a fresh table with `toolrank produce --to dynamodb` (SESSIONS sessions, ~3 writes
# each), then one `toolrank consume dynamodb-streams --until-idle IDLE` reads the whole
# stream into both sinks (the same table and Valkey). Prints records, wall and CPU time
# (from /usr/bin/time), records/s of wall time without the idle wait, CPU µs per record,
# and DynamoDB requests per record.
# Usage: bench/streams.sh   (SESSIONS=6000 IDLE=3)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/toolrank/target}"
SESSIONS="${SESSIONS:-6000}"
IDLE="${IDLE:-3}"
eval "$(infra/local/up)"
cargo build --release --locked --bin toolrank >&2
BIN="$CARGO_TARGET_DIR/release"
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
TABLE="bench$$-AgentTable"
"$BIN/toolrank" setup --no-kafka --table "$TABLE" >&2
"$BIN/toolrank" generate --sessions "$SESSIONS" --seed 6 --out "$WORK/history.jsonl" >&2
"$BIN/toolrank" produce --to dynamodb --table "$TABLE" "$WORK/history.jsonl" 2>&1 | tail -2 >&2
/usr/bin/time -f "%e %U %S %M" -o "$WORK/time" "$BIN/toolrank" consume dynamodb-streams --source-table "$TABLE" --table "$TABLE" \
  --application "bench$$" --namespace "bench$$" --until-idle "$IDLE" --dead-letter-file "$WORK/dl.jsonl" 2> "$WORK/log"
grep -E "^consumed" "$WORK/log"
read -r WALL USER SYS RSS < "$WORK/time"
python3 - "$WORK/log" "$WALL" "$USER" "$SYS" "$RSS" "$IDLE" <<'PY'
import re, sys
log, wall, user, sys_, rss, idle = open(sys.argv[1]).read(), *map(float, sys.argv[2:])
records = int(re.search(r"consumed (\d+) messages", log).group(1))
requests = int(re.search(r"\((\d+) DynamoDB requests", log).group(1))
busy = max(wall - idle, 1e-9)
print(f"{records} records: wall {wall:.2f} s ({records / busy:.0f} records/s without the {idle:.0f} s idle wait), "
      f"CPU {user + sys_:.2f} s = {(user + sys_) * 1e6 / records:.1f} µs/record, "
      f"{requests / records:.3f} DynamoDB sink requests/record, peak RSS {rss / 1024:.0f} MiB")
PY
