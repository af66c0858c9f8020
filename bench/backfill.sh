#!/usr/bin/env bash
# Backfill throughput and memory:
#   1. an export directory (gzip data files + manifest) of EXPORT_SESSIONS generated
#      sessions (~2M items at the default), `toolrank backfill --from export` onto a
#      fresh 4-partition topic;
#   2. a DynamoDB Local table filled with TABLE_SESSIONS sessions, `toolrank backfill
#      --from dynamodb --segments 4` onto another topic.
# Prints items, wall and CPU time (/usr/bin/time), items/s, CPU µs/item and peak RSS.
# Usage: bench/backfill.sh   (EXPORT_SESSIONS=700000 TABLE_SESSIONS=5000)
set -euo pipefail
EXPORT_SESSIONS="${EXPORT_SESSIONS:-700000}"
TABLE_SESSIONS="${TABLE_SESSIONS:-5000}"
source "$(dirname "$0")/prelude.sh"
RUN="backfill$$"
"$BIN/toolrank" setup --topic "$RUN-export" --dead-letter-topic "$RUN-dl" --partitions 4 --no-dynamodb >&2
"$BIN/toolrank" setup --topic "$RUN-scan" --dead-letter-topic "$RUN-dl2" --partitions 4 --table "$RUN-Table" >&2

mkdir -p "$WORK/export/data"
"$BIN/toolrank" generate --sessions "$EXPORT_SESSIONS" --seed 8 --style export --out "$WORK/all.jsonl" >&2
split -n l/8 -d "$WORK/all.jsonl" "$WORK/export/data/part-"
for f in "$WORK"/export/data/part-*; do gzip -1 "$f"; echo "{\"dataFileS3Key\":\"data/$(basename "$f").gz\"}"; done > "$WORK/export/manifest-files.json"
rm "$WORK/all.jsonl"

"$BIN/toolrank" generate --sessions "$TABLE_SESSIONS" --seed 9 --out "$WORK/table.jsonl" >&2
"$BIN/toolrank" produce --to dynamodb --table "$RUN-Table" "$WORK/table.jsonl" 2>&1 | tail -1 >&2

measure() {
  local name=$1; shift
  /usr/bin/time -f "%e %U %S %M" -o "$WORK/time" "$BIN/toolrank" backfill "$@" --id "$RUN-$name" 2> "$WORK/log" || { cat "$WORK/log" >&2; exit 1; }
  python3 - "$name" "$WORK/log" $(cat "$WORK/time") <<'PY'
import re, sys
name, log = sys.argv[1], open(sys.argv[2]).read()
wall, user, sys_, rss = map(float, sys.argv[3:])
items = int(re.search(r"backfilled (\d+) items", log).group(1))
print(f"backfill --from {name}: {items} items in {wall:.1f} s = {items / wall:,.0f} items/s, "
      f"CPU {user + sys_:.1f} s = {(user + sys_) * 1e6 / items:.1f} µs/item, peak RSS {rss / 1024:.0f} MiB")
PY
}
measure export --from export --topic "$RUN-export" "$WORK/export"
measure dynamodb --from dynamodb --table "$RUN-Table" --segments 4 --topic "$RUN-scan"
