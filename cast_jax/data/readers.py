"""One reader for every dataset source: local JSONL / JSON / CSV / TSV / parquet files or hub ids.

Rows come back as plain dicts. Field lookup goes through `resolve_fields`, which maps each
canonical field to a source column (first matching candidate, or the caller's override) and fails
with the file, the field and the columns it did find.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Mapping, Sequence

# utf-8-sig: Excel and Notepad exports start with a byte-order mark, which plain utf-8 would
# keep as part of the first column name ("\ufeffquestion").
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
               ".parquet": "parquet", ".pq": "parquet"}

# canonical field -> candidate column names, first present wins.
FieldSpec = Mapping[str, Sequence[str]]
# canonical field -> a column name, or a list of columns whose values form a list.
FieldOverrides = Mapping[str, "str | Sequence[str]"]


class DataError(ValueError):
  """Unreadable, empty or mis-shaped dataset input; the message names the source and the fix."""


def _read_jsonl(path: str) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8-sig") as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise DataError(f"{path}: line {lineno} is not valid JSON ({e}).") from e
  return rows


def _read_json(path: str) -> list[dict]:
  with open(path, encoding="utf-8-sig") as f:
    text = f.read()
  if not text.strip():
    return []
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e}). JSON Lines files need a .jsonl suffix.") from e
  if isinstance(data, dict) and isinstance(data.get("data"), list):
    data = data["data"]
  if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
    lengths = {len(v) for v in data.values()}
    if len(lengths) != 1:
      raise DataError(f"{path}: columnar JSON with columns of unequal lengths {sorted(lengths)}.")
    data = [dict(zip(data, vals)) for vals in zip(*data.values())]
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a JSON list of objects (or columns of equal-length lists), "
                    f"got {type(data).__name__}.")
  return data


def _read_csv(path: str, delimiter: str = ",") -> list[dict]:
  with open(path, encoding="utf-8-sig", newline="") as f:
    return list(csv.DictReader(f, delimiter=delimiter))


def _read_parquet(path: str) -> list[dict]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  return pq.read_table(path).to_pylist()


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv,
            "tsv": lambda path: _read_csv(path, "\t"), "parquet": _read_parquet}


def _load_hub(source: str, subset: str | None, split: str | None,
              hub_kwargs: Mapping[str, Any]) -> list[dict]:
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    ds = datasets.load_dataset(source, subset, split=split, **hub_kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{source!r} is not a local file, and datasets.load_dataset({source!r}, "
                    f"{subset!r}, split={split!r}) failed: {type(e).__name__}: {e}. Pass a path "
                    "to a local .jsonl/.json/.csv/.parquet file instead.") from e
  if isinstance(ds, Mapping):  # a DatasetDict: split=None
    raise DataError(f"{source!r}: pass split= (one of {sorted(ds)}).")
  return [dict(r) for r in ds]


def read_rows(source: str | os.PathLike | Sequence[Mapping[str, Any]], *,
              subset: str | None = None, split: str | None = None,
              file_format: str | None = None,
              hub_kwargs: Mapping[str, Any] | None = None) -> tuple[list[dict], str]:
  """Reads all rows of a dataset.

  Args:
    source: a local file path (format from the suffix or `file_format`), a hub dataset id for
      `datasets.load_dataset`, or already-loaded rows (list of dicts / a `datasets.Dataset`).
    subset: hub config name (ignored for local files). split: hub split (ignored for files).
    file_format: one of "jsonl", "json", "csv", "tsv", "parquet" to override the suffix.
    hub_kwargs: extra keyword arguments for `datasets.load_dataset` (hub ids only).
  Returns:
    (rows, description): list of dicts, and a name for the source to use in error messages.
  Raises:
    DataError: unreadable / empty source.
  """
  if not isinstance(source, (str, os.PathLike)):
    rows, desc = [dict(r) for r in source], f"<{type(source).__name__} of rows>"
  else:
    path = os.fspath(source)
    suffix = os.path.splitext(path)[1].lower()
    fmt = file_format or _EXTENSIONS.get(suffix)
    if os.path.isfile(path):
      if fmt not in _READERS:
        raise DataError(f"{path}: unknown format {suffix!r}; pass file_format= one of "
                        f"{sorted(_READERS)}.")
      try:
        rows = _READERS[fmt](path)
      except DataError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f"{path}: could not read as {fmt}: {type(e).__name__}: {e}") from e
      desc = path
    elif fmt is not None:
      raise DataError(f"{path}: no such file.")
    else:
      rows = _load_hub(path, subset, split, hub_kwargs or {})
      desc = f"{path} ({subset or 'default'}/{split})"
  if not rows:
    raise DataError(f"{desc}: empty, no rows found.")
  bad = next((i for i, r in enumerate(rows) if not isinstance(r, Mapping)), None)
  if bad is not None:
    raise DataError(f"{desc}: row {bad} is a {type(rows[bad]).__name__}, expected an object.")
  return rows, desc


def resolve_fields(rows: Sequence[Mapping[str, Any]], spec: FieldSpec, *, required: Sequence[str],
                   overrides: FieldOverrides | None = None,
                   desc: str = "dataset") -> dict[str, str | tuple[str, ...]]:
  """Maps each canonical field of `spec` to the source column(s) holding it.

  Args:
    rows: the rows (the union of their keys is searched).
    spec: canonical field -> candidate column names.
    required: canonical fields that must be found; others map only when present.
    overrides: canonical field -> column name, or a list of columns (their values form a list).
    desc: source name for error messages.
  Returns:
    dict canonical field -> column name (or tuple of column names).
  Raises:
    DataError naming the source, the field, the columns looked for and the columns found.
  """
  columns = set().union(*(r.keys() for r in rows))
  overrides = dict(overrides or {})
  unknown = set(overrides) - set(spec)
  if unknown:
    raise DataError(f"{desc}: fields= names unknown field(s) {sorted(unknown)}; this schema has "
                    f"{sorted(spec)}.")
  out: dict[str, str | tuple[str, ...]] = {}
  for field, candidates in spec.items():
    if field in overrides:
      want = overrides[field]
      cols = (want,) if isinstance(want, str) else tuple(want)
      missing = [c for c in cols if c not in columns]
      if missing:
        raise DataError(f"{desc}: column(s) {missing} given for field {field!r} not found; "
                        f"columns found: {sorted(columns)}.")
      out[field] = want if isinstance(want, str) else cols
      continue
    hit = next((c for c in candidates if c in columns), None)
    if hit is not None:
      out[field] = hit
    elif field in required:
      raise DataError(f"{desc}: missing field {field!r} (looked for column(s) {list(candidates)}); "
                      f"columns found: {sorted(columns)}. Map it with fields={{{field!r}: "
                      "'<column>'}.")
  return out


def get_value(row: Mapping[str, Any], column: str | tuple[str, ...] | None,
              default: Any = None) -> Any:
  """Value of `column` in `row` (a list for a tuple of columns); `default` if unmapped/absent."""
  if column is None:
    return default
  if isinstance(column, tuple):
    return [row.get(c) for c in column]
  value = row.get(column, default)
  return default if value is None else value
