"""Runs sql/duckdb/seed_analysis.sql over an export file and writes the tables as JSONL.

usage: duckdb_replay.py EXPORT_FILE TODAY OUT_DIR
"""
import os
import sys

import duckdb

src, today, out = sys.argv[1], sys.argv[2], sys.argv[3]
sql_path = os.path.join(os.path.dirname(__file__), "..", "sql", "duckdb", "seed_analysis.sql")
sql = open(sql_path).read().replace("{input}", src).replace("{today}", today)
con = duckdb.connect()
con.execute(sql)
os.makedirs(out, exist_ok=True)
for table in ("agent_score_summary", "user_process_patterns", "agent_tool_errors"):
    con.execute(f"COPY {table} TO '{out}/{table}.jsonl' (FORMAT JSON)")
# The same staging file `toolrank replay --out` writes, so both do the same work.
con.execute(f"""COPY (
    SELECT userid, sessionid, processid, domainid, agentid, toolid, toolnm, execution_date,
           strftime(execution_datetime, '%Y-%m-%d %H:%M:%S') AS execution_datetime, success_flag
    FROM agent_tool_analysis_staging
    ORDER BY userid, sessionid, execution_datetime, processid, agentid, toolid
) TO '{out}/staging.jsonl' (FORMAT JSON)""")
