#!/usr/bin/env bash
# What adding consumers to a group buys: one generated history (modifies, removes,
# redeliveries) on a topic of PARTITIONS partitions, read into both sinks by groups of 1, 2
# and 4 `consume kafka` processes (COUNTS), each group with a state table and namespace of
# its own. A group runs until every record is read and both sinks equal replay, then all
# its consumers are stopped together (so no hand-over is measured). Prints the group's
# events/s and, per process, CPU seconds, CPU µs per event it read and peak memory
# (/usr/bin/time), the sink lease holder's apart, with its ratios to the largest other
# consumer; checks both sinks against `toolrank replay` after each group.
# A group that has not read everything, or whose sinks do not equal replay, LIMIT seconds
# after it started, or one of whose consumers exits early, fails the script with the
# consumers' last log lines.
# Usage: bench/scale.sh   (SESSIONS=300000 gives ~1M events; PARTITIONS=8; COUNTS="1 2 4";
#                          LIMIT=900)
set -euo pipefail
SESSIONS="${SESSIONS:-300000}"
PARTITIONS="${PARTITIONS:-8}"
COUNTS="${COUNTS:-1 2 4}"
LIMIT="${LIMIT:-900}"
source "$(dirname "$0")/prelude.sh"
RUN="scale$$"
"$BIN/toolrank" generate --sessions "$SESSIONS" --seed 42 --out "$WORK/history.jsonl" >&2
EVENTS=$(wc -l < "$WORK/history.jsonl")
# Agent items must exist for the DynamoDB sink to score them.
grep '"SK":{"S":"METADATA"}' "$WORK/history.jsonl" > "$WORK/catalog.jsonl" || true
"$BIN/toolrank" setup --topic "$RUN" --dead-letter-topic "$RUN-dl" --partitions "$PARTITIONS" --no-dynamodb >&2
"$BIN/toolrank" produce --topic "$RUN" "$WORK/history.jsonl" >&2
echo "events:                $EVENTS in $PARTITIONS partitions"

# The sum of one metric over the N consumers' endpoints (ports 19400 + i), as an integer.
metric() {
  local name="$1" n="$2"
  for i in $(seq "$n"); do curl -s "http://127.0.0.1:$((19400 + i))/metrics" || true; done |
    awk -v m="$name" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d\n", s }'
}

# Fails the script if group N ran past LIMIT or one of its consumers exited ($pids, $start).
check() {
  local n="$1" why=""
  for pid in "${pids[@]}"; do kill -0 "$pid" 2> /dev/null || why="a consumer exited early"; done
  [ $((SECONDS - start)) -le "$LIMIT" ] || why="not done within $LIMIT s"
  [ -z "$why" ] && return 0
  echo "$n consumers: $why; their last log lines:" >&2
  for i in $(seq "$n"); do echo "--- consumer $i" >&2; tail -n 20 "$WORK/$n-$i.log" >&2; done
  for pid in "${pids[@]}"; do pkill -TERM -P "$pid" 2> /dev/null || true; done
  exit 1
}

run() {  # run N: N consumers in one group, on a state table and namespace of their own
  local n="$1" name="$RUN-$1"
  pids=()
  "$BIN/toolrank" setup --no-kafka --table "$name" --no-stream >&2
  "$BIN/toolrank" produce --to dynamodb --table "$name" "$WORK/catalog.jsonl" >&2
  start=$SECONDS
  for i in $(seq "$n"); do
    /usr/bin/time -f "%e %U %S %M" -o "$WORK/$n-$i.time" "$BIN/toolrank" --metrics-addr "127.0.0.1:$((19400 + i))" consume kafka \
      --topic "$RUN" --group "$name" --dead-letter-topic "$RUN-dl" --table "$name" --namespace "$name" --today "$TODAY" 2> "$WORK/$n-$i.log" &
    pids+=($!)
  done
  until [ "$(metric toolrank_messages_total "$n")" -ge "$EVENTS" ]; do check "$n"; sleep 0.5; done
  local read_secs=$((SECONDS - start))
  # Stopped together once the sinks show everything (the holder reads the others'
  # checkpoints as they save them).
  until exact "$name" "$name" "$WORK/history.jsonl" > /dev/null; do check "$n"; sleep 5; done
  # The consumers are the children of /usr/bin/time, which reports when they exit.
  for pid in "${pids[@]}"; do pkill -TERM -P "$pid"; done
  for pid in "${pids[@]}"; do wait "$pid"; done
  python3 - "$n" "$EVENTS" "$WORK" "$read_secs" <<'PY'
import re, sys
n, events, work, read_secs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], max(int(sys.argv[4]), 1)
procs = []
for i in range(1, n + 1):
    wall, user, sys_, rss = open(f"{work}/{n}-{i}.time").read().split()[-4:]
    log = open(f"{work}/{n}-{i}.log").read()
    read = int(re.search(r"consumed (\d+) messages", log).group(1))
    holder = "took the sink lease" in log
    procs.append((float(user) + float(sys_), int(rss) / 1024, read, holder))
total = sum(p[0] for p in procs)
print(f"{n} consumers:           {events / read_secs:,.0f} events/s (all read in {read_secs} s), {total:.1f} CPU s, {total * 1e6 / events:.1f} CPU µs/event")
for i, (cpu, rss, read, holder) in enumerate(procs, 1):
    role = "sink holder" if holder else "consumer"
    print(f"{n} consumers, {role} {i}: {cpu:.1f} CPU s, {read:,} events read, {cpu * 1e6 / max(read, 1):.1f} CPU µs/event read, peak {rss:.0f} MiB")
holders = [p for p in procs if p[3]]
others = [p for p in procs if not p[3]]
if len(holders) == 1 and others:
    h = holders[0]
    rss = max(o[1] for o in others)
    per_event = max(o[0] / max(o[2], 1) for o in others)
    print(f"{n} consumers, holder/other: peak memory {h[1] / rss:.2f}x, CPU per event read {h[0] / max(h[2], 1) / per_event:.2f}x")
elif len(holders) != 1:
    print(f"{n} consumers, holder/other: the sink lease changed hands ({len(holders)} holders), no ratio")
PY
  exact "$name" "$name" "$WORK/history.jsonl"
}
for n in $COUNTS; do run "$n"; done
