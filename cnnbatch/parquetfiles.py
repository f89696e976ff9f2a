"""Parquet files with an ``image`` column (binary, or Hugging Face's ``{bytes, path}`` struct), read a row group
at a time with bounded memory, every row accounted for (readers.py has the rules and the limits, which are read
from there at call time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fsspec

from . import readers, storage
from .readers import (
    Record,
    _constant,
    _nothing,
    file_stem,
    too_large,
)

# --- Parquet ----------------------------------------------------------------------------------------------------

IMAGE_TYPES = "binary, large_binary or struct<bytes: binary, path: string> (Hugging Face datasets' Image)"


def _is_binary(kind: Any) -> bool:
    import pyarrow as pa

    view = getattr(pa.types, "is_binary_view", None)
    return bool(pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or (view is not None and view(kind)))


def image_column_problem(schema: Any) -> str | None:
    """Why a Parquet file's ``image`` column cannot be read as images, or ``None`` when it can."""
    import pyarrow as pa

    if "image" not in schema.names:
        return f"no 'image' column (found columns {schema.names}); expected one of {IMAGE_TYPES}"
    kind = schema.field("image").type
    if _is_binary(kind):
        return None
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and _is_binary(kind.field("bytes").type):
        return None
    return f"the 'image' column is {kind}, expected {IMAGE_TYPES}"


def _key_column_problem(schema: Any) -> str | None:
    import pyarrow as pa

    if "key" not in schema.names:
        return None
    kind = schema.field("key").type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind) or (
            getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        return None
    return f"the 'key' column is {kind}, expected strings or integers"


class _ParquetKeys:
    """The keys a Parquet file gives: ``<file stem>/<key>``, or ``<file stem>/<row>`` for a null key; a key
    already given (a duplicate, or a fallback equal to a real key) makes that row an error row of its own."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.first_row: dict[str, int] = {}

    def key(self, value: Any, row: int) -> tuple[str, str | None]:
        candidate = f"{self.prefix}/{row if value is None else value}"
        first = self.first_row.get(candidate)
        if first is None:
            self.first_row[candidate] = row
            return candidate, None
        key, extra = f"{candidate}#{row}", 1
        while key in self.first_row:
            extra += 1
            key = f"{candidate}#{row}.{extra}"
        self.first_row[key] = row
        if value is None:
            return key, (f"null key, and its fallback {candidate!r} (<file>/<row>) is already the key of row "
                         f"{first} of this file; not used")
        return key, f"duplicate key {str(value)!r}: row {first} of this file has it too; only the first is used"


def _row_group_problem(metadata: Any, index: int, limit: int) -> tuple[str | None, int]:
    """A reason not to decode row group ``index`` (a decompression bomb), and rows per batch to decode it in."""
    group = metadata.row_group(index)
    columns = [group.column(i) for i in range(group.num_columns)]
    image = [c for c in columns if c.path_in_schema == "image" or c.path_in_schema.startswith("image.")]
    raw = sum(c.total_uncompressed_size for c in image)
    stored = sum(c.total_compressed_size for c in image)
    batch = max(1, min(256, limit // max(1, raw // max(1, group.num_rows))))
    if raw > limit and raw > readers.MAX_PARQUET_EXPANSION * max(1, stored):
        return (f"row group {index} not decoded: its image data decompresses to {raw} bytes from {stored} "
                f"({raw // max(1, stored)}x, over {readers.MAX_PARQUET_EXPANSION}x); refused as a decompression "
                "bomb"), batch
    return None, batch


def _cells(column: Any, limit: int) -> Iterator[tuple[bytes | None, str | None]]:
    """``(image bytes, None)`` or ``(None, why not)`` for each cell of a binary or ``{bytes, path}`` column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    valid = column.is_valid().to_pylist()
    paths: list[Any] = [None] * len(column)
    if pa.types.is_struct(column.type):
        fields = dict(zip((f.name for f in column.type), column.flatten()))  # offsets and the struct's nulls applied
        if "path" in fields:
            paths = fields["path"].to_pylist()
        column = fields["bytes"]
    lengths = pc.binary_length(column).to_pylist()
    for i, (ok, length) in enumerate(zip(valid, lengths)):
        if not ok or (length is None and paths[i] is None):
            yield None, "image is null"
        elif length is None:
            yield None, f"image bytes missing (path {str(paths[i])!r}); paths are not followed"
        elif length > limit:
            yield None, too_large("image cell", length, limit)
        else:
            yield column[i].as_py(), None


def parquet_records(fs: fsspec.AbstractFileSystem, path: str, rel: str) -> Iterator[Record]:
    """One record per row, in row order. A file whose ``image`` (or ``key``) column cannot be used gives an
    error row per row, naming the type found; a row group refused as a bomb gives an error row per row."""
    import pyarrow.parquet as pq

    limit = readers.MAX_RECORD_BYTES
    keys = _ParquetKeys(file_stem(rel))
    with storage.with_retries(lambda: fs.open(path, "rb"), f"open {path}") as handle:
        parquet = pq.ParquetFile(handle)
        schema = parquet.schema_arrow
        file_problem = image_column_problem(schema) or _key_column_problem(schema)
        key_column = "key" in schema.names and _key_column_problem(schema) is None
        label_column = "label" in schema.names
        row = 0
        for group in range(parquet.metadata.num_row_groups):
            problem, batch_size = _row_group_problem(parquet.metadata, group, limit)
            problem = file_problem or problem
            columns = [c for c, wanted in (("key", key_column), ("label", label_column), ("image", not problem))
                       if wanted]
            if not columns:  # nothing to read: the rows are errors with their fallback keys
                for _ in range(parquet.metadata.row_group(group).num_rows):
                    key, _error = keys.key(None, row)
                    yield Record(key, None, _nothing, error=problem)
                    row += 1
                continue
            for batch in parquet.iter_batches(batch_size=batch_size, row_groups=[group], columns=columns):
                values = batch.column("key").to_pylist() if key_column else [None] * batch.num_rows
                labels = batch.column("label").to_pylist() if label_column else [None] * batch.num_rows
                cells = _cells(batch.column("image"), limit) if not problem else iter(
                    [(None, problem)] * batch.num_rows)
                for value, label, (data, error) in zip(values, labels, cells):
                    key, key_error = keys.key(value, row)
                    error = key_error or error
                    yield Record(key, None if label is None else str(label),
                                 _nothing if error or data is None else _constant(data), error=error,
                                 nbytes=0 if error or data is None else len(data))
                    row += 1
