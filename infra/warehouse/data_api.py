"""A Redshift Data API endpoint for tests that executes real SQL on DuckDB.

There is no Redshift emulator (moto's Data API returns canned rows), so `infra/local/up`
starts this server: it speaks the Data API's JSON 1.1 protocol (X-Amz-Target
RedshiftData.*) for ExecuteStatement (with named :parameters), BatchExecuteStatement (one
transaction), DescribeStatement, GetStatementResult (paginated by NextToken),
CancelStatement and ListStatements, and runs each statement on DuckDB through
redshift_shim.py. Statements run asynchronously, as on Redshift: clients poll
DescribeStatement until FINISHED, FAILED or ABORTED.

Each `Database` of a request is its own DuckDB file under --data-dir (tests use one
database each, so they can run side by side). Cluster, workgroup, user and secret are
accepted and echoed, not checked. For tests: DuckDB's `pg_sleep(seconds)` makes a
statement outlast a client's timeout, and --page-rows small pages exercise pagination.

usage: data_api.py --port 14000 --data-dir DIR [--page-rows 1000]
"""
import argparse
import datetime
import decimal
import json
import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import duckdb

import redshift_shim


class ApiError(Exception):
    def __init__(self, kind, message, status=400):
        super().__init__(message)
        self.kind, self.message, self.status = kind, message, status


class Statement:
    """One statement (or one sub-statement of a batch) and, once finished, its result."""

    def __init__(self, sid, sql, database):
        self.id, self.sql, self.database = sid, sql, database
        self.status, self.error = "SUBMITTED", None
        self.created = self.updated = time.time()
        self.started_ns = self.duration_ns = 0
        self.columns, self.rows, self.rows_affected = None, None, -1
        self.subs = []
        self.cursor = None

    def describe(self):
        d = {
            "Id": self.id, "Status": self.status, "QueryString": self.sql, "Database": self.database,
            "CreatedAt": self.created, "UpdatedAt": self.updated, "Duration": self.duration_ns,
            "HasResultSet": self.columns is not None,
            "ResultRows": len(self.rows) if self.rows is not None else self.rows_affected,
            "ResultSize": 0, "RedshiftQueryId": 0,
        }
        if self.error:
            d["Error"] = self.error
        if self.subs:
            d["SubStatements"] = [
                {k: v for k, v in s.describe().items() if k in
                 ("Id", "Status", "QueryString", "CreatedAt", "UpdatedAt", "Duration", "HasResultSet", "ResultRows", "Error", "RedshiftQueryId")}
                for s in self.subs]
        return d


class Warehouse:
    def __init__(self, data_dir, page_rows):
        self.data_dir, self.page_rows = data_dir, page_rows
        self.databases, self.statements = {}, {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=8)

    def database(self, name):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,126}", name or ""):
            raise ApiError("ValidationException", "Database must be a valid identifier, got %r" % name)
        with self.lock:
            if name not in self.databases:
                con = redshift_shim.connect(duckdb, os.path.join(self.data_dir, name + ".duckdb"))
                self.databases[name] = con
            return self.databases[name]

    def submit(self, request, sqls, params, batch):
        database = request.get("Database")
        con = self.database(database)
        if not sqls or any(not isinstance(s, str) or not s.strip() for s in sqls):
            raise ApiError("ValidationException", "Sql must be a non-empty string")
        sid = str(uuid.uuid4())
        top = Statement(sid, "; ".join(sqls), database)
        if batch:
            top.subs = [Statement("%s:%d" % (sid, i + 1), s, database) for i, s in enumerate(sqls)]
        with self.lock:
            self.statements[sid] = top
            for s in top.subs:
                self.statements[s.id] = s
        self.pool.submit(self.run, con, top, params)
        out = {"Id": sid, "CreatedAt": top.created, "Database": database}
        for key in ("ClusterIdentifier", "WorkgroupName", "DbUser", "SecretArn"):
            if key in request:
                out[key] = request[key]
        return out

    def run(self, con, top, params):
        cur = con.cursor()
        top.cursor = cur
        parts = top.subs or [top]
        t0 = time.monotonic_ns()
        top.status = "STARTED"
        try:
            cur.execute("BEGIN TRANSACTION")
            for part in parts:
                if top.status == "ABORTED":
                    raise ApiError("Aborted", "Query cancelled on user's request")
                part.status, s0 = "STARTED", time.monotonic_ns()
                self.execute(cur, part, params)
                part.status, part.duration_ns, part.updated = "FINISHED", time.monotonic_ns() - s0, time.time()
            cur.execute("COMMIT")
            top.status = "FINISHED"
            if not top.subs:
                top.updated = time.time()
        except Exception as e:  # any failure rolls the whole statement or batch back
            try:
                cur.execute("ROLLBACK")
            except duckdb.Error:
                pass
            message = e.message if isinstance(e, ApiError) else "ERROR: %s" % e
            if top.status != "ABORTED":
                top.status, top.error = "FAILED", message
            for part in parts:
                if part.status != "FINISHED":
                    part.status, part.error = ("ABORTED" if top.status == "ABORTED" else "FAILED"), message
                    break
        finally:
            top.duration_ns, top.updated, top.cursor = time.monotonic_ns() - t0, time.time(), None
            cur.close()

    @staticmethod
    def execute(cur, part, params):
        statements = redshift_shim.statements(part.sql)
        if len(statements) != 1:
            raise ApiError("ValidationException", "one SQL statement per Sql, found %d" % len(statements))
        text, values = redshift_shim.translate(statements[0], params)
        if text is None:
            return
        cur.execute(text, values)
        if cur.description is None:
            return
        rows = cur.fetchall()
        if re.match(r"\s*(INSERT|UPDATE|DELETE|MERGE)\b", text, re.I):
            part.rows_affected = rows[0][0] if rows else 0
        else:
            part.columns, part.rows = [(d[0], str(d[1])) for d in cur.description], rows

    def statement(self, sid):
        with self.lock:
            s = self.statements.get(sid)
        if s is None:
            raise ApiError("ResourceNotFoundException", "Query does not exist: %s" % sid)
        return s

    def cancel(self, sid):
        s = self.statement(sid)
        if s.status in ("FINISHED", "FAILED", "ABORTED"):
            raise ApiError("ValidationException", "Could not cancel a query that is already in %s state" % s.status)
        s.status, s.error = "ABORTED", "Query cancelled on user's request"
        if s.cursor is not None:
            try:
                s.cursor.interrupt()
            except duckdb.Error:
                pass
        return {"Status": True}

    def result(self, sid, token):
        s = self.statement(sid)
        if s.status != "FINISHED" or s.columns is None:
            raise ApiError("ValidationException", "Query does not have result. Please check query status with DescribeStatement.")
        start = int(token or 0)
        page = s.rows[start:start + self.page_rows]
        out = {
            "ColumnMetadata": [{"name": n, "label": n, "typeName": _type_name(t), "nullable": 1} for n, t in s.columns],
            "Records": [[_field(v) for v in row] for row in page],
            "TotalNumRows": len(s.rows),
        }
        if start + self.page_rows < len(s.rows):
            out["NextToken"] = str(start + self.page_rows)
        return out

    def list(self):
        with self.lock:
            tops = [s for sid, s in self.statements.items() if ":" not in sid]
        return {"Statements": [{"Id": s.id, "Status": s.status, "QueryString": s.sql, "CreatedAt": s.created,
                                "UpdatedAt": s.updated, "IsBatchStatement": bool(s.subs)} for s in tops[-100:]]}


def _type_name(duck_type):
    t = duck_type.upper()
    for prefix, name in (("BIGINT", "int8"), ("HUGEINT", "numeric"), ("INTEGER", "int4"), ("DOUBLE", "float8"),
                         ("FLOAT", "float4"), ("DECIMAL", "numeric"), ("BOOLEAN", "bool"), ("DATE", "date"),
                         ("TIMESTAMP", "timestamp"), ("JSON", "super")):
        if t.startswith(prefix):
            return name
    return "varchar"


def _field(v):
    if v is None:
        return {"isNull": True}
    if isinstance(v, bool):
        return {"booleanValue": v}
    if isinstance(v, int):
        return {"longValue": v}
    if isinstance(v, (float, decimal.Decimal)):
        return {"doubleValue": float(v)}
    if isinstance(v, datetime.datetime):
        return {"stringValue": v.strftime("%Y-%m-%d %H:%M:%S")}
    if isinstance(v, datetime.date):
        return {"stringValue": v.isoformat()}
    return {"stringValue": str(v)}


def handler(warehouse):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                action = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
                self.reply(200, self.dispatch(action, body))
            except ApiError as e:
                self.reply(e.status, {"__type": e.kind, "message": e.message})
            except Exception as e:  # a bug here must still answer, as the service would
                self.reply(500, {"__type": "InternalServerException", "message": str(e)})

        def dispatch(self, action, body):
            params = {p["name"]: p["value"] for p in body.get("Parameters") or []}
            if action == "ExecuteStatement":
                return warehouse.submit(body, [body.get("Sql")], params, batch=False)
            if action == "BatchExecuteStatement":
                return warehouse.submit(body, body.get("Sqls") or [], {}, batch=True)
            if action == "DescribeStatement":
                return warehouse.statement(body.get("Id")).describe()
            if action == "GetStatementResult":
                return warehouse.result(body.get("Id"), body.get("NextToken"))
            if action == "CancelStatement":
                return warehouse.cancel(body.get("Id"))
            if action == "ListStatements":
                return warehouse.list()
            raise ApiError("UnknownOperationException", "unsupported operation %r" % action)

        def reply(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/x-amz-json-1.1")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=14000)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--page-rows", type=int, default=1000)
    args = ap.parse_args()
    os.makedirs(args.data_dir, exist_ok=True)
    server = ThreadingHTTPServer((args.host, args.port), handler(Warehouse(args.data_dir, args.page_rows)))
    server.serve_forever()


if __name__ == "__main__":
    main()
