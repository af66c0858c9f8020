#!/usr/bin/env bash
# What adding consumers to a group buys: one generated history (modifies, removes,
# redeliveries) on a topic of PARTITIONS partitions, read into both sinks by groups of 1, 2
# and 4 `consume kafka` processes (COUNTS), each group with a state table and namespace of
# its own. A group runs until every record is read and both sinks equal replay; at that
# moment each process's CPU seconds and peak memory so far (/proc: utime+stime, VmHWM)
# and the records it read (its /metrics) are taken, and which one holds the sink lease
# (`toolrank_sink_lease_held`). So the figures cover reading and keeping the sinks
# exact, not the hand-over when all of them stop together afterwards; a member that takes
# the sink lease over in that stop (to write last) has its peak through the stop printed
# apart: what a takeover costs in memory. Prints the
# group's events/s and, per process, CPU seconds, CPU µs per event it read and peak
# memory, the sink lease holder's apart, with its ratios to the largest other consumer;
# checks both sinks against `toolrank replay` after each group.
# A group that has not read everything, or whose sinks do not equal replay, LIMIT seconds
# after it started, or one of whose consumers exits early or fails to stop, fails the
# script with the consumers' last log lines.
# The consumers split the sink stage into SHARDS (4) shards by user (`--sink-shards`), as
# a group that scales out runs: each process is printed with the shards it holds, and the
# ratios are those of the largest peak memory and CPU per event read to the smallest, over
# all members. SHARDS=1 measures the one sink writer instead: its holder against the
# largest other member.
# With PROFILE=1, the group of PROFILE_GROUP (2) runs once more under `perf record`
# (Debian's linux-perf, call graphs; a state table and namespace of its own), and
# bench/profile.py splits the sink holder's CPU, and the busiest other member's, by part
# of the pipeline, in CPU µs per event of the group: what the holder pays on top (with
# SHARDS > 1, the busiest and the idlest member's; PROFILE_GROUP=1, the one member's).
# Usage: bench/scale.sh   (SESSIONS=300000 gives ~1M events; PARTITIONS=8; COUNTS="1 2 4", empty
#                          for the profiled group only;
#                          LIMIT=900; SHARDS=4; PROFILE=1, PROFILE_GROUP=2)
set -euo pipefail
SESSIONS="${SESSIONS:-300000}"
PARTITIONS="${PARTITIONS:-8}"
COUNTS="${COUNTS-1 2 4}"
LIMIT="${LIMIT:-900}"
SHARDS="${SHARDS:-4}"
if [ "${PROFILE:-0}" = 1 ] && ! command -v perf > /dev/null; then
  echo "PROFILE=1 needs perf (apt-get install linux-perf)" >&2
  exit 1
fi
source "$(dirname "$0")/prelude.sh"
RUN="scale$$"
"$BIN/toolrank" generate --sessions "$SESSIONS" --seed 42 --out "$WORK/history.jsonl" >&2
EVENTS=$(wc -l < "$WORK/history.jsonl")
# Agent items must exist for the DynamoDB sink to score them.
grep '"SK":{"S":"METADATA"}' "$WORK/history.jsonl" > "$WORK/catalog.jsonl" || true
"$BIN/toolrank" setup --topic "$RUN" --dead-letter-topic "$RUN-dl" --partitions "$PARTITIONS" --no-dynamodb >&2
"$BIN/toolrank" produce --topic "$RUN" "$WORK/history.jsonl" >&2
echo "events:                $EVENTS in $PARTITIONS partitions"

# The sum of one metric over the N consumers' endpoints (ports 19400 + i), or consumer
# ONLY's, as an integer.
metric() {
  local name="$1" n="$2" only="${3:-}"
  for i in $(seq "$n"); do
    if [ -z "$only" ] || [ "$i" = "$only" ]; then curl -s "http://127.0.0.1:$((19400 + i))/metrics" || true; fi
  done |
    awk -v m="$name" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d\n", s }'
}

# Fails the script if group N ran past LIMIT or one of its consumers exited ($pids, $start,
# $name).
check() {
  local n="$1" why=""
  for pid in "${pids[@]}"; do kill -0 "$pid" 2> /dev/null || why="a consumer exited early"; done
  [ $((SECONDS - start)) -le "$LIMIT" ] || why="not done within $LIMIT s"
  [ -z "$why" ] && return 0
  echo "$n consumers: $why; their last log lines:" >&2
  for i in $(seq "$n"); do echo "--- consumer $i" >&2; tail -n 20 "$WORK/$name-$i.log" >&2; done
  kill -TERM "${pids[@]}" 2> /dev/null || true
  exit 1
}

# run N [profile]: N consumers in one group, on a state table and namespace of their own;
# with `profile`, each under perf, and the holder's and another member's CPU split by part
# is printed instead of the group's figures.
run() {
  local n="$1" profile="${2:-}" name="$RUN-$1${2:+-$2}"
  pids=() perfs=()
  "$BIN/toolrank" setup --no-kafka --table "$name" --no-stream >&2
  "$BIN/toolrank" produce --to dynamodb --table "$name" "$WORK/catalog.jsonl" >&2
  start=$SECONDS
  for i in $(seq "$n"); do
    # Under perf, a consumer waits stopped until perf has attached: its samples cover
    # its whole run, from its first instruction.
    ${profile:+sh -c 'kill -STOP $$; exec "$@"' sh} "$BIN/toolrank" --metrics-addr "127.0.0.1:$((19400 + i))" consume kafka \
      --topic "$RUN" --group "$name" --dead-letter-topic "$RUN-dl" --table "$name" --namespace "$name" --today "$TODAY" --sink-shards "$SHARDS" 2> "$WORK/$name-$i.log" &
    pids+=($!)
    if [ -n "$profile" ]; then
      local pid=$!
      until [ "$(ps -o stat= -p "$pid")" = T ]; do sleep 0.05; done
      perf record -q -F 499 --call-graph dwarf,16384 -p "$pid" -o "$WORK/$name-$i.perf" 2> /dev/null &
      perfs+=($!)
      until [ -s "$WORK/$name-$i.perf" ]; do sleep 0.05; done
      sleep 0.5
      kill -CONT "$pid"
    fi
  done
  # Who held the sink lease at each look while reading (one line per look).
  : > "$WORK/$name.holders"
  holders() { for i in $(seq "$n"); do [ "$(metric toolrank_sink_lease_held "$n" "$i")" = 1 ] && echo -n "$i "; done; echo; }
  until [ "$(metric toolrank_messages_total "$n")" -ge "$EVENTS" ]; do check "$n"; holders >> "$WORK/$name.holders"; sleep 0.5; done
  local read_secs=$((SECONDS - start))
  # Done once the sinks show everything (the holder reads the others' checkpoints as
  # they save them).
  until exact "$name" "$name" "$WORK/history.jsonl" > /dev/null; do check "$n"; holders >> "$WORK/$name.holders"; sleep 5; done
  holders >> "$WORK/$name.holders"
  # The samples cover what the figures cover: perf stops before they are taken.
  if [ -n "$profile" ]; then
    kill -INT "${perfs[@]}"
    wait "${perfs[@]}" || true
  fi
  for i in $(seq "$n"); do
    local pid="${pids[$((i - 1))]}"
    echo "$(awk '{ print ($14 + $15) / 100 }' "/proc/$pid/stat") $(awk '/^VmHWM/ { print $2 }' "/proc/$pid/status") $(metric toolrank_messages_total "$n" "$i") $(grep -c "took the sink lease" "$WORK/$name-$i.log") $(metric toolrank_sink_lease_held "$n" "$i")" > "$WORK/$name-$i.figures"
  done
  # Each process's peak through the stop too (sampled until it exits): a member that
  # takes the sink lease over to write last reads every other member's aggregates and
  # rewrites both sinks in full.
  local samplers=()
  for i in $(seq "$n"); do
    local pid="${pids[$((i - 1))]}"
    (while hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$pid/status" 2> /dev/null) && [ -n "$hwm" ]; do
      echo "$hwm" > "$WORK/$name-$i.stop-peak"
      sleep 0.02
    done) &
    samplers+=($!)
  done
  kill -TERM "${pids[@]}"
  for i in $(seq "$n"); do
    if ! wait "${pids[$((i - 1))]}"; then
      echo "$n consumers: consumer $i did not stop cleanly; its last log lines:" >&2
      tail -n 20 "$WORK/$name-$i.log" >&2
      exit 1
    fi
  done
  wait "${samplers[@]}"
  if [ -n "$profile" ]; then
    profiles "$n" "$name"
    return
  fi
  python3 - "$n" "$EVENTS" "$WORK" "$read_secs" "$name" "$SHARDS" <<'PY'
import sys
n, events, work, read_secs, name, shards = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], max(int(sys.argv[4]), 1), sys.argv[5], int(sys.argv[6])
looks = [line.split() for line in open(f"{work}/{name}.holders")]
holder = looks[-1][0] if len(looks[-1]) == 1 else None
seen = {h for look in looks for h in look}
procs = []
stops = []
held = {}
for i in range(1, n + 1):
    cpu, rss_kib, read, took, held[i] = open(f"{work}/{name}-{i}.figures").read().split()
    procs.append((float(cpu), int(rss_kib) / 1024, int(read), str(i) == holder))
    took_at_stop = open(f"{work}/{name}-{i}.log").read().count("took the sink lease") > int(took)
    stops.append((int(open(f"{work}/{name}-{i}.stop-peak").read()) / 1024, took_at_stop))
total = sum(p[0] for p in procs)
group = f"{n} consumer{'s' if n > 1 else ''}"
print(f"{group}:{' ' * (22 - len(group))}{events / read_secs:,.0f} events/s (all read in {read_secs} s), {total:.1f} CPU s, {total * 1e6 / events:.1f} CPU µs/event")
for i, (cpu, rss, read, is_holder) in enumerate(procs, 1):
    role = "sink holder" if is_holder else "consumer"
    if shards > 1:
        role = f"consumer {i} (holds {held[i]} of {shards} sink shards)"
    else:
        role = f"{role} {i}"
    print(f"{group}, {role}: {cpu:.1f} CPU s, {read:,} events read, {cpu * 1e6 / max(read, 1):.1f} CPU µs/event read, peak {rss:.0f} MiB")
others = [p for p in procs if not p[3]]
if shards > 1 and n > 1:
    rss = [p[1] for p in procs]
    per_event = [p[0] / max(p[2], 1) for p in procs]
    print(f"{group}, largest/smallest: peak memory {max(rss) / min(rss):.2f}x, CPU per event read {max(per_event) / min(per_event):.2f}x")
elif holder and others:
    h = next(p for p in procs if p[3])
    rss = max(o[1] for o in others)
    per_event = max(o[0] / max(o[2], 1) for o in others)
    moved = f" (the lease moved while reading: held by {', '.join(sorted(seen))})" if len(seen) > 1 else ""
    print(f"{group}, holder/other: peak memory {h[1] / rss:.2f}x, CPU per event read {h[0] / max(h[2], 1) / per_event:.2f}x{moved}")
elif others and shards == 1:
    print(f"{group}, holder/other: no single holder at the end ({looks[-1]}), no ratio")
for i, (peak, took) in enumerate(stops, 1):
    if took:
        print(f"{group}, consumer {i} through the stop: took the sink lease over to write last, peak {peak:.0f} MiB ({peak / procs[i - 1][1]:.2f}x its peak while reading)")
PY
  exact "$name" "$name" "$WORK/history.jsonl"
}
# profiles N NAME: the profiled run NAME's members' CPU by part, per event of the group: the
# sink holder's and the busiest other member's; with SHARDS > 1, the busiest and the idlest
# member's (CPU per event read); a group of one, its one member's.
profiles() {
  local n="$1" name="$2" members
  members=$(python3 - "$n" "$WORK" "$name" "$SHARDS" <<'PY'
import sys
n, work, name, shards = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
rate = lambda i: (lambda cpu, rss, read, *_: float(cpu) / max(int(read), 1))(*open(f"{work}/{name}-{i}.figures").read().split())
members = [str(i) for i in range(1, n + 1)]
if n == 1:
    print("consumer:1")
elif shards > 1:
    print(f"busiest-consumer:{max(members, key=rate)} idlest-consumer:{min(members, key=rate)}")
else:
    last = [line.split() for line in open(f"{work}/{name}.holders")][-1]
    if len(last) == 1:
        print(f"sink-holder:{last[0]} consumer:{max((i for i in members if i != last[0]), key=rate)}")
PY
)
  if [ -z "$members" ]; then
    echo "$n consumers, profiled: no single sink holder at the end; no split"
    return
  fi
  local member role i
  for member in $members; do
    i="${member##*:}" role="${member%%:*}"
    echo "where the CPU of $n consumers' ${role//-/ } $i goes (profiled run; CPU µs per event of the group):"
    perf script -F comm,ip,sym -i "$WORK/$name-$i.perf" 2> /dev/null | python3 bench/profile.py "$EVENTS" "$(cut -d' ' -f1 "$WORK/$name-$i.figures")"
  done
}

for n in $COUNTS; do run "$n"; done
if [ "${PROFILE:-0}" = 1 ]; then run "${PROFILE_GROUP:-2}" profile; fi
