"""The ``sphana`` command.

- ``params``: compose conf/ into params.yaml.
- ``verify``: check a manifest, bundle directory or .tar.gz against its files.
- ``validate FILE --type KIND``: check a data file against its contract (JSON Schema + checks).
- ``stats FILE [--json]``: record count, label/kind counts and text lengths of a JSON Lines file.
- ``artifacts list|register|promote|rollback|diff|bundle|parity-samples``: the model registry
  (git tags in GTO's format over the ``artifacts:`` of dvc.yaml; see sphana/registry.py).
- ``convert MODEL OUT --kind embedding|relation|llm``: a model trained elsewhere into a gated bundle
  (sphana/convert/).
- ``query "QUESTION" [--release ...]``: answer a question over a release's corpus index
  (sphana/query.py): retrieval, graph re-ranking, the generator's answer, cited passages.
- ``serve RELEASE``: serve a release on ONNX Runtime (sphana/serving/); needs only
  ``pip install 'sphana[serve]'``, no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from sphana.config import ExportConfig, LayerNorm
from sphana.contracts import KINDS
from sphana.convert import KINDS as CONVERT_KINDS
from sphana.errors import SphanaError

console = Console(stderr=True, highlight=False)


def cmd_params(args: argparse.Namespace) -> int:
    from sphana.config import write_params

    write_params(Path(args.config_dir), Path(args.output), args.overrides)
    console.print(
        f"wrote {args.output} from {args.config_dir}/config.yaml"
        + (f" with {' '.join(args.overrides)}" if args.overrides else "")
    )
    return 0


def _default_root(manifest_file: Path) -> Path | None:
    """For a manifest inside a repository, the files live under params' paths.artifacts."""
    params = Path("params.yaml")
    if manifest_file.parent.name == "manifests" and params.is_file():
        from sphana.config import read_paths

        return Path(read_paths(params).artifacts)
    return None


def cmd_verify(args: argparse.Namespace) -> int:
    from sphana.manifest import verify

    target = Path(args.path)
    root = Path(args.root) if args.root else None
    if root is None and target.is_file() and target.suffix == ".json":
        root = _default_root(target)
    result = verify(target, root=root, lock_file=Path(args.lock) if args.lock else None)
    console.print(
        f"[green]OK[/] {args.path}: {result['files']} files of "
        f"{', '.join(result['components'])} match the manifest"
    )
    print(json.dumps(result))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from sphana.contracts import validate_file

    checked, found = validate_file(Path(args.file), args.type)
    for v in found:
        where = args.file if v.line is None else f"{args.file}:{v.line}"
        print(f"{where}: {v.path}: {v.message}")
    if found:
        bad = len({v.line for v in found})
        console.print(
            f"[bold red]FAIL[/] {escape(args.file)}: {len(found)} violation(s) in {bad} of "
            f"{checked} records of the {args.type} schema",
            soft_wrap=True,
        )
        return 1
    console.print(
        f"[green]OK[/] {escape(args.file)}: {checked} records match the {args.type} schema",
        soft_wrap=True,
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from sphana.contracts import stats

    result = stats(Path(args.file))
    if args.json:
        _print_json(result)
        return 0
    from rich.table import Table

    out = Console(highlight=False)
    out.print(f"[bold]{escape(args.file)}[/]: {result['records']} records", soft_wrap=True)
    out.print(f"fields: {', '.join(result['fields'])}", soft_wrap=True)
    for name, counts in result["distributions"].items():
        table = Table(title=f"{name} distribution", title_justify="left")
        table.add_column(name)
        for column in ("count", "share"):
            table.add_column(column, justify="right")
        for value, count in counts.items():
            table.add_row(escape(value), str(count), f"{count / result['records']:.1%}")
        out.print(table)
    if result["lengths"]:
        table = Table(title="lengths (characters; candidates: count)", title_justify="left")
        table.add_column("field")
        for column in ("p50", "p90", "p99", "max", "mean"):
            table.add_column(column, justify="right")
        for name, p in result["lengths"].items():
            table.add_row(name, *(str(p[c]) for c in ("p50", "p90", "p99", "max", "mean")))
        out.print(table)
    return 0


def _print_json(data: object) -> None:
    from sphana.io import dumps_json

    print(dumps_json(data), end="")


def cmd_artifacts_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from sphana import registry

    rows = registry.listing(Path(args.repo), args.names or None)
    if args.json:
        _print_json(rows)
        return 0
    table = Table(title_justify="left", title="registered versions (newest first)")
    for column in ("artifact", "version", "stages", "commit", "registered", "key metrics"):
        table.add_column(column)
    missing = False
    for row in rows:
        if row["metrics"] is None:
            missing = True
            metrics = f"[dim]{escape(row['note'])}[/]"
        else:
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in row["metrics"].items())
        version = f"{row['version']} [bold](latest)[/]" if row["latest"] else row["version"]
        table.add_row(
            row["name"],
            version,
            ", ".join(row["stages"]),
            row["commit"][:8],
            row["created_at"][:19].replace("T", " "),
            metrics,
        )
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    out.print(table if rows else "no registered versions (sphana artifacts register NAME VERSION)")
    if missing:
        out.print("missing manifests: `dvc fetch manifest --all-tags` fetches them")
    return 0


def cmd_artifacts_register(args: argparse.Namespace) -> int:
    from sphana import registry

    tag = registry.register(Path(args.repo), args.name, args.version)
    console.print(
        f"[green]registered[/] {tag}: share it with `git push origin {tag}` and the files with "
        "`dvc push`"
    )
    return 0


def cmd_artifacts_promote(args: argparse.Namespace) -> int:
    from sphana import registry

    before, now = registry.promote(Path(args.repo), args.name, args.version, args.stage)
    console.print(
        f"[green]{args.name}[/] {args.stage}: {before or 'none'} -> {now} "
        "(`git push --tags` to publish)"
    )
    return 0


def cmd_artifacts_rollback(args: argparse.Namespace) -> int:
    from sphana import registry

    before, now = registry.rollback(Path(args.repo), args.name, args.stage)
    console.print(
        f"[green]{args.name}[/] {args.stage} rolled back: {before} -> {now} "
        "(`git push --tags` to publish)"
    )
    return 0


def cmd_artifacts_diff(args: argparse.Namespace) -> int:
    from rich.table import Table

    from sphana import registry

    result = registry.diff(Path(args.repo), args.name, args.old, args.new)
    if args.json:
        _print_json(result)
        return 0
    out = Console(highlight=False)
    old, new = result["versions"]
    for facet in ("params", "data", "metrics", "files"):
        changed, same = result[facet]["changed"], result[facet]["same"]
        table = Table(title=f"{facet}: {len(changed)} changed, {same} same", title_justify="left")
        for column in (facet[:-1] if facet != "data" else "output", old, new):
            table.add_column(column)
        for key, (a, b) in changed.items():
            table.add_row(escape(key), escape(str(a)), escape(str(b)))
        out.print(table if changed else table.title)
    return 0


def cmd_artifacts_bundle(args: argparse.Namespace) -> int:
    from sphana import registry

    result = registry.bundle(Path(args.repo), args.name, args.version, Path(args.out))
    console.print(
        f"[green]OK[/] {args.out}: {args.name} {result['version']}, {result['files']} files "
        "verified against its manifest"
    )
    return 0


def cmd_artifacts_parity_samples(args: argparse.Namespace) -> int:
    from sphana import registry
    from sphana.io import write_json_atomic

    samples = registry.parity_samples(Path(args.repo), args.name, args.version)
    if args.output == "-":
        _print_json(samples)
    else:
        write_json_atomic(args.output, samples)
        cases = len(samples["cases"])
        console.print(
            f"[green]wrote[/] {args.output}: {cases} case(s) for {', '.join(samples['models'])}"
        )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from sphana.config import _check_semver
    from sphana.convert import convert, plan, print_table
    from sphana.entry import quiet_libraries
    from sphana.errors import ConfigError

    quiet_libraries()  # as the stages: a missing weight is an error, the rest is noise here

    try:
        _check_semver("--version", args.version)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    p = plan(Path(args.model), args.kind, args.pooling, args.normalize, args.max_seq_length)
    console.print(escape(p.describe()), soft_wrap=True)
    if args.dry_run:
        console.print("dry run: nothing was converted")
        return 0
    report = convert(
        p,
        Path(args.out),
        Path(args.eval) if args.eval else None,
        args.trust_pickle,
        args.threads,
        args.seconds,
        name=args.name,
        version=args.version,
        cfg=ExportConfig(layer_norm=LayerNorm(args.layer_norm)),
    )
    fusion = report["fusion"]
    console.print(
        "fused: "
        + ", ".join(f"{n} {op}" for op, n in fusion["fused_operators"].items() if n)
        + ("" if fusion["attention_fused"] else " [yellow](no fused attention)[/]")
        + (f"; layer norms: {fusion['layer_norm']}" if "layer_norm" in fusion else "")
        + (
            f"; {fusion['operators_on_real_tokens']} operators on real tokens only"
            if fusion.get("operators_on_real_tokens")
            else ""
        )
    )
    q = report["quantization"]
    console.print(f"INT8 recipe: {q['preset']} (tried {[t['preset'] for t in q['tried']]})")
    if report.get("sentence_transformers"):
        st = report["sentence_transformers"]
        console.print(
            f"vs sentence-transformers' encode ({st['texts']} texts): max abs diff "
            f"{st['max_abs_diff']:.2e}, min cosine {st['min_cosine']:.6f}"
        )
    if "table_inputs" in report:
        shape = report["table_inputs"]
        console.print(
            f"speed: {shape['inputs']} of the eval inputs in batches of {shape['batch']}, "
            f"{shape['tokens_per_input']:.0f} tokens each on average "
            f"(batches padded to {shape['padded_to']:.0f} on average), "
            f"{args.threads or 'all'} threads"
        )
    print(print_table(report))
    console.print(
        f"[green]OK[/] wrote {args.out}: a release bundle (manifest.json); "
        f"check it with `sphana verify {args.out}`, serve it with `sphana serve {args.out}`"
    )
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    import tempfile

    from sphana import query
    from sphana.manifest import checked, validate_schema
    from sphana.release import open_release
    from sphana.serving.engine import Engine, SessionSettings, parse_precision

    sources = [Path(s) for s in args.release or ["target/manifests/latest.json"]]
    settings = SessionSettings(intra_op_threads=args.threads)
    options = query.QueryOptions(top_k=args.top_k, candidates=args.candidates)
    with tempfile.TemporaryDirectory(prefix="sphana-query-") as tmp:
        if len(sources) == 1 and sources[0].suffix == ".json":  # in place, once every file matches
            if not sources[0].is_file():
                raise SphanaError(
                    f"{sources[0]}: no manifest there; build one (`make run`) or give --release"
                )
            root = _default_root(sources[0]) or sources[0].parent
            manifest = checked(sources[0], root)
            validate_schema(manifest, str(sources[0]))
        else:  # tarballs and bundles: verified into a temporary directory
            release = open_release(sources, Path(tmp) / "release")
            manifest, root = release.manifest, release.root
        engine = Engine(manifest, root, parse_precision(args.precision), settings)
        try:
            result = query.answer(engine, args.question, options)
        except query.QueryUnavailable as e:
            raise SphanaError(str(e)) from None
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    print(result["answer"] if result["answer"] is not None else f"({result['answer_skipped']})")
    for p in result["passages"]:
        console.print(
            f"[{p['rank'] + 1}] {escape(p['document'])} / {escape(str(p['section']))} "
            f"[{p['start']}:{p['end']}] score {p['score']:.4f} ({result['ranked_by']})"
        )
        console.print(f"    {escape(p['text'][:200])}", soft_wrap=True)
    steps = ", ".join(f"{k} {v:.1f} ms" for k, v in result["timings_ms"].items())
    console.print(f"[dim]{steps}[/]")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sphana.serving.server import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    # The module docstring is reStructuredText for readers of the code; --help gets plain text.
    parser = argparse.ArgumentParser(
        prog="sphana",
        description="Sphana build tooling: compose the configuration, check manifests and data "
        "files, manage the model registry, convert models trained elsewhere, and serve a release.",
        epilog="'sphana <command> --help' shows the arguments of a command. The pipeline itself "
        "runs with 'dvc repro', or one stage at a time: python stages/<stage>.py [overrides].",
    )
    sub = parser.add_subparsers(dest="command", required=True, title="commands")

    p = sub.add_parser("params", help="compose conf/ into params.yaml (run before `dvc repro`)")
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. embedding=tiny embedding.lr=1e-4"
    )
    p.add_argument("--config-dir", default="conf")
    p.add_argument("--output", default="params.yaml")
    p.set_defaults(func=cmd_params)

    v = sub.add_parser(
        "verify", help="check a manifest, bundle directory or .tar.gz against its files"
    )
    v.add_argument("path", help="manifest .json, unpacked bundle directory, or .tar.gz")
    v.add_argument("--root", help="directory the manifest's paths are relative to")
    v.add_argument("--lock", help="also check provenance against this dvc.lock")
    v.set_defaults(func=cmd_verify)

    c = sub.add_parser("validate", help="check a data file against its contract (JSON Schema)")
    c.add_argument("file", help="JSON Lines file (or manifest .json for --type manifest)")
    c.add_argument("--type", required=True, choices=list(KINDS), help="record kind of the file")
    c.set_defaults(func=cmd_validate)

    s = sub.add_parser("stats", help="record count, label/kind counts and lengths of a .jsonl")
    s.add_argument("file", help="JSON Lines file")
    s.add_argument("--json", action="store_true", help="print the statistics as JSON")
    s.set_defaults(func=cmd_stats)

    a = sub.add_parser(
        "artifacts",
        help="model registry: versions and stages as git tags (GTO format)",
        description="The model registry: versions and stages of the artifacts of dvc.yaml, as "
        "git tags in GTO's format.",
    )
    a.add_argument("--repo", default=".", help="repository root (default: .)")
    verbs = a.add_subparsers(dest="verb", required=True, title="commands")

    def verb(name: str, func: Any, help: str, *positional: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help)
        for arg in positional:
            p.add_argument(arg)
        p.set_defaults(func=func)
        return p

    p = verb("list", cmd_artifacts_list, "versions, stages and key metrics of each artifact")
    p.add_argument("names", nargs="*", help="artifacts of dvc.yaml (default: all)")
    p.add_argument("--json", action="store_true")
    p = verb(
        "register", cmd_artifacts_register, "tag HEAD as NAME@vVERSION once it verifies", "name"
    )
    p.add_argument("version", help="semantic version, e.g. 0.2.0")
    p = verb(
        "promote",
        cmd_artifacts_promote,
        "assign a stage (e.g. prod) to a version",
        "name",
        "version",
    )
    p.add_argument("--stage", required=True)
    p = verb(
        "rollback", cmd_artifacts_rollback, "give a stage back to its previous version", "name"
    )
    p.add_argument("--stage", required=True)
    p = verb(
        "diff",
        cmd_artifacts_diff,
        "params, data hashes, metrics, checksums of 2 versions",
        "name",
        "old",
        "new",
    )
    p.add_argument("--json", action="store_true")
    p = verb(
        "bundle", cmd_artifacts_bundle, "a verified, portable copy of a version", "name", "version"
    )
    p.add_argument("out", help="directory to create")
    p = verb(
        "parity-samples",
        cmd_artifacts_parity_samples,
        "inputs and ONNX Runtime outputs for another runtime to replay",
        "name",
        "version",
    )
    p.add_argument("-o", "--output", default="-", help="JSON file (default: stdout)")

    cv = sub.add_parser(
        "convert",
        help="a model trained elsewhere into gated ONNX + INT8 (sentence-transformers, ...)",
        description="Convert a sentence-transformers directory, a transformers directory or a "
        "state dict into ONNX with dynamic axes and fused attention, plus INT8, through the "
        "pipeline's export engine and parity gates; a missed gate writes nothing.",
    )
    cv.add_argument("model", help="model directory or state-dict file")
    cv.add_argument("out", help="bundle directory to write (replaced whole, only on success)")
    cv.add_argument("--name", help="release name in manifest.json (default: OUT's name)")
    cv.add_argument("--version", default="0.1.0", help="release and component version")
    cv.add_argument("--kind", required=True, choices=CONVERT_KINDS, help="what the model is")
    cv.add_argument("--pooling", help="pooling of a transformers model: mean, cls, max, ...")
    cv.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalize the output (default: as the source says; transformers: no)",
    )
    cv.add_argument("--max-seq-length", type=int, help="default: the source's")
    cv.add_argument(
        "--eval",
        help='JSON Lines to gate on: embedding {"query", "positive"}; relation {"text", '
        '"entity1", "entity2", "label"}; llm {"text"}',
    )
    cv.add_argument("--dry-run", action="store_true", help="print the plan, convert nothing")
    cv.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a pickle that needs more than weights_only=True (runs code from the file)",
    )
    cv.add_argument(
        "--layer-norm",
        choices=[m.value for m in LayerNorm],
        default=ExportConfig.layer_norm.value,
        help="residual add + layer norm as standard operators (fast on CPU) or fused (for GPU "
        "execution providers); as export.layer_norm",
    )
    cv.add_argument("--threads", type=int, default=2, help="for the parity and speed figures")
    cv.add_argument(
        "--seconds", type=float, default=2.0, help="speed table: the slowest backend's time"
    )
    cv.set_defaults(func=cmd_convert)

    q = sub.add_parser(
        "query",
        help="answer a question over a release's corpus index (ONNX Runtime only)",
        description="Embed the question, retrieve from the release's corpus index, re-rank with "
        "the graph ranker and answer with the generator from the best passage; print the answer "
        "and the cited passages (document, section, offsets, scores) and each step's time.",
    )
    q.add_argument("question")
    q.add_argument(
        "--release",
        action="append",
        metavar="SOURCE",
        help="a release .tar.gz, bundle directory (repeatable) or manifest .json "
        "(default: target/manifests/latest.json, its files under paths.artifacts)",
    )
    q.add_argument("--top-k", type=int, default=5, help="passages cited (default 5)")
    q.add_argument(
        "--candidates", type=int, default=20, help="passages retrieved for re-ranking (20)"
    )
    q.add_argument(
        "--precision",
        action="append",
        default=[],
        metavar="[COMPONENT=]int8|fp32|int4",
        help="as sphana serve --precision (default int8)",
    )
    q.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: default)")
    q.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    q.set_defaults(func=cmd_query)

    serve = sub.add_parser(
        "serve",
        help="serve a release on ONNX Runtime (HTTP, or JSON lines with --stdio)",
        description="Verify a release (every sha256), load and warm its ONNX Runtime sessions, "
        "then serve it: OpenAI and TEI embeddings, relations, rerank, generation, the Open "
        "Inference Protocol v2, /health, /info, /metrics; OpenAPI page at /docs.",
    )
    from sphana.serving.server import add_arguments

    add_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SphanaError as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
