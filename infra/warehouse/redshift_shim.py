r"""Runs Amazon Redshift SQL (sql/redshift/) unchanged on DuckDB: a small dialect shim.

There is no Redshift emulator, so the warehouse tests and the local Data API endpoint
(data_api.py) execute the shipped SQL on DuckDB after these rewrites, applied outside
string literals and comments:

  SUPER navigation   h."value"."PK"."S"           -> json_extract_string(h."value", '$."PK"."S"')
  LISTAGG            LISTAGG(x, ', ') WITHIN GROUP (ORDER BY y)
                                                   -> LISTAGG(x, ', ' ORDER BY y)
  DATEDIFF           DATEDIFF(day, a, b)           -> date_diff('day', a, b)
  TO_DATE            TO_DATE(s, 'YYYYMMDD')        -> strptime(s, '%Y%m%d')::DATE
  TO_TIMESTAMP       TO_TIMESTAMP(s, 'YYYYMMDDHH24MISS') -> strptime(s, '%Y%m%d%H%M%S')
  DDL attributes     DISTKEY(..), SORTKEY(..), DISTSTYLE x, ENCODE x   -> removed
  SUPER type         SUPER                         -> JSON
  string literals    'a\\b' (Redshift reads backslash escapes) -> 'a\b'
  session settings   SET enable_case_sensitive_*   -> dropped (DuckDB's JSON keys are
                     case-sensitive already; its identifiers are case-insensitive, which
                     the shipped SQL never relies on)

and these functions, defined as DuckDB macros on every connection (see MACROS):
GETDATE() and JSON_PARSE(text). TO_DATE/TO_TIMESTAMP formats must be literals made of the
elements YYYY, MM, DD, HH24, MI and SS.

Not expressible, so not used by sql/ (a statement using them fails loudly, never silently):
unquoted SUPER navigation (value.PK.S), SUPER array navigation and PartiQL unnesting,
other datetime format elements, and Redshift's implicit commit on TRUNCATE.
"""
import re

MACROS = [
    "CREATE OR REPLACE MACRO getdate() AS current_localtimestamp()",
    "CREATE OR REPLACE MACRO json_parse(s) AS s::JSON",
]

_TOKEN = re.compile(r"'(?:[^']|'')*'|--[^\n]*|/\*.*?\*/|\"(?:[^\"]|\"\")*\"|;|[^'\";/-]+|.", re.S)


def statements(script):
    """Splits a script into statements on semicolons outside literals; drops comments."""
    out, cur = [], []
    for tok in _TOKEN.findall(script):
        if tok.startswith("--") or tok.startswith("/*"):
            cur.append(" ")
        elif tok == ";":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(tok)
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def _close(text, open_idx):
    """Index of the parenthesis closing the one at open_idx (literals are masked)."""
    depth = 0
    for i in range(open_idx, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced parentheses: " + text[open_idx:open_idx + 80])


def _listagg(text):
    out, pos = [], 0
    for m in re.finditer(r"\bLISTAGG\s*\(", text, re.I):
        if m.start() < pos:
            continue
        open_idx = m.end() - 1
        close = _close(text, open_idx)
        within = re.compile(r"\s*WITHIN\s+GROUP\s*\(\s*ORDER\s+BY\b", re.I).match(text, close + 1)
        if not within:
            continue
        group_open = text.index("(", close + 1)
        group_close = _close(text, group_open)
        order = text[within.end():group_close]
        out.append(text[pos:close] + " ORDER BY" + order + ")")
        pos = group_close + 1
    out.append(text[pos:])
    return "".join(out)


# Redshift datetime format elements and their strptime equivalents, longest first.
_FORMAT = [("HH24", "%H"), ("YYYY", "%Y"), ("MI", "%M"), ("SS", "%S"), ("MM", "%m"), ("DD", "%d")]


def _strptime_format(fmt):
    out, i = [], 0
    while i < len(fmt):
        for element, code in _FORMAT:
            if fmt.startswith(element, i):
                out.append(code)
                i += len(element)
                break
        else:
            if fmt[i].isalpha():
                raise ValueError("datetime format element not supported by the shim: " + fmt[i:])
            out.append(fmt[i])
            i += 1
    return "".join(out)


def _to_datetime(text, literals):
    """TO_DATE/TO_TIMESTAMP(expr, 'format literal') as strptime."""
    out, pos = [], 0
    for m in re.finditer(r"\bTO_(DATE|TIMESTAMP)\s*\(", text, re.I):
        if m.start() < pos:
            continue
        close = _close(text, m.end() - 1)
        args = text[m.end():close]
        fmt = re.search(r",\s*\x00(\d+)\x00\s*$", args)
        if not fmt:
            raise ValueError("TO_%s needs a literal format: %s" % (m.group(1), text[m.start():close + 1]))
        code = _strptime_format(literals[int(fmt.group(1))][1:-1])
        cast = "::DATE" if m.group(1).upper() == "DATE" else ""
        out.append("%sstrptime(%s, '%s')%s" % (text[pos:m.start()], args[:fmt.start()], code, cast))
        pos = close + 1
    out.append(text[pos:])
    return "".join(out)


def _super(m):
    path = "$" + m.group(2)
    return "json_extract_string(%s, '%s')" % (m.group(1), path.replace("'", "''"))


def translate(stmt, params=None):
    """One Redshift statement as DuckDB SQL, or None when DuckDB has nothing to do.

    Named Data API parameters (:name) become positional placeholders: returns the text and
    the values to bind, in order.
    """
    if re.match(r"\s*SET\s+enable_case_sensitive_\w+", stmt, re.I):
        return None, []
    literals = []

    def mask(m):
        literals.append(m.group(0))
        return "\x00%d\x00" % (len(literals) - 1)

    text = re.sub(r"'(?:[^']|'')*'", mask, stmt)
    text = re.sub(r'((?:\b\w+\.)?"value")((?:\."[^"]+")+)', _super, text)
    text = _listagg(text)
    text = re.sub(r"\bDATEDIFF\s*\(\s*(\w+)\s*,", lambda m: "date_diff('%s'," % m.group(1).lower(), text, flags=re.I)
    text = _to_datetime(text, literals)
    text = re.sub(r"\b(?:DISTKEY|SORTKEY)\s*\([^)]*\)|\bDISTSTYLE\s+\w+|\bENCODE\s+\w+", "", text, flags=re.I)
    text = re.sub(r"\bSUPER\b", "JSON", text, flags=re.I)
    values = []

    def bind(m):
        if m.group(1) not in (params or {}):
            raise ValueError("no value for parameter :%s" % m.group(1))
        values.append(params[m.group(1)])
        return "?"

    text = re.sub(r"(?<![:\w]):([A-Za-z_]\w*)", bind, text)
    return re.sub("\x00(\\d+)\x00", lambda m: _unescape(literals[int(m.group(1))]), text), values


def _unescape(literal):
    """A Redshift literal's backslash escapes as DuckDB's plain text."""
    return re.sub(r"\\(.)", lambda m: "''" if m.group(1) == "'" else m.group(1), literal)


def connect(duckdb, path=":memory:"):
    """A DuckDB connection with the shim's macros defined."""
    con = duckdb.connect(path)
    for macro in MACROS:
        con.execute(macro)
    return con
