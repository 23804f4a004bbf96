"""Tokenized examples on disk: an uncompressed Arrow IPC file, memory-mapped and read row by row.

A job holds only the rows it touches: opening the file maps it (no row is read),
a row is a pair of zero-copy int32 views into the mapping, and the pages behind
rows a job never touches are never loaded. So a gradient shard job's memory
depends on its own rows, not on the pool's size (issue 10: the old Parquet
reader turned the whole pool into Python lists, ~70 bytes a token, in every job).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clusterucb.infra.io import atomic_path, decode_metadata, encode_metadata


def tokens_schema(extra_fields=(), metadata: dict[str, Any] | None = None) -> pa.Schema:
    """The columns of a tokenized file; ``metadata`` values are JSON-encoded under ``clusterucb.*``."""
    return pa.schema(
        [
            pa.field("example_id", pa.string(), nullable=False),
            *extra_fields,
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("labels", pa.list_(pa.int32()), nullable=False),
            pa.field("n_tokens", pa.int32(), nullable=False),
            pa.field("n_target_tokens", pa.int32(), nullable=False),
            pa.field("truncated", pa.bool_(), nullable=False),
        ],
        metadata=encode_metadata(metadata),
    )


def write_tokens(batches: Iterable[pa.RecordBatch | pa.Table], schema: pa.Schema, path: str | Path) -> int:
    """Stream ``batches`` into ``path`` (temp name, renamed when complete); returns the row count."""
    rows = 0
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for batch in batches:
            batch = batch.cast(schema) if isinstance(batch, pa.Table) else pa.Table.from_batches([batch]).cast(schema)
            writer.write_table(batch)
            rows += batch.num_rows
    return rows


class TokenTable(Sequence):
    """The rows of a tokenized file; ``table[i]`` is a dict whose ``input_ids``/``labels`` are int32 views.

    Slicing (``table[a:b]``) and :meth:`take` give another ``TokenTable`` without reading rows.
    """

    def __init__(self, table: pa.Table, path: str | Path | None = None):
        self.table = table
        self.path = path
        self._starts = np.cumsum([0] + [len(c) for c in table.column("example_id").chunks])
        self._chunks = None  # per record batch: (ids, ids offsets, labels, labels offsets, example ids), built lazily

    @classmethod
    def open(cls, path: str | Path) -> TokenTable:
        source = pa.memory_map(str(path), "r")
        return cls(pa.ipc.open_file(source).read_all(), path)

    @property
    def meta(self) -> dict[str, Any]:
        return decode_metadata(self.table.schema.metadata)

    def __len__(self) -> int:
        return self.table.num_rows

    def _views(self):
        if self._chunks is None:
            views = []
            for batch in self.table.to_batches():
                ids, labels = batch.column("input_ids"), batch.column("labels")
                views.append((ids.values.to_numpy(), ids.offsets.to_numpy(), labels.values.to_numpy(), labels.offsets.to_numpy(), batch))
            self._chunks = views
        return self._chunks

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self.take(np.arange(start, stop, step))
            return TokenTable(self.table.slice(start, max(0, stop - start)), self.path)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        chunk = int(np.searchsorted(self._starts, index, side="right") - 1)
        row = index - int(self._starts[chunk])
        ids, ids_off, labels, labels_off, batch = self._views()[chunk]
        out = {name: batch.column(name)[row].as_py() for name in batch.schema.names if name not in ("input_ids", "labels")}
        out["input_ids"] = ids[ids_off[row] : ids_off[row + 1]]
        out["labels"] = labels[labels_off[row] : labels_off[row + 1]]
        return out

    def take(self, indices: Sequence[int] | np.ndarray) -> TokenTable:
        """The rows at ``indices`` (in that order), as zero-copy one-row slices of the mapping.

        Not ``Table.take``: on a table of many record batches it first concatenates
        every batch of a list column, a copy of the whole pool per call.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return TokenTable(self.table.slice(0, 0), self.path)
        if indices.min() < 0 or indices.max() >= len(self):
            raise IndexError(f"row indices out of range for {len(self)} rows")
        return TokenTable(pa.concat_tables([self.table.slice(int(i), 1) for i in indices]), self.path)

    def ids(self) -> list[str]:
        return self.table.column("example_id").to_pylist()

    def lengths(self) -> np.ndarray:
        return self.table.column("n_tokens").to_numpy()

    def indices_of(self, example_ids: Sequence[str]) -> np.ndarray:
        """Row index of each id (an Arrow hash lookup, no Python list of the pool's ids); -1 where absent."""
        found = pc.index_in(pa.array(list(example_ids), pa.string()), value_set=self.table.column("example_id").combine_chunks())
        return found.fill_null(-1).to_numpy().astype(np.int64)

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist()


def token_meta(path: str | Path) -> dict[str, Any]:
    """The ``clusterucb.*`` metadata of a tokenized file (its schema; no row is read)."""
    with pa.memory_map(str(path), "r") as source:
        return decode_metadata(pa.ipc.open_file(source).schema.metadata)


def count_rows(path: str | Path) -> int:
    """Rows of a tokenized file, from its record-batch headers (no row is read)."""
    with pa.memory_map(str(path), "r") as source:
        reader = pa.ipc.open_file(source)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
