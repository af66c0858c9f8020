# Sourced by the bench scripts: the repository root, the shared build cache, the local
# stack, a release toolrank in $BIN, a scratch directory $WORK removed on exit (after the
# figures are printed as a markdown table; KEEP_WORK=1 keeps it: logs, perf recordings), and
# `exact`, which compares what the sinks hold with `toolrank replay`.
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/toolrank/target}"
eval "$(infra/local/up)"
cargo build --release --locked --bin toolrank >&2
BIN="$CARGO_TARGET_DIR/release"
WORK=$(mktemp -d)
# What the script prints is also kept, and at exit printed again as the markdown table
# docs/benchmarks.md shows (bench/table.py), with the command, the commit and the machine.
BENCH_ARGS=("$0" "$@")
exec 3>&1 > >(tee "$WORK/stdout"); TEE=$!
trap 'exec 1>&3; wait "$TEE" 2>/dev/null || true; python3 bench/table.py "${BENCH_ARGS[@]}" "$WORK/stdout"; if [ -n "${KEEP_WORK:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi' EXIT
# The generated histories end on this day: the consumers score for it, and so does replay.
TODAY=2025-07-14

exact() {  # exact NAMESPACE TABLE FILE...: the sinks hold what replay computes from FILEs
  local namespace="$1" table="$2"; shift 2
  rm -rf "$WORK/valkey" "$WORK/dynamodb"
  # Replay runs once for the same FILEs (a script may check several times).
  if [ "$(cat "$WORK/replay.of" 2>/dev/null)" != "$*" ]; then
    rm -rf "$WORK/replay" "$WORK/replay.of"
    "$BIN/toolrank" replay --today "$TODAY" --out "$WORK/replay" "$@" 2> /dev/null
    echo "$*" > "$WORK/replay.of"
  fi
  "$BIN/toolrank" results --from valkey --namespace "$namespace" --today "$TODAY" --out "$WORK/valkey" 2> /dev/null
  "$BIN/toolrank" results --from dynamodb --table "$table" --today "$TODAY" --out "$WORK/dynamodb" 2> /dev/null
  python3 - "$WORK" <<'PY'
import os, sys
work = sys.argv[1]
# A sink that holds nothing yet (its `results` failed) reads as empty.
read = lambda sink, t: open(f"{work}/{sink}/{t}.jsonl").read().splitlines() if os.path.exists(f"{work}/{sink}/{t}.jsonl") else []
tables = ["agent_score_summary", "user_process_patterns", "agent_tool_errors"]
wrong = [f"valkey {t}" for t in tables if read("valkey", t) != read("replay", t)]
wrong += [f"dynamodb {t}" for t in tables[::2] if read("dynamodb", t) != read("replay", t)]
recommended = [l for l in read("replay", "user_process_patterns") if '"is_recommended":true' in l]
wrong += ["dynamodb recommended patterns"] * (read("dynamodb", "user_process_patterns") != recommended)
rows = {t: len(read("replay", t)) for t in tables}
print(f"exact:                 {'NO, differ: ' + ', '.join(wrong) if wrong else 'both sinks equal replay'} ({rows['agent_score_summary']} agents, {rows['user_process_patterns']} patterns, {len(recommended)} recommended)")
sys.exit(1 if wrong else 0)
PY
}
