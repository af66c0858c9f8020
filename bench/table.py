"""Prints a benchmark's figures as the markdown table docs/benchmarks.md shows.

usage: python3 bench/table.py SCRIPT STDOUT_FILE [ARGS...]
Each `label: value` line the script printed becomes a row; a heading names the command
(with the benchmark settings set in the environment), the commit and the machine.
"""
import os, re, subprocess, sys

script, path, args = sys.argv[1], sys.argv[2], sys.argv[3:]
settings = sorted(f"{k}={v}" for k, v in os.environ.items()
                  if re.fullmatch(r"SESSIONS|LATENCY_SESSIONS|LATENCY_RATE|RATE|BATCHES|INVOKE_RECORDS|RUNS|PARTITIONS|"
                                  r"HORIZONS|LIVE|SAMPLE_SECS|CONSUME_ARGS|STEADY_ARGS|SINK_INTERVAL_MS|WRITES_PER_EVENT|"
                                  r"DYNAMODB_FLUSH_MS|SEGMENTS|EXPORT_SESSIONS|TABLE_SESSIONS|KILLS|VALKEY_DOWN|THROTTLE|BROKER_DOWN|"
                                  r"MALFORMED|LEASE_SECS|CHAOS_SEED|COUNTS|SHARDS|PROFILE|PROFILE_GROUP", k))
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 2**20
print()
print(f"`{' '.join(settings + [script] + args)}` at commit `{commit}`{' (with uncommitted changes)' if dirty else ''}, "
      f"{os.cpu_count()} cores, {mem:.0f} GiB, {cpu}:")
print()
print("| figure | value |")
print("|---|---|")
lines = open(path).read().splitlines()
for line in lines:
    m = re.match(r"^\s*([A-Za-z0-9][^:|]{1,100}):\s+(\S.*)$", line.rstrip())
    if m:
        print(f"| {m.group(1).strip()} | {m.group(2).replace('|', '/')} |")
# A markdown table the script printed (e.g. bench/stream.sh's PROFILE=1 split) follows
# as it is, under the line that introduced it.
for i, line in enumerate(lines):
    if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
        print()
        if i > 0:
            print(lines[i - 1].strip())
            print()
    if line.startswith("|"):
        print(line)
