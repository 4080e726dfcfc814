"""``sphana serve --registry REPO --stage STAGE``: serve what a registry stage holds, and follow it.

The stage of each component is resolved the way ``dvc artifacts get --stage`` resolves it
(:mod:`sphana.registry`: the version whose tag last named the stage); the release served is every
component the stage holds, fetched as bundles from the DVC cache or remote
(:func:`sphana.registry.bundle`, verified). Every ``poll_seconds`` the follower looks again (after
``git fetch --tags`` when the repository has an ``origin``): when the assignment has changed
(``sphana artifacts promote`` or ``rollback``), it reloads the server onto it without a restart.
An assignment that fails to load is not retried: ``/info`` and the metrics show the failure until
the stage moves again. Each replica follows on its own, so a promote reaches all of them within a
poll.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sphana.serving.live import ReloadError

log = logging.getLogger("sphana.serve")


class Follower:
    def __init__(self, repo: Path, stage: str, cache: Path, poll_seconds: float) -> None:
        try:  # GTO and DVC: the registry extra
            import dvc.repo  # noqa: F401
            import gto  # noqa: F401
        except ImportError as e:
            raise ReloadError(
                "registry",
                f"--registry needs DVC and GTO ({e.name} is missing): "
                "pip install 'sphana[registry]'",
            ) from None
        self.repo = repo
        self.stage = stage
        self.cache = cache
        self.poll_seconds = poll_seconds
        self.serving: dict[str, str] = {}  # component -> registry version being served
        self.failed: dict[str, Any] | None = None  # the assignment that failed, and why
        self.last_poll: float | None = None
        self.polls = 0

    def resolve(self) -> dict[str, str]:
        """component -> the registry version at the stage (components without it left out)."""
        from sphana import registry

        if "origin" in self._git("remote").split():
            self._git("fetch", "--quiet", "--tags", "--force", "origin")
        out = {}
        for name, history in sorted(registry.histories(self.repo).items()):
            if name == registry.RELEASE:
                continue
            commit = history.holders().get(self.stage)
            if commit is not None and commit in history.versions_at:
                out[name] = history.versions_at[commit]
        if not out:
            raise ReloadError(
                "registry",
                f"no component of {self.repo} is at stage {self.stage!r}: "
                f"`sphana artifacts promote NAME VERSION --stage {self.stage}` assigns one",
            )
        return out

    def fetch(self, assignment: dict[str, str]) -> list[str]:
        """The verified bundle directory of each component's version (fetched once)."""
        from sphana import registry

        out = []
        for name, version in assignment.items():
            bundle = self.cache / name / version
            if not bundle.is_dir():
                bundle.parent.mkdir(parents=True, exist_ok=True)
                try:
                    registry.bundle(self.repo, name, version, bundle)
                except registry.RegistryError as e:
                    raise ReloadError("registry", str(e)) from None
            out.append(str(bundle))
        return out

    def sources(self) -> list[str]:
        """The bundles of the stage now (the server's first release)."""
        assignment = self.resolve()
        bundles = self.fetch(assignment)
        self.serving = assignment
        return bundles

    async def run(self, reload: Callable[[Any, str], Awaitable[dict]]) -> None:
        """Poll until cancelled; ``reload(sources, origin)`` swaps a release in."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.poll(reload)
            except Exception:  # a poll that fails is logged and tried again at the next
                log.exception("registry poll failed")

    async def poll(self, reload: Callable[[Any, str], Awaitable[dict]]) -> None:
        self.polls += 1
        self.last_poll = time.time()
        try:
            assignment = await asyncio.to_thread(self.resolve)
        except ReloadError as e:
            log.warning("registry %s: %s", self.repo, e)
            return
        if assignment == self.serving:
            self.failed = None  # the stage moved back to what serves: the failure is over
            return
        if self.failed is not None and self.failed["assignment"] == assignment:
            return  # failed once: not retried until the stage moves again
        log.info("stage %s moved: %s -> %s", self.stage, self.serving, assignment)
        try:
            await reload(lambda: self.fetch(assignment), "registry")
        except ReloadError as e:
            if e.reason == "busy":
                return  # another reload is running: the next poll tries
            self.failed = {"assignment": assignment, "reason": e.reason, "message": str(e)}
            return
        self.serving, self.failed = assignment, None

    def describe(self) -> dict[str, Any]:
        return {
            "repo": str(self.repo),
            "stage": self.stage,
            "poll_seconds": self.poll_seconds,
            "serving": self.serving,
            "failed": self.failed,
            "polls": self.polls,
            "last_poll": self.last_poll,
        }

    def _git(self, *args: str) -> str:
        proc = subprocess.run(
            ["git", *args], cwd=self.repo, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise ReloadError(
                "registry", f"git {' '.join(args)} in {self.repo}: {proc.stderr.strip()}"
            )
        return proc.stdout
