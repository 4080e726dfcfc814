"""What a running server serves, and how that changes without a restart or a dropped request.

A :class:`Served` is one loaded release: its engine (sessions), its batchers and its generator
thread. :class:`Live` holds the current one. Every request takes the current one when it starts
and keeps it to its last byte, so a response never mixes versions (its ``x-model-version`` header
names the one that served it). A reload builds the next :class:`Served` beside the current one
(verify every sha256, create and warm the sessions, replay the release's parity samples on them:
:class:`sphana.serving.server.Loader`) and only then swaps it in; the replaced one is closed once
its last request has ended. Any failure leaves the current one serving.

Everything here runs on the event loop's thread (route, release, swap), so it needs no lock.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sphana.errors import SphanaError

log = logging.getLogger("sphana.serve")

# why a reload did not happen (the reason label of reload_failures_total)
REASONS = ("source", "checksum", "session", "parity", "registry", "busy")


class ReloadError(SphanaError):
    """A release that was not loaded, and why: ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclass(eq=False)
class Served:
    """One loaded release and what serves it; ``close`` frees it (once no request holds it)."""

    engine: Any  # sphana.serving.engine.Engine
    batchers: dict[str, Any] = field(default_factory=dict)
    llm_executor: Any = None
    cleanup: Callable[[], None] | None = None  # removes its verified copy
    active: int = 0  # requests holding it
    retired: bool = False
    closed: bool = False

    @property
    def version(self) -> str:
        return self.engine.version

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for b in self.batchers.values():
            b.close()
        if self.llm_executor is not None:
            self.llm_executor.shutdown(wait=False, cancel_futures=True)
        if self.cleanup is not None:  # a large release takes a while to delete: not on the loop
            threading.Thread(target=self.cleanup, name="release-cleanup").start()
        log.info("closed release %s: its last request has ended", self.version)


class Live:
    """The :class:`Served` that new requests get: the current release (the control), or, for a
    component with a split (:mod:`sphana.serving.traffic`), the variant release whose version of
    it the request's key draws or pins."""

    def __init__(self, served: Served) -> None:
        self.current = served
        self.loaded_at = time.time()
        self.variants: list[Served] = []  # other releases, serving only through splits and pins
        self.splits: dict[str, dict[str, float]] = {}  # component -> {version: weight}
        self.shadows: dict[str, tuple[str, float]] = {}  # component -> (version, share copied)

    def arms(self) -> list[Served]:
        return [self.current, *self.variants]

    def find(self, component: str, version: str) -> Served | None:
        """The release serving ``component`` at ``version`` (the control first)."""
        for served in self.arms():
            model = served.engine.models.get(component)
            if model is not None and model.version == version:
                return served
        return None

    def versions(self, component: str) -> list[str]:
        return [
            s.engine.models[component].version for s in self.arms() if component in s.engine.models
        ]

    def route(self, component: str | None, key: str | None, pin: str | None) -> Served:
        """The release a request for ``component`` is served by (held: :meth:`release` it);
        ``key`` draws its version where the component is split (a random one when None).

        Raises:
            LookupError: ``pin`` names a version of ``component`` no loaded release has.
        """
        served = self.current
        if component is not None and pin:
            found = self.find(component, pin)
            if found is None:
                raise LookupError(
                    f"no loaded release serves {component} {pin}; loaded: "
                    + (", ".join(self.versions(component)) or "none")
                )
            served = found
        elif component in self.splits:
            from sphana.serving.traffic import choose

            version = choose(self.splits[component], key or uuid.uuid4().hex, component)
            served = self.find(component, version) or self.current
        served.active += 1
        return served

    def set_split(self, component: str, weights: dict[str, float] | None) -> None:
        """Split ``component``'s traffic by ``weights`` (None ends the split).

        Raises:
            LookupError: a weighted version that no loaded release serves.
        """
        if weights is None:
            self.splits.pop(component, None)
            return
        missing = [v for v, w in weights.items() if w > 0 and self.find(component, v) is None]
        if missing:
            raise LookupError(
                f"split of {component}: no loaded release serves version(s) {missing}; loaded: "
                + (", ".join(self.versions(component)) or "none")
                + " (load another with --variant or POST /admin/variants)"
            )
        self.splits[component] = dict(weights)

    def set_shadow(self, component: str, version: str | None, share: float = 0.0) -> None:
        """Copy ``share`` of ``component``'s requests to its ``version`` (None ends it).

        Raises:
            LookupError: no loaded release serves that version.
        """
        if version is None:
            self.shadows.pop(component, None)
            return
        if self.find(component, version) is None:
            raise LookupError(
                f"shadow of {component}: no loaded release serves version {version}; loaded: "
                + (", ".join(self.versions(component)) or "none")
            )
        self.shadows[component] = (version, share)

    def add_variant(self, served: Served) -> None:
        self.variants.append(served)

    def remove_variant(self, version: str) -> Served:
        """Stop serving variant release ``version`` (closed once drained); splits that weighted
        its components fall back to the control for them.

        Raises:
            LookupError: no variant has that release version.
        """
        for served in self.variants:
            if served.version == version:
                self.variants.remove(served)
                served.retired = True
                if served.active == 0:
                    served.close()
                return served
        raise LookupError(
            f"no variant release {version}; variants: "
            + (", ".join(s.version for s in self.variants) or "none")
        )

    def release(self, served: Served) -> None:
        served.active -= 1
        if served.retired and served.active == 0:
            served.close()

    def swap(self, new: Served) -> Served:
        """Serve ``new`` from the next request on; the old one closes once drained."""
        old, self.current = self.current, new
        self.loaded_at = time.time()
        old.retired = True
        if old.active == 0:
            old.close()
        return old

    def close(self) -> None:
        for served in self.arms():
            served.close()
