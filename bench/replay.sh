#!/usr/bin/env bash
# Replay benchmark: generates a DynamoDB export of SESSIONS sessions (default 200000,
# ~200 MB), then times `toolrank replay` and DuckDB running the seed's SQL
# (sql/duckdb/seed_analysis.sql) over the same file, checks that both give the same
# tables (staging included: both write the same four files), and reports MB/s,
# executions/s, CPU time and peak memory (medians of RUNS runs each after a warm-up,
# default 5), for toolrank both as it writes by default and with --direct-io.
#
# usage: bench/replay.sh [SESSIONS]      (DuckDB comes from PyPI into a venv; stop the local
#                                        servers first: idle, they take CPU from both tools)
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

# run NAME CMD...: one timed run writing into $OUT/NAME, appending "wall-s cpu-s peak-MB" to $OUT/NAME.runs
run() {
  local name=$1; shift
  # Each run starts from the same state: no output files to truncate (freeing 180 MB of
  # blocks on this discard-mounted disk costs the run that does it), dirty pages written,
  # free memory compacted where permitted, so that neither tool pays for leftovers
  # (huge-page faults after a run that freed 600 MB otherwise compact memory inline).
  rm -rf "${OUT:?}/$name"
  sync
  echo 1 2>/dev/null >/proc/sys/vm/compact_memory || true
  /usr/bin/time -f "%e %U %S %M" -o "$OUT/$name.time" "$@" >/dev/null 2>"$OUT/$name.log" || { cat "$OUT/$name.log"; exit 1; }
  read -r wall user sys rss <"$OUT/$name.time"
  echo "$wall $(python3 -c "print($user+$sys)") $((rss / 1024))" >>"$OUT/$name.runs"
}

# Each tool gets one untimed warm-up run, then RUNS timed runs in a row, and the medians
# are compared (hyperfine's method). Not alternating: on this VM, a run that follows
# DuckDB pays to fault in again the ~650 MB that DuckDB just freed (the host takes freed
# guest memory back), up to +0.8 s of kernel time.
RUNS="${RUNS:-5}"
# runs NAME CMD...: the warm-up, then RUNS timed runs into $OUT/NAME.runs
runs() {
  run "$@"
  rm "$OUT/$1.runs"
  for _ in $(seq "$RUNS"); do run "$@"; done
}
cat "$INPUT" >/dev/null  # warm the page cache for both
# toolrank writes its files through the page cache by default, and past it with
# --direct-io; both are timed.
runs toolrank "$BIN" replay --today "$TODAY" --out "$OUT/toolrank" "$INPUT"
runs toolrank-direct "$BIN" replay --today "$TODAY" --out "$OUT/toolrank-direct" --direct-io "$INPUT"
runs duckdb "$VENV/bin/python" bench/duckdb_replay.py "$INPUT" "$TODAY" "$OUT/duckdb"
EXECUTIONS=$(wc -l <"$OUT/toolrank/staging.jsonl")

{
echo "input: $INPUT, $(printf %.0f "$MB") MB, $SESSIONS sessions, $EXECUTIONS executions; $RUNS runs each"
python3 bench/compare.py "$OUT/toolrank" "$OUT/duckdb" && diff -r "$OUT/toolrank" "$OUT/toolrank-direct" && echo "results: identical (toolrank's files the same either way)"
python3 - "$MB" "$EXECUTIONS" "$OUT/toolrank.runs" "$OUT/toolrank-direct.runs" "$OUT/duckdb.runs" <<'PY'
import statistics, sys
mb, ex = float(sys.argv[1]), float(sys.argv[2])
medians = {}
rows = []
for name, path in (("toolrank", sys.argv[3]), ("toolrank --direct-io", sys.argv[4]), ("DuckDB", sys.argv[5])):
    runs = [tuple(map(float, line.split())) for line in open(path)]
    w, c, r = (statistics.median(x[i] for x in runs) for i in range(3))
    medians[name] = w
    walls = [x[0] for x in runs]
    rows.append(f"| {name} | {w:.2f} | {min(walls):.2f}-{max(walls):.2f} | {c:.2f} | {mb / w:.1f} | {ex / w:,.0f} | {c / ex * 1e6:.2f} | {r:.0f} |")
for name in ("toolrank", "toolrank --direct-io"):
    print(f"speed-up: {name} is {medians['DuckDB'] / medians[name]:.1f}x faster than DuckDB (median wall clock, 2 cores available to both)")
print()
print("| median of runs | wall s | wall s min-max | CPU s | MB/s | executions/s | CPU µs/execution | peak MB |")
print("|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
PY
} | tee "$OUT/summary"
python3 bench/table.py "$0" "$OUT/summary" "$@"
