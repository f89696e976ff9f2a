"""Parquet encoding shared by every dataset cnnbatch writes: compression choices, schema metadata, ``_errors`` rows."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"cnnbatch"
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("error", pa.string())])


def with_metadata(fields: list[tuple[str, pa.DataType]], metadata: dict[str, Any]) -> pa.Schema:
    """A schema whose metadata (key ``cnnbatch``) records ``metadata`` as JSON."""
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _float_leaf(typ: pa.DataType) -> bool:
    """Whether a column's leaf values are floats, through any nesting of lists."""
    while pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ):
        typ = typ.value_type
    return pa.types.is_floating(typ)


def _leaf_path(name: str, typ: pa.DataType) -> str:
    """The Parquet leaf path of a (nested) list column's values: ``<name>.list.element[.list.element...]``."""
    path = name
    while pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ):
        path += ".list.element"
        typ = typ.value_type
    return path


# Row groups of tables with nested vector columns (augmented views: K x D floats a row) are cut to about this many
# bytes, so that a reader (train) holds one row group at a time in bounded memory. Flat tables keep one group.
NESTED_ROW_GROUP_BYTES = 16 * 2**20


def _depth(typ: pa.DataType) -> int:
    depth = 0
    while pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ):
        typ, depth = typ.value_type, depth + 1
    return depth


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    """zstd, no dictionary for floats, byte_stream_split on float columns (they compress ~15% better)."""
    # Parquet leaf paths: a list column's values live at "<name>.list.element"
    float_columns = [_leaf_path(n, t) for n, t in zip(table.schema.names, table.schema.types, strict=True)
                     if _float_leaf(t)]
    string_columns = [n for n, t in zip(table.schema.names, table.schema.types, strict=True)
                      if pa.types.is_string(t)]
    row_group_size = None
    if any(_depth(t) >= 2 for t in table.schema.types) and table.num_rows:
        row_group_size = max(1, NESTED_ROW_GROUP_BYTES // max(1, table.nbytes // table.num_rows))
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=row_group_size,
        compression="zstd",
        use_dictionary=[c for c in string_columns if c != "key"],
        use_byte_stream_split=float_columns or False,
        write_statistics=["key"],
    )
    return sink.getvalue().to_pybytes()


def errors_table(errors: list[tuple[str, str]]) -> pa.Table:
    return pa.Table.from_pylist([{"key": k, "error": e} for k, e in errors], schema=ERRORS_SCHEMA)
