"""Load a release safely: what a model server calls before it opens a single model.

A release comes as a ``.tar.gz`` (:func:`sphana.manifest.package`), as one or several bundle
directories (:func:`sphana.manifest.write_bundles`, what ``dvc artifacts get`` writes: one per
component) or as a manifest file whose paths are relative to a root directory. :func:`open_release`
copies every file the manifest lists into a working directory while it hashes it, checks it
against the manifest's size and sha256, and returns a :class:`Release` only when all of them
match, so the bytes a server loads are the bytes that were checked.

Tarballs are streamed, never unpacked wholesale: ``manifest.json`` must come first and is read
(bounded) before anything else; afterwards only the regular files it lists are written, each one
refused the moment it holds more than its declared size, and the decompressed stream as a whole
may not exceed what the manifest accounts for. A small archive cannot expand to fill the disk.

Imports the standard library and sphana's own light modules only (no torch, DVC or Hydra).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from sphana.errors import InputError, SphanaError, VerifyError
from sphana.io import atomic_dir, dumps_json
from sphana.manifest import MANIFEST_NAME, parts, validate_schema

MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KiB; anything near this is not one
BLOCK_SIZE = 1 << 20  # files are copied, counted and hashed this many bytes at a time
# Decompressed bytes a tar member may take besides its data: its header block(s), including PAX
# extended headers (tarfile reads those into memory whole, hence the bound), and padding.
MEMBER_OVERHEAD = 64 << 10
_TAR_RECORD = 20 * 512  # tarfile's read size in stream mode: it may read this much ahead
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass(frozen=True)
class Component:
    """One component of a loaded release; every path is absolute, under :attr:`Release.root`."""

    name: str
    version: str
    model: Path  # the file the manifest ships for serving (entry ``path``): INT8 when quantized
    fp32: Path | None  # ``model_config.fp32_path``: the fp32 export (``model`` when unquantized)
    int8: Path | None  # the INT8 model where the release has one besides the fp32, else None
    quantized: bool
    files: dict[str, Path]  # every listed file: manifest path -> file
    entry: dict[str, Any]  # the component's manifest entry (metrics, signature, model_config...)
    manifest: dict[str, Any]  # the whole manifest of the source it came from (its provenance)
    source: Path  # the tarball, bundle directory or manifest file it came from


@dataclass(frozen=True)
class Release:
    """A verified release: every file of every component matched its manifest when copied."""

    manifest: dict[str, Any]  # the merged manifest (also written to ``root/manifest.json``)
    root: Path  # the directory holding ``manifest.json`` and the files at their manifest paths
    components: dict[str, Component]
    sources: tuple[Path, ...]

    def component(self, name: str) -> Component:
        """The component ``name``; a :class:`SphanaError` naming those present otherwise."""
        if name not in self.components:
            raise SphanaError(
                f"{self.root}: the release has no component {name!r} "
                f"(it has {', '.join(sorted(self.components)) or 'none'})"
            )
        return self.components[name]


# --- the manifest -------------------------------------------------------------------------


def is_tarball(path: Path) -> bool:
    """Whether ``path`` names a release tarball (by its suffix)."""
    return path.name.endswith(TARBALL_SUFFIXES)


def safe_relpath(rel: str) -> bool:
    """Whether a manifest path stays inside its root: relative, normalized, no ``.``/``..``."""
    if not rel or "\x00" in rel or "\\" in rel:
        return False
    pure = PurePosixPath(rel)
    if pure.is_absolute() or pure.as_posix() != rel:
        return False
    return all(part not in ("", ".", "..") for part in pure.parts)


def parse_manifest(data: bytes, source: str) -> dict[str, Any]:
    """``data`` as a manifest checked against its JSON Schema and for unsafe file paths.

    Raises:
        VerifyError: naming ``source`` (and the line of a JSON error).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VerifyError(f"{source}: not UTF-8 text ({e.reason})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise VerifyError(f"{source}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise VerifyError(f"{source}: nested too deeply to be a manifest") from None
    validate_schema(manifest, source)
    files, dirs = {MANIFEST_NAME}, set()
    for name, component in manifest["components"].items():
        for rel in [f["path"] for f in component["files"]] + [component["path"]]:
            if not safe_relpath(rel):
                raise VerifyError(
                    f"{source}: {name}: file path {rel!r} is unsafe (absolute, with an empty, "
                    "'.' or '..' part, or not normalized); refusing the release"
                )
            if rel == MANIFEST_NAME:
                raise VerifyError(f"{source}: {name}: a file may not be named {MANIFEST_NAME}")
        for f in component["files"]:
            files.add(f["path"])
            dirs.update(_parents(f["path"]))
    if files & dirs:
        raise VerifyError(
            f"{source}: {', '.join(sorted(files & dirs))}: both a file and a directory of files"
        )
    return manifest


def _parents(rel: str) -> list[str]:
    """``a/b/c`` -> ``["a/b", "a"]``."""
    return [p.as_posix() for p in PurePosixPath(rel).parents][:-1]


def read_manifest_file(path: Path) -> dict[str, Any]:
    """A manifest file (at most :data:`MAX_MANIFEST_BYTES`) parsed by :func:`parse_manifest`."""
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise VerifyError(f"{path}: not a regular file")
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise VerifyError(f"{path}: no manifest there") from None
    except OSError as e:
        raise VerifyError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise VerifyError(f"{path}: more than {MAX_MANIFEST_BYTES} bytes; not a manifest")
    return parse_manifest(data, str(path))


def listed_files(manifest: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every file the manifest lists (path -> its entry, with ``component``) and the manifest's
    own inconsistencies (a component path or checksum that is not one of its files)."""
    listed: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name, component in parts(manifest).items():
        own = {f["path"]: f for f in component["files"]}
        if component["path"] not in own:
            problems.append(f"{name}: path {component['path']} is not among its files")
        elif own[component["path"]]["sha256"] != component["checksum"]:
            problems.append(f"{name}: checksum differs from the sha256 of {component['path']}")
        fp32 = component.get("model_config", {}).get("fp32_path")
        if fp32 is not None and fp32 not in own:
            problems.append(f"{name}: model_config.fp32_path {fp32} is not among its files")
        for rel, f in own.items():
            seen = listed.get(rel)
            if seen is None:
                listed[rel] = {**f, "component": name}
            elif (seen["size"], seen["sha256"]) != (f["size"], f["sha256"]):
                problems.append(f"{name}: {rel} is listed by {seen['component']} differently")
    return listed, problems


# --- copying with a bound -------------------------------------------------------------------


def copy_bounded(
    src: IO[bytes], dest: Path | None, expected: dict[str, Any], label: str
) -> str | None:
    """Copy ``src`` to the new file ``dest`` (or only read it, when None) in blocks, counting and
    hashing; returns the mismatch with ``expected`` (``size``, ``sha256``) or None.

    Never reads more than one byte past the declared size nor writes any byte past it.

    Raises:
        VerifyError: as soon as ``src`` holds more than ``expected["size"]`` bytes (``dest``
            is removed).
    """
    limit = int(expected["size"])
    digest = hashlib.sha256()
    n = 0
    out = open(dest, "xb") if dest is not None else None  # noqa: SIM115 (closed below)
    try:
        while block := src.read(min(BLOCK_SIZE, limit - n + 1)):
            n += len(block)
            if n > limit:
                raise VerifyError(
                    f"{label}: holds more than the {limit} bytes its manifest declares; "
                    f"refused after {n} bytes, before writing any past them"
                )
            digest.update(block)
            if out is not None:
                out.write(block)
    except BaseException:
        if out is not None:
            out.close()
            dest.unlink(missing_ok=True)  # type: ignore[union-attr]
        raise
    if out is not None:
        out.close()
    if n != limit:
        return f"{label}: size {n} != {limit}"
    actual = f"sha256:{digest.hexdigest()}"
    if actual != expected["sha256"]:
        return f"{label}: sha256 {actual} != {expected['sha256']}"
    return None


class _Overrun(Exception):
    def __init__(self, limit: int) -> None:
        self.limit = limit


class _Bounded:
    """A read-only stream that raises once more than ``limit`` bytes have been read from it."""

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self.raw, self.limit, self.count = raw, limit, 0

    def read(self, size: int | None = -1) -> bytes:
        room = self.limit - self.count + 1
        data = self.raw.read(room if size is None or size < 0 else min(size, room))
        self.count += len(data)
        if self.count > self.limit:
            raise _Overrun(self.limit)
        return data


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link to {member.linkname}"
    if member.islnk():
        return f"a hard link to {member.linkname}"
    if member.isdir():
        return "a directory"
    if member.issparse():
        return "a sparse file"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a FIFO"
    return f"of tar type {member.type!r}"


def read_tarball(
    tarball: Path,
    dest: Path | None,
    before_extract: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Stream ``tarball`` safely into the directory ``dest`` (which must exist), or only check
    it when ``dest`` is None. Returns the manifest and its files' mismatches (altered, short or
    missing files: empty when all match).

    ``manifest.json`` must be the first member (at most :data:`MAX_MANIFEST_BYTES`); it is
    parsed and checked, then ``before_extract(manifest)`` may refuse it; only then are members
    written: each must be a regular file the manifest lists, once, no larger than declared.

    Raises:
        VerifyError: for an unreadable archive, a misplaced, oversized or invalid manifest, and
            any member that is unlisted, repeated, not a regular file, outside the root or larger
            than declared, naming it; nothing past that member is read. What was written under
            ``dest`` stays: give a scratch directory (:func:`open_release` does).
    """
    manifest_source = f"{tarball}:{MANIFEST_NAME}"
    try:
        raw = open(tarball, "rb")  # noqa: SIM115 (closed in finally)
    except OSError as e:
        raise VerifyError(f"{tarball}: not a readable bundle ({e.strerror or e})") from None
    try:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = _Bounded(
            gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw,
            MEMBER_OVERHEAD + MAX_MANIFEST_BYTES + 2 * _TAR_RECORD,
        )
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            first = tar.next()
            if first is None:
                raise VerifyError(f"{tarball}: an empty archive, no {MANIFEST_NAME}")
            if first.name != MANIFEST_NAME or not first.isfile() or first.issparse():
                raise VerifyError(
                    f"{tarball}: the first member is {first.name} "
                    f"({'a regular file' if first.isfile() else _kind(first)}), not "
                    f"{MANIFEST_NAME}; refusing to extract anything before the manifest is read"
                )
            if first.size > MAX_MANIFEST_BYTES:
                raise VerifyError(
                    f"{manifest_source}: {first.size} bytes, more than the "
                    f"{MAX_MANIFEST_BYTES} a manifest may have; refused"
                )
            reader = tar.extractfile(first)
            assert reader is not None  # a regular file
            manifest = parse_manifest(reader.read(MAX_MANIFEST_BYTES + 1), manifest_source)
            listed, problems = listed_files(manifest)
            if before_extract is not None:
                before_extract(manifest)
            # from here the whole stream may hold the listed files and their headers, no more
            stream.limit = stream.count + sum(
                -(-f["size"] // 512) * 512 + MEMBER_OVERHEAD for f in listed.values()
            )
            stream.limit += 2 * _TAR_RECORD + 1024
            seen: set[str] = set()
            while (member := tar.next()) is not None:
                name = member.name
                if not safe_relpath(name.rstrip("/")):
                    raise VerifyError(
                        f"{tarball}: member {name}: unsafe path (absolute, with '..' or not "
                        "normalized); refused without extracting it"
                    )
                if not member.isfile() or member.issparse():
                    raise VerifyError(
                        f"{tarball}: member {name} is {_kind(member)}, not a regular file; "
                        "refused without extracting it"
                    )
                if name not in listed:
                    raise VerifyError(
                        f"{tarball}: member {name} is not listed in the manifest; "
                        "refused without extracting it"
                    )
                if name in seen:
                    raise VerifyError(f"{tarball}: member {name} appears twice; refused")
                seen.add(name)
                expected = listed[name]
                label = f"{expected['component']}: {name}"
                if member.size > expected["size"]:
                    raise VerifyError(
                        f"{tarball}: {label}: {member.size} bytes, more than the "
                        f"{expected['size']} its manifest declares; refused without extracting it"
                    )
                target = None
                if dest is not None:
                    target = dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                reader = tar.extractfile(member)
                assert reader is not None
                try:
                    problem = copy_bounded(reader, target, expected, label)
                except VerifyError as e:
                    raise VerifyError(f"{tarball}: {e}") from None
                if problem:
                    problems.append(problem)
    except _Overrun as e:
        raise VerifyError(
            f"{tarball}: decompresses to more than the {e.limit} bytes its manifest accounts "
            "for; refused (a compression bomb?)"
        ) from None
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise VerifyError(f"{tarball}: not a readable bundle ({e})") from None
    finally:
        raw.close()
    problems += [
        f"{f['component']}: missing file {rel}" for rel, f in listed.items() if rel not in seen
    ]
    return manifest, problems


# --- directories ----------------------------------------------------------------------------


def _unlisted(bundle: Path, listed: dict[str, dict[str, Any]]) -> list[str]:
    """Files (and links) under ``bundle`` that are neither its manifest nor listed."""
    extra = []
    for parent, dirs, files in os.walk(bundle):
        here = Path(parent)
        # a link to a directory is an entry too, never followed
        for entry in [*files, *(d for d in dirs if (here / d).is_symlink())]:
            rel = (here / entry).relative_to(bundle).as_posix()
            if rel != MANIFEST_NAME and rel not in listed:
                extra.append(rel)
    return sorted(extra)


def read_directory(
    manifest: dict[str, Any], root: Path, dest: Path | None, bundle: bool
) -> list[str]:
    """Copy (or only check, when ``dest`` is None) every file ``manifest`` lists under ``root``,
    counting and hashing each as it goes; returns every mismatch (altered, missing, not a
    regular file, and for a ``bundle`` directory unlisted files), empty when all match."""
    listed, problems = listed_files(manifest)
    for rel, expected in listed.items():
        label = f"{expected['component']}: {rel}"
        try:
            src = open(root / rel, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            problems.append(f"{expected['component']}: missing file {rel}")
            continue
        except OSError as e:
            problems.append(f"{label}: cannot read ({e.strerror or e})")
            continue
        with src:
            info = os.fstat(src.fileno())
            if not stat.S_ISREG(info.st_mode):
                problems.append(f"{label}: not a regular file")
                continue
            if info.st_size != expected["size"]:  # known without reading it
                problems.append(f"{label}: size {info.st_size} != {expected['size']}")
                continue
            target = None
            if dest is not None:
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
            problem = copy_bounded(src, target, expected, label)
            if problem:
                problems.append(problem)
    if bundle:
        problems += [f"unlisted file {rel}" for rel in _unlisted(root, listed)]
    return problems


# --- a release --------------------------------------------------------------------------------


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _check_workdir(workdir: Path, sources: Sequence[Path]) -> None:
    resolved = workdir.resolve()
    if workdir.exists():
        if not workdir.is_dir():
            raise InputError(workdir, "is not a directory; give a new or empty one")
        if any(workdir.iterdir()) and not (workdir / MANIFEST_NAME).is_file():
            raise InputError(
                workdir,
                "is not empty and holds no release; it would be replaced whole, "
                "so give a new or empty directory (or one a release was loaded into)",
            )
    for source in sources:
        src = source.resolve()
        if _inside(src, resolved) or (source.is_dir() and _inside(resolved, src)):
            raise InputError(
                source, f"overlaps the working directory {workdir}; give one outside it"
            )


def _version_key(requirement: str) -> tuple[int, ...]:
    digits = requirement.lstrip("<>=!~ ")
    try:
        return tuple(int(p) for p in digits.split("."))
    except ValueError:
        return ()


def merge(manifests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One manifest of several with distinct components: the first's fields, every component,
    the highest opset and version requirements (``onnxruntime``, ``cuda``...), and the union of
    their provenance stages (the first's record of a stage wins; each component's own is in
    :attr:`Component.manifest`)."""
    first = manifests[0]
    if len(manifests) == 1:
        return first
    components: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    stages: dict[str, Any] = {}
    data: dict[str, Any] = {}
    signals: dict[str, Any] = {}
    system = dict(first["system_requirements"])
    index = next((m["index"] for m in manifests if "index" in m), None)
    for m in manifests:
        components.update(m["components"])
        skipped.update(m["skipped_components"])
        for stage, record in m["provenance"]["stages"].items():
            stages.setdefault(stage, record)
        for path, md5 in (m["provenance"].get("data") or {}).items():
            data.setdefault(path, md5)
        for name, signal in (m["training_signals"].get("signals") or {}).items():
            signals.setdefault(name, signal)
        for key, value in m["system_requirements"].items():
            have = system.get(key)
            if have is None:
                system[key] = value
            elif isinstance(value, int) and isinstance(have, int):  # opset
                system[key] = max(have, value)
            elif isinstance(value, str) and isinstance(have, str):  # ">=1.17.0"
                system[key] = max(have, value, key=_version_key)
    return {
        **first,
        "schema_version": min(m["schema_version"] for m in manifests),
        "components": components,
        "skipped_components": {k: v for k, v in skipped.items() if k not in components},
        "training_signals": {**first["training_signals"], "signals": signals},
        "system_requirements": system,
        "provenance": {**first["provenance"], "data": data, "stages": stages},
        **({"index": index} if index is not None else {}),
    }


def open_release(sources: Sequence[Path], workdir: Path, *, root: Path | None = None) -> Release:
    """Load a release from ``sources`` into ``workdir`` and return it once every file matches.

    Each source is a release tarball, a bundle directory (``manifest.json`` and its files; no
    other files) or a manifest file whose paths are relative to ``root`` (default: the manifest's
    directory). Several sources merge into one release (:func:`merge`); two holding the same
    component, or the same file path, are refused. Every listed file is copied into ``workdir``
    while its size and sha256 are checked (tarballs as :func:`read_tarball` describes), then the
    merged manifest is written there as ``manifest.json``.

    ``workdir`` is replaced whole and only on success (nothing of a failed load stays): it must
    be new, empty, or a directory a release was loaded into, and must not overlap a source.

    Raises:
        VerifyError: naming the source and every file that differs (or the first unsafe member of
            a tarball), or a manifest that fails its JSON Schema.
        InputError: for a missing source or an unusable ``workdir``.
    """
    if isinstance(sources, (str, os.PathLike)):  # one source given bare
        sources = [sources]
    sources = [Path(s) for s in sources]
    workdir = Path(workdir).absolute()
    if not sources:
        raise SphanaError("open_release: no source given (a tarball, bundles or a manifest)")
    for source in sources:
        if not source.exists():
            raise InputError(source, "no such file or directory")
    _check_workdir(workdir, sources)
    owner: dict[str, Path] = {}  # component -> the source that brought it
    paths: dict[str, Path] = {}  # file path -> the source that brought it
    dirs: dict[str, Path] = {}  # directory of files -> the source that brought it
    manifests: list[tuple[Path, dict[str, Any]]] = []

    def claim(source: Path, manifest: dict[str, Any]) -> None:
        """Refuse a source whose components or files another source already brought."""
        for name in manifest["components"]:
            if name in owner:
                raise VerifyError(
                    f"{source}: component {name} is also in {owner[name]}; "
                    "give one source per component"
                )
        rels = {f["path"] for c in parts(manifest).values() for f in c["files"]}
        for rel in sorted(rels):
            other = paths.get(rel) or dirs.get(rel)
            other = other or next((paths[p] for p in _parents(rel) if p in paths), None)
            if other is not None:
                raise VerifyError(f"{source}: its file {rel} collides with one of {other}")
        owner.update(dict.fromkeys(manifest["components"], source))
        for rel in rels:
            paths[rel] = source
            dirs.update(dict.fromkeys(_parents(rel), source))

    with atomic_dir(workdir) as tmp:
        for source in sources:
            if source.is_dir():
                manifest = read_manifest_file(source / MANIFEST_NAME)
                claim(source, manifest)
                problems = read_directory(manifest, source, tmp, bundle=True)
            elif is_tarball(source):
                manifest, problems = read_tarball(source, tmp, lambda m, s=source: claim(s, m))
            else:
                manifest = read_manifest_file(source)
                claim(source, manifest)
                base = root if root is not None else source.parent
                problems = read_directory(manifest, base, tmp, bundle=False)
            if problems:
                raise VerifyError(
                    f"{source}: {len(problems)} mismatch(es):\n  " + "\n  ".join(problems)
                )
            manifests.append((source, manifest))
        merged = merge([m for _, m in manifests])
        validate_schema(merged, f"the merged manifest of {', '.join(map(str, sources))}")
        (tmp / MANIFEST_NAME).write_text(dumps_json(merged), encoding="utf-8")

    components: dict[str, Component] = {}
    for source, manifest in manifests:
        for name, entry in manifest["components"].items():
            fp32 = entry["model_config"].get("fp32_path")
            quantized = bool(entry["model_config"]["quantized"])
            components[name] = Component(
                name=name,
                version=entry["version"],
                model=workdir / entry["path"],
                fp32=workdir / fp32 if fp32 is not None else None,
                int8=workdir / entry["path"] if quantized and entry["path"] != fp32 else None,
                quantized=quantized,
                files={f["path"]: workdir / f["path"] for f in entry["files"]},
                entry=entry,
                manifest=manifest,
                source=source,
            )
    return Release(
        manifest=merged,
        root=workdir,
        components=dict(sorted(components.items())),
        sources=tuple(sources),
    )
