"""The whole build on a user's own documents, with no annotations: ``dvc repro`` with the default
configs in a clone of this repository (HEAD) whose ``data/`` holds only the given documents.

Prints the wall time, the stages DVC ran, the components built and skipped, and the embedding
model's retrieval on held-out pseudo-queries and out of domain, base model against the shipped
one. It measures; it asserts nothing.

    python benchmarks/own_corpus_build.py /usr/share/doc/valgrind/html   # the Valgrind manual
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sh(*cmd: str, cwd: Path) -> str:
    env = dict(os.environ)  # stages call `python`: this interpreter's environment first
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(cwd)  # the clone's sphana, not an editable install's working tree
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("documents", type=Path, help="a directory of documents (any formats)")
    parser.add_argument("--keep", action="store_true", help="keep the build directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sphana-own-corpus-"))
    repo = work / "repo"
    sh("git", "clone", "-q", str(REPO), str(repo), cwd=work)
    shutil.rmtree(repo / "data")
    shutil.copytree(args.documents, repo / "data/documents")
    files = [p for p in (repo / "data/documents").rglob("*") if p.is_file()]
    mb = sum(p.stat().st_size for p in files) / 1e6
    for cmd in (
        ("git", "config", "user.email", "bench@sphana.invalid"),
        ("git", "config", "user.name", "sphana-bench"),
        ("git", "add", "-A"),
        ("git", "commit", "-qm", "own documents, no annotations"),
    ):
        sh(*cmd, cwd=repo)
    sh(sys.executable, "-m", "sphana.cli", "params", cwd=repo)

    start = time.perf_counter()
    output = sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    seconds = time.perf_counter() - start

    target = repo / "target"
    manifest = json.loads((target / "manifests/latest.json").read_text())
    ingest = json.loads((target / "ingest/report.json").read_text())
    embedding = json.loads((target / "metrics/train_embedding.json").read_text())
    print(f"corpus: {args.documents} ({len(files)} files, {mb:.1f} MB)")
    print(
        f"ingest: {ingest['documents']} documents, {ingest['chunks']} chunks, "
        f"ignored {ingest['ignored_count']}, skipped {ingest['skipped_count']}"
    )
    stages = re.findall(r"Running stage '([^']+)'", output)
    print(f"dvc repro: {seconds:.0f} s, stages run: {', '.join(stages)}")
    print(f"built: {', '.join(sorted(manifest['components']))}")
    for name, skipped in manifest["skipped_components"].items():
        print(f"skipped: {name}: {skipped['reason']}")
    for name, signal in manifest["training_signals"]["signals"].items():
        print(f"signal: {name}: {signal}")
    print(f"embedding validation (held-out documents' pseudo-queries, {embedding['validation']}):")
    rows = [("base", embedding["base"]), ("shipped", embedding["fine_tuned"])]
    if "before_interpolation" in embedding:
        rows.insert(1, ("fine-tuned, before interpolation", embedding["before_interpolation"]))
    for label, m in rows:
        print(
            f"  {label:34s} recall@10 {m['recall@10']:.4f}  recall@5 {m['recall@5']:.4f}"
            f"  MRR {m['mrr']:.4f}"
        )
    ood = embedding.get("out_of_domain")
    if ood:
        print(
            f"embedding out of domain ({ood['set']['source']}; the mix is chosen on the "
            "selection half, the report half is held out):"
        )
        for label in ("base", "fine_tuned", "shipped"):
            for half in ("selection", "report"):
                m = ood[label][half]
                print(f"  {label:12s} {half:9s} recall@10 {m['recall@10']:.4f}  MRR {m['mrr']:.4f}")
    if args.keep:
        print(f"kept: {repo}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
