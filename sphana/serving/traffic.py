"""Traffic between versions: weighted, sticky splits, outcomes per version and the statistics that
say whether a candidate is better than the control.

- A **split** gives each version of a component a weight (``embedding=0.1.0:90,0.2.0:10``). A
  request's version is chosen by hashing its key (the ``x-sphana-key`` header; a random one
  without it), so a key always gets the same version while the weights stay; ``x-sphana-version``
  pins one.
- **Outcomes**: ``POST /v1/feedback {"request_id", "reward"}`` records a reward against the version
  that served the request (``x-request-id`` of its response).
- **Statistics** per version: mean reward with a 95% confidence interval and a two-sided test
  against the control: the two-proportion z-test when every reward is 0 or 1, Welch's t-test
  otherwise (p-values from the normal and Student's t distributions, computed here: serving does
  not depend on scipy; the tests check them against it).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sphana.vectors import row_cosines

KEY_HEADER = "x-sphana-key"
PIN_HEADER = "x-sphana-version"
# the component an endpoint serves: what a split of that component routes
ENDPOINTS = {
    "/v1/embeddings": "embedding",
    "/embed": "embedding",
    "/v1/relations": "relation",
    "/v1/rerank": "gnn",
    "/v1/generate": "llm",
}
MIN_SAMPLE = 30  # rewards per version before a test may be called
LATENCIES = 10_000  # the latest latencies kept per version (p50/p95)
REQUESTS = 100_000  # the latest request ids kept for feedback


def component_of(path: str) -> str | None:
    """The component an endpoint serves (``/v2/models/<name>/...`` -> name), or None."""
    if path in ENDPOINTS:
        return ENDPOINTS[path]
    parts = path.split("/")
    if len(parts) >= 4 and parts[1] == "v2" and parts[2] == "models":
        return parts[3]
    return None


def parse_split(spec: str) -> tuple[str, dict[str, float]]:
    """``component=version:weight,version:weight`` -> (component, {version: weight}).

    Raises:
        ValueError: naming what is wrong and the form expected.
    """
    form = "expected component=version:weight,version:weight (e.g. embedding=0.1.0:90,0.2.0:10)"
    component, sep, rest = spec.partition("=")
    if not sep or not component.strip() or not rest.strip():
        raise ValueError(f"split {spec!r}: {form}")
    weights: dict[str, float] = {}
    for part in rest.split(","):
        version, sep, weight = part.strip().rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not version or value < 0 or not math.isfinite(value):
            raise ValueError(f"split {spec!r}: {part.strip()!r} is not version:weight; {form}")
        weights[version] = value
    return component.strip(), check_weights(component.strip(), weights)


def check_weights(component: str, weights: dict[str, Any]) -> dict[str, float]:
    if not weights or not all(
        isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights.values()
    ):
        raise ValueError(f"split of {component}: give each version a weight >= 0")
    if sum(weights.values()) <= 0:
        raise ValueError(f"split of {component}: the weights sum to 0")
    return {str(v): float(w) for v, w in weights.items()}


def choose(weights: dict[str, float], key: str, component: str) -> str:
    """The version ``key`` gets: the hash of (component, key) read as a number in [0, 1),
    placed on the cumulative weights (versions in the order given). Sticky while the weights
    stay; a weight moved from one version to another moves only the keys it must."""
    digest = hashlib.sha256(f"{component}\0{key}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64 * sum(weights.values())
    total = 0.0
    for version, weight in weights.items():
        total += weight
        if point < total:
            return version
    return next(v for v, w in reversed(weights.items()) if w > 0)


def parse_shadow(spec: str) -> tuple[str, str, float]:
    """``component=version:share`` (share in (0, 1]) -> (component, version, share).

    Raises:
        ValueError: naming what is wrong and the form expected.
    """
    component, weights = parse_split(spec)
    if len(weights) != 1:
        raise ValueError(f"shadow {spec!r}: one version, e.g. embedding=0.2.0:0.25")
    (version, share), *_ = weights.items()
    return component, version, check_share(component, share)


def check_share(component: str, share: Any) -> float:
    if not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"shadow of {component}: the share of requests copied is in (0, 1]")
    return float(share)


# --- shadow comparisons: served answer vs the candidate's, 1.0 when they agree fully ----------


def cosine_agreement(served: Any, shadow: Any) -> float:
    """Mean cosine of each input's two embeddings."""
    return float(np.mean(row_cosines(served, shadow)))


def label_agreement(served: dict[str, Any], shadow: dict[str, Any]) -> float:
    """Share of candidate pairs given the same relation (or none) by both."""

    def labels(out: dict[str, Any]) -> list[Any]:
        return [p["relation"]["label"] if p["relation"] else None for p in out["pairs"]]

    a, b = labels(served), labels(shadow)
    if len(a) != len(b):
        return 0.0
    return float(np.mean([x == y for x, y in zip(a, b, strict=True)])) if a else 1.0


def ranking_agreement(served: Any, shadow: Any) -> float:
    """Share of pairs of texts that both score in the same order (Kendall's concordance)."""
    a, b = np.asarray(served, dtype=np.float64), np.asarray(shadow, dtype=np.float64)
    i, j = np.triu_indices(len(a), k=1)
    if len(i) == 0:
        return 1.0
    return float(np.mean(np.sign(a[i] - a[j]) == np.sign(b[i] - b[j])))


def token_agreement(served: list[int], shadow: list[int]) -> float:
    """Share of positions where both generations have the same token (over the longer)."""
    longest = max(len(served), len(shadow))
    if longest == 0:
        return 1.0
    return sum(x == y for x, y in zip(served, shadow, strict=False)) / longest


# --- statistics ----------------------------------------------------------------------------------


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1 - tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_sf`; p in (0.5, 1))."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if 1 - t_sf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def two_proportion_z(s1: float, n1: int, s2: float, n2: int) -> tuple[float, float]:
    """(z, two-sided p) of H0 p1 == p2, pooled standard error (``s``: successes)."""
    p = (s1 + s2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (s1 / n1 - s2 / n2) / se
    return z, 2 * normal_sf(abs(z))


def welch_t(m1: float, v1: float, n1: int, m2: float, v2: float, n2: int) -> tuple[float, float]:
    """(t, two-sided p) of Welch's t-test from means and sample variances (ddof 1)."""
    a, b = v1 / n1, v2 / n2
    if a + b == 0:
        return 0.0, 1.0
    t = (m1 - m2) / math.sqrt(a + b)
    df = (a + b) ** 2 / (a * a / (n1 - 1) + b * b / (n2 - 1))
    return t, 2 * t_sf(abs(t), df)


@dataclass
class Arm:
    """What one version of a component has served and earned."""

    requests: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCIES))
    rewards: int = 0
    total: float = 0.0
    squares: float = 0.0
    binary: bool = True  # every reward so far is 0 or 1
    shadow: dict[str, Any] = field(default_factory=lambda: {"compared": 0, "agreement": 0.0})

    def shadowed(self, agreement: float) -> None:
        """One shadow comparison: the running mean agreement with the served answers."""
        n = self.shadow["compared"] + 1
        mean = self.shadow["agreement"] + (agreement - self.shadow["agreement"]) / n
        self.shadow = {"compared": n, "agreement": mean}

    def reward(self, value: float) -> None:
        self.rewards += 1
        self.total += value
        self.squares += value * value
        self.binary = self.binary and value in (0.0, 1.0)

    @property
    def mean(self) -> float | None:
        return self.total / self.rewards if self.rewards else None

    @property
    def variance(self) -> float | None:
        n = self.rewards
        if n < 2:
            return None
        return max((self.squares - self.total * self.total / n) / (n - 1), 0.0)

    def interval(self) -> list[float] | None:
        """95% confidence interval of the mean reward (Wald for 0/1 rewards, Student's t
        otherwise)."""
        n, mean, var = self.rewards, self.mean, self.variance
        if mean is None or var is None:
            return None
        if self.binary:
            half = 1.959963984540054 * math.sqrt(mean * (1 - mean) / n)
        else:
            half = t_quantile(0.975, n - 1) * math.sqrt(var / n)
        return [mean - half, mean + half]


def compare(arm: Arm, control: Arm) -> dict[str, Any] | None:
    """The two-sided test of ``arm`` against ``control`` (None until both have two rewards)."""
    if arm.rewards < 2 or control.rewards < 2:
        return None
    if arm.binary and control.binary:
        stat, p = two_proportion_z(arm.total, arm.rewards, control.total, control.rewards)
        successes = [arm.total, arm.rewards - arm.total, control.total]
        successes.append(control.rewards - control.total)
        enough = min(arm.rewards, control.rewards) >= MIN_SAMPLE and min(successes) >= 10
        test = "two-proportion z-test"
    else:
        assert arm.mean is not None and control.mean is not None
        stat, p = welch_t(
            arm.mean, arm.variance or 0.0, arm.rewards,
            control.mean, control.variance or 0.0, control.rewards,
        )  # fmt: skip
        enough = min(arm.rewards, control.rewards) >= MIN_SAMPLE
        test = "Welch's t-test"
    return {
        "test": test,
        "statistic": round(stat, 6),
        "p_value": p,
        "significant": bool(enough and p < 0.05),
        "enough_data": enough,
    }


class Outcomes:
    """Per (component, version) :class:`Arm` figures, and which version served each recent
    request (for feedback)."""

    def __init__(self) -> None:
        self.arms: dict[tuple[str, str], Arm] = {}
        self.served: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def arm(self, component: str, version: str) -> Arm:
        return self.arms.setdefault((component, version), Arm())

    def record(self, request_id: str, component: str, version: str, seconds: float) -> None:
        arm = self.arm(component, version)
        arm.requests += 1
        arm.latencies.append(seconds)
        self.served[request_id] = (component, version)
        if len(self.served) > REQUESTS:
            self.served.popitem(last=False)

    def feedback(self, request_id: str, reward: float) -> tuple[str, str] | None:
        """Record ``reward`` for the version that served ``request_id`` (None if unknown)."""
        served = self.served.get(request_id)
        if served is not None:
            self.arm(*served).reward(reward)
        return served

    def report(self, component: str, control: str | None) -> dict[str, Any]:
        versions = {v: a for (c, v), a in self.arms.items() if c == component}
        base = versions.get(control) if control is not None else None
        out = {}
        for version, arm in versions.items():
            lat = np.asarray(arm.latencies, dtype=float) * 1000
            out[version] = {
                "requests": arm.requests,
                "latency_ms": {
                    "p50": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
                    "p95": round(float(np.percentile(lat, 95)), 3) if len(lat) else None,
                },
                "rewards": arm.rewards,
                "mean_reward": arm.mean,
                "ci95": arm.interval(),
                "shadow": arm.shadow if arm.shadow["compared"] else None,
                "vs_control": compare(arm, base)
                if base is not None and version != control
                else None,
            }
        return {"component": component, "control": control, "versions": out}
