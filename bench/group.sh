#!/usr/bin/env bash
# What adding consumers to a group buys: the same generated history (modifies, removes,
# redeliveries) read into both sinks by one `consume kafka`, then by CONSUMERS of them in
# one group, each run on a topic, table and namespace of its own. Prints each process's CPU
# seconds and peak memory (/usr/bin/time), the group's total CPU beside the lone
# consumer's, and checks both sinks against `toolrank replay` after each run.
# Usage: bench/group.sh   (SESSIONS=54000 gives ~179k events; PARTITIONS=4; CONSUMERS=2)
set -euo pipefail
SESSIONS="${SESSIONS:-54000}"
PARTITIONS="${PARTITIONS:-4}"
CONSUMERS="${CONSUMERS:-2}"
source "$(dirname "$0")/prelude.sh"
RUN="group$$"
"$BIN/toolrank" generate --sessions "$SESSIONS" --seed 42 --out "$WORK/history.jsonl" >&2
EVENTS=$(wc -l < "$WORK/history.jsonl")
# Agent items must exist for the DynamoDB sink to score them.
grep '"SK":{"S":"METADATA"}' "$WORK/history.jsonl" > "$WORK/catalog.jsonl" || true
echo "events: $EVENTS in $PARTITIONS partitions"

run() {  # run NAME N: N consumers in one group, on a topic, table and namespace of their own
  local name="$RUN-$1" n="$2" pids=()
  "$BIN/toolrank" setup --topic "$name" --dead-letter-topic "$name-dl" --partitions "$PARTITIONS" --table "$name" --no-stream >&2
  "$BIN/toolrank" produce --to dynamodb --table "$name" "$WORK/catalog.jsonl" >&2
  "$BIN/toolrank" produce --topic "$name" "$WORK/history.jsonl" >&2
  for i in $(seq "$n"); do
    /usr/bin/time -f "%e %U %S %M" -o "$WORK/$1-$i.time" "$BIN/toolrank" consume kafka --topic "$name" --group "$name" \
      --dead-letter-topic "$name-dl" --table "$name" --namespace "$name" --until-idle 10 --today "$TODAY" 2> "$WORK/$1-$i.log" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  python3 - "$1" "$EVENTS" "$WORK" "$n" <<'PY'
import sys
name, events, work, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
total = 0.0
for i in range(1, n + 1):
    wall, user, sys_, rss = open(f"{work}/{name}-{i}.time").read().split()[-4:]
    cpu = float(user) + float(sys_)
    total += cpu
    print(f"{name} consumer {i}:      {cpu:.2f} CPU s, peak {int(rss) / 1024:.0f} MiB, {float(wall):.1f} s wall")
print(f"{name}, all consumers:   {total:.2f} CPU s, {total * 1e6 / events:.2f} CPU µs/event")
PY
  exact "$name" "$name" "$WORK/history.jsonl"
}
run alone 1
run group "$CONSUMERS"
