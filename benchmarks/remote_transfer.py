"""Push and pull time of the built artifacts to an S3 remote (moto's server on 127.0.0.1).

Run after `dvc repro` (or `make run`) on a committed build, from the repository root:

    python benchmarks/remote_transfer.py [--jobs 4]

Works on a clone in a temporary directory; this repository's config and cache are only read.
`dvc push` sends every output HEAD's dvc.lock records (datasets, PyTorch and ONNX models,
bundles, the tarball, metrics) from this repository's cache; `dvc pull` then fetches them into
an empty cache and checks them out, and `sphana verify` checks what arrived. Needs moto
(`pip install 'moto[server]'`, part of the dev extra). It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUCKET = "sphana-bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="dvc push/pull -j")
    args = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    from sphana import registry

    root = Path.cwd()
    cache = str(registry.cache_dir(Path.cwd()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def dvc(*argv: str, cwd: Path) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dvc", *argv], cwd=cwd, env=env, check=True)
        return time.perf_counter() - start

    try:
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            clone = Path(tmp) / "clone"
            subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
            dvc("remote", "add", "--local", "-d", "bench", f"s3://{BUCKET}/cache", cwd=clone)
            dvc("remote", "modify", "--local", "bench", "endpointurl", url, cwd=clone)
            dvc("cache", "dir", "--local", cache, cwd=clone)
            push = dvc("push", "-q", "-j", str(args.jobs), cwd=clone)
            pages = boto3.client("s3", endpoint_url=url).get_paginator("list_objects_v2")
            stored = [o for page in pages.paginate(Bucket=BUCKET) for o in page.get("Contents", [])]
            count, size = len(stored), sum(o["Size"] for o in stored)
            dvc("cache", "dir", "--local", str(Path(tmp) / "empty-cache"), cwd=clone)
            pull = dvc("pull", "-q", "-j", str(args.jobs), cwd=clone)
            verified = subprocess.run(
                [
                    bin_dir / "sphana",
                    "verify",
                    "target/manifests/latest.json",
                    "--lock",
                    "dvc.lock",
                ],
                cwd=clone,
                env=env,
                capture_output=True,
                text=True,
            )
    finally:
        server.stop()
    mb = size / 1e6
    print(f"S3 remote (moto on 127.0.0.1), dvc -j {args.jobs}: {count} objects, {mb:.0f} MB")
    print(f"  dvc push: {push:.1f} s ({mb / push:.0f} MB/s)")
    print(f"  dvc pull into an empty cache + checkout: {pull:.1f} s ({mb / pull:.0f} MB/s)")
    print(f"  sphana verify on the pulled clone: {verified.stderr.strip() or verified.stdout}")


if __name__ == "__main__":
    main()
