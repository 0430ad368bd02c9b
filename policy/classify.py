"""SQL classification with PostgreSQL's own parser (pglast / libpg_query).

:func:`classify` turns a query string into a :class:`Classification`: one
:class:`StatementInfo` per statement (kind, class, risk flags, relations and
functions touched), or a parse error. Nothing here looks at text with regular
expressions: comments, case, quoting, dollar quoting and unicode escapes are
resolved by the parser before any decision is made. (Replication connections'
commands, :func:`classify_replication`, are told by their first keyword, as the
server tells them.)

The parse tree is walked as libpg_query's JSON (decoding it is several times
cheaper than building pglast's Python AST), iteratively, so deeply nested
input cannot exhaust the Python stack. :class:`Classifier` keeps two bounded LRU
caches, because the same statements repeat (prepared statements, pgbench,
ORMs): one keyed by the exact text, and one keyed by the statement's *shape*,
its text with each literal cut out, so that ``... WHERE aid = 17`` and
``... WHERE aid = 42`` are parsed once. See :func:`_shape` for when a shape may
stand for a whole family of texts.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from threading import Lock
from typing import Any, Final, Literal

from pglast import parser as pg_parser

# Statement classes, from least to most powerful (DO blocks take the highest
# class of the statements in their body).
READ = "read"
WRITE = "write"
DDL = "ddl"
DCL = "dcl"
TRANSACTION = "transaction"
UTILITY = "utility"
REPLICATION = "replication"  # commands of a replication connection's own grammar
CLASSES = (READ, WRITE, DDL, DCL, TRANSACTION, UTILITY, REPLICATION)
_CLASS_RANK = {UTILITY: 0, TRANSACTION: 0, READ: 1, WRITE: 2, DDL: 3, DCL: 4, REPLICATION: 4}

# Risk flags. The README documents each one.
FLAGS = (
    "drop",
    "truncate",
    "alter",
    "delete_without_where",
    "update_without_where",
    "grant",
    "role_change",
    "set_role",
    "copy_program",
    "server_file",
    "large_object",
    "remote_connection",
    "do_block",
    "unanalysed_body",
    "dynamic_sql",
    "untrusted_language",
    "server_admin",
    "load_library",
    "data_modifying_cte",
)

# Functions that read, write or list files on the database server (lo_import
# and lo_export move files between the server's disk and large objects).
SERVER_FILE_FUNCTIONS = frozenset(
    {
        "pg_read_file",
        "pg_read_binary_file",
        "pg_stat_file",
        "pg_ls_dir",
        "pg_ls_logdir",
        "pg_ls_waldir",
        "pg_ls_tmpdir",
        "pg_ls_archive_statusdir",
        "pg_ls_logicalsnapdir",
        "pg_ls_logicalmapdir",
        "pg_ls_replslotdir",
        "pg_ls_summariesdir",
        "pg_file_write",
        "pg_file_rename",
        "pg_file_unlink",
        "pg_file_sync",
        "pg_file_read",
        "pg_file_length",
        "pg_logdir_ls",
        "lo_import",
        "lo_export",
    }
)
LARGE_OBJECT_FUNCTIONS = frozenset(
    {
        "lo_import",
        "lo_export",
        "lo_create",
        "lo_creat",
        "lo_open",
        "lo_close",
        "lo_get",
        "lo_put",
        "lo_from_bytea",
        "lo_unlink",
        "lo_truncate",
        "lo_truncate64",
        "lo_lseek",
        "lo_lseek64",
        "lo_tell",
        "lo_tell64",
        "loread",
        "lowrite",
    }
)
REMOTE_FUNCTION_PREFIXES = ("dblink",)
REMOTE_EXTENSIONS = frozenset({"dblink", "postgres_fdw"})
REMOTE_WRAPPERS = frozenset({"dblink_fdw", "postgres_fdw"})
SERVER_ADMIN_FUNCTIONS = frozenset(
    {
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_promote",
        "pg_switch_wal",
        "pg_create_restore_point",
        "pg_drop_replication_slot",
        "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot",
        "pg_replication_origin_create",
        "pg_backup_start",
        "pg_backup_stop",
    }
)
ROLE_SETTINGS = frozenset({"role", "session_authorization"})
TRUSTED_LANGUAGES = frozenset({"sql", "plpgsql", "plperl", "pltcl", "plv8", "pljava"})

MAX_CACHED_TEXT = 16 * 1024


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """One statement of a query string, as PostgreSQL's parser sees it."""

    text: str
    kind: str  # command-tag style: "SELECT", "DROP TABLE", "SET", "DO", ...
    statement_class: str  # one of CLASSES
    flags: frozenset[str] = frozenset()
    objects: tuple[str, ...] = ()  # relations, "schema.name" or "name" when unqualified
    functions: tuple[str, ...] = ()  # functions called, as written (schema-qualified or not)
    # What the statement does to the session's SQL-level prepared statements: ("prepare",
    # name), ("execute", name) or ("deallocate", name), the name as the server folds it;
    # ("deallocate", None) for DEALLOCATE ALL and DISCARD ALL. None for any other.
    prepared: tuple[str, str | None] | None = None

    def summary(self) -> dict[str, Any]:
        """A plain dict for audit records and reports."""
        return {
            "kind": self.kind,
            "class": self.statement_class,
            "flags": sorted(self.flags),
            "objects": list(self.objects),
            "functions": list(self.functions),
        }


@dataclass(frozen=True, slots=True)
class Classification:
    """A whole query string: its statements, or why it could not be parsed."""

    text: str
    statements: tuple[StatementInfo, ...] = ()
    parse_error: str | None = None
    # The statement's shape (text with literals cut out) when every text of
    # that shape classifies alike; the policy may reuse decisions by it.
    shape: bytes | None = field(default=None, compare=False)

    @property
    def flags(self) -> frozenset[str]:
        out: set[str] = set()
        for s in self.statements:
            out |= s.flags
        return frozenset(out)

    @property
    def objects(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(o for s in self.statements for o in s.objects))

    def summary(self) -> dict[str, Any]:
        """A plain dict for audit records and reports."""
        if self.parse_error is not None:
            return {"parse_error": self.parse_error}
        return {"statements": [s.summary() for s in self.statements]}


# ---------------------------------------------------------------------------
# Kinds and classes per parse node type.

_FIXED: dict[str, tuple[str, str]] = {
    "SelectStmt": ("SELECT", READ),
    "InsertStmt": ("INSERT", WRITE),
    "UpdateStmt": ("UPDATE", WRITE),
    "DeleteStmt": ("DELETE", WRITE),
    "MergeStmt": ("MERGE", WRITE),
    "CallStmt": ("CALL", WRITE),
    "TruncateStmt": ("TRUNCATE", WRITE),
    "VariableShowStmt": ("SHOW", READ),
    "DeclareCursorStmt": ("DECLARE CURSOR", READ),
    "ClosePortalStmt": ("CLOSE", UTILITY),
    "DeallocateStmt": ("DEALLOCATE", UTILITY),
    "ExecuteStmt": ("EXECUTE", UTILITY),
    "DiscardStmt": ("DISCARD", UTILITY),
    "ListenStmt": ("LISTEN", UTILITY),
    "UnlistenStmt": ("UNLISTEN", UTILITY),
    "NotifyStmt": ("NOTIFY", UTILITY),
    "LockStmt": ("LOCK TABLE", UTILITY),
    "CheckPointStmt": ("CHECKPOINT", UTILITY),
    "LoadStmt": ("LOAD", UTILITY),
    "ClusterStmt": ("CLUSTER", UTILITY),
    "ReindexStmt": ("REINDEX", UTILITY),
    "ConstraintsSetStmt": ("SET CONSTRAINTS", UTILITY),
    "DoStmt": ("DO", UTILITY),
    "CreateStmt": ("CREATE TABLE", DDL),
    "IndexStmt": ("CREATE INDEX", DDL),
    "ViewStmt": ("CREATE VIEW", DDL),
    "RuleStmt": ("CREATE RULE", DDL),
    "CreateTrigStmt": ("CREATE TRIGGER", DDL),
    "CreateSeqStmt": ("CREATE SEQUENCE", DDL),
    "AlterSeqStmt": ("ALTER SEQUENCE", DDL),
    "CreatedbStmt": ("CREATE DATABASE", DDL),
    "DropdbStmt": ("DROP DATABASE", DDL),
    "CompositeTypeStmt": ("CREATE TYPE", DDL),
    "CreateEnumStmt": ("CREATE TYPE", DDL),
    "CreateRangeStmt": ("CREATE TYPE", DDL),
    "CreatePLangStmt": ("CREATE LANGUAGE", DDL),
    "CreateFdwStmt": ("CREATE FOREIGN DATA WRAPPER", DDL),
    "AlterFdwStmt": ("ALTER FOREIGN DATA WRAPPER", DDL),
    "CreateForeignServerStmt": ("CREATE SERVER", DDL),
    "AlterForeignServerStmt": ("ALTER SERVER", DDL),
    "CreateForeignTableStmt": ("CREATE FOREIGN TABLE", DDL),
    "CreateUserMappingStmt": ("CREATE USER MAPPING", DDL),
    "AlterUserMappingStmt": ("ALTER USER MAPPING", DDL),
    "DropUserMappingStmt": ("DROP USER MAPPING", DDL),
    "ImportForeignSchemaStmt": ("IMPORT FOREIGN SCHEMA", DDL),
    "RefreshMatViewStmt": ("REFRESH MATERIALIZED VIEW", DDL),
    "SecLabelStmt": ("SECURITY LABEL", DDL),
    "CommentStmt": ("COMMENT", DDL),
    "AlterSystemStmt": ("ALTER SYSTEM", DDL),
    "DropOwnedStmt": ("DROP OWNED", DDL),
    "DropTableSpaceStmt": ("DROP TABLESPACE", DDL),
    "CreateRoleStmt": ("CREATE ROLE", DCL),
    "AlterRoleStmt": ("ALTER ROLE", DCL),
    "AlterRoleSetStmt": ("ALTER ROLE", DCL),
    "DropRoleStmt": ("DROP ROLE", DCL),
    "ReassignOwnedStmt": ("REASSIGN OWNED", DCL),
    "AlterDefaultPrivilegesStmt": ("ALTER DEFAULT PRIVILEGES", DCL),
}

_TRANSACTION_KINDS = {
    "TRANS_STMT_BEGIN": "BEGIN",
    "TRANS_STMT_START": "START TRANSACTION",
    "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK",
    "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
    "TRANS_STMT_RELEASE": "RELEASE",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK TO SAVEPOINT",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}

_OBJECT_WORDS = {
    "MATVIEW": "MATERIALIZED VIEW",
    "FDW": "FOREIGN DATA WRAPPER",
    "FOREIGN_SERVER": "SERVER",
    "TSCONFIGURATION": "TEXT SEARCH CONFIGURATION",
    "TSDICTIONARY": "TEXT SEARCH DICTIONARY",
    "TSPARSER": "TEXT SEARCH PARSER",
    "TSTEMPLATE": "TEXT SEARCH TEMPLATE",
    "OPCLASS": "OPERATOR CLASS",
    "OPFAMILY": "OPERATOR FAMILY",
    "PROCEDURE": "PROCEDURE",
    "ROUTINE": "ROUTINE",
}

# Object types whose names in DROP/ALTER lists are relations.
_RELATION_OBJECTS = frozenset(
    {
        "OBJECT_TABLE",
        "OBJECT_VIEW",
        "OBJECT_MATVIEW",
        "OBJECT_INDEX",
        "OBJECT_SEQUENCE",
        "OBJECT_FOREIGN_TABLE",
    }
)

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
_ASSIGN_TARGET = re.compile(r'^\s*(?:[\w$]+|"[^"]*")(?:\s*\.\s*(?:[\w$]+|"[^"]*")|\[[^\]]*\])*\s*:?=')


def _object_type(value: Any) -> str:
    name = str(value or "").removeprefix("OBJECT_")
    return _OBJECT_WORDS.get(name, name.replace("_", " "))


def _generic_kind(node_type: str) -> str:
    return " ".join(_CAMEL.split(node_type.removesuffix("Stmt"))).upper()


def _has_option(options: Any, name: str) -> bool:
    """Whether a boolean option is on, read as PostgreSQL's defGetBoolean does."""
    for item in options or ():
        elem = item.get("DefElem") if isinstance(item, dict) else None
        if not elem or elem.get("defname") != name:
            continue
        arg = elem.get("arg")
        if arg is None:
            return True
        if "Integer" in arg:
            return bool(arg["Integer"].get("ival", 0))
        if "Boolean" in arg:
            return bool(arg["Boolean"].get("boolval", False))
        value = str((arg.get("String") or {}).get("sval", "")).lower()
        return value not in ("false", "off")
    return False


def _strings(items: Any) -> list[str]:
    out: list[str] = []
    for item in items or ():
        if isinstance(item, dict) and "String" in item:
            out.append(item["String"].get("sval", ""))
    return out


# ---------------------------------------------------------------------------
# The walk.


@dataclass(slots=True)
class _Facts:
    flags: set[str] = field(default_factory=set)
    objects: dict[str, None] = field(default_factory=dict)
    functions: dict[str, None] = field(default_factory=dict)
    ctes: set[str] = field(default_factory=set)
    modifies: bool = False  # a data-modifying statement inside another one
    inner_class: str | None = None  # highest class of a DO body's statements
    # Set by every rule that looks at a literal's value (A_Const): such a
    # statement's classification is not shared by its shape.
    reads_literal: bool = False

    def add_relation(self, schema: str | None, name: str) -> None:
        self.objects[f"{schema}.{name}" if schema else name] = None


def _nodes(tree: Any) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """Every dict in the tree, with the node type that wraps it (if any)."""
    stack: list[tuple[str | None, Any]] = [(None, tree)]
    while stack:
        wrapper, value = stack.pop()
        if isinstance(value, dict):
            if len(value) == 1:
                ((key, inner),) = value.items()
                if key[:1].isupper() and isinstance(inner, dict):
                    stack.append((key, inner))
                    continue
            yield wrapper, value
            children = [v for v in value.values() if isinstance(v, (dict, list))]
            stack.extend((None, v) for v in reversed(children))
        elif isinstance(value, list):
            stack.extend((None, v) for v in reversed(value) if isinstance(v, (dict, list)))


def _where_is_trivial(where: Any) -> bool:
    """True when a WHERE clause is absent or refers to no column (WHERE true, 1=1)."""
    if where is None:
        return True
    return all(wrapper not in ("ColumnRef", "CurrentOfExpr") for wrapper, _ in _nodes(where))


def _collect(tree: Any, facts: _Facts) -> None:
    for wrapper, node in _nodes(tree):
        if wrapper == "CommonTableExpr" and "ctename" in node:
            facts.ctes.add(node["ctename"])
        if "relname" in node and "relpersistence" in node:
            facts.add_relation(node.get("schemaname"), node["relname"])
        elif "funcname" in node and "funcformat" in node:
            _function(node, facts)
        elif wrapper in ("DeleteStmt", "UpdateStmt") and _where_is_trivial(node.get("whereClause")):
            facts.flags.add("delete_without_where" if wrapper == "DeleteStmt" else "update_without_where")
        if wrapper == "CommonTableExpr":
            query = node.get("ctequery") or {}
            if any(k in query for k in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")):
                facts.modifies = True
                facts.flags.add("data_modifying_cte")


def _function(node: dict[str, Any], facts: _Facts) -> None:
    names = _strings(node.get("funcname"))
    if not names:
        return
    facts.functions[".".join(names)] = None
    name = names[-1].lower()
    if name in SERVER_FILE_FUNCTIONS:
        facts.flags.add("server_file")
    if name in LARGE_OBJECT_FUNCTIONS:
        facts.flags.add("large_object")
    if name.startswith(REMOTE_FUNCTION_PREFIXES):
        facts.flags.add("remote_connection")
    if name in SERVER_ADMIN_FUNCTIONS:
        facts.flags.add("server_admin")
    if name == "set_config":
        args = node.get("args") or []
        first = args[0] if args else None
        setting = None
        if isinstance(first, dict) and "A_Const" in first:
            facts.reads_literal = True
            setting = (first["A_Const"].get("sval") or {}).get("sval")
        if setting is None or setting.lower() in ROLE_SETTINGS:
            facts.flags.add("set_role")


def _kind_and_class(node_type: str, node: dict[str, Any], facts: _Facts) -> tuple[str, str]:
    if node_type in _FIXED:
        kind, klass = _FIXED[node_type]
    elif node_type == "TransactionStmt":
        kind, klass = _TRANSACTION_KINDS.get(node.get("kind", ""), "TRANSACTION"), TRANSACTION
    elif node_type == "VariableSetStmt":
        reset = node.get("kind") in ("VAR_RESET", "VAR_RESET_ALL")
        kind = "RESET" if reset else "SET"
        name = str(node.get("name", "")).lower()
        if name in ROLE_SETTINGS:
            klass = DCL
        elif name in ("transaction", "session characteristics"):
            klass = TRANSACTION
        else:
            klass = UTILITY
    elif node_type == "DropStmt":
        kind, klass = "DROP " + _object_type(node.get("removeType")), DDL
    elif node_type in ("AlterTableStmt", "AlterObjectSchemaStmt", "AlterOwnerStmt", "RenameStmt"):
        objtype = node.get("objtype") or node.get("objectType") or node.get("renameType")
        if node_type == "RenameStmt" and objtype in ("OBJECT_COLUMN", "OBJECT_TABCONSTRAINT"):
            objtype = node.get("relationType")
        kind, klass = "ALTER " + _object_type(objtype), DDL
    elif node_type == "CreateTableAsStmt":
        matview = node.get("objtype") == "OBJECT_MATVIEW"
        kind = "CREATE MATERIALIZED VIEW" if matview else "CREATE TABLE AS"
        klass = DDL
    elif node_type == "DefineStmt":
        kind, klass = "CREATE " + _object_type(node.get("kind")), DDL
    elif node_type == "CreateFunctionStmt":
        kind = "CREATE PROCEDURE" if node.get("is_procedure") else "CREATE FUNCTION"
        klass = DDL
    elif node_type in ("GrantStmt", "GrantRoleStmt"):
        kind, klass = ("GRANT" if node.get("is_grant") else "REVOKE"), DCL
    elif node_type == "VacuumStmt":
        kind, klass = ("VACUUM" if node.get("is_vacuumcmd") else "ANALYZE"), UTILITY
    elif node_type == "FetchStmt":
        kind, klass = ("MOVE" if node.get("ismove") else "FETCH"), READ
    elif node_type == "CopyStmt":
        kind, klass = "COPY", (WRITE if node.get("is_from") else READ)
    elif node_type == "ExplainStmt":
        kind = "EXPLAIN"
        klass = READ
        if _has_option(node.get("options"), "analyze"):
            klass = _inner_class(node.get("query"), facts) or READ
    elif node_type == "PrepareStmt":
        kind, klass = "PREPARE", _inner_class(node.get("query"), facts) or UTILITY
    else:
        kind = _generic_kind(node_type)
        klass = DDL if kind.startswith(("CREATE", "ALTER", "DROP")) else UTILITY
    if node_type == "SelectStmt" and node.get("intoClause"):
        kind, klass = "SELECT INTO", DDL
    if klass == READ and node_type == "SelectStmt" and facts.modifies:
        klass = WRITE
    return kind, klass


def _inner_class(query: Any, facts: _Facts) -> str | None:
    if not isinstance(query, dict) or len(query) != 1:
        return None
    ((node_type, node),) = query.items()
    if not isinstance(node, dict):
        return None
    return _kind_and_class(node_type, node, facts)[1]


def _drops_a_column(node: dict[str, Any]) -> bool:
    """ALTER TABLE … DROP COLUMN: the column's data goes with it."""
    return any(
        isinstance(cmd, dict) and cmd.get("AlterTableCmd", {}).get("subtype") == "AT_DropColumn"
        for cmd in node.get("cmds") or ()
    )


def _flags(node_type: str, node: dict[str, Any], kind: str, facts: _Facts) -> None:
    flags = facts.flags
    if kind.startswith("DROP") or (node_type == "AlterTableStmt" and _drops_a_column(node)):
        flags.add("drop")
    if node_type == "TruncateStmt":
        flags.add("truncate")
    if (kind.startswith("ALTER") or node_type == "RenameStmt") and node_type not in (
        "AlterRoleStmt",
        "AlterRoleSetStmt",
        "AlterDefaultPrivilegesStmt",
    ):
        flags.add("alter")
    if node_type in ("GrantStmt", "GrantRoleStmt", "AlterDefaultPrivilegesStmt"):
        flags.add("grant")
    if node_type in (
        "CreateRoleStmt",
        "AlterRoleStmt",
        "AlterRoleSetStmt",
        "DropRoleStmt",
        "ReassignOwnedStmt",
    ):
        flags.add("role_change")
    if node_type == "VariableSetStmt" and str(node.get("name", "")).lower() in ROLE_SETTINGS:
        flags.add("set_role")
    if node_type == "CopyStmt":
        if node.get("is_program"):
            flags.add("copy_program")
        elif node.get("filename"):
            flags.add("server_file")
    if node_type == "AlterSystemStmt":
        flags.add("server_admin")
    if node_type == "LoadStmt":
        flags.add("load_library")
    if node_type in ("CreateUserMappingStmt", "AlterUserMappingStmt", "ImportForeignSchemaStmt"):
        flags.add("remote_connection")
    if node_type in ("CreateSubscriptionStmt", "AlterSubscriptionStmt"):
        flags.add("remote_connection")
    if node_type == "CreateForeignServerStmt" and node.get("fdwname") in REMOTE_WRAPPERS:
        flags.add("remote_connection")
    if node_type == "CreateExtensionStmt" and node.get("extname") in REMOTE_EXTENSIONS:
        flags.add("remote_connection")
    if node_type == "CreatePLangStmt" and (
        node.get("plname", "").lower() not in TRUSTED_LANGUAGES or not node.get("pltrusted")
    ):
        flags.add("untrusted_language")
    if node_type == "CreateFunctionStmt":
        for option in node.get("options") or ():
            elem = option.get("DefElem", {})
            if elem.get("defname") == "language":
                language = (elem.get("arg") or {}).get("String", {}).get("sval", "")
                if language.lower() not in TRUSTED_LANGUAGES:
                    flags.add("untrusted_language")
    if node_type in ("DropStmt",) and node.get("removeType") in _RELATION_OBJECTS:
        for item in node.get("objects") or ():
            names = _strings((item.get("List") or {}).get("items"))
            if names:
                facts.add_relation(".".join(names[:-1]) or None, names[-1])


# ---------------------------------------------------------------------------
# DO blocks.


def _do_block(node: dict[str, Any], facts: _Facts, depth: int) -> None:
    facts.flags.add("do_block")
    body: str | None = None
    language = "plpgsql"
    for item in node.get("args") or ():
        elem = item.get("DefElem", {})
        value = (elem.get("arg") or {}).get("String", {}).get("sval")
        if elem.get("defname") == "as":
            body = value
        elif elem.get("defname") == "language" and value:
            language = value.lower()
    if body is None or language != "plpgsql" or depth > 4:
        facts.flags.add("unanalysed_body")
        return
    inner = _plpgsql_statements(body)
    if inner is None:
        facts.flags.add("unanalysed_body")
        return
    queries, dynamic = inner
    if dynamic:
        facts.flags.add("dynamic_sql")
    best: str | None = None
    for query in queries:
        try:
            statements = _classify_text(query, depth + 1)
        except _ParseFailure:
            facts.flags.add("unanalysed_body")
            continue
        for s in statements:
            facts.flags |= s.flags
            facts.objects.update(dict.fromkeys(s.objects))
            facts.functions.update(dict.fromkeys(s.functions))
            if best is None or _CLASS_RANK[s.statement_class] > _CLASS_RANK[best]:
                best = s.statement_class
    facts.inner_class = best


def _plpgsql_statements(body: str) -> tuple[list[str], bool] | None:
    """The SQL inside a PL/pgSQL body and whether it runs dynamic SQL, or None."""
    tag = "$rf$"
    n = 0
    while tag in body:
        n += 1
        tag = f"$rf{n}$"
    source = f"CREATE FUNCTION rf_do() RETURNS SETOF record LANGUAGE plpgsql AS {tag}{body}{tag}"
    try:
        tree = json.loads(pg_parser.parse_plpgsql_json(source))
    except Exception:
        return None
    queries: list[str] = []
    dynamic = False
    for wrapper, node in _nodes(tree):
        if wrapper in ("PLpgSQL_stmt_dynexecute", "PLpgSQL_stmt_dynfors") or "dynquery" in node:
            dynamic = True
        if wrapper != "PLpgSQL_expr":
            continue
        query = node.get("query", "")
        mode = node.get("parseMode", 0)
        if mode == 0:
            queries.append(query)
        elif mode == 2:
            queries.append("SELECT " + query)
        else:
            match = _ASSIGN_TARGET.match(query)
            queries.append("SELECT " + (query[match.end() :] if match else query))
    return queries, dynamic


# ---------------------------------------------------------------------------
# Entry points.


class _ParseFailure(Exception):
    pass


def _parse(text: str) -> dict[str, Any]:
    try:
        tree: dict[str, Any] = json.loads(pg_parser.parse_sql_json(text))
    except Exception as e:  # pglast raises ParseError; anything else is as bad
        raise _ParseFailure(str(e) or type(e).__name__) from None
    return tree


def _classify_tree(
    tree: dict[str, Any], text: str, depth: int = 0, facts_out: list[_Facts] | None = None
) -> list[StatementInfo]:
    raw = text.encode("utf-8")
    out: list[StatementInfo] = []
    for raw_stmt in tree.get("stmts", ()):
        stmt = raw_stmt.get("stmt") or {}
        if len(stmt) != 1:
            continue
        ((node_type, node),) = stmt.items()
        start = raw_stmt.get("stmt_location", 0)
        length = raw_stmt.get("stmt_len", 0)
        end = start + length if length else len(raw)
        stmt_text = raw[start:end].decode("utf-8", "replace").strip()
        facts = _Facts()
        out.append(_statement(node_type, node, stmt_text, depth, facts))
        if facts_out is not None:
            facts_out.append(facts)
    return out


def _classify_text(text: str, depth: int = 0) -> list[StatementInfo]:
    return _classify_tree(_parse(text), text, depth)


def _statement(
    node_type: str, node: dict[str, Any], text: str, depth: int, facts: _Facts | None = None
) -> StatementInfo:
    facts = facts if facts is not None else _Facts()
    _collect({node_type: node}, facts)
    kind, klass = _kind_and_class(node_type, node, facts)
    _flags(node_type, node, kind, facts)
    if node_type == "DoStmt":
        _do_block(node, facts, depth)
        if facts.inner_class is not None:
            klass = facts.inner_class
    objects = tuple(o for o in facts.objects if o not in facts.ctes)
    return StatementInfo(
        text=text,
        kind=kind,
        statement_class=klass,
        flags=frozenset(facts.flags),
        objects=objects,
        functions=tuple(facts.functions),
        prepared=_prepared(node_type, node),
    )


_PREPARED_ACTIONS = {"PrepareStmt": "prepare", "ExecuteStmt": "execute",
                     "DeallocateStmt": "deallocate"}


def _prepared(node_type: str, node: dict[str, Any]) -> tuple[str, str | None] | None:
    """StatementInfo.prepared of a statement."""
    action = _PREPARED_ACTIONS.get(node_type)
    if action is not None:
        name = node.get("name")
        return action, (name if isinstance(name, str) and not node.get("isall") else None)
    if node_type == "DiscardStmt" and node.get("target") == "DISCARD_ALL":
        return "deallocate", None
    return None


def classify(text: str) -> Classification:
    """Classify a query string (uncached); unparseable text gives ``parse_error``."""
    try:
        return Classification(text, tuple(_classify_text(text)))
    except _ParseFailure as e:
        return Classification(text, (), parse_error=str(e))


# Replication connections (startup parameter ``replication``) have a grammar of their own
# besides SQL (PostgreSQL's walsender: repl_gram.y). The server takes a query string as a
# replication command exactly when its first token is one of these keywords; whitespace
# may come first, nothing else (its scanner knows no comments). With their risk flags:
# creating and dropping slots and taking a base backup are what the SQL functions
# flagged ``server_admin`` do.
_REPLICATION_COMMANDS: dict[str, frozenset[str]] = {
    "IDENTIFY_SYSTEM": frozenset(),
    "SHOW": frozenset(),
    "TIMELINE_HISTORY": frozenset(),
    "READ_REPLICATION_SLOT": frozenset(),
    "START_REPLICATION": frozenset(),
    "CREATE_REPLICATION_SLOT": frozenset({"server_admin"}),
    "DROP_REPLICATION_SLOT": frozenset({"server_admin"}),
    "ALTER_REPLICATION_SLOT": frozenset({"server_admin"}),
    "BASE_BACKUP": frozenset({"server_admin"}),
    "UPLOAD_MANIFEST": frozenset({"server_admin"}),
}
# The first token when it is a keyword: letters and underscores, not followed by a
# character that would continue an identifier (ident_cont, bytes >= 0x80 included).
_FIRST_KEYWORD = re.compile(r"[ \t\n\r\f\v]*([A-Za-z_]+)(?![A-Za-z0-9_$\x80-\U0010ffff])")


def classify_replication(text: str) -> Classification | None:
    """A replication command, as a replication connection's server takes it; None for a
    text it runs as SQL (or, on a physical replication connection, refuses)."""
    match = _FIRST_KEYWORD.match(text)
    if match is None:
        return None
    kind = match.group(1).upper()
    flags = _REPLICATION_COMMANDS.get(kind)
    if flags is None:
        return None
    info = StatementInfo(text.strip(" \t\n\r\f\v;"), kind, REPLICATION, flags)
    return Classification(text, (info,))


# Literal tokens of PostgreSQL's scanner, cut out of a shape (with a marker for
# their kind). U&'' strings stay in: their escapes are checked by the parser.
_LITERAL_TOKENS = {
    "ICONST": "\x00i", "FCONST": "\x00f", "SCONST": "\x00s", "BCONST": "\x00b", "XCONST": "\x00x",
}
_COMMENT_TOKENS = frozenset({"C_COMMENT", "SQL_COMMENT"})
# In a plain text, an integer literal: a run of at most nine digits with no character
# on either side that would continue a token with it (names, numerics like 1.5 and 1e5).
# (It starts with the digit and looks back from there, so the regex engine can skip
# ahead to the next digit instead of testing the look-behind at every character.)
_PLAIN_INTEGER = re.compile(r"[0-9](?<![A-Za-z0-9_.][0-9])[0-9]{0,8}(?![A-Za-z0-9_.])")
_SEMICOLON = "ASCII_59"


@dataclass(slots=True)
class _Shape:
    """A single statement's text with its literals cut out, and where its statement text lies."""

    key: bytes
    start: int  # offset (in characters) of the first token that is not a comment
    end: int  # offset of the closing ';', or the text's length
    # Offsets of the literals cut out; None for a plain text, whose integer literals are
    # found again only when a new shape is checked (the key needs one regex pass, not two).
    literals: tuple[int, ...] | None

    def statement_text(self, text: str) -> str:
        return text[self.start : self.end].strip()

    def literal_offsets(self, text: str) -> tuple[int, ...]:
        if self.literals is not None:
            return self.literals
        return tuple(match.start() for match in _PLAIN_INTEGER.finditer(text))


def _shape(text: str) -> _Shape | None:
    """The shape of a one-statement text; None for anything else.

    The key is the text byte for byte, except that each literal token (and the
    whitespace after it) is replaced by NUL and a letter for its kind; NUL
    cannot occur in a query. Two texts with the same key therefore scan to the
    same tokens but for the literals' values, and the parser, which decides by
    token kinds, builds the same tree but for the values it puts in A_Const
    nodes. A shape is only used for texts where every literal became an A_Const
    and no classification rule read one (checked by :func:`_shape_holds` the
    first time a shape is seen), so every text of a cached shape classifies
    alike.

    Plain texts (ASCII, no quotes, comments, dollar signs or backslashes) are
    keyed without the scanner: in them, a run of at most nine digits between
    characters that cannot continue a token is exactly an integer literal
    (ICONST) to PostgreSQL's scanner too. Anything else goes through the
    scanner itself.
    """
    if "\x00" in text:
        return None
    plain = _plain_text(text)
    if plain is not False:
        return _Shape(*plain, None) if plain is not None else None
    return _scanned_shape(text)


def statement_shape(text: str) -> bytes | None:
    """The key of ``text``'s shape (see :func:`_shape`); None when it has none.

    Only a key that a :class:`Classification` carries as ``shape`` was checked
    to stand for all its texts.
    """
    if len(text) > MAX_CACHED_TEXT or "\x00" in text:
        return None
    plain = _plain_text(text)  # as _shape, without building the _Shape
    if plain is not False:
        return plain[0] if plain is not None else None
    shape = _scanned_shape(text)
    return shape.key if shape is not None else None


def _is_plain(text: str) -> bool:
    """ASCII with no quotes, comments, dollar signs or backslashes (see :func:`_shape`)."""
    return (text.isascii() and "'" not in text and '"' not in text and "$" not in text
            and "\\" not in text and "--" not in text and "/*" not in text)


def _plain(text: str) -> tuple[bytes, int, int] | None:
    """A plain text's key, and where its one statement starts and ends (before a closing
    ';'); None for more than one statement or none."""
    body = text.rstrip()
    end = len(body)
    if body.endswith(";"):
        end -= 1
    if ";" in body[:end]:
        return None  # more than one statement
    start = len(text) - len(text.lstrip())
    if start >= end:
        return None
    return ("p" + _PLAIN_INTEGER.sub("\x00i", text)).encode("ascii"), start, end


def _plain_text_py(text: str) -> tuple[bytes, int, int] | None | Literal[False]:
    """:func:`_plain` of a plain text; False for a text that is not plain."""
    return _plain(text) if _is_plain(text) else False


# Why the compiled step is not in use, for `ringfence doctor`; None when it is.
NATIVE_SHAPE_ERROR: ImportError | None = None
try:  # the same compiled (setup.py); this module works alike without it
    if os.environ.get("RINGFENCE_IMPL") == "python":
        raise ImportError("RINGFENCE_IMPL=python")
    from policy._plainshape import plain as _plain_text
except ImportError as e:  # a source tree where it was not built, or RINGFENCE_IMPL=python
    NATIVE_SHAPE_ERROR = e
    _plain_text = _plain_text_py
NATIVE_SHAPE: Final = _plain_text is not _plain_text_py
# For callers with a fast path of their own: a plain text's (key, start, end), None for
# one without exactly one statement, False for a text that is not plain (see _shape).
plain_text: Final = _plain_text


def _scanned_shape(text: str) -> _Shape | None:
    try:
        tokens = pg_parser.scan(text)  # offsets in characters
    except Exception:  # unterminated quotes and the like: the parser will say why
        return None
    parts: list[str] = []
    literals: list[int] = []
    pos = 0
    start = -1
    end = len(text)
    closed = False
    literal_at = -1  # the literal whose span runs to the next token
    for offset, _last, name, _kind in tokens:
        if literal_at >= 0:
            pos = offset
            literal_at = -1
        if name in _COMMENT_TOKENS:
            continue
        if closed:
            return None  # more than one statement
        if name == _SEMICOLON:
            closed = True
            end = offset
            continue
        if start < 0:
            start = offset
        marker = _LITERAL_TOKENS.get(name)
        if marker is not None:
            parts.append(text[pos:offset])
            parts.append(marker)
            literals.append(offset)
            literal_at = offset
    if literal_at >= 0:
        pos = len(text)
    if start < 0:
        return None
    parts.append(text[pos:])
    return _Shape(("s" + "".join(parts)).encode("utf-8"), start, end, tuple(literals))


def _shape_holds(tree: dict[str, Any], shape: _Shape, statements: list[StatementInfo],
                 facts: list[_Facts], text: str) -> bool:
    """Whether every text of ``shape`` classifies as this one did (see :func:`_shape`)."""
    if len(statements) != 1 or len(tree.get("stmts", ())) != 1 or facts[0].reads_literal:
        return False
    if statements[0].text != shape.statement_text(text):
        return False
    # The parser's locations are byte offsets, the shape's are characters.
    raw = text.encode("utf-8")
    constants = {
        len(raw[: node["location"]].decode("utf-8", "replace"))
        for wrapper, node in _nodes(tree)
        if wrapper == "A_Const" and isinstance(node.get("location"), int)
    }
    return all(offset in constants for offset in shape.literal_offsets(text))


class Classifier:
    """:func:`classify` behind bounded LRU caches keyed by the text and by its shape."""

    def __init__(self, max_entries: int = 4096, max_text: int = MAX_CACHED_TEXT) -> None:
        self.max_entries = max_entries
        self.max_text = max_text
        self._cache: OrderedDict[str, Classification] = OrderedDict()
        self._shapes: OrderedDict[bytes, StatementInfo] = OrderedDict()
        self._lock = Lock()
        self.hits = 0
        self.misses = 0

    def __call__(self, text: str) -> Classification:
        with self._lock:
            found = self._cache.get(text)
            if found is not None:
                self._cache.move_to_end(text)
                self.hits += 1
                return found
        if len(text) > self.max_text:
            with self._lock:
                self.misses += 1
            return classify(text)
        shape = _shape(text)
        if shape is not None:
            with self._lock:
                template = self._shapes.get(shape.key)
                if template is not None:
                    self._shapes.move_to_end(shape.key)
                    self.hits += 1
            if template is not None:
                info = StatementInfo(
                    shape.statement_text(text), template.kind,
                    template.statement_class, template.flags, template.objects, template.functions,
                    template.prepared,
                )
                return Classification(text, (info,), shape=shape.key)
        with self._lock:
            self.misses += 1
        return self._classify_and_keep(text, shape)

    def _classify_and_keep(self, text: str, shape: _Shape | None) -> Classification:
        try:
            tree = _parse(text)
        except _ParseFailure as e:
            result = Classification(text, (), parse_error=str(e))
            self._keep(self._cache, text, result)
            return result
        facts: list[_Facts] = []
        statements = _classify_tree(tree, text, 0, facts)
        if shape is not None and _shape_holds(tree, shape, statements, facts, text):
            self._keep(self._shapes, shape.key, statements[0])
            return Classification(text, tuple(statements), shape=shape.key)
        result = Classification(text, tuple(statements))
        self._keep(self._cache, text, result)
        return result

    def _keep(self, cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        with self._lock:
            cache[key] = value
            if len(cache) > self.max_entries:
                cache.popitem(last=False)

    def __len__(self) -> int:
        return len(self._cache) + len(self._shapes)


default_classifier = Classifier()
