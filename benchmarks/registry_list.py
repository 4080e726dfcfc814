"""Time of `sphana artifacts list` over a registry with many tagged versions.

Run after `dvc repro` (or `make run`) on a committed build, from the repository root:

    python benchmarks/registry_list.py [--versions 50] [--runs 5]

Works on a clone in a temporary directory (this repository's tags and files are not touched):
the clone reads this repository's DVC cache, gets one empty commit per version, and the
versions are registered through GTO over the five artifacts of dvc.yaml in turn, with a prod
stage assigned to one version each. Prints the wall time of the whole command (a new process,
as a user runs it), median and max of --runs. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from gto import api

    from sphana import registry

    root = Path.cwd()
    names = list(yaml.safe_load(Path("dvc.yaml").read_text())["artifacts"])
    cache = str(registry.cache_dir(Path.cwd()))
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        git("clone", "-q", "--no-tags", str(root), str(clone), cwd=root)
        git("config", "user.email", "bench@sphana.invalid", cwd=clone)
        git("config", "user.name", "bench", cwd=clone)
        subprocess.run(
            [sys.executable, "-m", "dvc", "cache", "dir", "--local", cache], cwd=clone, check=True
        )
        start = time.perf_counter()
        for i in range(args.versions):
            name = names[i % len(names)]
            git("commit", "-q", "--allow-empty", "-m", f"version {i}", cwd=clone)
            api.register(str(clone), name, "HEAD", version=f"v1.{i // len(names)}.0")
        for name in names:
            api.assign(str(clone), name, "prod", version="v1.0.0")
        made = time.perf_counter() - start
        command = [str(Path(sys.executable).parent / "sphana"), "artifacts", "list"]
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run(command, cwd=clone, capture_output=True, text=True, check=True)
            times.append(time.perf_counter() - start)
        listed = subprocess.run(
            [*command, "--json"], cwd=clone, capture_output=True, text=True, check=True
        ).stdout
        rows = json.loads(listed)
        with_metrics = sum(1 for r in rows if r["metrics"])
    print(
        f"registry: {args.versions} versions of {len(names)} artifacts "
        f"(+{len(names)} prod assignments), tagged in {made:.1f} s"
    )
    print(
        f"`sphana artifacts list`: {len(rows)} versions, {with_metrics} with key metrics "
        "from their manifest"
    )
    print(
        f"  wall time over {args.runs} runs: median {statistics.median(times):.2f} s, "
        f"max {max(times):.2f} s"
    )


if __name__ == "__main__":
    main()
