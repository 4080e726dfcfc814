"""The ``sphana`` command: ``params`` (compose conf/ into params.yaml) and ``verify``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

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
