"""`datasets.Dataset` splits built from Arrow tables with a content fingerprint: nothing is pickled.

`datasets` fingerprints a Dataset built without an explicit fingerprint (`Dataset.from_dict`, every
transform such as `cast_column`/`select`) by pickling its state with dill. dill pickles a module by value
when the module's file lies outside `sys.prefix` and outside any `site-packages` folder (e.g. a
`pip install --target DIR` + PYTHONPATH install, as on a GPU image whose system Python refuses pip),
and pyarrow's module namespace holds a class dill cannot pickle (`MonthDayNano`): loading a benchmark
then dies with a `PicklingError` (docs/decisions.md, "Benchmarks are built without dill").
The functions here build, subset and read splits through pyarrow only and never call a `datasets`
function that hashes.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import pyarrow as pa

FINGERPRINT_VERSION = b"3rtpr-split-v1"  # change when the table layout of the splits changes


def content_fingerprint(table: pa.Table) -> str:
    """16 hex characters: blake2b of the table's Arrow IPC stream (schema, feature metadata and data)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    digest = hashlib.blake2b(FINGERPRINT_VERSION, digest_size=8)
    digest.update(memoryview(sink.getvalue()))
    return digest.hexdigest()


def _dataset(table: pa.Table, features):
    import datasets

    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features),
                            fingerprint=content_fingerprint(table))


def build_split(columns: dict, features):
    """A `datasets.Dataset` with `features` (a `datasets.Features`) from python columns (name -> list);
    an `Image()` column takes file paths. Its fingerprint is the content hash of the Arrow table."""
    encoded = features.encode_batch(columns)
    return _dataset(pa.Table.from_pydict(encoded, schema=features.arrow_schema), features)


def arrow_table(split) -> pa.Table:
    """The split's rows, in order, as a pyarrow Table (an indices mapping from `select`/`shuffle` applied)."""
    table = split.data.table
    indices = getattr(split, "_indices", None)
    if indices is not None:
        table = table.take(indices.column(0))
    return table


def keep_rows(split, rows: Sequence[int]):
    """The rows `rows` (positions in `split`, e.g. `verify_images(split).keep`) as a new split with the same
    features; nothing is hashed. An `index` column (the training split's sample position, which per-sample
    training state is indexed by) is renumbered 0..R-1; every other column keeps its values."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= len(split))):
        raise ValueError(f"rows must be 1-D positions in [0, {len(split)}), got shape {rows.shape}")
    table = arrow_table(split).take(pa.array(rows, type=pa.int64()))
    if "index" in table.column_names:
        position = table.column_names.index("index")
        table = table.set_column(position, table.schema.field(position),
                                 pa.array(np.arange(len(rows), dtype=np.int64)))
    return _dataset(table, split.features)


def column_values(split, name: str) -> list:
    """One column as python values (an `Image()` column as dicts {"bytes", "path"}, not decoded)."""
    if name not in split.column_names:
        raise ValueError(f"split lacks column {name!r} (columns: {split.column_names})")
    return arrow_table(split).column(name).to_pylist()
