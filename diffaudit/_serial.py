"""Typed dataclass <-> JSON helpers shared by every result type.

Results are dataclasses, never bare dicts; this module turns them into plain JSON values and back,
following the type hints, so each result class only needs ``JsonMixin``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import numpy as np

T = TypeVar("T")


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses / numpy values / paths to JSON values. Non-finite floats become None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


_JSON_KIND = {list: "a list", tuple: "a list", dict: "an object"}


def _convert(tp: Any, value: Any, where: str = "value") -> Any:
    """``value`` (parsed JSON) as type ``tp``; a value of the wrong JSON kind is a ValueError naming ``where`` (the
    field's path, e.g. ``checkpoints[0].metrics``), never an AttributeError deep in a report."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where) if len(args) == 1 else value
    if value is None:
        if dataclasses.is_dataclass(tp) or origin in (list, typing.List, tuple, typing.Tuple, dict, typing.Dict):
            raise ValueError(f"{where}: null where {_kind(tp, origin)} is expected")
        return None
    if dataclasses.is_dataclass(tp):
        return from_jsonable(tp, value, where)
    if origin in (list, typing.List):
        (arg,) = get_args(tp) or (Any,)
        _expect(value, list, tp, origin, where)
        return [_convert(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (tuple, typing.Tuple):
        _expect(value, list, tp, origin, where)
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))) if args else \
            tuple(value)
    if origin in (dict, typing.Dict):
        kt, vt = get_args(tp) or (Any, Any)
        _expect(value, dict, tp, origin, where)
        return {k: _convert(vt, v, f"{where}[{k!r}]") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: expected an integer, got {type(value).__name__}")
    if tp is str and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
    if tp is Path:
        return Path(value)
    return value


def _kind(tp: Any, origin: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return f"an object ({tp.__name__})"
    return _JSON_KIND.get(origin, "a value")


def _expect(value: Any, json_type: type, tp: Any, origin: Any, where: str) -> None:
    if not isinstance(value, json_type):
        raise ValueError(f"{where}: expected {_kind(tp, origin)}, got {type(value).__name__}")


def from_jsonable(cls: type[T], data: dict, where: str | None = None) -> T:
    """Build dataclass ``cls`` from JSON data; unknown keys and values of the wrong kind are errors (a newer file,
    a typo, or a hand-edited one), each naming the field."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown keys for {cls.__name__}: {sorted(unknown)}; allowed: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, KeyError) as e:  # a __post_init__ that rejects the values
        raise ValueError(f"{where}: {e}") from e


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` via a temp file + rename in the same folder (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp creates 0600; results are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class JsonMixin:
    """``to_json(path=None)`` / ``from_json(path_or_text)`` for dataclasses."""

    def to_dict(self) -> dict:
        return to_jsonable(self)

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, sort_keys=False, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls: type[T], data: dict) -> T:
        return from_jsonable(cls, data)

    @classmethod
    def from_json(cls: type[T], path_or_text: str | os.PathLike) -> T:
        s = str(path_or_text)
        if s.lstrip().startswith("{"):
            data = json.loads(s)
        else:
            p = Path(s)
            if not p.is_file():
                raise FileNotFoundError(f"{cls.__name__}.from_json: no such file: {s!r}")
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{s!r} is not a JSON file ({e})") from e
            try:
                return from_jsonable(cls, data)  # type: ignore[arg-type]
            except ValueError as e:
                raise ValueError(f"{s!r} is not a valid {cls.__name__} file: {e}") from e
        return from_jsonable(cls, data)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------- CSV
#: leading characters that make a spreadsheet run a cell as a formula (OWASP "CSV injection")
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """One CSV cell: numbers as numbers (``repr`` of finite floats, "" for None/NaN/inf), text with a leading ``'``
    when a spreadsheet would read it as a formula."""
    if value is None or isinstance(value, bool):
        return "" if value is None else str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if math.isfinite(float(value)) else ""
    s = str(value)
    return "'" + s if s.startswith(CSV_FORMULA_START) else s


def write_csv(path: str | os.PathLike | None, header: list[str], rows) -> str:
    """The one CSV writer of diffaudit: ``header`` then ``rows`` (cells through :func:`csv_cell`), "\\n" line ends
    (fields holding newlines are quoted), written atomically to ``path`` when given; returns the text."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")  # "\r\n" so that cells holding \r or \n get quoted ...
    lines = []
    for row in [header, *([csv_cell(c) for c in r] for r in rows)]:
        buf.seek(0)
        buf.truncate()
        w.writerow(row)
        lines.append(buf.getvalue()[:-2])  # ... then each row ends with a plain "\n"
    text = "\n".join(lines) + "\n"
    if path is not None:
        atomic_write_text(path, text)
    return text
