"""Atomic writes, JSON Lines with line numbers, and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sphana.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and move it into place.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*"):  # left by a killed run
        if stale.is_dir() and stale.name.endswith((".tmp", ".old")):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def dumps_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def write_live_without_steps(live_dir: Path, metrics: dict[str, Any]) -> None:
    """A training stage's DVCLive outputs when it trained nothing (an imported model, a model
    shipped as is, a skipped component): its metrics and an empty plots directory."""
    write_json_atomic(live_dir / "metrics.json", metrics)
    (live_dir / "plots" / "metrics").mkdir(parents=True, exist_ok=True)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, dumps_json(data))


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSON Lines, atomically. Returns the number written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line.

    Raises:
        InputError: on invalid JSON or a line that is not an object, naming file and line.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(path, f"not UTF-8 text ({e.reason})", lineno) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    path, f"invalid JSON ({e.msg} at column {e.colno})", lineno
                ) from None
            if not isinstance(obj, dict):
                raise InputError(path, "expected a JSON object per line", lineno)
            yield lineno, obj


def load_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return [obj for _, obj in read_jsonl(path)]


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


SKIPPED_FILE = "skipped.json"  # what a stage writes instead of a component it could not build


def write_skipped(directory: str | os.PathLike[str], component: str, reason: str) -> None:
    """Write ``directory`` (atomically, replacing it) holding only ``skipped.json``: the
    component was not built, and why. Downstream stages and the manifest read it back with
    :func:`read_skipped`, so a DVC output exists either way."""
    with atomic_dir(directory) as tmp:
        write_json_atomic(tmp / SKIPPED_FILE, {"component": component, "reason": reason})


def read_skipped(directory: str | os.PathLike[str]) -> str | None:
    """The reason ``directory``'s component was skipped, or None when it was built."""
    marker = Path(directory) / SKIPPED_FILE
    if not marker.is_file():
        return None
    return str(json.loads(marker.read_text(encoding="utf-8"))["reason"])
