"""The ``sphana`` command.

- ``params``: compose conf/ into params.yaml.
- ``verify``: check a manifest, bundle directory or .tar.gz against its files.
- ``validate FILE --type KIND``: check a data file against its contract (JSON Schema + checks).
- ``stats FILE [--json]``: record count, label/kind counts and text lengths of a JSON Lines file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from sphana.contracts import KINDS
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
        import yaml

        artifacts = (yaml.safe_load(params.read_text(encoding="utf-8")) or {}).get("paths", {})
        return Path(artifacts.get("artifacts", "target/artifacts"))
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
        print(json.dumps(result, indent=2, ensure_ascii=False))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sphana", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
