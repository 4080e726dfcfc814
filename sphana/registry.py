"""Model registry: versions and stages of the ``artifacts:`` of ``dvc.yaml`` as git tags in GTO's
format (``<name>@v<semver>`` registers a version, ``<name>#<stage>#<n>`` assigns a stage,
``<name>#<stage>!#<n>`` unassigns it), written through the GTO library.

A stage holds one version at a time, the one ``dvc artifacts get --stage`` downloads: the target
of the newest tag that names the stage. ``promote`` unassigns the stage from the version holding
it and then assigns it, one second later, so GTO (``gto show``) and DVC agree on the holder;
``rollback`` does the same back to the version that held the stage before.

A component version's content is its bundle directory (``paths.bundles/<name>``: the manifest
excerpt and the component's files); ``release`` is the tarball. Both are DVC outputs: their
bytes come from the DVC cache or the DVC remote, the manifest of a version is found through that
version's ``dvc.lock``.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sphana.errors import SphanaError, VerifyError

RELEASE = "release"  # the artifact of the whole tarball; the others are components
# the figure `list` shows per component: (evaluation section, key), read from each version's
# manifest (`evaluation`; schema version 1 manifests had these nested figures under `metrics`)
KEY_METRICS = {
    "embedding": ("validation", "recall@5"),
    "relation": ("validation", "macro_f1"),
    "gnn": ("validation", "ndcg@10"),
    "llm": ("validation", "perplexity"),
}


class RegistryError(SphanaError):
    """A registry command that cannot be done as asked (and what to do instead)."""


@dataclass
class Version:
    name: str
    version: str  # "v1.2.3"
    commit: str
    created_at: str
    stages: list[str] = field(default_factory=list)  # the stages this version holds now
    latest: bool = False  # the highest version of its artifact


def normalize(version: str) -> str:
    """``1.2.3`` or ``v1.2.3`` -> ``v1.2.3``; anything else is refused."""
    import semver

    bare = version[1:] if version.startswith("v") else version
    if not semver.Version.is_valid(bare):
        raise RegistryError(
            f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 0.2.0)"
        )
    return f"v{bare}"


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RegistryError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip()}")
    return proc.stdout


@functools.cache
def declared(root: Path) -> dict[str, dict[str, Any]]:
    """The ``artifacts:`` of ``dvc.yaml`` (name -> path, type, desc, labels; paths unresolved)."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise RegistryError(f"{dvc_yaml}: not found; run sphana from the repository root")
    return (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("artifacts") or {}


def _check_name(root: Path, name: str) -> None:
    names = declared(root)
    if name not in names:
        raise RegistryError(
            f"{name!r} is not an artifact of {root / 'dvc.yaml'} (artifacts: {', '.join(names)})"
        )


@contextmanager
def _gto(root: Path) -> Iterator[Any]:
    """GTO's registry: what writes the tags."""
    from gto.registry import GitRegistry

    with GitRegistry.from_url(str(root)) as reg:
        yield reg


# GTO's tag names (gto.constants.tag_re, for the artifacts of a top-level dvc.yaml), read here
# with one `git for-each-ref`: GTO's own reader (and its import) takes ~1.5 s for 50 versions.
_NAME = r"[a-zA-Z0-9](?:[a-zA-Z0-9-/_]*[a-zA-Z0-9])?"
_NUMBER = r"(?:0|[1-9]\d*)"
_IDENT = r"(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)"
_SEMVER = (
    rf"{_NUMBER}\.{_NUMBER}\.{_NUMBER}(?:-{_IDENT}(?:\.{_IDENT})*)?"
    r"(?:\+[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*)?"
)
TAG = re.compile(
    rf"^(?P<name>{_NAME})"
    rf"(?:(?:#(?P<stage>{_NAME})|@(?P<version>v{_SEMVER}))(?P<cancel>!?)|@deprecated|@created)"
    r"(?:#[0-9]+)?$"
)


@dataclass(frozen=True)
class Tag:
    tag: str
    commit: str  # the tagged commit
    time: int  # tagger time, seconds: what DVC orders a stage's tags by
    version: str | None  # a (de)registration tag
    stage: str | None  # an (un)assignment tag
    cancel: bool  # deregistration or unassignment

    @property
    def order(self) -> tuple[int, str]:
        return self.time, self.tag


@dataclass
class History:
    """The tags of one artifact, oldest first. Stages are held by commits (what DVC fetches);
    a commit's version is its registration, if it has one that was not deregistered."""

    name: str
    tags: list[Tag]

    @functools.cached_property
    def registered(self) -> dict[str, Tag]:
        """version -> its registration tag, for the versions not deregistered since."""
        newest: dict[str, Tag] = {}
        for t in self.tags:
            if t.version:
                newest[t.version] = t
        return {v: t for v, t in newest.items() if not t.cancel}

    @functools.cached_property
    def versions_at(self) -> dict[str, str]:
        return {t.commit: v for v, t in self.registered.items()}

    def label(self, commit: str) -> str:
        return self.versions_at.get(commit, commit[:8])

    def holders(self) -> dict[str, str]:
        """stage -> the commit holding it, as ``dvc artifacts get --stage`` resolves it: the
        target of the newest tag naming the stage (an assignment or not)."""
        return {t.stage: t.commit for t in self.tags if t.stage}

    def active(self, stage: str) -> list[str]:
        """Commits whose last event for ``stage`` is an assignment (what GTO shows)."""
        last = {t.commit: t for t in self.tags if t.stage == stage}
        return [commit for commit, t in last.items() if not t.cancel]

    def assignments(self, stage: str) -> list[tuple[tuple[int, str], str]]:
        """(order, commit) of each assignment of ``stage``, oldest first."""
        return [(t.order, t.commit) for t in self.tags if t.stage == stage and not t.cancel]


def histories(root: Path) -> dict[str, History]:
    """Every artifact's annotated GTO tags (GTO and DVC ignore lightweight tags)."""
    fields = "%(objecttype) %(taggerdate:unix) %(*objectname) %(refname:strip=2)"
    out: dict[str, History] = {}
    for line in _git(root, "for-each-ref", "refs/tags", f"--format={fields}").splitlines():
        kind, when, commit, tag = line.split(" ", 3)
        match = TAG.match(tag)
        if kind != "tag" or not match:
            continue
        name = match["name"]
        out.setdefault(name, History(name, [])).tags.append(
            Tag(
                tag,
                commit,
                int(when),
                match["version"],
                match["stage"],
                match["cancel"] == "!",
            )
        )
    for history in out.values():
        history.tags.sort(key=lambda t: t.order)
    return out


def history(root: Path, name: str) -> History:
    return histories(root).get(name, History(name, []))


def _semver_key(version: str) -> Any:
    import semver

    return semver.Version.parse(version[1:])


def versions(root: Path, name: str, tags: History | None = None) -> list[Version]:
    """Registered versions of ``name``, highest first."""
    tags = tags or history(root, name)
    holders = tags.holders()
    ordered = sorted(tags.registered, key=_semver_key, reverse=True)
    out = []
    for i, version in enumerate(ordered):
        tag = tags.registered[version]
        out.append(
            Version(
                name=name,
                version=version,
                commit=tag.commit,
                created_at=dt.datetime.fromtimestamp(tag.time, dt.timezone.utc).isoformat(),
                stages=sorted(s for s, commit in holders.items() if commit == tag.commit),
                latest=i == 0,
            )
        )
    return out


def find(root: Path, name: str, version: str, tags: History | None = None) -> Version:
    version = normalize(version)
    for v in versions(root, name, tags):
        if v.version == version:
            return v
    raise RegistryError(
        f"{name} {version} is not registered (`sphana artifacts list {name}` shows its versions)"
    )


def _wait_past_newest_tag(root: Path, name: str) -> None:
    """Tag times have a resolution of one second and DVC orders a stage's tags by time: a new
    tag must be strictly newer than every tag of the artifact."""
    newest = max((t.time for t in history(root, name).tags), default=0)
    if newest > time.time() + 5:
        raise RegistryError(
            f"a tag of {name} is dated {newest - time.time():.0f} s in the future (clock skew "
            "between machines?): a new tag would not be the newest; fix the clock and retry"
        )
    while time.time() < newest + 1:
        time.sleep(0.05)


# --- reading a version's files ------------------------------------------------------------


def _manifest_out(root: Path, commit: str) -> tuple[str, str]:
    """(path, md5) of the manifest stage's output in ``commit``'s dvc.lock. Parses only the
    lines of that stage's ``outs`` where it can: a whole dvc.lock takes ~40 ms to parse, and
    `list` reads one per version."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    text = _git(root, "show", f"{commit}:dvc.lock")
    lines = text.splitlines(keepends=True)
    try:  # dvc.lock as DVC lays it out: "  manifest:" ... "    outs:" then deeper lines
        start = lines.index("    outs:\n", lines.index("  manifest:\n"))
        end = next(
            (
                i
                for i in range(start + 1, len(lines))
                if not lines[i].startswith(("    -", "     "))
            ),
            None,
        )
        outs = yaml.load("".join(lines[start:end]), Loader=loader)["outs"]
    except (ValueError, KeyError, TypeError, yaml.YAMLError):
        stages = (yaml.load(text, Loader=loader) or {}).get("stages", {})
        outs = (stages.get("manifest") or {}).get("outs")
    if not outs:
        raise RegistryError(f"dvc.lock of commit {commit[:8]} has no manifest stage output")
    (out,) = outs
    return out["path"], out["md5"]


@functools.cache
def cache_dir(root: Path) -> Path:
    """DVC's local cache directory (``cache.dir`` at any config level; default .dvc/cache),
    from DVC's config alone: opening the repository costs ~0.4 s more."""
    from dvc.config import Config

    configured = Config(str(root / ".dvc")).get("cache", {}).get("dir")
    return Path(configured) if configured else root / ".dvc" / "cache"


def _cache_path(root: Path, md5: str) -> Path:
    return cache_dir(root.resolve()) / "files" / "md5" / md5[:2] / md5[2:]


def manifest_at(root: Path, commit: str, fetch: bool = True) -> dict[str, Any] | None:
    """The release manifest built at ``commit``: from the DVC cache, else (``fetch``) through
    DVC from the remote; ``None`` when it is in neither place that was looked at."""
    path, md5 = _manifest_out(root, commit)
    cached = _cache_path(root, md5)
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    if not fetch:
        return None
    from dvc.api import DVCFileSystem

    try:
        text = DVCFileSystem(str(root), rev=commit).read_text(path, encoding="utf-8")
    except Exception as e:  # DVC's errors for a missing remote or object vary
        raise RegistryError(
            f"the manifest of commit {commit[:8]} ({path}) is neither in the DVC cache nor "
            f"on the remote ({e}); run `dvc push` where it was built"
        ) from None
    return json.loads(text)


def _component_manifest(root: Path, v: Version, fetch: bool = True) -> dict[str, Any] | None:
    from sphana.manifest import excerpt

    manifest = manifest_at(root, v.commit, fetch)
    if manifest is None or v.name == RELEASE:
        return manifest
    if v.name not in manifest["components"]:
        raise RegistryError(f"{v.name} {v.version}: its release manifest has no {v.name}")
    return excerpt(manifest, v.name)


def key_metrics(manifest: dict[str, Any] | None) -> dict[str, float]:
    if manifest is None:
        return {}
    out = {}
    for component, entry in manifest["components"].items():
        section, key = KEY_METRICS[component]
        value = (_evaluation(entry).get(section) or {}).get(key)
        if value is not None:
            out[f"{component} {key}"] = value
    return out


def _evaluation(entry: dict[str, Any]) -> dict[str, Any]:
    """A component's nested quality figures: ``evaluation``, or, in a schema version 1
    manifest, ``metrics`` (since version 2 a flat name -> number map for consumers)."""
    return entry["evaluation"] if "evaluation" in entry else entry["metrics"]


def listing(root: Path, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Every version of every artifact (or of ``names``) with its stages and key metrics (from
    the manifests in the local DVC cache; ``metrics`` is ``None`` where it is not there)."""
    tagged = histories(root)
    rows = []
    for name in names or list(declared(root)):
        _check_name(root, name)
        for v in versions(root, name, tagged.get(name, History(name, []))):
            try:
                manifest = _component_manifest(root, v, fetch=False)
                note = None if manifest else "manifest not in the DVC cache"
            except RegistryError as e:  # e.g. a version tagged on a commit without dvc.lock
                manifest, note = None, str(e)
            metrics = key_metrics(manifest) if manifest else None
            rows.append({**v.__dict__, "metrics": metrics, "note": note})
    return rows


# --- writing tags ---------------------------------------------------------------------------


def _verify_head(root: Path, name: str) -> None:
    """What ``register`` checks before tagging HEAD: the built files are the ones HEAD's
    dvc.lock records, and they match their manifest."""
    import hashlib

    from sphana import manifest as manifest_lib
    from sphana.config import read_paths

    path, md5 = _manifest_out(root, "HEAD")
    manifest_file = root / path
    if not manifest_file.is_file():
        raise VerifyError(f"{manifest_file}: not built; run `dvc repro` (or `dvc pull`)")
    data = manifest_file.read_bytes()
    if hashlib.md5(data).hexdigest() != md5:
        raise VerifyError(
            f"{manifest_file} is not the manifest HEAD's dvc.lock records; "
            "run `dvc checkout` or `dvc repro`, then commit dvc.lock"
        )
    paths = read_paths(root / "params.yaml")
    manifest_lib.verify(manifest_file, root=root / paths.artifacts, lock_file=root / "dvc.lock")
    manifest = json.loads(data)
    if name == RELEASE:
        from sphana.release import read_tarball

        tarball = root / paths.manifests / "latest.tar.gz"
        inside, problems = read_tarball(tarball, None)  # streamed and checked, never unpacked
        if problems:
            raise VerifyError(f"{tarball}: " + "; ".join(problems))
        if inside != manifest:
            raise VerifyError(f"{tarball}: its manifest is not {manifest_file}; run `dvc repro`")
        return
    if name not in manifest["components"]:
        raise VerifyError(f"{manifest_file}: no component {name} (release.components)")
    bundle = root / paths.bundles / name
    manifest_lib.verify(bundle)
    inside = json.loads((bundle / manifest_lib.MANIFEST_NAME).read_text(encoding="utf-8"))
    if inside != manifest_lib.excerpt(manifest, name):
        raise VerifyError(f"{bundle}: its manifest is not {manifest_file}'s; run `dvc repro`")


def register(root: Path, name: str, version: str) -> str:
    """Tag HEAD as ``name@<version>``. Refuses a dirty tree, a non-semver or existing version,
    a commit that already has a version of ``name``, and files that do not verify."""
    from gto.exceptions import GTOException

    _check_name(root, name)
    version = normalize(version)
    if _git(root, "status", "--porcelain", "--untracked-files=no").strip():
        raise RegistryError(
            "the working tree has uncommitted changes: a version is a commit; "
            "commit (dvc.lock included) or stash them first"
        )
    existing = {v.version: v for v in versions(root, name)}
    if version in existing:
        raise RegistryError(
            f"{name} {version} already exists (commit {existing[version].commit[:8]}); "
            "versions are immutable: pick a new one"
        )
    try:
        _verify_head(root, name)
    except VerifyError as e:
        raise RegistryError(f"refusing to register {name} {version}: {e}") from None
    _wait_past_newest_tag(root, name)
    try:
        with _gto(root) as reg:
            reg.register(name=name, rev="HEAD", version=version, simple=True)
    except GTOException as e:
        raise RegistryError(f"refusing to register {name} {version}: {e}") from None
    return f"{name}@{version}"


def _move_stage(root: Path, name: str, stage: str, target: Version, verb: str) -> str:
    """Unassign ``stage`` from the commits that hold it, then assign it to ``target``, each tag
    newer than the last: GTO and ``dvc artifacts get --stage`` then agree on the holder."""
    from gto.exceptions import GTOException

    message = f"{verb}: {stage} -> {target.version}"
    try:
        with _gto(root) as reg:
            for commit in history(root, name).active(stage):
                if commit != target.commit:
                    _wait_past_newest_tag(root, name)
                    reg.unassign(name=name, stage=stage, rev=commit, message=message)
            _wait_past_newest_tag(root, name)
            # force: GTO may still count the target in the stage (tags not written by sphana)
            reg.assign(name=name, stage=stage, version=target.version, message=message, force=True)
    except GTOException as e:
        raise RegistryError(f"{verb} of {name} {target.version} to {stage} failed: {e}") from None
    tags = history(root, name)
    return tags.label(tags.holders()[stage])


def promote(root: Path, name: str, version: str, stage: str) -> tuple[str | None, str]:
    """Assign ``stage`` to ``version``: (the version that held it, the one that holds it now)."""
    _check_name(root, name)
    _check_stage(stage)
    tags = history(root, name)
    target = find(root, name, version, tags)
    holder = tags.holders().get(stage)
    if holder == target.commit:
        raise RegistryError(f"{name} {target.version} already holds {stage}")
    before = tags.label(holder) if holder else None
    return before, _move_stage(root, name, stage, target, "promote")


def rollback(root: Path, name: str, stage: str) -> tuple[str, str]:
    """Give ``stage`` back to the version assigned to it before the current holder's
    assignment (twice in a row goes back and forth, like ``kubectl rollout undo``); versions
    deregistered since are skipped."""
    _check_name(root, name)
    tags = history(root, name)
    current = tags.holders().get(stage)
    if current is None:
        raise RegistryError(f"no version of {name} holds {stage}: nothing to roll back")
    assignments = tags.assignments(stage)
    since = max((order for order, commit in assignments if commit == current), default=None)
    earlier = [
        commit
        for order, commit in assignments
        if (since is None or order < since) and commit != current and commit in tags.versions_at
    ]
    if not earlier:
        raise RegistryError(
            f"{name} {tags.label(current)} is the first registered version assigned to "
            f"{stage}: nothing to roll back to"
        )
    target = find(root, name, tags.versions_at[earlier[-1]], tags)
    return tags.label(current), _move_stage(root, name, stage, target, "rollback")


def _check_stage(stage: str) -> None:
    if not re.fullmatch(_NAME, stage):
        raise RegistryError(
            f"{stage!r} is not a stage name GTO accepts (letters, digits, '-', '_', '/')"
        )


# --- a version's content ----------------------------------------------------------------------


def bundle(root: Path, name: str, version: str, out: Path) -> dict[str, Any]:
    """Copy version ``version`` of ``name`` to ``out`` (a new directory) from the DVC cache or
    remote, and verify it: a component's bundle directory, or ``release``'s tarball inside
    ``out``. Written whole or not at all."""
    from dvc.repo import Repo

    from sphana.io import atomic_dir
    from sphana.manifest import verify

    _check_name(root, name)
    v = find(root, name, version)
    if out.exists():
        raise RegistryError(f"{out}: already exists; give a new directory")
    if not out.parent.is_dir():
        raise RegistryError(f"{out.parent}: no such directory")
    with atomic_dir(out) as tmp:
        target = tmp / "download"
        try:
            with Repo(str(root)) as repo:
                repo.artifacts.download(name, version=v.version, out=str(target))
        except Exception as e:  # DVC's errors for a missing remote or object vary
            raise RegistryError(
                f"cannot fetch {name} {v.version} (commit {v.commit[:8]}): {e}; "
                "is it pushed (`dvc push`) and the remote configured?"
            ) from None
        if name == RELEASE:
            tarball = tmp / "latest.tar.gz"
            target.rename(tarball)
            result = verify(tarball)
        else:
            for item in target.iterdir():
                item.rename(tmp / item.name)
            target.rmdir()
            result = verify(tmp)
    return {**result, "path": str(out), "version": v.version}


def parity_samples(root: Path, name: str, version: str) -> dict[str, Any]:
    """:func:`sphana.samples.build` on the verified bundle of ``name`` ``version``."""
    from sphana import samples

    if name == RELEASE:
        raise RegistryError("parity samples are per component: embedding, relation, gnn or llm")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bundle"
        verified = bundle(root, name, version, out)
        result = samples.build(out)
    return {"registry_version": verified["version"], **result}


# --- diff -----------------------------------------------------------------------------------


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _facets(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    stages = manifest["provenance"]["stages"]
    params: dict[str, Any] = {}
    for stage in stages.values():
        params.update(_flat(stage["params"]))
    data = dict(manifest["provenance"]["data"])
    for stage in stages.values():  # the md5 of every upstream output (datasets, models)
        data.update(stage["outs"])
    metrics, files = {}, {}
    for component, entry in manifest["components"].items():
        metrics.update(_flat(_evaluation(entry), component))
        files.update({f["path"]: f["sha256"] for f in entry["files"]})
    return {"params": params, "data": data, "metrics": metrics, "files": files}


def diff(root: Path, name: str, old: str, new: str) -> dict[str, Any]:
    """Params, data hashes, metrics and file checksums of two versions, side by side:
    ``{facet: {key: [old, new]}}`` for the keys that differ, and how many are the same."""
    _check_name(root, name)
    a, b = find(root, name, old), find(root, name, new)
    facets_a, facets_b = (_facets(_component_manifest(root, v)) for v in (a, b))
    out: dict[str, Any] = {"versions": [a.version, b.version], "commits": [a.commit, b.commit]}
    for facet in ("params", "data", "metrics", "files"):
        left, right = facets_a[facet], facets_b[facet]
        keys = sorted(set(left) | set(right))
        changed = {k: [left.get(k), right.get(k)] for k in keys if left.get(k) != right.get(k)}
        out[facet] = {"changed": changed, "same": len(keys) - len(changed)}
    return out
