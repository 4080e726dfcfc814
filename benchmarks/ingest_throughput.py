"""Ingest throughput.

Two modes, run from the repository root (neither needs built artifacts):

    python benchmarks/ingest_throughput.py [--repeat 5] [--parser simple]
    python benchmarks/ingest_throughput.py --corpus-mb 50 [--parse-cache] [--keep DIR]

The first times the entity parser alone (documents/s and sentences/s), with the parse cache off
(every section parsed) and on (a rerun that reuses every parse), best of ``--repeat`` runs, on the
corpus under ``paths.documents`` (reading and normalizing documents is not timed).

The second times the whole ``ingest.run`` (read, normalize, chunk, parse, check, write) on a
corpus of at least ``--corpus-mb`` MB built in a temporary directory from real text every fresh
machine has: the docstrings of Python's standard library (one Markdown or text document per
module, a section per documented class or function) and the licenses in
/usr/share/common-licenses, copied under distinct ids until the size is reached. Copies repeat
section texts, so the parse cache is off unless ``--parse-cache`` (each section is then parsed,
as in a corpus of distinct text). It prints documents/s, MB/s and the peak RSS of a fresh
process that only runs the ingest, then the same for ``build_datasets`` on what the ingest wrote
(``--src DIR`` runs another checkout's ``sphana`` on the same corpus, to compare).

It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def parser_throughput(args: argparse.Namespace) -> None:
    import yaml

    from sphana.config import IngestConfig, ParserName
    from sphana.documents import read_documents
    from sphana.entities import ParseCache, extract, load_parser, read_gold_file

    paths = yaml.safe_load(Path("params.yaml").read_text())["paths"]
    docs = read_documents(
        Path(paths["documents"]), IngestConfig(), {"skipped": [], "ignored_files": []}
    )
    gold = read_gold_file(Path(paths["gold"]) / "relations.jsonl", docs)
    backend = load_parser(ParserName(args.parser), args.spacy_model)
    with tempfile.TemporaryDirectory() as tmp:
        for label, enabled in (("cache off", False), ("cache warm", True)):
            best, report = float("inf"), {}
            warm = ParseCache(Path(tmp), backend.version, enabled)
            if enabled:  # fill it once
                extract(docs, backend, warm, gold, 400)
                warm.save()
            for _ in range(args.repeat):
                cache = ParseCache(Path(tmp), backend.version, enabled)
                start = time.perf_counter()
                report = extract(docs, backend, cache, gold, 400).report
                best = min(best, time.perf_counter() - start)
                cache.close()
            print(
                f"{backend.version:>10} {label:>10}: {len(docs)} documents, "
                f"{report['sentences']} sentences, {report['candidate_pairs']} candidate pairs in "
                f"{best * 1000:.1f} ms -> {len(docs) / best:,.0f} documents/s, "
                f"{report['sentences'] / best:,.0f} sentences/s "
                f"(gold pairs found: {report['gold_recall']:.2%})"
            )


# --- a large corpus of real text ---------------------------------------------------------------


def _stdlib_documents() -> Iterator[tuple[str, str, list[tuple[str, str]]]]:
    """``(name, title, [(heading, text)])`` per standard-library module with docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages", "test", "idlelib"):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts)
        sections, seen = [], set()
        intro = ast.get_docstring(tree)
        if intro:
            sections.append(("", intro))
        stack = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    name = f"{prefix}{child.name}"
                    doc = ast.get_docstring(child)
                    if doc and name not in seen and len(doc) > 40:
                        seen.add(name)
                        sections.append((name, doc))
                    stack.append((child, f"{name}."))
        if sections:
            yield module, f"{module}: {(intro or module).splitlines()[0]}"[:120], sections


def _license_documents() -> Iterator[tuple[str, str, list[tuple[str, str]]]]:
    root = Path("/usr/share/common-licenses")
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.is_file() and not path.is_symlink():
            text = path.read_text(encoding="utf-8", errors="replace")
            yield f"license-{path.name}", f"License: {path.name}", [("", text)]


_NOT_A_HEADING = re.compile(r"(?m)^(?=#|==)")


def build_corpus(root: Path, megabytes: float) -> tuple[int, int]:
    """Write documents under ``root`` until they hold ``megabytes`` MB; (documents, bytes)."""
    base = [*_stdlib_documents(), *_license_documents()]
    if not base:
        raise SystemExit("no standard-library docstrings found to build a corpus from")
    documents = size = copy = 0
    while size < megabytes * 1e6:
        for i, (name, title, raw) in enumerate(base):
            # a docstring line that starts like a heading ("# ...", an "====" underline) is text
            sections = [(h, _NOT_A_HEADING.sub(" ", t)) for h, t in raw]
            if i % 2:  # .txt: title line, then == Heading == sections
                body = f"{title}\n\n" + "".join(
                    (f"== {h} ==\n\n" if h else "") + f"{t}\n\n" for h, t in sections
                )
                path = root / f"copy{copy:03d}" / f"{name}.txt"
            else:  # .md: # Title, then ## Heading sections
                body = f"# {title}\n\n" + "".join(
                    (f"## {h}\n\n" if h else "") + f"{t}\n\n" for h, t in sections
                )
                path = root / f"copy{copy:03d}" / f"{name}.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = body.encode("utf-8")
            path.write_bytes(data)
            documents += 1
            size += len(data)
            if size >= megabytes * 1e6:
                break
        copy += 1
    return documents, size


def _child(corpus: str, out: str, parse_cache: bool, src: str | None) -> None:
    """Run in a fresh process: ``ingest.run`` alone, so its peak RSS is the ingest's."""
    import resource

    if src:
        sys.path.insert(0, src)
    from sphana.base_models import load_fast_tokenizer
    from sphana.config import IngestConfig
    from sphana.ingest import run

    cfg = IngestConfig(parse_cache=parse_cache)
    load_fast_tokenizer(cfg.tokenizer, "ingest.tokenizer")  # imports done: the baseline RSS
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = run(cfg, Path(corpus), Path(out))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "seconds": seconds,
                "documents": report["documents"],
                "chunks": report["chunks"],
                "sections": report["sections"],
                "parse_cache": report["relations"]["parse_cache"],
                "baseline_rss_mb": baseline / 1024,
                "peak_rss_mb": peak / 1024,
                "sphana": sys.modules["sphana"].__file__,
            }
        )
    )


def _datasets_child(ingest: str, out: str, src: str | None) -> None:
    """Run in a fresh process: ``datasets.run`` alone on ``ingest``'s outputs."""
    import resource

    if src:
        sys.path.insert(0, src)
    from sphana import datasets
    from sphana.config import DatasetConfig

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = datasets.run(
        DatasetConfig(), Path(ingest), Path(out) / "gold", Path(out), Path(out) / "report.json"
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "seconds": seconds,
                "pairs": report["embedding"]["pairs"],
                "baseline_rss_mb": baseline / 1024,
                "peak_rss_mb": peak / 1024,
            }
        )
    )


def corpus_throughput(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.keep) if args.keep else Path(tmp) / "documents"
        if not (corpus / "copy000").is_dir():
            start = time.perf_counter()
            documents, size = build_corpus(corpus, args.corpus_mb)
            print(
                f"corpus: {documents} documents, {size / 1e6:.1f} MB in {corpus} "
                f"(built in {time.perf_counter() - start:.0f} s)"
            )
        size = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
        cmd = [sys.executable, __file__, "--child", str(corpus), str(Path(tmp) / "ingest")]
        cmd += ["--parse-cache"] if args.parse_cache else []
        cmd += ["--src", args.src] if args.src else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if proc.returncode:
            raise SystemExit(f"ingest failed:\n{proc.stderr[-4000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"ingest.run ({r['sphana']}, parse cache {'on' if args.parse_cache else 'off'}): "
            f"{r['documents']} documents, {r['sections']} sections, {r['chunks']} chunks, "
            f"{size / 1e6:.1f} MB in {r['seconds']:.1f} s -> "
            f"{r['documents'] / r['seconds']:,.1f} documents/s, "
            f"{size / 1e6 / r['seconds']:.2f} MB/s; peak RSS {r['peak_rss_mb']:.0f} MB "
            f"({r['baseline_rss_mb']:.0f} MB after imports and the tokenizer); "
            f"parse cache hits/misses {r['parse_cache']['hits']}/{r['parse_cache']['misses']}"
        )
        cmd = [sys.executable, __file__, "--datasets-child", str(Path(tmp) / "ingest")]
        cmd += [str(Path(tmp) / "datasets")] + (["--src", args.src] if args.src else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if proc.returncode:
            raise SystemExit(f"build_datasets failed:\n{proc.stderr[-4000:]}")
        d = json.loads(proc.stdout.strip().splitlines()[-1])
        chunks_mb = (Path(tmp) / "ingest" / "chunks.jsonl").stat().st_size / 1e6
        print(
            f"datasets.run: {r['chunks']} chunks ({chunks_mb:.1f} MB) -> embedding pairs "
            f"{d['pairs']} in {d['seconds']:.1f} s -> {r['chunks'] / d['seconds']:,.0f} chunks/s; "
            f"peak RSS {d['peak_rss_mb']:.0f} MB ({d['baseline_rss_mb']:.0f} MB after imports)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--parser", choices=["simple", "spacy"], default="simple")
    parser.add_argument("--spacy-model", default="en_core_web_sm")
    parser.add_argument("--corpus-mb", type=float, help="time ingest.run on a corpus this large")
    parser.add_argument("--parse-cache", action="store_true", help="corpus mode: cache on")
    parser.add_argument("--keep", help="corpus mode: build (or reuse) the corpus here")
    parser.add_argument("--src", help="corpus mode: import sphana from this directory")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--datasets-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, args.parse_cache, args.src)
    elif args.datasets_child:
        _datasets_child(*args.datasets_child, args.src)
    elif args.corpus_mb:
        corpus_throughput(args)
    else:
        parser_throughput(args)


if __name__ == "__main__":
    main()
