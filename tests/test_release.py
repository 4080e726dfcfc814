"""sphana.release: a release loads only when every file matches its manifest, and a tarball can
neither write outside its working directory nor expand past what its manifest declares.

The releases are real: a small manifest over a few tiny files, packaged and bundled by
:func:`sphana.manifest.package` and :func:`sphana.manifest.write_bundles` (no pipeline run)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sphana import manifest as manifest_lib
from sphana import release as release_lib
from sphana.errors import InputError, VerifyError
from sphana.release import copy_bounded, open_release, read_tarball, safe_relpath

FILES = {
    "embedding/onnx/embedding.onnx": b"fp32 embedding model\n" * 40,
    "embedding/onnx/embedding.int8.onnx": b"int8 embedding model\n" * 10,
    "embedding/onnx/tokenizer.json": b'{"model": {"vocab": {"a": 0}}}\n',
    "gnn/onnx/gnn.onnx": bytes(range(256)) * 4,
}
MODELS = {  # component -> (shipped path, fp32 path)
    "embedding": ("embedding/onnx/embedding.int8.onnx", "embedding/onnx/embedding.onnx"),
    "gnn": ("gnn/onnx/gnn.onnx", "gnn/onnx/gnn.onnx"),
}
SIGNATURE = {
    "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}],
    "outputs": [{"name": "embeddings", "dtype": "float32", "shape": ["batch", 8]}],
}
OPSETS = {"embedding": 17, "gnn": 14}


def build_manifest(artifacts: Path) -> dict[str, Any]:
    """A schema-valid manifest of :data:`FILES` written under ``artifacts``."""
    for rel, data in FILES.items():
        (artifacts / rel).parent.mkdir(parents=True, exist_ok=True)
        (artifacts / rel).write_bytes(data)
    components = {}
    for name, (path, fp32) in MODELS.items():
        files = [
            manifest_lib.file_entry(artifacts, artifacts / rel)
            for rel in sorted(FILES)
            if rel.startswith(f"{name}/")
        ]
        components[name] = {
            "version": "0.1.0",
            "path": path,
            "checksum": next(f["sha256"] for f in files if f["path"] == path),
            "metrics": {"validation": {"score": 0.5}},
            "model_config": {"quantized": path != fp32, "fp32_path": fp32, "opset": OPSETS[name]},
            "files": files,
            "parity": {"fp32": {"max_abs_diff": 0.0}, "int8": None},
            "signature": SIGNATURE,
        }
    stages = {
        stage: {"deps": {"data": f"md5-{stage}"}, "outs": {}, "params": {}}
        for name in MODELS
        for stage in manifest_lib.COMPONENT_STAGES[name]
    }
    manifest = {
        "schema_version": 1,
        "name": "sphana-test",
        "version": "0.1.0",
        "created_at": "2024-01-01T00:00:00+00:00",
        "components": components,
        "skipped_components": {"llm": {"reason": "no base model in this test"}},
        "training_signals": {"questions": 0, "relations": 0, "signals": {"embedding": "derived"}},
        "system_requirements": {
            "onnxruntime": ">=1.17.0",
            "opset": max(OPSETS.values()),
            "execution_providers": ["CPUExecutionProvider"],
        },
        "provenance": {
            "git_commit": None,
            "git_dirty": None,
            "data": {"data": "md5-ingest"},
            "stages": stages,
        },
    }
    manifest_lib.validate_schema(manifest, "test manifest")
    return manifest


@pytest.fixture
def built(tmp_path: Path) -> SimpleNamespace:
    """The artifacts, their manifest file, its tarball and its bundles, built for real."""
    artifacts = tmp_path / "artifacts"
    manifest_file = tmp_path / "manifests" / "latest.json"
    manifest_lib.write(build_manifest(artifacts), manifest_file)
    manifest = manifest_lib.checked(manifest_file, artifacts)
    tarball = tmp_path / "manifests" / "latest.tar.gz"
    manifest_lib.package(manifest, manifest_file, artifacts, tarball)
    bundles = tmp_path / "bundles"
    assert manifest_lib.write_bundles(manifest, artifacts, bundles) == ["embedding", "gnn"]
    return SimpleNamespace(
        artifacts=artifacts,
        manifest_file=manifest_file,
        manifest=manifest,
        tarball=tarball,
        bundles=bundles,
        tmp=tmp_path,
    )


def flip_byte(path: Path, at: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_loaded(release: release_lib.Release, work: Path, manifest: dict[str, Any]) -> None:
    """``release`` sits in ``work``: every listed file there with its content, nothing else."""
    assert release.root == work.absolute()
    assert sorted(release.components) == ["embedding", "gnn"]
    for rel, data in FILES.items():
        assert (work / rel).read_bytes() == data
    on_disk = {p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()}
    assert on_disk == {*FILES, manifest_lib.MANIFEST_NAME}
    assert json.loads((work / manifest_lib.MANIFEST_NAME).read_text()) == release.manifest
    assert release.manifest == manifest
    emb, gnn = release.components["embedding"], release.components["gnn"]
    assert emb.version == "0.1.0" and emb.quantized
    assert emb.model == emb.int8 == release.root / "embedding/onnx/embedding.int8.onnx"
    assert emb.fp32 == release.root / "embedding/onnx/embedding.onnx"
    assert set(emb.files) == {r for r in FILES if r.startswith("embedding/")}
    assert (
        emb.files["embedding/onnx/tokenizer.json"].read_bytes()
        == FILES["embedding/onnx/tokenizer.json"]
    )
    assert not gnn.quantized and gnn.int8 is None
    assert gnn.model == gnn.fp32 == release.root / "gnn/onnx/gnn.onnx"
    assert release.component("gnn") is gnn


def test_a_good_tarball_loads_and_every_file_matches(built: SimpleNamespace) -> None:
    work = built.tmp / "work"
    release = open_release([built.tarball], work)
    assert_loaded(release, work, built.manifest)
    assert release.sources == (built.tarball,)
    assert release.components["gnn"].source == built.tarball
    with pytest.raises(Exception, match="no component 'llm'"):
        release.component("llm")
    # verify keeps its answer for a tarball
    assert manifest_lib.verify(built.tarball) == {
        "manifest": f"{built.tarball}:manifest.json",
        "components": ["embedding", "gnn"],
        "files": len(FILES),
    }


def test_a_manifest_file_loads_from_its_root(built: SimpleNamespace) -> None:
    work = built.tmp / "work"
    release = open_release([built.manifest_file], work, root=built.artifacts)
    assert_loaded(release, work, built.manifest)
    # by default its paths are relative to its own directory, where the files are not
    with pytest.raises(VerifyError, match="gnn: missing file gnn/onnx/gnn.onnx"):
        open_release([built.manifest_file], built.tmp / "other")
    assert not (built.tmp / "other").exists()


def test_two_bundles_merge_into_the_whole_release(built: SimpleNamespace) -> None:
    work = built.tmp / "work"
    sources = [built.bundles / "gnn", built.bundles / "embedding"]
    release = open_release(sources, work)
    assert_loaded(release, work, built.manifest)  # the excerpts merge back into the manifest
    assert release.components["embedding"].source == built.bundles / "embedding"
    assert list(release.components["gnn"].manifest["components"]) == ["gnn"]
    assert release.components["gnn"].manifest["system_requirements"]["opset"] == 14


def test_two_bundles_of_the_same_component_are_refused(built: SimpleNamespace) -> None:
    copy = shutil.copytree(built.bundles / "embedding", built.tmp / "embedding-again")
    with pytest.raises(VerifyError, match="component embedding is also in"):
        open_release([built.bundles / "embedding", copy], built.tmp / "work")
    assert not (built.tmp / "work").exists()
    # a tarball holds both components already
    with pytest.raises(VerifyError, match="component gnn is also in"):
        open_release([built.tarball, built.bundles / "gnn"], built.tmp / "work")
    assert not (built.tmp / "work").exists()


def test_a_tampered_file_in_a_bundle_is_refused_by_name(built: SimpleNamespace) -> None:
    flip_byte(built.bundles / "embedding/embedding/onnx/tokenizer.json")
    with pytest.raises(VerifyError) as e:
        open_release([built.bundles / "embedding", built.bundles / "gnn"], built.tmp / "work")
    assert "1 mismatch(es)" in str(e.value)
    assert "embedding: embedding/onnx/tokenizer.json: sha256 sha256:" in str(e.value)
    assert not (built.tmp / "work").exists()


def test_a_tampered_file_in_a_tarball_is_refused_by_name(built: SimpleNamespace) -> None:
    flip_byte(built.artifacts / "embedding/onnx/embedding.int8.onnx")
    manifest_lib.package(built.manifest, built.manifest_file, built.artifacts, built.tarball)
    with pytest.raises(VerifyError, match="embedding/onnx/embedding.int8.onnx: sha256"):
        open_release([built.tarball], built.tmp / "work")
    assert not (built.tmp / "work").exists()
    with pytest.raises(VerifyError) as e:
        manifest_lib.verify(built.tarball)
    assert str(e.value).startswith(f"{built.tarball}: 1 mismatch(es):")
    assert "embedding: embedding/onnx/embedding.int8.onnx: sha256" in str(e.value)


def test_a_corrupt_tarball_is_not_readable(built: SimpleNamespace) -> None:
    data = built.tarball.read_bytes()
    built.tarball.write_bytes(data[: len(data) // 2])  # cut in the middle of a member
    with pytest.raises(VerifyError, match="not a readable bundle"):
        open_release([built.tarball], built.tmp / "work")
    assert not (built.tmp / "work").exists()


def test_missing_and_unlisted_files_of_a_bundle_are_refused(built: SimpleNamespace) -> None:
    bundle = built.bundles / "gnn"
    (bundle / "gnn/onnx/gnn.onnx").unlink()
    (bundle / "stray.txt").write_text("x")
    with pytest.raises(VerifyError) as e:
        open_release([bundle], built.tmp / "work")
    assert "gnn: missing file gnn/onnx/gnn.onnx" in str(e.value)
    assert "unlisted file stray.txt" in str(e.value)
    assert not (built.tmp / "work").exists()


# --- hostile tarballs -------------------------------------------------------------------------


class Zeros(io.RawIOBase):
    """``size`` zero bytes (endless when None), counting what was read."""

    def __init__(self, size: int | None = None) -> None:
        self.left, self.read_bytes = size, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 20
        if self.left is not None:
            n = min(n, self.left)
            self.left -= n
        self.read_bytes += n
        return bytes(n)


def member(name: str, data: bytes | None = None, **fields: Any) -> tuple[tarfile.TarInfo, Any]:
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else 0
    for key, value in fields.items():
        setattr(info, key, value)
    return info, io.BytesIO(data) if data is not None else None


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, Any]]) -> Path:
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for info, data in members:
            tar.addfile(info, data)
    return path


def good_members(manifest: dict[str, Any], skip: str = "") -> list[tuple[tarfile.TarInfo, Any]]:
    """The members :func:`sphana.manifest.package` writes for ``manifest``, less ``skip``."""
    return [member(manifest_lib.MANIFEST_NAME, json.dumps(manifest).encode())] + [
        member(rel, data) for rel, data in sorted(FILES.items()) if rel != skip
    ]


def refused(built: SimpleNamespace, tarball: Path, match: str) -> None:
    """Neither open_release nor verify accepts ``tarball``; nothing stays on disk."""
    work = built.tmp / "work"
    with pytest.raises(VerifyError, match=match):
        open_release([tarball], work)
    assert not work.exists()
    assert not list(built.tmp.glob(".work.*"))  # no temporary directory left behind
    with pytest.raises(VerifyError, match=match):
        manifest_lib.verify(tarball)


def test_a_good_handmade_tarball_loads(built: SimpleNamespace) -> None:
    tarball = write_tar(built.tmp / "good.tar.gz", good_members(built.manifest))
    assert_loaded(open_release([tarball], built.tmp / "work"), built.tmp / "work", built.manifest)


def test_a_member_missing_from_a_tarball_is_refused(built: SimpleNamespace) -> None:
    members = good_members(built.manifest, skip="embedding/onnx/tokenizer.json")
    tarball = write_tar(built.tmp / "missing.tar.gz", members)
    refused(built, tarball, "embedding: missing file embedding/onnx/tokenizer.json")


def test_a_member_larger_than_declared_is_refused_before_it_is_written(
    built: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = json.loads(json.dumps(built.manifest))
    rel = "embedding/onnx/tokenizer.json"
    entry = next(f for f in manifest["components"]["embedding"]["files"] if f["path"] == rel)
    entry.update(size=10, sha256=f"sha256:{hashlib.sha256(bytes(10)).hexdigest()}")
    big = 50 << 20
    zeros = member(rel, size=big)[0], Zeros(big)
    members = [m for m in good_members(manifest) if m[0].name != rel] + [zeros]
    tarball = write_tar(built.tmp / "bomb.tar.gz", members)
    assert tarball.stat().st_size < 1 << 20  # 50 MB of zeros in a small archive

    decompressed = []

    class Counting(gzip.GzipFile):
        def read(self, size: int = -1) -> bytes:
            data = super().read(size)
            decompressed.append(len(data))
            return data

    monkeypatch.setattr(release_lib.gzip, "GzipFile", Counting)
    refused(built, tarball, f"{rel}: {big} bytes, more than the 10 its manifest declares")
    assert 0 < sum(decompressed) < 2 * (1 << 20)  # stopped at the member's header


def test_copying_stops_one_byte_past_the_declared_size(tmp_path: Path) -> None:
    """The block copy every source goes through: an endless stream declared 10 bytes."""
    src, dest = Zeros(), tmp_path / "out"
    expected = {"size": 10, "sha256": f"sha256:{hashlib.sha256(bytes(10)).hexdigest()}"}
    with pytest.raises(VerifyError, match="f: holds more than the 10 bytes"):
        copy_bounded(src, dest, expected, "f")
    assert src.read_bytes == 11 and not dest.exists()
    assert copy_bounded(Zeros(10), dest, expected, "f") is None and dest.read_bytes() == bytes(10)
    assert copy_bounded(Zeros(9), None, expected, "f") == "f: size 9 != 10"


def test_the_stream_may_not_expand_past_what_the_manifest_accounts_for(
    built: SimpleNamespace,
) -> None:
    """A 20 MiB PAX header (tarfile would read it into memory whole) hits the global bound."""
    members = good_members(built.manifest)
    members[1][0].pax_headers = {"comment": "A" * (20 << 20)}
    tarball = write_tar(built.tmp / "pax.tar.gz", members)
    refused(built, tarball, "decompresses to more than the .* bytes its manifest accounts for")


def test_an_oversized_manifest_member_is_refused(built: SimpleNamespace) -> None:
    size = release_lib.MAX_MANIFEST_BYTES + 1
    tarball = write_tar(
        built.tmp / "big-manifest.tar.gz",
        [(member(manifest_lib.MANIFEST_NAME, size=size)[0], Zeros(size))],
    )
    refused(built, tarball, f"{size} bytes, more than the {size - 1} a manifest may have")


def test_the_manifest_must_come_first(built: SimpleNamespace) -> None:
    members = good_members(built.manifest)
    tarball = write_tar(built.tmp / "late.tar.gz", members[1:] + members[:1])
    refused(built, tarball, "first member is embedding/onnx/embedding.int8.onnx .*not manifest")


def test_an_unlisted_member_is_refused_unextracted(built: SimpleNamespace) -> None:
    members = good_members(built.manifest)
    members.insert(2, member("embedding/onnx/extra.bin", b"not in the manifest"))
    tarball = write_tar(built.tmp / "extra.tar.gz", members)
    refused(built, tarball, "member embedding/onnx/extra.bin is not listed in the manifest")
    assert not list(built.tmp.rglob("extra.bin"))


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, "a symbolic link to /etc/passwd"),
        ({"type": tarfile.LNKTYPE, "linkname": "gnn/onnx/gnn.onnx"}, "a hard link to"),
        ({"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, "a device"),
        ({"type": tarfile.DIRTYPE}, "a directory"),
    ],
)
def test_a_member_that_is_not_a_regular_file_is_refused(
    built: SimpleNamespace, fields: dict[str, Any], kind: str
) -> None:
    rel = "embedding/onnx/tokenizer.json"  # a listed name, so only its type is wrong
    members = [m for m in good_members(built.manifest) if m[0].name != rel]
    members.insert(1, member(rel, **fields))
    tarball = write_tar(built.tmp / "link.tar.gz", members)
    refused(built, tarball, f"member {rel} is {kind}.*not a regular file")


@pytest.mark.parametrize("name", ["../evil.txt", "embedding/../../evil.txt", "/tmp/evil.txt"])
def test_a_member_outside_the_root_is_refused(built: SimpleNamespace, name: str) -> None:
    members = good_members(built.manifest)
    members.insert(1, member(name, b"escaped"))
    tarball = write_tar(built.tmp / "escape.tar.gz", members)
    refused(built, tarball, f"member {name}: unsafe path")
    assert not (built.tmp.parent / "evil.txt").exists()


def test_a_repeated_member_is_refused(built: SimpleNamespace) -> None:
    members = good_members(built.manifest)
    members.append(member("gnn/onnx/gnn.onnx", FILES["gnn/onnx/gnn.onnx"]))
    tarball = write_tar(built.tmp / "twice.tar.gz", members)
    refused(built, tarball, "member gnn/onnx/gnn.onnx appears twice")


@pytest.mark.parametrize(
    ("rel", "safe"),
    [
        ("a/b.onnx", True),
        ("a", True),
        ("", False),
        ("/a", False),
        ("../a", False),
        ("a/../b", False),
        ("a/./b", False),
        ("./a", False),
        ("a//b", False),
        ("a/", False),
        ("a\\..\\b", False),
    ],
)
def test_safe_relpath(rel: str, safe: bool) -> None:
    assert safe_relpath(rel) is safe


def test_a_bundle_manifest_with_an_unsafe_path_is_refused(built: SimpleNamespace) -> None:
    bundle = built.bundles / "gnn"
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["components"]["gnn"]["files"][0]["path"] = "gnn/./onnx/gnn.onnx"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerifyError, match="file path 'gnn/./onnx/gnn.onnx' is unsafe"):
        open_release([bundle], built.tmp / "work")


# --- the working directory --------------------------------------------------------------------


def test_a_failed_load_leaves_the_working_directory_as_it_was(built: SimpleNamespace) -> None:
    work = built.tmp / "work"
    open_release([built.tarball], work)
    before = (work / "manifest.json").read_bytes()
    flip_byte(built.bundles / "gnn/gnn/onnx/gnn.onnx")
    with pytest.raises(VerifyError, match="gnn/onnx/gnn.onnx: sha256"):
        open_release([built.bundles / "gnn"], work)
    assert (work / "manifest.json").read_bytes() == before
    assert (work / "embedding/onnx/tokenizer.json").is_file()
    # a good load replaces the previous release whole
    release = open_release([built.bundles / "embedding"], work)
    assert sorted(release.components) == ["embedding"]
    assert not (work / "gnn").exists()


def test_a_working_directory_that_holds_something_else_is_refused(built: SimpleNamespace) -> None:
    work = built.tmp / "precious"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty and holds no release"):
        open_release([built.tarball], work)
    assert (work / "notes.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="overlaps the working directory"):
        open_release([built.bundles / "gnn"], built.bundles / "gnn" / "work")
    with pytest.raises(InputError, match="no such file or directory"):
        open_release([built.tmp / "nothing.tar.gz"], built.tmp / "work")


def test_read_tarball_only_checks_when_given_no_directory(built: SimpleNamespace) -> None:
    manifest, problems = read_tarball(built.tarball, None)
    assert manifest == built.manifest and problems == []


# --- what a model server imports --------------------------------------------------------------

HEAVY = ("torch", "transformers", "dvc", "hydra", "onnx", "onnxruntime", "omegaconf")


def test_loading_a_release_imports_nothing_heavy(built: SimpleNamespace) -> None:
    code = (
        "import sys; from pathlib import Path; from sphana.release import open_release; "
        f"r = open_release([Path(sys.argv[1])], Path(sys.argv[2])); "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(built.tarball), str(built.tmp / "work")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == "[]"


def test_the_verify_command_on_tarballs(built: SimpleNamespace) -> None:
    def verify(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sphana.cli", "verify", str(path)],
            capture_output=True,
            text=True,
        )

    proc = verify(built.tarball)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["files"] == len(FILES)
    members = good_members(built.manifest)
    members.insert(1, member("../evil.txt", b"escaped"))
    proc = verify(write_tar(built.tmp / "escape.tar.gz", members))
    assert proc.returncode == 1 and "member ../evil.txt: unsafe path" in proc.stderr
