"""Ingest throughput of the entity parser: documents/s and sentences/s, with the parse cache off
(every section parsed) and on (a rerun that reuses every parse).

Run from the repository root (needs no built artifacts):

    python benchmarks/ingest_throughput.py [--repeat 5] [--parser simple]

Parsing is timed alone (reading and normalizing documents is not), best of ``--repeat`` runs, on
the corpus under ``paths.documents``. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from sphana.config import IngestConfig, ParserName
from sphana.entities import ParseCache, extract, load_parser, read_gold_file
from sphana.ingest import read_documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--parser", choices=[p.value for p in ParserName], default="simple")
    parser.add_argument("--spacy-model", default="en_core_web_sm")
    args = parser.parse_args()

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
            print(
                f"{backend.version:>10} {label:>10}: {len(docs)} documents, "
                f"{report['sentences']} sentences, {report['candidate_pairs']} candidate pairs in "
                f"{best * 1000:.1f} ms -> {len(docs) / best:,.0f} documents/s, "
                f"{report['sentences'] / best:,.0f} sentences/s "
                f"(gold pairs found: {report['gold_recall']:.2%})"
            )


if __name__ == "__main__":
    main()
