"""Compares two `replay --out` directories table by table (counts and dates exactly,
floats to 1e-9 relative). Exits 1 on any difference.

usage: compare.py DIR_A DIR_B
"""
import json
import math
import sys

KEYS = {
    "agent_score_summary": ("domainid", "agentid"),
    "user_process_patterns": ("userid", "process_pattern", "agent_sequence", "tool_sequence"),
    "agent_tool_errors": ("agentid",),
    "staging": ("userid", "sessionid", "processid", "agentid", "toolid"),
}


def load(d, table):
    rows = {}
    with open(f"{d}/{table}.jsonl") as f:
        for line in f:
            r = json.loads(line)
            rows[tuple(r[k] for k in KEYS[table])] = r
    return rows


def same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


bad = 0
for table in KEYS:
    a, b = load(sys.argv[1], table), load(sys.argv[2], table)
    if a.keys() != b.keys():
        print(f"{table}: {len(a.keys() - b.keys())} rows only in A, {len(b.keys() - a.keys())} only in B")
        bad += 1
        continue
    diffs = [(k, c, a[k][c], b[k].get(c)) for k in a for c in a[k] if c in b[k] and not same(a[k][c], b[k][c])]
    print(f"{table}: {len(a)} rows, {len(diffs)} differing values")
    for d in diffs[:5]:
        print("   ", d)
    bad += bool(diffs)
sys.exit(1 if bad else 0)
