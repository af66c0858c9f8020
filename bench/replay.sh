#!/usr/bin/env bash
# Replay benchmark: generates a DynamoDB export of SESSIONS sessions (default 200000,
# ~200 MB), then times `toolrank replay` and DuckDB running the seed's SQL
# (sql/duckdb/seed_analysis.sql) over the same file, checks that both give the same
# tables (staging included: both write the same four files), and reports MB/s,
# executions/s, CPU time and peak memory.
#
# usage: bench/replay.sh [SESSIONS]      (DuckDB comes from PyPI into a venv)
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS="${1:-200000}"
TODAY=2025-07-14
OUT="${BENCH_OUT:-bench/out}"
VENV="${TOOLRANK_VENV:-$HOME/.cache/toolrank/venv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/toolrank/target}"
mkdir -p "$OUT"

cargo build --release --locked --bin toolrank -q
BIN="$CARGO_TARGET_DIR/release/toolrank"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -r infra/python/requirements.txt

INPUT="$OUT/export-$SESSIONS.json"
[ -s "$INPUT" ] || "$BIN" generate --sessions "$SESSIONS" --seed 42 --style export --out "$INPUT"
MB=$(python3 -c "import os;print(os.path.getsize('$INPUT')/1e6)")

# measure NAME CMD...: wall seconds, CPU seconds (user+sys), peak RSS in MB, into $NAME_*
measure() {
  local name=$1; shift
  sync
  /usr/bin/time -f "%e %U %S %M" -o "$OUT/$name.time" "$@" >/dev/null 2>"$OUT/$name.log" || { cat "$OUT/$name.log"; exit 1; }
  read -r wall user sys rss <"$OUT/$name.time"
  printf -v "${name}_wall" %s "$wall"
  printf -v "${name}_cpu" %s "$(python3 -c "print($user+$sys)")"
  printf -v "${name}_rss" %s "$((rss / 1024))"
}

cat "$INPUT" >/dev/null  # warm the page cache for both
measure toolrank "$BIN" replay --today "$TODAY" --out "$OUT/toolrank" "$INPUT"
measure duckdb "$VENV/bin/python" bench/duckdb_replay.py "$INPUT" "$TODAY" "$OUT/duckdb"
EXECUTIONS=$(wc -l <"$OUT/toolrank/staging.jsonl")

echo "input: $INPUT, $(printf %.0f "$MB") MB, $SESSIONS sessions, $EXECUTIONS executions"
python3 bench/compare.py "$OUT/toolrank" "$OUT/duckdb" && echo "results: identical"
python3 - "$MB" "$EXECUTIONS" "$toolrank_wall" "$toolrank_cpu" "$toolrank_rss" "$duckdb_wall" "$duckdb_cpu" "$duckdb_rss" <<'PY'
import sys
mb, ex, tw, tc, tr, dw, dc, dr = map(float, sys.argv[1:])
print(f"{'':10} {'wall s':>8} {'CPU s':>8} {'MB/s':>8} {'exec/s':>12} {'CPU us/exec':>12} {'peak MB':>8}")
for name, w, c, r in (("toolrank", tw, tc, tr), ("duckdb", dw, dc, dr)):
    print(f"{name:10} {w:8.2f} {c:8.2f} {mb / w:8.1f} {ex / w:12,.0f} {c / ex * 1e6:12.2f} {r:8.0f}")
print(f"toolrank is {dw / tw:.1f}x faster than DuckDB (wall clock, 2 cores available to both)")
PY
