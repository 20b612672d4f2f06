"""A strict emulation of the SQL Server that SQLR/ targets, on SQLite: it runs the scripts and procedures
themselves (T-SQL control flow, transactions, TRY/CATCH) and enforces the documented rules our code depends on:

- sp_execute_external_script for Python: parameters and InputDataSet columns only of the types the Python
  data-type mapping lists (binary data is refused; it crosses hex-encoded in varchar(max), as sqlmlutils does);
  OutputDataSet columns that cannot be mapped (bytes) come back NULL, NaN comes back NULL; a Python error is
  Msg 39004.
- errors: with XACT_ABORT OFF a runtime error ends only its statement and the batch goes on; with it ON the
  batch stops and the transaction is rolled back; inside TRY control goes to CATCH (a doomed transaction
  cannot commit); THROW ends the batch.
- no nested INSERT ... EXEC, no ROLLBACK inside one; no NaN in float columns or parameters; no implicit
  conversion between character and binary data; JSON_VALUE and OPENJSON raise on invalid JSON (NaN is not JSON);
  OPENJSON without WITH gives SQL Server's (key, value, type) rows; FOR JSON PATH leaves NULL properties out,
  writes binary as base64, embeds JSON_QUERY values and nested FOR JSON results as JSON, and gives NULL for no rows;
  VECTOR(n) holds exactly n float32 values (n <= 1998) and VECTOR_DISTANCE computes cosine/euclidean/dot.
- issue 27: Msg 39004 then 39019 for a script error; OUTPUT variables the script must set; bigint as float64; no
  all-None or NaN OutputDataSet column; a vector index makes its table read-only unless ALLOW_STALE_VECTOR_INDEX
  is ON and needs 100 vectors; permissions (EXECUTE, SELECT, EXECUTE ANY EXTERNAL SCRIPT) for users that are not
  sysadmin, roles, GRANT, EXECUTE AS USER. Each rule and its Microsoft page: SQLR/README.md.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import sqlite3
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlglot
from sqlglot import exp

PYTHON_TYPES = {"bit", "tinyint", "smallint", "int", "bigint", "float", "real", "char", "varchar", "nchar",
                "nvarchar", "date", "datetime", "smalldatetime", "uniqueidentifier"}
"""SQL types sp_execute_external_script maps for Python (binary left out: see the module docstring)."""
MAX_VECTOR_DIMENSIONS = 1998
STATEMENT_KEYWORDS = {"BEGIN", "THROW", "SET", "RETURN", "INSERT", "DELETE", "UPDATE", "EXEC", "EXECUTE", "SELECT",
                      "MERGE", "DECLARE", "CREATE", "BREAK", "CONTINUE", "IF", "WHILE", "PRINT", "ALTER", "DROP",
                      "COMMIT", "ROLLBACK"}
TOKEN = re.compile(r"\s+|--[^\n]*|/\*.*?\*/|N?'(?:[^']|'')*'|\[[^\]]*\]|@@?\w+|#\w+|[\w.$]+|<=|>=|<>|!=|.", re.DOTALL)


class SqlError(Exception):
    """A SQL Server error: number, message, and whether it ends the whole batch whatever XACT_ABORT says."""

    def __init__(self, number: int, message: str, batch_abort: bool = False) -> None:
        super().__init__(f"Msg {number}: {message}")
        self.number, self.message, self.batch_abort = number, message, batch_abort


@dataclass
class Procedure:
    name: str
    params: list[tuple[str, str, str | None, bool]]  # (name, type, default SQL, OUTPUT)
    body: list


@dataclass
class Frame:
    """One procedure call or batch: its variables and their declared types."""

    values: dict[str, Any] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    temp_tables: list[str] = field(default_factory=list)


class Break(Exception):
    pass


class Continue(Exception):
    pass


class Return(Exception):
    pass


def script_error(detail: str) -> SqlError:
    """A failed external script: Msg 39004, which is all a CATCH block sees, followed by Msg 39019 with the
    detail (Known issues for Python and R: the two messages come together)."""
    error = SqlError(39004, "A 'Python' script error occurred during execution of 'sp_execute_external_script' "
                            "with HRESULT 0x80004004.")
    error.detail = SqlError(39019, f"An external script error occurred: {detail}")
    error.args = (f"{error.args[0]} Msg 39019: {error.detail.message}",)
    return error


# ---------------------------------------------------------------- parsing
def tokens(text: str) -> list[str]:
    return [t for t in TOKEN.findall(text) if t.strip() and not t.startswith(("--", "/*"))]


def _word(tok: list[str], i: int) -> str:
    return tok[i].upper() if i < len(tok) else ""


def parse_block(tok: list[str], i: int, until: tuple[str, ...]) -> tuple[list, int]:
    """Statements from tok[i] up to (not including) the words `until` (e.g. END TRY)."""
    body = []
    while i < len(tok) and tuple(_word(tok, i + k) for k in range(len(until))) != until:
        if tok[i] == ";":
            i += 1
            continue
        stmt, i = parse_statement(tok, i)
        body.append(stmt)
    if i >= len(tok):
        raise SqlError(102, f"Incorrect syntax: missing {' '.join(until)}", True)
    return body, i + len(until)


def _condition(tok: list[str], i: int) -> tuple[str, int]:
    depth, start = 0, i
    while i < len(tok) and not (depth == 0 and i > start and _word(tok, i) in STATEMENT_KEYWORDS):
        depth += tok[i] == "("
        depth -= tok[i] == ")"
        i += 1
    return " ".join(tok[start:i]), i


def parse_statement(tok: list[str], i: int) -> tuple[tuple, int]:
    word = _word(tok, i)
    if word == "BEGIN" and _word(tok, i + 1) == "TRY":
        body, i = parse_block(tok, i + 2, ("END", "TRY"))
        if (_word(tok, i), _word(tok, i + 1)) != ("BEGIN", "CATCH"):
            raise SqlError(102, "Incorrect syntax: END TRY must be followed by BEGIN CATCH", True)
        catch, i = parse_block(tok, i + 2, ("END", "CATCH"))
        return ("try", body, catch), i
    if word == "BEGIN" and _word(tok, i + 1) not in ("TRAN", "TRANSACTION"):
        body, i = parse_block(tok, i + 1, ("END",))
        return ("block", body), i
    if word in ("IF", "WHILE"):
        cond, i = _condition(tok, i + 1)
        then, i = parse_statement(tok, i)
        otherwise = None
        while i < len(tok) and tok[i] == ";":
            i += 1
        if word == "IF" and _word(tok, i) == "ELSE":
            otherwise, i = parse_statement(tok, i + 1)
        return (word.lower(), cond, then, otherwise), i
    if word in ("BREAK", "CONTINUE", "RETURN"):
        return (word.lower(),), i + 1 + (i + 1 < len(tok) and tok[i + 1] == ";")
    depth, start = 0, i
    while i < len(tok) and not (depth == 0 and tok[i] == ";"):
        depth += tok[i] == "("
        depth -= tok[i] == ")"
        i += 1
    if i >= len(tok):
        raise SqlError(102, f"statement not ended with ';': {' '.join(tok[start:start + 8])}", True)
    return ("sql", " ".join(tok[start:i])), i + 1


def split_arguments(text: str) -> list[str]:
    """Top-level comma-separated parts of `text`."""
    parts, depth, current = [], 0, []
    for t in tokens(text):
        if t == "," and depth == 0:
            parts.append(" ".join(current))
            current = []
            continue
        depth += t == "("
        depth -= t == ")"
        current.append(t)
    return parts + ([" ".join(current)] if current else [])


def unquote(literal: str) -> str:
    return literal[literal.index("'") + 1:-1].replace("''", "'")


def declarations(text: str) -> list[tuple[str, str, str | None, bool]]:
    """(name, type, default, OUTPUT) of `@a int = 1, @b nvarchar(max) OUTPUT` (a procedure or @params header)."""
    out = []
    for part in split_arguments(text):
        found = re.fullmatch(r"@(\w+)\s+(?:AS\s+)?(\w+(?:\s*\(\s*[\w\s,]+\))?)(?:\s*=\s*(.+?))?(\s+OUTPUT)?",
                             part.strip(), re.IGNORECASE | re.DOTALL)
        if not found:
            raise SqlError(102, f"Incorrect syntax near {part!r}", True)
        out.append((found.group(1).lower(), re.sub(r"\s+", "", found.group(2)).lower(), found.group(3),
                    bool(found.group(4))))
    return out


def base_type(sql_type: str) -> str:
    return sql_type.split("(")[0].lower()


def vector_dimensions(sql_type: str) -> int:
    return int(re.search(r"\((\d+)", sql_type).group(1))


# ---------------------------------------------------------------- value rules
def to_vector(value: Any, dims: int) -> str | None:
    """A VECTOR(dims) value (canonical JSON of float32 values), from JSON text or another vector."""
    if value is None:
        return None
    if dims > MAX_VECTOR_DIMENSIONS:
        raise SqlError(42204, f"vector dimensions {dims} exceed the maximum of {MAX_VECTOR_DIMENSIONS}", True)
    try:
        values = json.loads(value, parse_constant=_no_constant) if isinstance(value, str) else None
    except ValueError:
        values = None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise SqlError(42201, "the value is not a JSON array of numbers and cannot become a vector")
    if len(values) != dims:
        raise SqlError(42204, f"the vector has {len(values)} dimensions; the type needs {dims}")
    return json.dumps([float(v) for v in np.asarray(values, dtype=np.float32)])


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _json(text: Any) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, TypeError):
        raise SqlError(13609, "JSON text is not properly formatted.") from None


def json_value(text: Any, path: str) -> Any:
    if text is None:
        return None
    value = _json(text)
    for key in re.findall(r"\.(\w+)|\[(\d+)\]", path.lstrip("$")):
        try:
            value = value[key[0]] if key[0] else value[int(key[1])]
        except (KeyError, IndexError, TypeError):
            return None  # lax mode: a path that is not there is NULL
    return None if isinstance(value, (dict, list)) else str(value) if not isinstance(value, bool) else str(value).lower()


def is_json(text: Any) -> int | None:
    if text is None:
        return None
    try:
        _json(text)
    except SqlError:
        return 0
    return 1


def json_object(spec: str, *values: Any) -> str:
    """One row of FOR JSON PATH: `spec` is [[property, is JSON], ...] for `values`. NULL properties are left out
    (no INCLUDE_NULL_VALUES), binary data is base64 text, JSON_QUERY values and nested FOR JSON results are JSON."""
    row = {}
    for (name, embedded), value in zip(json.loads(spec), values, strict=True):
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise SqlError(8023, f"FOR JSON: {value} in property {name!r} is not a valid float")
        row[name] = _json(value) if embedded else base64.b64encode(value).decode() if isinstance(value, bytes) \
            else value
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"))


class ForJson:
    """The rows of a FOR JSON PATH query as one JSON text: an array, or the bare objects WITHOUT_ARRAY_WRAPPER;
    NULL when there are no rows."""

    def __init__(self) -> None:
        self.rows: list[str] = []
        self.wrapped = True

    def step(self, row: str, wrapped: int) -> None:
        self.rows.append(row)
        self.wrapped = bool(wrapped)

    def finalize(self) -> str | None:
        if not self.rows:
            return None
        text = ",".join(self.rows)
        return f"[{text}]" if self.wrapped else text


def convert(sql_type: str, value: Any, style: int | None = None) -> Any:
    """CONVERT(sql_type, value, style) for the conversions SQLR/ uses (binary <-> hex text with style 2)."""
    kind = base_type(sql_type)
    if value is None:
        return None
    if kind in ("varbinary", "binary"):
        if isinstance(value, bytes):
            return value
        text = str(value)
        if style == 2:
            try:
                return bytes.fromhex(text)
            except ValueError:
                raise SqlError(8114, "Error converting data type varchar to varbinary.") from None
        return text.encode("latin-1", "replace")
    if kind in ("varchar", "nvarchar", "char", "nchar"):
        text = ("0x" if style == 1 else "") + value.hex().upper() if isinstance(value, bytes) and style in (1, 2) \
            else value.decode("latin-1") if isinstance(value, bytes) else str(value)
        size = re.search(r"\((\d+)\)", sql_type)
        return text[:int(size.group(1))] if size else text
    if kind in ("int", "bigint", "smallint", "tinyint"):
        return int(value)
    if kind in ("float", "real"):
        return float(value)
    if kind == "vector":
        return to_vector(value, vector_dimensions(sql_type))
    return value


def check_value(sql_type: str, value: Any, where: str) -> Any:
    """A value as a column, variable or parameter of `sql_type` takes it (implicit conversion rules)."""
    kind = base_type(sql_type)
    if value is None:
        return None
    if isinstance(value, (np.generic,)):
        value = value.item()
    if kind in ("float", "real"):
        if isinstance(value, bytes):
            raise SqlError(257, f"Implicit conversion from varbinary to {kind} is not allowed ({where}).")
        value = float(value)
        if not math.isfinite(value):
            raise SqlError(8023, f"The supplied value is not a valid instance of data type float ({where}).")
        return value
    if kind in ("varbinary", "binary") and not isinstance(value, bytes):
        raise SqlError(257, f"Implicit conversion from data type varchar to {kind} is not allowed. "
                            f"Use the CONVERT function ({where}).")
    if kind in ("varchar", "nvarchar", "char", "nchar") and isinstance(value, bytes):
        raise SqlError(257, f"Implicit conversion from data type varbinary to {kind} is not allowed ({where}).")
    if kind in ("int", "bigint", "smallint", "tinyint", "bit"):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise SqlError(245, f"Conversion failed when converting {value!r} to data type int ({where}).",
                           True) from None
    if kind == "vector":
        return to_vector(value, vector_dimensions(sql_type))
    return value


def vector_distance(metric: str, a: Any, b: Any) -> float | None:
    if a is None or b is None:
        return None
    u, v = (np.asarray(_json(x), dtype=np.float32).astype(np.float64) for x in (a, b))
    if u.shape != v.shape:
        raise SqlError(42204, "VECTOR_DISTANCE: the vectors have different dimensions")
    if metric == "euclidean":
        return float(np.sqrt(np.sum((u - v) ** 2)))
    if metric == "cosine":
        return float(1.0 - u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    if metric == "dot":
        return float(-(u @ v))
    raise SqlError(42206, f"VECTOR_DISTANCE: unknown metric {metric!r}")


# ---------------------------------------------------------------- T-SQL -> SQLite
def _function(name: str, *args: exp.Expression) -> exp.Anonymous:
    return exp.Anonymous(this=name, expressions=list(args))


def _type_text(node: exp.DataType) -> str:
    return node.sql(dialect="tsql").lower()


def _branches(tree: exp.Expression) -> list[exp.Select]:
    """The SELECTs whose rows a query returns: itself, or each branch of its UNIONs."""
    if isinstance(tree, exp.Union):
        return _branches(tree.left) + _branches(tree.right)
    return [tree] if isinstance(tree, exp.Select) else []


def _openjson(node: exp.OpenJSON) -> exp.Expression:
    """OPENJSON(x) WITH (...) as its typed columns; without WITH as SQL Server's (key, value, type) rows."""
    columns = ", ".join(f"{_column_from_json(col)} AS {col.this.sql()}" for col in node.expressions) or (
        "CAST(key AS TEXT) AS key, value, CASE type WHEN 'null' THEN 0 WHEN 'text' THEN 1 WHEN 'integer' THEN 2 "
        "WHEN 'real' THEN 2 WHEN 'true' THEN 3 WHEN 'false' THEN 3 WHEN 'array' THEN 4 ELSE 5 END AS type")
    source = node.this.sql(dialect="sqlite")
    return sqlglot.parse_one(f"(SELECT {columns} FROM json_each(tsql_json_array({source})))", read="sqlite")


def _column_from_json(col: exp.OpenJSONColumnDef) -> str:
    path = col.args.get("path").sql(dialect="sqlite") if col.args.get("path") else f"'$.{col.this.name}'"
    return f"tsql_convert('{_type_text(col.args['kind'])}', json_extract(value, {path}), NULL)"


def _for_json(node: exp.Select) -> exp.Expression:
    """`SELECT ... FOR JSON PATH [, WITHOUT_ARRAY_WRAPPER]` as a SELECT of one JSON text (json_object, ForJson)."""
    clause = node.args["for_"]
    options = {option.name.upper() for option in clause.expressions}
    if str(clause.args.get("kind")).upper() != "JSON" or "PATH" not in options \
            or options - {"PATH", "WITHOUT_ARRAY_WRAPPER"}:
        raise SqlError(102, f"only FOR JSON PATH [, WITHOUT_ARRAY_WRAPPER] is emulated: {clause.sql(dialect='tsql')}",
                       True)
    spec, values = [], []
    for column in node.expressions:
        value = column.this if isinstance(column, exp.Alias) else column
        if not column.alias_or_name or "." in column.alias_or_name:
            raise SqlError(13605, "FOR JSON: every column needs a plain name (no nesting by dotted names emulated)",
                           True)
        embedded = isinstance(value, exp.JSONExtract) and bool(value.args.get("json_query")) \
            or isinstance(value, exp.Subquery) and bool(value.this.args.get("for_"))
        spec.append([column.alias_or_name, embedded])
        values.append(value.this if isinstance(value, exp.JSONExtract) else value)
    rows = node.copy()
    rows.set("for_", None)
    rows.set("expressions", [exp.alias_(_function("tsql_json_object", exp.Literal.string(json.dumps(spec)),
                                                  *[v.copy() for v in values]), "tsql_json")])
    wrapped = exp.Literal.number(int("WITHOUT_ARRAY_WRAPPER" not in options))
    return exp.select(_function("tsql_for_json", exp.column("tsql_json"), wrapped)).from_(
        exp.Subquery(this=rows.transform(_rewrite)))


def _values(node: exp.Values) -> exp.Expression:
    """`(VALUES ...) AS v (a, b)`, whose column names SQLite cannot take, as a SELECT naming its columns."""
    alias = node.args["alias"]
    names = [c.name for c in alias.columns]
    rows = node.copy()
    rows.set("alias", None)
    select = sqlglot.parse_one(f"SELECT {', '.join(f'column{k} AS {n}' for k, n in enumerate(names, 1))}"
                               f" FROM ({rows.sql(dialect='sqlite')})", read="sqlite")
    return exp.Subquery(this=select, alias=exp.TableAlias(this=alias.this))


def _is_text(node: exp.Expression) -> bool:
    """Whether an expression is text by its literals: T-SQL's + on text concatenates."""
    return isinstance(node, exp.National) or isinstance(node, exp.Literal) and node.is_string \
        or isinstance(node, exp.Add) and (_is_text(node.this) or _is_text(node.expression))


def _rewrite(node: exp.Expression) -> exp.Expression:
    if isinstance(node, exp.Add) and _is_text(node):
        return exp.DPipe(this=node.this.transform(_rewrite), expression=node.expression.transform(_rewrite))
    if isinstance(node, exp.Select) and node.args.get("for_"):
        return _for_json(node)
    if isinstance(node, exp.Values) and node.args.get("alias") and node.args["alias"].columns:
        return _values(node)
    if isinstance(node, exp.National):
        return exp.Literal.string(node.this)
    if isinstance(node, exp.Table):
        node.set("db", None)
        if node.this and node.this.args.get("temporary"):
            node.set("this", exp.to_identifier("tmp_" + node.name))
        if isinstance(node.this, exp.OpenJSON):
            return exp.Subquery(this=_openjson(node.this).this, alias=node.args.get("alias"))
    if isinstance(node, exp.Column) and node.table and node.args.get("db"):
        node.set("db", None)
    if isinstance(node, exp.Column) and node.table and node.args["table"].args.get("temporary"):
        node.set("table", exp.to_identifier("tmp_" + node.table))  # #t.column
    if isinstance(node, exp.Convert):
        style = node.args.get("style") or exp.Null()
        return _function("tsql_convert", exp.Literal.string(_type_text(node.this)), node.expression, style)
    if isinstance(node, exp.Cast) and node.to.this == exp.DataType.Type.VECTOR:
        return _function("tsql_convert", exp.Literal.string(_type_text(node.to)), node.this, exp.Null())
    if isinstance(node, exp.Cast) and node.to.this in (exp.DataType.Type.VARBINARY, exp.DataType.Type.BINARY):
        return _function("tsql_convert", exp.Literal.string(_type_text(node.to)), node.this, exp.Null())
    if isinstance(node, exp.JSONExtractScalar):
        path = node.expression.sql(dialect="tsql")
        return _function("tsql_json_value", node.this, exp.Literal.string(unquote(path) if "'" in path else path))
    if isinstance(node, exp.DataType) and node.expressions and node.expressions[0].name.upper() == "MAX":
        node.set("expressions", [])
    return node


def _add_type_checks(tree: exp.Create) -> None:
    """CHECK constraints that hold SQLite to SQL Server's column types (binary, float without NaN, vectors)."""
    for col in tree.find_all(exp.ColumnDef):
        kind, name = col.args.get("kind"), col.this.sql(dialect="sqlite")
        if kind is None:
            continue
        text = _type_text(kind)
        check = {"varbinary": f"typeof({name}) IN ('blob', 'null')", "binary": f"typeof({name}) IN ('blob', 'null')",
                 "float": f"typeof({name}) IN ('real', 'integer', 'null')",
                 "vector": f"tsql_convert('{text}', {name}, NULL) IS {name}"}.get(base_type(text))
        if check:
            constraint = exp.ColumnConstraint(kind=exp.CheckColumnConstraint(
                this=sqlglot.parse_one(check, read="sqlite")))
            col.set("constraints", [*col.args.get("constraints", []), constraint])


def to_sqlite(tsql: str) -> str:
    text = re.sub(r"@@TRANCOUNT", "@tsql_trancount", tsql, flags=re.IGNORECASE)
    tree = sqlglot.parse_one(text, read="tsql")
    if isinstance(tree, exp.Create):
        _add_type_checks(tree)
    for column in tree.find_all(exp.Column):  # OUTPUT INSERTED.x becomes RETURNING x
        if column.table.upper() == "INSERTED":
            column.set("table", None)
    tree = tree.transform(_rewrite).transform(
        lambda node: exp.Literal.string(node.this) if isinstance(node, exp.National) else node)
    sql = tree.sql(dialect="sqlite")
    return sql.replace("DEFAULT SYSUTCDATETIME()", "DEFAULT CURRENT_TIMESTAMP")


def column_types(create_sql: str) -> tuple[str, dict[str, str]]:
    """(table name as SQLite sees it, {column: T-SQL type}) of a CREATE TABLE statement."""
    tree = sqlglot.parse_one(create_sql, read="tsql")
    table = tree.find(exp.Table)
    name = ("tmp_" if table.this.args.get("temporary") else "") + table.name
    return name.lower(), {c.name.lower(): _type_text(c.args["kind"]) for c in tree.find_all(exp.ColumnDef)}


def named_constraints(create_sql: str) -> tuple[str, list[tuple[str, list[str]]], list[tuple[str, int]]]:
    """A CREATE TABLE statement without its UNIQUE constraints and with every column CHECK named, (name, columns)
    of each UNIQUE, (name, column position from 1) of each CHECK. SQL Server backs a UNIQUE with a unique index of
    the constraint's name; the emulation creates that index, which ALTER TABLE ... DROP CONSTRAINT can drop (SQLite
    cannot drop an inline UNIQUE). An unnamed constraint is named as SQL Server names it: UQ__table__ or
    CK__table__column__, then 16 hex digits."""
    tree = sqlglot.parse_one(create_sql, read="tsql")
    table, uniques, checks = tree.find(exp.Table).name, [], []
    for position, col in enumerate(tree.find_all(exp.ColumnDef), 1):
        digest = hashlib.sha256(f"{table}.{col.name}".encode()).hexdigest()[:16].upper()
        constraints = col.args.get("constraints") or []
        for constraint in constraints:
            if isinstance(constraint.kind, exp.CheckColumnConstraint):
                if not constraint.this:
                    constraint.set("this", exp.to_identifier(f"CK__{table[:9]}__{col.name[:5]}__{digest}"))
                checks.append((constraint.this.name, position))
        kept = [c for c in constraints if not isinstance(c.kind, exp.UniqueColumnConstraint)]
        if len(kept) < len(constraints):
            uniques.append((f"UQ__{table[:8]}__{digest}", [col.name]))
            col.set("constraints", kept)
    for constraint in list(tree.find_all(exp.Constraint)):
        unique = constraint.find(exp.UniqueColumnConstraint)
        if unique is not None:
            uniques.append((constraint.name, [c.name for c in unique.this.expressions]))
            constraint.pop()
    return (tree.sql(dialect="tsql") if uniques or checks else create_sql), uniques, checks


def table_id(name: str) -> int:
    """A table's object id (OBJECT_ID, sys.key_constraints, sys.index_columns): stable per name."""
    return 1000 + zlib.crc32(name.lower().encode()) % 1_000_000_000


CATALOG_VIEWS = (
    # sys.key_constraints: the UNIQUE constraints (the emulation keeps no PRIMARY KEY rows), each backed by the
    # unique index of its name (named_constraints)
    ("CREATE VIEW key_constraints AS SELECT c.name AS name, OBJECT_ID(c.table_name, 'U') AS parent_object_id,"
     " c.type AS type, i.rowid AS unique_index_id FROM tsql_constraints AS c"
     " JOIN sqlite_master AS i ON i.type = 'index' AND i.name = c.name"),
    # sys.index_columns: each index's columns, column_id counted from 1 in the table's column order
    ("CREATE VIEW index_columns AS SELECT OBJECT_ID(i.tbl_name, 'U') AS object_id, i.rowid AS index_id,"
     " k.seqno + 1 AS index_column_id, k.cid + 1 AS column_id FROM sqlite_master AS i, pragma_index_info(i.name) AS k"
     " WHERE i.type = 'index'"),
    # sys.check_constraints: each CHECK the scripts declared, parent_column_id 0 for a table-level one
    ("CREATE VIEW check_constraints AS SELECT name, OBJECT_ID(table_name, 'U') AS parent_object_id,"
     " column_id AS parent_column_id FROM tsql_constraints WHERE type = 'C'"),
    # INFORMATION_SCHEMA.COLUMNS: the columns of every table and view
    ("CREATE VIEW columns AS SELECT 'dbo' AS table_schema, m.name AS table_name, c.name AS column_name"
     " FROM sqlite_master AS m, pragma_table_info(m.name) AS c WHERE m.type IN ('table', 'view')"),
)
"""The catalog views 02_Migrate.sql and the view source read (sys. and INFORMATION_SCHEMA. are dropped like dbo.)."""


# ---------------------------------------------------------------- the server
class Server:
    """SQL Server as far as SQLR/ needs it, over one SQLite connection (one session)."""

    def __init__(self, path: str = ":memory:", *, vector_type: bool = False) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.vector_type = vector_type
        self.procedures: dict[str, Procedure] = {}
        self.tables: dict[str, dict[str, str]] = {}
        self.trancount, self.doomed, self.xact_abort = 0, False, False
        self.try_depth, self.insert_exec_depth = 0, 0
        self.errors: list[SqlError] = []
        self.caught: list[SqlError] = []
        self.external_calls = 0
        self.databases = {"master"}
        self.user: str | None = None  # None: a sysadmin (dbo); else a database user, checked against `grants`
        self.principals: dict[str, set[str]] = {}  # user or role -> the roles it is a member of
        self.grants: set[tuple[str, str, str]] = set()  # (permission, securable, principal)
        self.conn.execute("CREATE TABLE database_scoped_configurations (name TEXT, value INTEGER)")
        self.conn.executemany("INSERT INTO database_scoped_configurations VALUES (?, 0)",
                              [("PREVIEW_FEATURES",), ("ALLOW_STALE_VECTOR_INDEX",)])
        self.conn.execute("CREATE TABLE indexes (name TEXT)")
        self.conn.execute("CREATE TABLE configurations (name TEXT, value_in_use INTEGER)")
        self.conn.execute("INSERT INTO configurations VALUES ('external scripts enabled', 1)")
        self.conn.execute("CREATE TABLE tsql_constraints (name TEXT PRIMARY KEY, table_name TEXT NOT NULL, type TEXT,"
                          " column_id INTEGER)")
        for name, arity, fn in [
            ("tsql_convert", 3, convert), ("tsql_json_value", 2, json_value), ("ISJSON", 1, is_json),
            ("tsql_json_array", 1, self._json_array), ("DATALENGTH", 1, lambda v: None if v is None else len(v)),
            ("VECTOR_DISTANCE", 3, vector_distance), ("SCOPE_IDENTITY", 0, self._identity),
            ("SHA2", 2, lambda v, bits: None if v is None else hashlib.sha256(  # HASHBYTES('SHA2_256', v)
                v if isinstance(v, bytes) else str(v).encode("utf-16-le")).digest()),
            ("ERROR_MESSAGE", 0, lambda: self.caught[-1].message if self.caught else None),
            ("ERROR_NUMBER", 0, lambda: self.caught[-1].number if self.caught else None),
            ("XACT_STATE", 0, lambda: -1 if self.doomed else int(self.trancount > 0)),
            ("CONCAT", -1, lambda *parts: "".join("" if p is None else str(p) for p in parts)),
            ("DB_ID", 1, lambda name: 1 if name.lower() in self.databases else None), ("SYSUTCDATETIME", 0, lambda: "2026-01-01T00:00:00"),
            ("TYPE_ID", 1, lambda name: 1 if name.lower() == "vector" and self.vector_type else None),
            ("OBJECT_ID", 2, self._object_id), ("OBJECT_ID", 1, lambda name: self._object_id(name, None)),
            ("COL_LENGTH", 2, self._col_length), ("COL_NAME", 2, self._col_name),
            ("QUOTENAME", 1, lambda name: None if name is None or len(name) > 128 else f"[{name.replace(']', ']]')}]"),
            ("SERVERPROPERTY", 1, lambda name: {"productmajorversion": "17" if self.vector_type else "16"}.get(
                name.lower())),
            ("DATABASE_PRINCIPAL_ID", 1, lambda name: 1 if name.lower() in self.principals else None),
            ("tsql_vector_index_read_only", 1, self._read_only),
        ]:
            self.conn.create_function(name, arity, self._guarded(fn))
        self.conn.create_function("tsql_json_object", -1, self._guarded(json_object))
        self.conn.create_aggregate("tsql_for_json", 2, ForJson)
        for view in CATALOG_VIEWS:
            self.conn.execute(view)
        self._last_id = None

    # helpers reachable from SQL
    def _guarded(self, fn):
        def call(*args):
            try:
                return fn(*args)
            except SqlError as err:
                self._pending = err
                raise
        return call

    def _json_array(self, text: Any) -> str:
        value = _json(text)
        if not isinstance(value, list):
            raise SqlError(13609, "OPENJSON: not a JSON array")
        return json.dumps(value)

    def _identity(self) -> int | None:
        return self._last_id

    def _read_only(self, table: str) -> None:
        (stale,) = self.conn.execute(
            "SELECT value FROM database_scoped_configurations WHERE name = 'ALLOW_STALE_VECTOR_INDEX'").fetchone()
        if not stale:
            raise SqlError(42230, f"The table '{table}' has a vector index and is read-only: data modification "
                                  "statements fail unless ALLOW_STALE_VECTOR_INDEX is ON.")

    # permissions
    def roles_of(self, principal: str) -> set[str]:
        """The principal, its roles and theirs; every user is in public."""
        found, todo = {"public"}, [principal]
        while todo:
            name = todo.pop()
            if name not in found:
                found.add(name)
                todo += self.principals.get(name, set())
        return found

    def require(self, permission: str, securables: tuple[str, ...], what: str) -> None:
        """Refuse the current user `permission` unless granted on one of `securables` (an object, its schema,
        the database) to the user or one of its roles. A sysadmin (user None) has every permission."""
        if self.user is None:
            return
        held = self.roles_of(self.user)
        if not any((permission, s, p) in self.grants for s in securables for p in held):
            number, text = (297, "The user does not have permission to perform this action.") \
                if permission == "EXECUTE ANY EXTERNAL SCRIPT" else \
                (229, f"The {permission} permission was denied on the object '{what}', schema 'dbo'.")
            raise SqlError(number, f"{text} ({permission} for user {self.user})", True)

    def require_on_object(self, permission: str, name: str) -> None:
        shown = name.split(".")[-1].strip("[]")
        bare = shown.lower()
        if not bare.startswith(("#", "tmp_")):
            self.require(permission, (f"object::dbo.{bare}", "schema::dbo", "database"), shown)

    def require_statement(self, text: str) -> None:
        """A client's own statement: its verb on the table it writes, SELECT on every other table it names."""
        tree = sqlglot.parse_one(text, read="tsql")
        verb = {exp.Insert: "INSERT", exp.Update: "UPDATE", exp.Delete: "DELETE"}.get(type(tree), "SELECT")
        target = tree.find(exp.Table) if verb != "SELECT" else None
        for table in tree.find_all(exp.Table):
            self.require_on_object(verb if table is target else "SELECT", table.name)

    def security(self, text: str) -> bool:
        """CREATE ROLE, CREATE USER ... WITHOUT LOGIN, ALTER ROLE ... ADD MEMBER, GRANT; True when `text` is one."""
        words = re.sub(r"\s*:\s*:\s*", "::", text).split()  # the tokenizer splits SCHEMA::dbo
        head = " ".join(w.upper() for w in words[:2])
        if head in ("CREATE ROLE", "CREATE USER"):
            name = words[2].strip("[]").lower()
            if name in self.principals:
                raise SqlError(15023, f"User, group, or role '{name}' already exists in the current database.", True)
            self.principals[name] = set()
        elif head == "ALTER ROLE":
            found = re.fullmatch(r"ALTER ROLE \[?(\w+)\]? ADD MEMBER \[?(\w+)\]?", " ".join(words), re.IGNORECASE)
            role, member = found.group(1).lower(), found.group(2).lower()
            if role not in self.principals or member not in self.principals:
                raise SqlError(15151, f"Cannot alter the role '{role}': it or '{member}' does not exist.", True)
            self.principals[member].add(role)
        elif words[0].upper() == "GRANT":
            found = re.fullmatch(r"GRANT (.+?)(?: ON (\S+))? TO \[?(\w+)\]?", " ".join(words), re.IGNORECASE)
            permissions, securable, principal = found.groups()
            if principal.lower() not in self.principals:
                raise SqlError(15151, f"Cannot find the user or role '{principal}'.", True)
            target = "database" if securable is None else securable.lower() if "::" in securable \
                else f"object::dbo.{securable.split('.')[-1].strip('[]').lower()}"
            for permission in permissions.split(","):
                self.grants.add((" ".join(permission.split()).upper(), target, principal.lower()))
        else:
            return False
        return True

    def _object_id(self, name: str, kind: str | None) -> int | None:
        bare = name.split(".")[-1].strip("[]").lower()
        if bare.startswith("#"):
            bare = "tmp_" + bare[1:]
        if kind in (None, "U") and bare in self.tables:
            return table_id(bare)
        if kind in (None, "P") and bare in self.procedures:
            return 2
        if kind in (None, "V") and self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'view' AND name = ?",
                                                     (bare,)).fetchone():
            return 3
        return None

    def _col_length(self, table: str, column: str) -> int | None:
        """Whether the column of the table or view exists (its byte length in SQL Server; here 1), else NULL."""
        bare = table.split(".")[-1].strip("[]").lower()
        if bare in self.tables:
            return 1 if column.lower() in self.tables[bare] else None
        found = self.conn.execute("SELECT 1 FROM sqlite_master AS m, pragma_table_info(m.name) AS c WHERE m.type ="
                                  " 'view' AND m.name = ? AND c.name = ? COLLATE NOCASE", (bare, column)).fetchone()
        return 1 if found else None

    def _col_name(self, object_id: int, column_id: int) -> str | None:
        """COL_NAME: the column's name by the table's id and the column's position from 1, else NULL."""
        for table, columns in self.tables.items():
            if table_id(table) == object_id and 0 < column_id <= len(columns):
                return list(columns)[column_id - 1]
        return None

    # scripts
    def run_script(self, text: str, variables: dict[str, str] | None = None) -> None:
        for name, value in (variables or {}).items():
            text = text.replace(f"$({name})", value)
        for batch in re.split(r"(?im)^\s*GO\s*$", text):
            if batch.strip():
                self.run_batch(batch)

    def run_batch(self, batch: str) -> list[pd.DataFrame]:
        found = re.match(r"\s*(?:--[^\n]*\n\s*)*CREATE\s+OR\s+ALTER\s+PROCEDURE\s+(?:dbo\.)?(\w+)(.*?)\bAS\s+BEGIN\b(.*)",
                         batch, re.IGNORECASE | re.DOTALL)
        if found:
            name, header, rest = found.groups()
            body, _ = parse_block(tokens(rest), 0, ("END",))
            self.procedures[name.lower()] = Procedure(name, declarations(header) if header.strip() else [], body)
            return []
        return self._top(lambda frame, results: self.block(parse_block(tokens(batch) + ["END"], 0, ("END",))[0],
                                                           frame, results))

    def call(self, name: str, /, **params: Any) -> tuple[list[pd.DataFrame], dict[str, Any]]:
        """EXEC dbo.name with these parameters, as a client sends them: (result sets, OUTPUT parameters).
        Raises the first error the batch met, after the batch went as far as SQL Server would let it."""
        outputs: dict[str, Any] = {}

        def run(frame: Frame, results: list) -> None:
            procedure = self.procedures[name.lower()]
            self.require_on_object("EXECUTE", name)  # the client's call; nested calls chain ownership (dbo)
            for key, value in params.items():
                (sql_type,) = [t for n, t, _, _ in procedure.params if n == key.lower()]
                frame.values[key.lower()], frame.types[key.lower()] = check_value(sql_type, value, f"@{key}"), sql_type
            outputs.update(self.execute(procedure, {k.lower(): f"@{k.lower()}" for k in params}, frame, results))
        results = self._top(run)
        return results, outputs

    def drop_temporary(self, frame: Frame) -> None:
        """Temporary tables end with the procedure (or batch) that created them."""
        for name in frame.temp_tables:
            self.conn.execute(f"DROP TABLE IF EXISTS temp.{name}")
            self.tables.pop(name, None)

    def _top(self, run) -> list[pd.DataFrame]:
        results: list[pd.DataFrame] = []
        self.errors, self.xact_abort = [], False
        top = Frame()
        try:
            run(top, results)
        except SqlError as err:
            self.errors.append(err)
            if self.trancount and (self.xact_abort or self.doomed):
                self._rollback()
        except Return:
            pass
        if self.trancount:  # a batch may leave a transaction open; the client's tests never do
            self._rollback()
            self.errors.append(SqlError(266, "Transaction count after EXECUTE indicates a mismatching number of "
                                             "BEGIN and COMMIT statements."))
        for (name,) in self.conn.execute("SELECT name FROM sqlite_temp_master WHERE type = 'table'").fetchall():
            self.conn.execute(f"DROP TABLE temp.{name}")  # whatever a rollback brought back
            self.tables.pop(name, None)
        if self.errors:
            raise self.errors[0]
        return results

    # execution
    def execute(self, procedure: Procedure, arguments: dict[str, str], caller: Frame,
                results: list) -> dict[str, Any]:
        """Run a procedure with `arguments` ({param: SQL expression in the caller}); its OUTPUT values by param."""
        frame = Frame()
        for name, sql_type, default, _ in procedure.params:
            frame.types[name] = sql_type
            source = arguments.pop(name, None)
            if source is None:
                source = default if default is not None else "NULL"
            source = re.sub(r"\s+OUTPUT$", "", source, flags=re.IGNORECASE)
            frame.values[name] = check_value(sql_type, self.scalar(source, caller), f"@{name}")
        if arguments:
            raise SqlError(8145, f"{', '.join(arguments)} is not a parameter for procedure {procedure.name}.", True)
        saved = self.xact_abort
        try:
            self.block(procedure.body, frame, results)
        except Return:
            pass
        finally:
            self.xact_abort = saved
            self.drop_temporary(frame)
        return {name: frame.values[name] for name, _, _, output in procedure.params if output}

    def block(self, body: list, frame: Frame, results: list) -> None:
        for stmt in body:
            try:
                self.statement(stmt, frame, results)
            except SqlError as err:
                if self.try_depth or self.xact_abort or err.batch_abort:
                    raise
                self.errors.append(err)  # XACT_ABORT OFF: the statement ends, the batch goes on

    def statement(self, stmt: tuple, frame: Frame, results: list) -> None:
        kind = stmt[0]
        if kind == "block":
            self.block(stmt[1], frame, results)
        elif kind == "try":
            self.try_depth += 1
            try:
                self.block(stmt[1], frame, results)
            except SqlError as err:
                if self.xact_abort and self.trancount:
                    self.doomed = True
                self.try_depth -= 1
                self.caught.append(err)
                try:
                    self.block(stmt[2], frame, results)
                finally:
                    self.caught.pop()
            else:
                self.try_depth -= 1
        elif kind == "if":
            if self.truth(stmt[1], frame):
                self.statement(stmt[2], frame, results)
            elif stmt[3] is not None:
                self.statement(stmt[3], frame, results)
        elif kind == "while":
            while self.truth(stmt[1], frame):
                try:
                    self.statement(stmt[2], frame, results)
                except Break:
                    break
                except Continue:
                    continue
        elif kind == "break":
            raise Break
        elif kind == "continue":
            raise Continue
        elif kind == "return":
            raise Return
        else:
            self.simple(stmt[1], frame, results)

    def truth(self, condition: str, frame: Frame) -> bool:
        return bool(self.scalar(f"CASE WHEN {condition} THEN 1 ELSE 0 END", frame))

    def scalar(self, expression: str, frame: Frame) -> Any:
        return self.query(f"SELECT {expression}", frame)[1][0][0]

    def query(self, tsql: str, frame: Frame) -> tuple[list[str], list[tuple]]:
        """Run one T-SQL statement on SQLite with the frame's variables bound: (column names, rows)."""
        names = {n.lower() for n in re.findall(r"(?<!@)@(\w+)", re.sub(r"N?'(?:[^']|'')*'", "", tsql))}
        unknown = names - set(frame.values) - {"tsql_trancount"}
        if unknown:
            raise SqlError(137, f"Must declare the scalar variable \"@{min(unknown)}\".", True)
        try:
            sql = to_sqlite(re.sub(r"(?<!@)@(\w+)", lambda m: "@" + m.group(1).lower(), tsql))
        except sqlglot.errors.ParseError as err:
            raise SqlError(102, f"Incorrect syntax: {str(err).splitlines()[0]} [{tsql[:200]}]", True) from None
        bound = {**frame.values, "tsql_trancount": self.trancount}
        self._pending = None
        try:
            cursor = self.conn.execute(sql, {k: bound[k] for k in set(re.findall(r"@(\w+)", sql))})
            rows = cursor.fetchall()
        except sqlite3.Error as err:
            if self._pending is not None:
                raise self._pending from None
            raise SqlError(547 if "constraint" in str(err).lower() else 8180, f"{err} [{sql[:200]}]") from None
        if cursor.lastrowid and re.match(r"\s*INSERT", sql, re.IGNORECASE):
            self._last_id = cursor.lastrowid
        return [d[0] for d in cursor.description or []], rows

    def simple(self, text: str, frame: Frame, results: list) -> None:
        words = text.split()
        head = " ".join(w.upper() for w in words[:2])
        if head in ("CREATE DATABASE", "DROP DATABASE"):  # one SQLite file holds them all; DB_ID knows the names
            name = words[2].strip("[];").lower()
            self.databases.add(name) if head == "CREATE DATABASE" else self.databases.discard(name)
            return
        if head.startswith(("SET NOCOUNT", "PRINT")) or self.security(text):
            return
        if head == "EXECUTE AS" or head == "EXEC AS":  # EXECUTE AS USER = N'name': the session runs as that user
            name = unquote(text.split("=", 1)[1].strip()).lower()
            if name not in self.principals:
                raise SqlError(15517, f"Cannot execute as the database principal '{name}'.", True)
            self.user = name
            return
        if words[0].upper() == "REVERT":
            self.user = None
            return
        if head == "ALTER DATABASE":
            found = re.fullmatch(r"ALTER DATABASE SCOPED CONFIGURATION SET (\w+) = (ON|OFF)", " ".join(words),
                                 re.IGNORECASE)
            self.require("ALTER ANY DATABASE SCOPED CONFIGURATION", ("database",), "database")
            self.conn.execute("UPDATE database_scoped_configurations SET value = ? WHERE name = ?",
                              (int(found.group(2).upper() == "ON"), found.group(1).upper()))
        elif head == "SET XACT_ABORT":
            self.xact_abort = words[2].upper() == "ON"
        elif words[0].upper() == "SET":
            found = re.match(r"SET\s+@(\w+)\s*=\s*(.*)", text, re.IGNORECASE | re.DOTALL)
            self.assign(frame, found.group(1).lower(), self.scalar(found.group(2), frame))
        elif words[0].upper() == "DECLARE":
            for name, sql_type, default, _ in declarations(text[len(words[0]):]):
                frame.types[name], frame.values[name] = sql_type, None
                if default is not None:
                    self.assign(frame, name, self.scalar(default, frame))
        elif words[0].upper() == "THROW":
            self.throw(text, frame)
        elif head in ("BEGIN TRAN", "BEGIN TRANSACTION"):
            if self.trancount == 0:
                self.conn.execute("BEGIN")
            self.trancount += 1
        elif words[0].upper() == "COMMIT":
            if self.doomed:
                raise SqlError(3930, "The current transaction cannot be committed. Roll back the transaction.", True)
            if self.trancount == 0:
                raise SqlError(3902, "The COMMIT TRANSACTION request has no corresponding BEGIN TRANSACTION.")
            self.trancount -= 1
            if self.trancount == 0:
                self.conn.execute("COMMIT")
        elif words[0].upper() == "ROLLBACK":
            if self.insert_exec_depth:
                raise SqlError(3915, "Cannot use the ROLLBACK statement within an INSERT-EXEC statement.", True)
            if self.trancount == 0:
                raise SqlError(3903, "The ROLLBACK TRANSACTION request has no corresponding BEGIN TRANSACTION.")
            self._rollback()
        elif words[0].upper() in ("EXEC", "EXECUTE"):
            results.extend(self.exec_call(text.split(None, 1)[1], frame))
        elif re.match(r"INSERT\s+INTO\s+\S+\s*\([^)]*\)\s*EXEC", text, re.IGNORECASE):
            self.insert_exec(text, frame)
        elif head == "CREATE TABLE":
            name, types = column_types(text)
            if name in self.tables and name.startswith("tmp_"):
                raise SqlError(2714, f"There is already an object named '#{name[4:]}' in the database (a nested "
                                     "procedure must not reuse its caller's temporary table names).", True)
            if name.startswith("tmp_"):
                self.query(text, frame)
                frame.temp_tables.append(name)
            else:
                definition, uniques, checks = named_constraints(text)
                self.query(definition, frame)
                for constraint, columns in uniques:
                    self.conn.execute(f'CREATE UNIQUE INDEX "{constraint}" ON {name} ({", ".join(columns)})')
                    self.conn.execute("INSERT INTO tsql_constraints VALUES (?, ?, 'UQ', 0)", (constraint, name))
                self.conn.executemany("INSERT INTO tsql_constraints VALUES (?, ?, 'C', ?)",
                                      [(constraint, name, column) for constraint, column in checks])
            self.tables[name] = types
        elif head == "ALTER TABLE":
            self.alter_table(text)
        elif re.match(r"CREATE\s+VECTOR\s+INDEX", text, re.IGNORECASE):
            self.vector_index(text)
        elif re.match(r"SELECT\s+(TOP\s*\([^)]*\)\s*)?@\w+\s*=", text, re.IGNORECASE):
            self.select_assign(text, frame)
        else:
            columns, rows = self.query(text, frame)
            if words[0].upper() == "SELECT" and columns:
                results.append(pd.DataFrame(rows, columns=columns))

    def assign(self, frame: Frame, name: str, value: Any) -> None:
        if name not in frame.values:
            raise SqlError(137, f"Must declare the scalar variable \"@{name}\".", True)
        frame.values[name] = check_value(frame.types[name], value, f"@{name}")

    def select_assign(self, text: str, frame: Frame) -> None:
        found = re.match(r"SELECT\s+(TOP\s*\([^)]*\)\s*)?(.*?)(\s+FROM\s.*)?$", text, re.IGNORECASE | re.DOTALL)
        targets, expressions = [], []
        for part in split_arguments(found.group(2)):
            name, expression = re.match(r"@(\w+)\s*=\s*(.*)", part.strip(), re.DOTALL).groups()
            targets.append(name.lower())
            expressions.append(expression)
        _, rows = self.query(f"SELECT {found.group(1) or ''}{', '.join(expressions)}{found.group(3) or ''}", frame)
        if rows:  # T-SQL: the last row's values; no row leaves the variables as they were
            for name, value in zip(targets, rows[-1]):
                self.assign(frame, name, value)

    def throw(self, text: str, frame: Frame) -> None:
        arguments = split_arguments(text[len("THROW"):])
        if not arguments:
            if not self.caught:
                raise SqlError(10704, "To rethrow an error, a THROW statement must be used inside a CATCH block.", True)
            raise SqlError(self.caught[-1].number, self.caught[-1].message, True)
        number, message, _ = (self.scalar(a, frame) for a in arguments)
        raise SqlError(int(number), str(message), True)

    def _rollback(self) -> None:
        self.conn.execute("ROLLBACK")
        self.trancount, self.doomed = 0, False

    def exec_call(self, text: str, frame: Frame) -> list[pd.DataFrame]:
        name, _, rest = text.partition(" ")
        name = name.split(".")[-1].lower()
        parts = split_arguments(rest)
        dynamic = self.dynamic_sql(parts, frame) if name == "sp_executesql" else None
        arguments = {}
        for part in parts[2 if dynamic and dynamic.params else 1:] if dynamic else parts:
            found = re.match(r"@(\w+)\s*=\s*(.*)", part.strip(), re.DOTALL)
            if not found:
                raise SqlError(102, f"pass parameters by name: {part!r}", True)
            arguments[found.group(1).lower()] = found.group(2).strip()
        if name == "sp_execute_external_script":
            return self.external_script(arguments, frame)
        if dynamic is None and name not in self.procedures:
            raise SqlError(2812, f"Could not find stored procedure '{name}'.", True)
        results: list[pd.DataFrame] = []
        outputs = self.execute(dynamic or self.procedures[name], dict(arguments), frame, results)
        for param, value in outputs.items():
            source = arguments.get(param, "")
            if re.search(r"\bOUTPUT$", source, re.IGNORECASE):
                self.assign(frame, source.split()[0].lstrip("@").lower(), value)
        return results

    def insert_exec(self, text: str, frame: Frame) -> None:
        found = re.match(r"INSERT\s+INTO\s+(\S+)\s*\(([^)]*)\)\s*EXEC(?:UTE)?\s+(.*)", text, re.IGNORECASE | re.DOTALL)
        table = found.group(1).split(".")[-1].replace("#", "tmp_").lower()
        columns = [c.strip().strip("[]").lower() for c in found.group(2).split(",")]
        if self.insert_exec_depth:
            raise SqlError(8164, "An INSERT EXEC statement cannot be nested.")
        self.insert_exec_depth += 1
        try:
            results = self.exec_call(found.group(3), frame)
        finally:
            self.insert_exec_depth -= 1
        types = self.tables[table]
        rows = []
        for result in results:
            if len(result.columns) != len(columns):
                raise SqlError(213, "Column name or number of supplied values does not match table definition.")
            rows += [tuple(check_value(types[c], v, f"{table}.{c}") for c, v in zip(columns, row))
                     for row in result.itertuples(index=False)]
        placeholders, names = ", ".join("?" * len(columns)), ", ".join(f'"{c}"' for c in columns)
        try:
            self.conn.executemany(f"INSERT INTO {table} ({names}) VALUES ({placeholders})", rows)
        except sqlite3.Error as err:
            raise SqlError(515 if "NOT NULL" in str(err) else 547, str(err)) from None

    def external_script(self, arguments: dict[str, str], frame: Frame) -> list[pd.DataFrame]:
        """sp_execute_external_script for Python, with the documented data-type rules."""
        literal = {k: unquote(arguments.pop(k)) for k in ("language", "script", "input_data_1", "params")
                   if k in arguments}
        self.require("EXECUTE ANY EXTERNAL SCRIPT", ("database",), "database")
        if literal.get("language") != "Python":
            raise SqlError(39004, "only @language = N'Python' is emulated", True)
        declared = declarations(literal.get("params", "")) if literal.get("params", "").strip() else []
        scope: dict[str, Any] = {}
        targets: dict[str, str] = {}
        for name, sql_type, _, output in declared:
            if base_type(sql_type) not in PYTHON_TYPES:
                raise SqlError(39004, f"Unsupported type {sql_type} for parameter @{name} in the 'Python' runtime.")
            source = arguments.pop(name, None)
            if source is None:
                raise SqlError(201, f"The external script expects parameter '@{name}', which was not supplied.", True)
            if output:
                found = re.fullmatch(r"@(\w+)\s+OUTPUT", source, re.IGNORECASE)
                if not found:
                    raise SqlError(39004, f"@{name} is declared OUTPUT but not passed as OUTPUT")
                targets[name] = found.group(1).lower()
            if not output:  # OUTPUT variables start unset: the script must set them (see external_script)
                value = self.scalar(source, frame)
                scope[name] = float(value) if base_type(sql_type) == "bigint" and value is not None else value
        if arguments:
            raise SqlError(8145, f"{', '.join(arguments)} is not declared in @params.", True)
        frame_in = pd.DataFrame()
        if literal.get("input_data_1"):
            query = literal["input_data_1"]
            if re.search(r"(?<!@)@\w+", re.sub(r"N?'(?:[^']|'')*'", "", query)):
                raise SqlError(137, "@input_data_1 runs in its own scope: it cannot use the procedure's variables.")
            for table in sqlglot.parse_one(query, read="tsql").find_all(exp.Table):
                self.require_on_object("SELECT", table.name)  # the input query runs as the caller
            columns, rows = self.query(query, Frame())
            for k, column in enumerate(columns):
                if any(isinstance(r[k], bytes) for r in rows):
                    raise SqlError(39004, f"Unsupported input data type in column '{column}': varbinary is not "
                                          "supported by the runtime for 'Python' script.")
            frame_in = pd.DataFrame(rows, columns=columns)
            for column, sql_type in self.input_types(query):
                if base_type(sql_type) not in PYTHON_TYPES:
                    raise SqlError(39004, f"Unsupported input data type {sql_type} in column '{column}' for the "
                                          "'Python' runtime.")
                if base_type(sql_type) == "bigint":  # the mapping's float64, as for parameters
                    frame_in[column] = frame_in[column].astype("float64")
        scope.update(InputDataSet=frame_in, OutputDataSet=pd.DataFrame())
        self.external_calls += 1
        try:
            exec(compile(literal["script"], "@script", "exec"), scope)  # noqa: S102 - the external script runtime
        except Exception as err:  # noqa: BLE001 - every Python error is Msg 39004 (then 39019) to the caller
            raise script_error(f"{type(err).__name__}: {err}") from None
        for name, sql_type, _, output in declared:
            if output:
                if name not in scope:
                    raise script_error(f"BxlServer: the script did not set the output variable {name}")
                value = scope[name]
                if value is not None and base_type(sql_type) in ("varchar", "nvarchar", "char", "nchar") \
                        and not isinstance(value, str):
                    raise SqlError(39004, f"OUTPUT parameter @{name}: a {type(value).__name__} for {sql_type}")
                self.assign(frame, targets[name], check_value(sql_type, value, f"@{name}"))
        data = self._output_data_set(scope["OutputDataSet"])
        return [data] if len(data) or len(data.columns) else []

    def input_types(self, query: str) -> list[tuple[str, str]]:
        """(column, T-SQL type) of each column of an @input_data_1 query whose type its text shows: a table's column,
        CAST or CONVERT, a literal with a decimal point (SQL Server types it numeric); in every branch of a UNION."""
        typed = []
        tree = sqlglot.parse_one(query, read="tsql")
        for select in _branches(tree):
            tables = {t.alias_or_name.lower(): t.name.lower() for t in select.find_all(exp.Table)}
            for column in select.expressions:
                value, sql_type = column.unalias(), None
                if isinstance(value, exp.Column) and (value.table or len(tables) == 1):
                    table = tables.get(value.table.lower(), "") if value.table else next(iter(tables.values()))
                    sql_type = (self.tables.get(table) or self.tables.get(f"tmp_{table}", {})).get(value.name.lower())
                elif isinstance(value, (exp.Cast, exp.Convert)):
                    sql_type = _type_text(value.to if isinstance(value, exp.Cast) else value.this)
                elif isinstance(value, exp.Literal) and value.is_number and "." in value.this:
                    sql_type = "numeric"
                if sql_type:
                    typed.append((column.alias_or_name, "int" if sql_type == "integer" else sql_type))
        return typed

    @staticmethod
    def _output_data_set(data: Any) -> pd.DataFrame:
        if not isinstance(data, pd.DataFrame):
            raise SqlError(39004, "OutputDataSet must be a pandas DataFrame")
        if len(data.columns) == 0:
            return data
        for column in data.columns:  # the Python mapping documents neither; R's maps both to NA
            if len(data) and data[column].isna().all():
                raise script_error(f"OutputDataSet column {column!r} holds only None/NaN (its type is undefined)")
            if data[column].dtype.kind == "f" and data[column].isna().any():
                raise script_error(f"OutputDataSet column {column!r} holds NaN")
        out = data.astype(object).where(pd.notna(data), None)
        for column in out.columns:  # what the Python mapping cannot carry comes back NULL
            if any(isinstance(v, (bytes, bytearray, memoryview)) for v in out[column]):
                out[column] = None
        return out

    def vector_index(self, text: str) -> None:
        if not self.vector_type:
            raise SqlError(102, "Incorrect syntax near 'VECTOR'.", True)
        (preview,) = self.conn.execute(
            "SELECT value FROM database_scoped_configurations WHERE name = 'PREVIEW_FEATURES'").fetchone()
        if not preview:
            raise SqlError(42222, "CREATE VECTOR INDEX is a preview feature: PREVIEW_FEATURES is OFF.")
        found = re.match(r"CREATE\s+VECTOR\s+INDEX\s+(\w+)\s+ON\s+(\S+)\s*\(\s*(\w+)\s*\)\s*WITH\s*\((.*)\)$",
                         text, re.IGNORECASE | re.DOTALL)
        options = dict(re.findall(r"(\w+)\s*=\s*'(\w+)'", found.group(4)))
        table = found.group(2).split(".")[-1].lower()
        if base_type(self.tables[table].get(found.group(3).lower(), "")) != "vector" \
                or options.get("METRIC") not in ("cosine", "euclidean", "dot") or options.get("TYPE", "DiskANN").lower() != "diskann":
            raise SqlError(42223, f"CREATE VECTOR INDEX: not a vector column or unknown options: {text}")
        (rows,) = self.conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {found.group(3)} IS NOT NULL").fetchone()
        if rows < 100:
            raise SqlError(42266, f"Cannot create a vector index. The table contains only {rows} rows with non-null "
                                  "vectors, but at least 100 are required for vector index creation.")
        self.conn.execute("INSERT INTO indexes (name) VALUES (?)", (found.group(1),))
        for action in ("INSERT", "UPDATE", "DELETE"):  # SQL Server 2025's (earlier-version) index: read-only
            self.conn.execute(f"CREATE TRIGGER read_only_{action.lower()}_{table} BEFORE {action} ON {table} "
                              f"BEGIN SELECT tsql_vector_index_read_only('{table}'); END")

    def dynamic_sql(self, parts: list[str], frame: Frame) -> Procedure:
        """EXEC sp_executesql @stmt [, @params, @name = value [OUTPUT], ...]: the text as a procedure of those
        parameters, so it runs in its own scope (no caller variables, its own temporary tables)."""
        values = [self.scalar(re.sub(r"^@(?:stmt|params)\s*=\s*", "", p.strip(), flags=re.IGNORECASE), frame)
                  for p in parts[:2] if not re.match(r"@(?!stmt\b|params\b)\w+\s*=", p.strip(), re.IGNORECASE)]
        if not values or not isinstance(values[0], str) or not values[0].strip():
            raise SqlError(102, f"sp_executesql: {values[:1]!r} is not a statement", True)
        text = values[0] if values[0].rstrip().endswith(";") else values[0] + ";"
        body, _ = parse_block(tokens(text) + ["END"], 0, ("END",))
        for stmt in body:  # dynamic SQL leaves the ownership chain: the caller's own permissions apply
            if stmt[0] == "sql" and stmt[1].split()[0].upper() in ("SELECT", "INSERT", "UPDATE", "DELETE"):
                self.require_statement(stmt[1])
        return Procedure("sp_executesql", declarations(values[1]) if len(values) > 1 else [], body)

    def alter_table(self, text: str) -> None:
        """ALTER TABLE as SQLR/02_Migrate.sql uses it, one atomic statement: ALTER COLUMN to the same type with
        NULL or NOT NULL, ADD of nullable columns, DROP CONSTRAINT of a UNIQUE constraint; by the rules of
        Microsoft's ALTER TABLE page (SQLR/README.md)."""
        tree = sqlglot.parse_one(text, read="tsql")
        table, actions = tree.this.name.lower(), tree.args.get("actions") or []
        if table not in self.tables or table.startswith("tmp_"):
            raise SqlError(4902, f"Cannot find the object \"{tree.this.name}\" because it does not exist or you do "
                                 "not have permissions.")
        self.require_on_object("ALTER", table)
        self.conn.execute("SAVEPOINT tsql_alter")
        try:
            if len(actions) == 1 and isinstance(actions[0], exp.AlterColumn):
                self._alter_column(table, actions[0])
            elif actions and all(isinstance(a, exp.ColumnDef) for a in actions):
                added = {}
                for action in actions:
                    added.update(self._add_column(table, action, added))
                self.tables[table].update(added)
            elif len(actions) == 1 and isinstance(actions[0], exp.Drop) and actions[0].args.get("kind") == "CONSTRAINT":
                self._drop_constraint(table, actions[0].find(exp.Table).name)
            elif len(actions) == 1 and isinstance(actions[0], exp.AddConstraint) \
                    and isinstance(actions[0].find(exp.Constraint), exp.Constraint) \
                    and actions[0].find(exp.CheckColumnConstraint) is not None:
                self._add_check(table, actions[0].find(exp.Constraint))
            else:
                raise SqlError(102, f"only ALTER COLUMN, ADD columns, ADD CONSTRAINT ... CHECK and DROP CONSTRAINT are "
                                    f"emulated: {text}", True)
        except BaseException:
            self.conn.execute("ROLLBACK TO tsql_alter")
            self.conn.execute("RELEASE tsql_alter")
            raise
        self.conn.execute("RELEASE tsql_alter")

    def _alter_column(self, table: str, action: exp.AlterColumn) -> None:
        """Nullability only. SQLite cannot alter a column and a rebuild's DROP TABLE would cascade to the rows
        that refer to the table (foreign keys cannot be switched off inside a transaction), so the table's stored
        definition is edited in place, SQLite's documented way to remove (or add) a NOT NULL."""
        column = action.this.name.lower()
        if column not in self.tables[table]:
            raise SqlError(4924, f"ALTER TABLE ALTER COLUMN failed because column '{column}' does not exist in "
                                 f"table '{table}'.")
        if action.args.get("dtype") is None or _type_text(action.args["dtype"]) != self.tables[table][column]:
            raise SqlError(102, f"ALTER COLUMN {column}: only a change of nullability (the same type given) is "
                                "emulated", True)
        for name, why in self._dependents(table, column):  # Msg 5074 then 4922, which a CATCH block sees
            raise SqlError(4922, f"The {why} '{name}' is dependent on column '{column}'. ALTER TABLE ALTER COLUMN "
                                 f"{column} failed because one or more objects access this column.")
        nullable = action.args.get("allow_null") is not False  # neither NULL nor NOT NULL: nullable (the page)
        if not nullable and self.conn.execute(f"SELECT 1 FROM {table} WHERE {column} IS NULL").fetchone():
            raise SqlError(515, f"Cannot insert the value NULL into column '{column}', table '{table}'; column does "
                                "not allow nulls. UPDATE fails.")
        definition = self._definition(table)
        col = next(c for c in definition.find_all(exp.ColumnDef) if c.name.lower() == column)
        kept = [c for c in col.args.get("constraints") or [] if not isinstance(c.kind, exp.NotNullColumnConstraint)]
        col.set("constraints", [exp.ColumnConstraint(kind=exp.NotNullColumnConstraint(allow_null=nullable or None)),
                                *kept])
        self._redefine(table, definition)

    def _definition(self, table: str) -> exp.Create:
        (sql,) = self.conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                                   (table,)).fetchone()
        return sqlglot.parse_one(sql, read="sqlite")

    def _redefine(self, table: str, definition: exp.Create) -> None:
        """Store the table's new definition in place (SQLite's documented way to drop a NOT NULL or a CHECK; the
        caller has checked the rows satisfy what it adds)."""
        (version,) = self.conn.execute("PRAGMA schema_version").fetchone()
        self.conn.execute("PRAGMA writable_schema = ON")
        try:
            self.conn.execute("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = ?",
                              (definition.sql(dialect="sqlite"), table))
            self.conn.execute(f"PRAGMA schema_version = {version + 1}")
        finally:
            self.conn.execute("PRAGMA writable_schema = OFF")

    def _add_check(self, table: str, constraint: exp.Constraint) -> None:
        """ADD CONSTRAINT name CHECK (...): refused (Msg 547) when a row fails it (WITH CHECK, the default)."""
        name = constraint.name
        if self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = ? UNION ALL SELECT 1 FROM tsql_constraints "
                             "WHERE name = ?", (name, name)).fetchone():
            raise SqlError(2714, f"There is already an object named '{name}' in the database.")
        created = sqlglot.parse_one(to_sqlite(f"CREATE TABLE {table} (tsql_column int, {constraint.sql(dialect='tsql')})"),
                                    read="sqlite").find(exp.Constraint)
        check = created.find(exp.CheckColumnConstraint).this.sql(dialect="sqlite")
        if self.conn.execute(f"SELECT 1 FROM {table} WHERE NOT ({check})").fetchone():
            raise SqlError(547, f"The ALTER TABLE statement conflicted with the CHECK constraint \"{name}\". The "
                                f"conflict occurred in table \"dbo.{table}\".")
        definition = self._definition(table)
        definition.this.append("expressions", created)
        self._redefine(table, definition)
        self.conn.execute("INSERT INTO tsql_constraints VALUES (?, ?, 'C', 0)", (name, table))

    def _dependents(self, table: str, column: str) -> list[tuple[str, str]]:
        """What keeps ALTER COLUMN from changing `column` (the page's list, as far as emulated): the primary key,
        a foreign key from or to it, a UNIQUE constraint, an index unless the column is (n)varchar or varbinary."""
        found = [(f"PK__{table}", "object") for _, name, *_, pk in self.conn.execute(
            "SELECT * FROM pragma_table_info(?)", (table,)) if name.lower() == column and pk]
        found += [(f"FK__{table}__{column}", "object") for row in self.conn.execute(
            "SELECT * FROM pragma_foreign_key_list(?)", (table,)) if row[3].lower() == column]
        for (child,) in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            found += [(f"FK__{child}__{row[3]}", "object") for row in self.conn.execute(
                "SELECT * FROM pragma_foreign_key_list(?)", (child,)) if row[2].lower() == table and row[4]
                and row[4].lower() == column]
        position = list(self.tables[table]).index(column) + 1
        found += [(n, "object") for (n,) in self.conn.execute(
            "SELECT name FROM tsql_constraints WHERE table_name = ? AND type = 'C' AND column_id = ?", (table, position))]
        constraints = {n for (n,) in self.conn.execute("SELECT name FROM tsql_constraints WHERE table_name = ?",
                                                        (table,))}
        for _, index, _, origin, _ in self.conn.execute("SELECT * FROM pragma_index_list(?)", (table,)).fetchall():
            if column in (c.lower() for (c,) in self.conn.execute("SELECT name FROM pragma_index_info(?)", (index,))):
                if index in constraints or origin != "c":
                    found.append((index, "object"))
                elif base_type(self.tables[table][column]) not in ("varchar", "nvarchar", "varbinary"):
                    found.append((index, "index"))
        return found

    def _add_column(self, table: str, action: exp.ColumnDef, added: dict[str, str]) -> dict[str, str]:
        name = action.name.lower()
        if name in self.tables[table] or name in added:
            raise SqlError(2705, f"Column names in each table must be unique. Column name '{name}' in table "
                                 f"'{table}' is specified more than once.")
        kinds = [c.kind for c in action.args.get("constraints") or []]
        if any(not isinstance(k, (exp.NotNullColumnConstraint, exp.DefaultColumnConstraint)) for k in kinds):
            raise SqlError(102, f"ADD {name}: only NULL, NOT NULL and DEFAULT are emulated", True)
        not_null = any(isinstance(k, exp.NotNullColumnConstraint) and not k.args.get("allow_null") for k in kinds)
        if not_null and not any(isinstance(k, exp.DefaultColumnConstraint) for k in kinds) \
                and self.conn.execute(f"SELECT 1 FROM {table}").fetchone():
            raise SqlError(4901, f"ALTER TABLE only allows columns to be added that can contain nulls, or have a "
                                 f"DEFAULT definition specified. Column '{name}' cannot be added to non-empty table "
                                 f"'{table}' because it does not satisfy these conditions.")
        created = sqlglot.parse_one(to_sqlite(f"CREATE TABLE {table} ({action.sql(dialect='tsql')})"), read="sqlite")
        self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {created.find(exp.ColumnDef).sql(dialect='sqlite')}")
        return {name: _type_text(action.args["kind"])}

    def _drop_constraint(self, table: str, name: str) -> None:
        found = self.conn.execute("SELECT type FROM tsql_constraints WHERE name = ? AND table_name = ?",
                                  (name, table)).fetchone()
        if not found:
            raise SqlError(3727, f"'{name}' is not a constraint. Could not drop constraint.")  # Msg 3728 then 3727
        if found[0] == "UQ":
            self.conn.execute(f'DROP INDEX "{name}"')
        else:  # a CHECK: out of the column's constraints, or the table's
            definition = self._definition(table)
            for node in list(definition.find_all(exp.ColumnConstraint, exp.Constraint)):
                if node.this is not None and not isinstance(node.this, bool) and node.this.name == name:
                    node.pop()
            self._redefine(table, definition)
        self.conn.execute("DELETE FROM tsql_constraints WHERE name = ?", (name,))


def install(server: Server, scripts: list, database: str = "ImageSimilarity") -> None:
    """Run SQLR/'s numbered scripts in order, as Setup-ImageSimilarity.ps1 does: those marked
    `-- requires: vector` only on a server with the VECTOR type."""
    for path in scripts:
        text = path.read_text()
        if text.startswith("-- requires: vector") and not server.vector_type:
            continue
        server.run_script(text, {"DatabaseName": database})


def rows_of(frame: pd.DataFrame) -> list[tuple]:
    """A result set's rows as the driver gives them: NULL is None (a frame holds it as NaN where the column has
    numbers; SQL Server stores no NaN)."""
    return [tuple(None if isinstance(v, float) and math.isnan(v) else v for v in row)
            for row in frame.itertuples(index=False)]


class Client:
    """A DB-API connection to the server, as mssql-python gives one: `?` placeholders bound in order; with
    autocommit off the first statement opens a transaction that commit() or rollback() ends."""

    def __init__(self, server: Server, user: str | None = None) -> None:
        """`user`: the database user the login maps to (None: a sysadmin login)."""
        self.server, self.autocommit, self.user = server, True, user

    def cursor(self) -> ClientCursor:
        return ClientCursor(self)

    def commit(self) -> None:
        if self.server.trancount:
            self.server.conn.execute("COMMIT")
            self.server.trancount = 0

    def rollback(self) -> None:
        if self.server.trancount:
            self.server._rollback()

    def close(self) -> None:
        self.rollback()


class ClientCursor:
    """One statement (or EXEC of a procedure) at a time; its result sets."""

    def __init__(self, client: Client) -> None:
        self.client, self.description, self.rowcount = client, None, -1
        self.sets: list[tuple[list[str], list[tuple]]] = []
        self.rows: list[tuple] = []

    def execute(self, sql: str, *params: Any) -> None:
        server, parts = self.client.server, re.split(r"(N?'(?:[^']|'')*')", sql)  # literals at odd places
        server.user = self.client.user
        if sum(part.count("?") for part in parts[::2]) != len(params):
            raise SqlError(8178, f"the statement has not one placeholder per value: {sql}", True)
        numbers = iter(range(1, len(params) + 1))
        text = "".join(part if k % 2 else re.sub(r"\?", lambda _: f"@p{next(numbers)}", part)
                       for k, part in enumerate(parts))
        values = {f"p{k}": v for k, v in enumerate(params, 1)}
        called = text.split()[1].split(".")[-1].rstrip(";").lower() if len(text.split()) > 1 else ""
        if not params and (text.split()[0].upper() not in ("SELECT", "EXEC", "EXECUTE")
                           or called not in server.procedures):  # a batch: scripts, external scripts
            # T-SQL needs no terminator after a batch's last statement (the emulation's scripts end each one)
            results = server.run_batch(text if text.rstrip().endswith(";") else text + ";")
            self.client.user = server.user  # EXECUTE AS / REVERT last for the session
            self.sets = [(list(r.columns), rows_of(r)) for r in results]
        elif text.split()[0].upper() in ("EXEC", "EXECUTE"):
            name, _, rest = text.split(None, 1)[1].partition(" ")
            arguments = {n: values[p] for n, p in re.findall(r"@(\w+)\s*=\s*@(p\d+)", rest)}
            results, _ = server.call(name.split(".")[-1], **arguments)
            self.sets = [(list(r.columns), rows_of(r)) for r in results]
        else:
            if not self.client.autocommit and not server.trancount:
                server.conn.execute("BEGIN")
                server.trancount = 1
            server.require_statement(text)
            columns, rows = server.query(text, Frame(values=values))
            self.rowcount = server.conn.execute("SELECT changes()").fetchone()[0]
            self.sets = [(columns, rows)] if columns else []
        self.nextset()

    def nextset(self) -> bool:
        if not self.sets:
            self.description, self.rows = None, []
            return False
        columns, self.rows = self.sets.pop(0)
        self.description = [(c,) for c in columns]
        return True

    def fetchall(self) -> list[tuple]:
        rows, self.rows = self.rows, []
        return rows

    def fetchone(self) -> tuple | None:
        return self.rows.pop(0) if self.rows else None
