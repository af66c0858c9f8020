#!/usr/bin/env bash
# The batch path on a ~1M-execution mirror (SESSIONS sessions of a generated export,
# ~3.2 executions each), through the local Redshift Data API endpoint (DuckDB):
#   1. `toolrank mirror` of the export into a fresh database: items/s, and CPU µs per
#      item of toolrank and of the endpoint (statement parsing and execution);
#   2. `toolrank warehouse score` in full (sql/redshift 00, 10, 20, 25);
#   3. the same history plus 1% more sessions mirrored, then `--incremental` (00, 30, 25);
#   4. the warehouse's tables and staging against `toolrank replay` of the same files.
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
step full warehouse score --today "$TODAY" --out "$WORK/full"
TOOLRANK_LOG=warn step more mirror "$WORK/more.jsonl"
step incremental warehouse score --incremental --today "$TODAY" --out "$WORK/incremental"
"$BIN/toolrank" replay --today "$TODAY" --out "$WORK/replay" "$WORK/export.jsonl" "$WORK/more.jsonl" 2>/dev/null
python3 bench/compare.py "$WORK/replay" "$WORK/incremental" >&2 && echo "incremental warehouse = replay: identical" >&2
EXECUTIONS=$(wc -l < "$WORK/full/staging.jsonl")
python3 - <<PY
items, execs = $ITEMS, $EXECUTIONS
print(f"mirror: {items} items in {$mirror_wall:.1f} s = {items / $mirror_wall:,.0f} items/s; "
      f"CPU toolrank {$mirror_cpu * 1e6 / items:.1f} µs/item, endpoint (DuckDB) {$mirror_server * 1e6 / items:.1f} µs/item")
print(f"warehouse score (full, {execs} executions): {$full_wall:.1f} s wall, endpoint CPU {$full_server:.1f} s "
      f"({$full_server * 1e6 / execs:.2f} µs/execution), toolrank CPU {$full_cpu:.1f} s (reading back and writing --out)")
print(f"warehouse score --incremental after 1% more sessions: {$incremental_wall:.1f} s wall, endpoint CPU {$incremental_server:.1f} s")
PY
