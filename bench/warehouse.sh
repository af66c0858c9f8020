#!/usr/bin/env bash
# The batch path on a ~1M-execution mirror (SESSIONS sessions of a generated export,
# ~3.2 executions each), through the local Redshift Data API endpoint (DuckDB):
#   1. `toolrank mirror` of the export into a fresh database: items/s, and CPU µs per
#      item of toolrank and of the endpoint (statement parsing and execution);
#   2. `toolrank warehouse score` in full (sql/redshift 00, 10, 20, 25), then reading the
#      tables back (all pages);
#   3. the same history plus 1% more sessions mirrored, then `--incremental` (00, 30, 25),
#      reading the tables and the staging table back (`--out`);
#   4. the warehouse's tables and staging against `toolrank replay` of the same files.
# SQL seconds come from toolrank's log (one line per file); the rest of a step's wall time
# is reading results through GetStatementResult pages.
# Usage: bench/warehouse.sh   (SESSIONS=310000)
set -euo pipefail
SESSIONS="${SESSIONS:-310000}"
TODAY=2025-07-14
source "$(dirname "$0")/prelude.sh"
DB="bench_$$"
WH_PID=$(cat "${TOOLRANK_STACK_DATA:-$HOME/.cache/toolrank/stack/data}/pids/warehouse.pid")
"$BIN/toolrank" generate --sessions "$SESSIONS" --seed 42 --style export --out "$WORK/export.jsonl" >&2
"$BIN/toolrank" generate --sessions $((SESSIONS / 100)) --seed 43 --days 2 --style export --out "$WORK/more.jsonl" >&2
sed -i 's/"USR/"MORE/g' "$WORK/more.jsonl"   # new users: 1% new sessions, some new agents' rows

cpu_of() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }
# step NAME CMD...: wall and CPU of toolrank, CPU of the endpoint, into $NAME_*.
step() {
  local name=$1; shift
  local before; before=$(cpu_of "$WH_PID")
  /usr/bin/time -f "%e %U %S %M" -o "$WORK/time" "$BIN/toolrank" "$@" --workgroup local --database "$DB" 2> "$WORK/$name.log" \
    || { cat "$WORK/$name.log" >&2; exit 1; }
  read -r wall user sys rss < "$WORK/time"
  printf -v "${name}_wall" %s "$wall"
  printf -v "${name}_cpu" %s "$(python3 -c "print($user + $sys)")"
  printf -v "${name}_server" %s "$(python3 -c "print($(cpu_of "$WH_PID") - $before)")"
}

TOOLRANK_LOG=warn step mirror mirror "$WORK/export.jsonl"
ITEMS=$(grep -oE "mirrored [0-9]+" "$WORK/mirror.log" | grep -oE "[0-9]+")
step full --log-format json warehouse score --today "$TODAY"
TOOLRANK_LOG=warn step more mirror "$WORK/more.jsonl"
step incremental --log-format json warehouse score --incremental --today "$TODAY" --out "$WORK/incremental"
"$BIN/toolrank" replay --today "$TODAY" --out "$WORK/replay" "$WORK/export.jsonl" "$WORK/more.jsonl" 2>/dev/null
python3 bench/compare.py "$WORK/replay" "$WORK/incremental" >&2 && echo "incremental warehouse = replay: identical" >&2
EXECUTIONS=$(grep -c . "$WORK/export.jsonl")
python3 - <<PY
import json
def sql(log):
    files = [json.loads(l)["fields"] for l in open(log) if l.startswith("{") and '"ran"' in l]
    return sum(f["secs"] for f in files), ", ".join(f'{f["file"]} {f["secs"]:.1f} s' for f in files)
items, execs = $ITEMS, $EXECUTIONS
(full_sql, full_files), (inc_sql, inc_files) = sql("$WORK/full.log"), sql("$WORK/incremental.log")
print(f"mirror: {items} items in {$mirror_wall:.1f} s = {items / $mirror_wall:,.0f} items/s; "
      f"CPU toolrank {$mirror_cpu * 1e6 / items:.1f} µs/item, endpoint (DuckDB) {$mirror_server * 1e6 / items:.1f} µs/item")
print(f"warehouse score, full, on {execs} items: SQL {full_sql:.1f} s ({full_files}); "
      f"with reading the tables back {$full_wall:.1f} s wall; endpoint CPU {$full_server:.1f} s")
print(f"warehouse score --incremental after 1% more sessions: SQL {inc_sql:.1f} s ({inc_files}); "
      f"with reading tables and staging back {$incremental_wall:.1f} s wall; endpoint CPU {$incremental_server:.1f} s")
PY
