"""Post-promotion monitoring: change detection on reward streams, holdout checks, webhooks.

Detectors
---------
:class:`Cusum` is Page's (1954) cumulative sum on standardised observations
``z = (x - mean) / sd``: ``S+ = max(0, S+ + z - k)`` and ``S- = max(0, S- - z - k)``, alarm
when a watched side exceeds ``h``. ``k`` (the allowance) is conventionally half the shift to
detect, in sd units; ``h`` sets the false-alarm rate. The in-control mean and sd are given
or estimated from a burn-in of ``burn_in`` samples.

:class:`PageHinkley` (Hinkley 1971, in its data-stream form) is the same reflected walk on
the same standardised ``z`` centred on their *running* mean,
``S = max(0, S + zbar_t - z_t - delta)`` for a drop, so ``delta`` and ``lambda`` are in sd
units too. Its sd (and the centre, which the running mean makes immaterial) comes from a
burn-in exactly as CUSUM's does. (Read raw, an allowance of half a sd would be 0.5 reward
units, more than a conversion rate of 11% can fall: the walk would never move.) With a
fixed mean it is exactly CUSUM with ``k = delta``, ``h = lambda``; the running mean lets it
do without a reference mean, at the price of slowing down after a change (the mean drifts
toward the new level).

Choosing ``h`` from a target in-control average run length (ARL0)
-----------------------------------------------------------------
Siegmund's (1985, *Sequential Analysis*, ch. II; as quoted in Montgomery, *Introduction to
Statistical Quality Control*, §9.1) approximation for a one-sided CUSUM on N(mu, 1) data::

    ARL(Delta) ~= (exp(-2 Delta b) + 2 Delta b - 1) / (2 Delta^2),  b = h + 1.166,

with ``Delta = shift - k`` (``b^2`` when ``Delta = 0``); in control ``Delta = -k``. A two-sided
scheme has ``1/ARL = 1/ARL+ + 1/ARL-``. :func:`cusum_threshold_for_arl` inverts it;
:func:`cusum_arl` evaluates it, e.g. the expected detection delay is ``cusum_arl(h, k, shift)``
~ ``(h + 1.166) / (shift - k)``. ARL0 counts samples fed to the detector (batches when the
monitor batches). The approximation is for normal data: on raw low-rate Bernoulli rewards
(skewed) a downward CUSUM is conservative (true ARL0 ~1.8x the target at p = 0.1) while an
upward one alarms more often than planned; batch means (``MonitorSettings.batch_size``)
bring the data closer to normal, or calibrate ``h`` by simulation. Estimating mean/sd from
a short burn-in also shortens ARL0: use hundreds of samples.

Holdout comparison
------------------
After promotion the previous champion may keep a small holdout share. The promoted
variant has regressed when its mean falls below the holdout's by more than ``margin``:
H0: ``mu_p - mu_h >= -margin`` against H1: ``mu_p - mu_h < -margin``, with the one-sided
z statistic ``z = (mean_p - mean_h + margin) / sqrt(var_p/n_p + var_h/n_h)`` (normal by the
CLT; independent rewards). Looking after every reward would inflate the error rate
(Johari et al. 2017), so the monitor looks only when ``min(n_p, n_h)`` first reaches
``min_samples * 2**j`` and spends ``alpha * 2**-(j+1)`` at look ``j``: by the union bound the
probability of a false regression over the whole (unbounded) watch is at most ``alpha``.

``margin`` should be the promotion rule's indifference margin. The rule promotes a variant
within that margin of the best, so a right promotion can leave the champion up to the
margin below the previous one. With ``margin = 0`` such a champion is in H1: its expected
z falls like ``sqrt(n)`` while the critical values fall only like ``sqrt(log n)``, so the
unbounded watch rolls it back with probability approaching 1. Unset, the margin is the
rule's default, 1% of the champion's mean (its mean since promotion here).

Score drift
-----------
:func:`ks_drift` wraps the two-sample Kolmogorov-Smirnov test; :func:`psi` is the
Population Stability Index over reference-quantile bins, read with the usual credit-scoring
thresholds (Siddiqi 2006): < 0.1 stable, 0.1-0.25 moderate shift, >= 0.25 significant shift.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import hmac
import json
import logging
import math
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from numba import njit
from scipy import optimize
from scipy import stats as sps

from allocator.lifecycle import Action, Event, EventType

__all__ = [
    "PSI_MODERATE",
    "PSI_SIGNIFICANT",
    "Cusum",
    "CusumSettings",
    "Detector",
    "Direction",
    "HoldoutTest",
    "KsDrift",
    "Moments",
    "MonitorSettings",
    "PageHinkley",
    "PageHinkleySettings",
    "PromotionMonitor",
    "Psi",
    "PsiLevel",
    "Reaction",
    "Regression",
    "RunningStats",
    "WebhookNotifier",
    "cusum_arl",
    "cusum_threshold_for_arl",
    "holdout_z_test",
    "ks_drift",
    "make_detector",
    "psi",
    "webhook_payload",
]

_log = logging.getLogger(__name__)

# Siegmund's correction for the overshoot of a normal random walk over the boundary:
# 2 * 0.583 where 0.583 ~= -zeta(1/2)/sqrt(2*pi) is the expected ladder-height excess.
_SIEGMUND_CORRECTION = 1.166
# A zero sd from a constant burn-in would divide by zero; any later change then alarms.
_SD_FLOOR = 1e-12

FloatArray = npt.NDArray[np.float64]


# ---------------------------------------------------------------------------------------
# Average run length (Siegmund)
# ---------------------------------------------------------------------------------------


def _siegmund_one_sided(drift: float, b: float) -> float:
    """ARL of a one-sided normal CUSUM whose increments have mean ``drift``."""
    x = -2.0 * drift * b
    if x > 700.0:
        return math.inf
    if abs(x) < 1e-4:
        # Series of (e^x - x - 1) / (2 drift^2): avoids the cancellation as drift -> 0.
        return b * b * (1.0 + x / 3.0 + x * x / 12.0)
    return (math.expm1(x) - x) / (2.0 * drift * drift)


def _check_k(k: float) -> None:
    """Validate a CUSUM allowance."""
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"k must be finite and >= 0, got {k}")


def cusum_arl(h: float, k: float, shift: float = 0.0, *, two_sided: bool = False) -> float:
    """Siegmund's approximate ARL of a CUSUM (sd units) when the mean moves by ``shift``.

    ``shift`` is signed toward the watched side (for a downward detector, a drop of 0.2 sd
    is ``shift=0.2``). ``shift=0`` gives ARL0; ``shift>k`` the expected detection delay.
    """
    if not math.isfinite(h) or h < 0:
        raise ValueError(f"h must be finite and >= 0, got {h}")
    _check_k(k)
    if not math.isfinite(shift):
        raise ValueError(f"shift must be finite, got {shift}")
    b = h + _SIEGMUND_CORRECTION
    arl = _siegmund_one_sided(shift - k, b)
    if not two_sided:
        return arl
    other = _siegmund_one_sided(-shift - k, b)
    return 1.0 / (1.0 / arl + 1.0 / other)


@functools.lru_cache(maxsize=256)  # a root-find (tens of us), asked for on every supervisor pass
def cusum_threshold_for_arl(arl0: float, k: float, *, two_sided: bool = False) -> float:
    """Threshold ``h`` (sd units) giving in-control ARL ``arl0`` by Siegmund's approximation.

    >>> round(cusum_threshold_for_arl(1000.0, 0.5), 2)
    5.06
    """
    _check_k(k)
    if not math.isfinite(arl0):
        raise ValueError(f"arl0 must be finite, got {arl0}")
    floor = cusum_arl(0.0, k, two_sided=two_sided)
    if arl0 <= floor:
        raise ValueError(f"arl0={arl0} is below the ARL at h=0 ({floor:.3g}) for k={k}")
    hi = 1.0
    while cusum_arl(hi, k, two_sided=two_sided) < arl0:
        hi *= 2.0
    root = optimize.brentq(
        lambda h: cusum_arl(h, k, two_sided=two_sided) - arl0, 0.0, hi, xtol=1e-10, rtol=1e-12
    )
    return float(root)


# ---------------------------------------------------------------------------------------
# Detectors
# ---------------------------------------------------------------------------------------


class Direction(enum.Enum):
    """Which mean change a detector watches for."""

    DOWN = "down"
    UP = "up"
    BOTH = "both"


@njit(cache=True, nogil=True)
def _scan_fixed(
    z: FloatArray, s_lo: float, s_hi: float, k: float, h: float, lo: bool, hi: bool
) -> tuple[float, float, int]:
    """Reflected walks on standardised z until the first alarm; (s_lo, s_hi, index or -1)."""
    for i in range(z.shape[0]):
        if hi:
            s_hi = max(0.0, s_hi + (z[i] - k))
        if lo:
            s_lo = max(0.0, s_lo + (-z[i] - k))
        if s_lo > h or s_hi > h:
            return s_lo, s_hi, i
    return s_lo, s_hi, -1


@njit(cache=True, nogil=True)
def _scan_running(
    z: FloatArray,
    s_lo: float,
    s_hi: float,
    total: float,
    n: float,
    delta: float,
    lam: float,
    lo: bool,
    hi: bool,
) -> tuple[float, float, float, float, int]:
    """Page-Hinkley walks on z centred on their running mean; (s_lo, s_hi, total, n, index
    or -1)."""
    for i in range(z.shape[0]):
        total += z[i]
        n += 1.0
        d = z[i] - total / n
        if hi:
            s_hi = max(0.0, s_hi + (d - delta))
        if lo:
            s_lo = max(0.0, s_lo + (-d - delta))
        if s_lo > lam or s_hi > lam:
            return s_lo, s_hi, total, n, i
    return s_lo, s_hi, total, n, -1


def _as_finite_1d(values: npt.ArrayLike, name: str) -> FloatArray:
    """Validate and convert to a contiguous float64 vector."""
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.float64))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite")
    return arr


def _check_scalar(x: float) -> float:
    """Validate one observation."""
    if isinstance(x, bool) or not isinstance(x, int | float | np.floating | np.integer):
        raise TypeError(f"observation must be a real number, got {type(x).__name__}")
    xf = float(x)
    if not math.isfinite(xf):
        raise ValueError(f"observation must be finite, got {xf}")
    return xf


class RunningStats:
    """Count, mean and sum of squared deviations (Welford; Chan et al. merge for batches).

    >>> rs = RunningStats(); rs.add_many([1.0, 2.0, 3.0]); (rs.n, rs.mean, rs.variance)
    (3, 2.0, 1.0)
    """

    __slots__ = ("m2", "mean", "n")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, x: float) -> None:
        """Add one observation."""
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    def add_many(self, xs: npt.ArrayLike) -> None:
        """Add a batch (pairwise merge keeps it stable for long streams)."""
        arr = np.asarray(xs, dtype=np.float64)
        nb = int(arr.size)
        if nb == 0:
            return
        mb = float(arr.mean())
        m2b = float(((arr - mb) ** 2).sum())
        n = self.n + nb
        d = mb - self.mean
        self.mean += d * nb / n
        self.m2 += m2b + d * d * self.n * nb / n
        self.n = n

    @property
    def variance(self) -> float:
        """Sample variance (ddof=1); 0 with fewer than two observations."""
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0

    def moments(self) -> Moments:
        """Immutable snapshot."""
        return Moments(self.n, self.mean, self.variance)

    def state(self) -> list[float]:
        """``[n, mean, m2]``, for :meth:`load_state` (JSON keeps floats exactly)."""
        return [self.n, self.mean, self.m2]

    def load_state(self, state: Sequence[float]) -> None:
        """Continue from :meth:`state`."""
        n, self.mean, self.m2 = state
        self.n = int(n)


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of a stream for the normal-approximation tests."""

    n: int
    mean: float
    variance: float

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        if not (math.isfinite(self.mean) and math.isfinite(self.variance)):
            raise ValueError("mean and variance must be finite")
        if self.variance < 0:
            raise ValueError(f"variance must be >= 0, got {self.variance}")


@dataclass(frozen=True)
class CusumSettings:
    """CUSUM parameters in sd units; ``mean``/``sd`` None means estimate from the burn-in.

    >>> CusumSettings(k=0.5, h=cusum_threshold_for_arl(1e4, 0.5), mean=0.1, sd=0.3).burn_in
    0
    """

    k: float = 0.5
    h: float = 5.0
    direction: Direction = Direction.DOWN
    mean: float | None = None
    sd: float | None = None
    burn_in: int = 0

    def __post_init__(self) -> None:
        _check_k(self.k)
        if not math.isfinite(self.h) or self.h <= 0:
            raise ValueError(f"h must be finite and > 0, got {self.h}")
        if not isinstance(self.direction, Direction):
            raise TypeError("direction must be a Direction")
        if self.mean is not None and not math.isfinite(self.mean):
            raise ValueError(f"mean must be finite, got {self.mean}")
        if self.sd is not None and not (math.isfinite(self.sd) and self.sd > 0):
            raise ValueError(f"sd must be finite and > 0, got {self.sd}")
        if isinstance(self.burn_in, bool) or not isinstance(self.burn_in, int):
            raise TypeError("burn_in must be an int")
        if self.burn_in < 0:
            raise ValueError(f"burn_in must be >= 0, got {self.burn_in}")
        if (self.mean is None or self.sd is None) and self.burn_in < 2:
            raise ValueError("burn_in must be >= 2 when mean or sd is to be estimated")


@dataclass(frozen=True)
class PageHinkleySettings:
    """Page-Hinkley parameters in sd units: allowance ``delta``, threshold ``lam``.

    ``sd`` None means estimate it from the first ``burn_in`` samples, which also start the
    running mean (the walk begins after them).

    >>> PageHinkleySettings(delta=0.5, lam=8.0, burn_in=100).sd is None
    True
    """

    delta: float = 0.5
    lam: float = 50.0
    direction: Direction = Direction.DOWN
    burn_in: int = 30
    sd: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.delta) or self.delta < 0:
            raise ValueError(f"delta must be finite and >= 0, got {self.delta}")
        if not math.isfinite(self.lam) or self.lam <= 0:
            raise ValueError(f"lam must be finite and > 0, got {self.lam}")
        if not isinstance(self.direction, Direction):
            raise TypeError("direction must be a Direction")
        if self.sd is not None and not (math.isfinite(self.sd) and self.sd > 0):
            raise ValueError(f"sd must be finite and > 0, got {self.sd}")
        if isinstance(self.burn_in, bool) or not isinstance(self.burn_in, int):
            raise TypeError("burn_in must be an int")
        if self.burn_in < 0:
            raise ValueError(f"burn_in must be >= 0, got {self.burn_in}")
        if self.sd is None and self.burn_in < 2:
            raise ValueError("burn_in must be >= 2 when sd is to be estimated")


class Detector(Protocol):
    """What the monitor needs from a change detector."""

    @property
    def n(self) -> int: ...
    @property
    def alarm(self) -> bool: ...
    @property
    def alarm_at(self) -> int | None: ...
    @property
    def statistic(self) -> float: ...
    @property
    def threshold(self) -> float: ...
    def update(self, x: float) -> bool: ...
    def update_many(self, xs: npt.ArrayLike) -> int | None: ...
    def reset(self) -> None: ...
    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: Mapping[str, Any]) -> None: ...


class _Reflected:
    """Shared by the two reflected-walk detectors: the alarm bookkeeping and the reference
    (mean, sd) that standardises their input, given or estimated from a burn-in of
    ``burn_in`` samples (0: none, the reference is given; a missing mean is then 0)."""

    def __init__(
        self,
        direction: Direction,
        threshold: float,
        mean: float | None,
        sd: float | None,
        burn_in: int,
    ) -> None:
        self._lo = direction in (Direction.DOWN, Direction.BOTH)
        self._hi = direction in (Direction.UP, Direction.BOTH)
        self._threshold = threshold
        self._given = (mean, sd)
        self._burn_in = burn_in
        self.reset()

    def reset(self) -> None:
        """Forget everything, including the burn-in estimates."""
        self._n = 0
        self._s_lo = 0.0
        self._s_hi = 0.0
        self._alarm_at: int | None = None
        self._burn = RunningStats()
        self._mean, self._sd = self._given
        self._ready = False
        if self._burn_in == 0:
            self._finish_burn_in()

    def state(self) -> dict[str, Any]:
        """The walk plus the burn-in and the reference it set, for :meth:`load_state`: the
        detector continues exactly where it was."""
        return {
            "n": self._n,
            "lo": self._s_lo,
            "hi": self._s_hi,
            "alarm_at": self._alarm_at,
            "burn": self._burn.state(),
            "mean": self._mean,
            "sd": self._sd,
            "ready": self._ready,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state`."""
        self._n = int(state["n"])
        self._s_lo = float(state["lo"])
        self._s_hi = float(state["hi"])
        self._alarm_at = None if state["alarm_at"] is None else int(state["alarm_at"])
        self._burn.load_state(state["burn"])
        self._mean = None if state["mean"] is None else float(state["mean"])
        self._sd = None if state["sd"] is None else float(state["sd"])
        self._ready = bool(state["ready"])

    @property
    def reference(self) -> tuple[float, float] | None:
        """(mean, sd) in use, None while the burn-in is still running."""
        if not self._ready:
            return None
        assert self._mean is not None and self._sd is not None
        return self._mean, self._sd

    def _finish_burn_in(self) -> None:
        if self._mean is None:
            self._mean = self._burn.mean
        if self._sd is None:
            self._sd = max(math.sqrt(self._burn.variance), _SD_FLOOR)
        self._ready = True

    def _burn_one(self, x: float) -> bool:
        """Feed ``x`` to the burn-in if it is still running; True if it took it."""
        if self._ready:
            return False
        self._burn.add(x)
        if self._burn.n >= self._burn_in:
            self._finish_burn_in()
        return True

    def _burn_many(self, arr: FloatArray) -> int | None:
        """Feed the burn-in from the front of ``arr``: how many it took, None if it took
        all and still runs. One by one, as :meth:`_burn_one`, so both round alike."""
        if self._ready:
            return 0
        take = min(arr.size, self._burn_in - self._burn.n)
        for v in arr[:take]:
            self._burn_one(float(v))
        return take if self._ready else None

    @property
    def n(self) -> int:
        """Samples consumed (burn-in and post-alarm samples included)."""
        return self._n

    @property
    def alarm(self) -> bool:
        """True once the statistic crossed the threshold (latched until reset)."""
        return self._alarm_at is not None

    @property
    def alarm_at(self) -> int | None:
        """1-based sample count at which the alarm was raised."""
        return self._alarm_at

    @property
    def statistic(self) -> float:
        """Largest watched side of the walk."""
        return max(self._s_lo if self._lo else 0.0, self._s_hi if self._hi else 0.0)

    @property
    def threshold(self) -> float:
        """Alarm threshold in the statistic's units."""
        return self._threshold


class Cusum(_Reflected):
    """Page's CUSUM on standardised observations; ``update`` returns the (latched) alarm.

    >>> det = Cusum(CusumSettings(k=0.5, h=4.0, mean=0.0, sd=1.0))
    >>> det.update_many([0.1, -0.2, -3.0, -3.0])
    3
    """

    def __init__(self, settings: CusumSettings) -> None:
        if not isinstance(settings, CusumSettings):
            raise TypeError("settings must be CusumSettings")
        self.settings = settings
        s = settings
        burn_in = 0 if s.mean is not None and s.sd is not None else s.burn_in
        super().__init__(s.direction, s.h, s.mean, s.sd, burn_in)

    def update(self, x: float) -> bool:
        """Consume one observation; True if the detector is (now or already) in alarm."""
        xf = _check_scalar(x)
        self._n += 1
        if self._alarm_at is not None:
            return True
        if self._burn_one(xf):
            return False
        assert self._mean is not None and self._sd is not None
        z = (xf - self._mean) / self._sd
        k = self.settings.k
        if self._hi:
            self._s_hi = max(0.0, self._s_hi + (z - k))
        if self._lo:
            self._s_lo = max(0.0, self._s_lo + (-z - k))
        if self._s_lo > self._threshold or self._s_hi > self._threshold:
            self._alarm_at = self._n
            return True
        return False

    def update_many(self, xs: npt.ArrayLike) -> int | None:
        """Consume ``xs``; index of the first element after which the alarm is on, or None.

        Identical (bit for bit) to calling :meth:`update` on each element in turn.
        """
        arr = _as_finite_1d(xs, "xs")
        start = self._n
        self._n += arr.size
        if self._alarm_at is not None:
            return 0 if arr.size else None
        i = self._burn_many(arr)
        if i is None:
            return None
        assert self._mean is not None and self._sd is not None
        z = (arr[i:] - self._mean) / self._sd
        self._s_lo, self._s_hi, j = _scan_fixed(
            z, self._s_lo, self._s_hi, self.settings.k, self._threshold, self._lo, self._hi
        )
        if j < 0:
            return None
        self._alarm_at = start + i + j + 1
        return i + j


class PageHinkley(_Reflected):
    """Page-Hinkley test around the running mean, on observations standardised like CUSUM's.

    >>> det = PageHinkley(PageHinkleySettings(delta=0.0, lam=1.0, burn_in=4))
    >>> det.update_many([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    5
    """

    def __init__(self, settings: PageHinkleySettings) -> None:
        if not isinstance(settings, PageHinkleySettings):
            raise TypeError("settings must be PageHinkleySettings")
        self.settings = settings
        # No given mean: the running mean does the centring (the burn-in's mean, which
        # starts it, only keeps z small).
        super().__init__(settings.direction, settings.lam, None, settings.sd, settings.burn_in)

    def reset(self) -> None:
        """Forget everything, including the running mean."""
        self._total = 0.0  # sum and count of z (the burn-in's z sum to 0 about their mean)
        self._count = 0.0
        super().reset()

    def _finish_burn_in(self) -> None:
        super()._finish_burn_in()
        self._total = 0.0
        self._count = float(self._burn.n)

    def state(self) -> dict[str, Any]:
        """The walk, the reference, and the running mean's sums (of z)."""
        return {**super().state(), "total": self._total, "count": self._count}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state`."""
        if "ready" not in state:
            # Saved by an earlier version, which walked on raw values: its sums and walk
            # have no reference to be continued in sd units.
            raise ValueError("Page-Hinkley state in raw units, from an earlier version")
        super().load_state(state)
        self._total = float(state["total"])
        self._count = float(state["count"])

    @property
    def running_mean(self) -> float:
        """Mean of everything consumed before the alarm (0 before the first sample)."""
        if not self._ready:
            return self._burn.mean
        assert self._mean is not None and self._sd is not None
        return self._mean + self._sd * (self._total / self._count if self._count else 0.0)

    def update(self, x: float) -> bool:
        """Consume one observation; True if the detector is (now or already) in alarm."""
        xf = _check_scalar(x)
        self._n += 1
        if self._alarm_at is not None:
            return True
        if self._burn_one(xf):
            return False
        assert self._mean is not None and self._sd is not None
        z = (xf - self._mean) / self._sd
        self._total += z
        self._count += 1.0
        d = z - self._total / self._count
        delta = self.settings.delta
        if self._hi:
            self._s_hi = max(0.0, self._s_hi + (d - delta))
        if self._lo:
            self._s_lo = max(0.0, self._s_lo + (-d - delta))
        if self._s_lo > self._threshold or self._s_hi > self._threshold:
            self._alarm_at = self._n
            return True
        return False

    def update_many(self, xs: npt.ArrayLike) -> int | None:
        """Consume ``xs``; index of the first element after which the alarm is on, or None.

        Identical (bit for bit) to calling :meth:`update` on each element in turn.
        """
        arr = _as_finite_1d(xs, "xs")
        start = self._n
        self._n += arr.size
        if self._alarm_at is not None:
            return 0 if arr.size else None
        i = self._burn_many(arr)
        if i is None:
            return None
        assert self._mean is not None and self._sd is not None
        z = (arr[i:] - self._mean) / self._sd
        self._s_lo, self._s_hi, self._total, self._count, j = _scan_running(
            z,
            self._s_lo,
            self._s_hi,
            self._total,
            self._count,
            self.settings.delta,
            self._threshold,
            self._lo,
            self._hi,
        )
        if j < 0:
            return None
        self._alarm_at = start + i + j + 1
        return i + j


def make_detector(settings: CusumSettings | PageHinkleySettings) -> Cusum | PageHinkley:
    """Build the detector described by ``settings``."""
    if isinstance(settings, CusumSettings):
        return Cusum(settings)
    if isinstance(settings, PageHinkleySettings):
        return PageHinkley(settings)
    raise TypeError(f"unknown detector settings {type(settings).__name__}")


# ---------------------------------------------------------------------------------------
# Holdout comparison
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HoldoutTest:
    """Result of the one-sided z test of the promoted variant against the holdout."""

    diff: float
    se: float
    z: float
    p_value: float
    alpha: float
    margin: float
    regressed: bool


def holdout_z_test(
    promoted: Moments, holdout: Moments, *, margin: float = 0.0, alpha: float = 0.05
) -> HoldoutTest:
    """Test H1: mean_promoted - mean_holdout < -margin (normal approximation, Welch se).

    >>> t = holdout_z_test(Moments(10_000, 0.08, 0.0736), Moments(10_000, 0.10, 0.09))
    >>> t.regressed, round(t.z, 2)
    (True, -4.94)
    """
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be finite and >= 0, got {margin}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if promoted.n < 2 or holdout.n < 2:
        raise ValueError("each stream needs at least two observations")
    diff = promoted.mean - holdout.mean
    se = math.sqrt(promoted.variance / promoted.n + holdout.variance / holdout.n)
    centred = diff + margin
    # se == 0 means both streams are constant: the difference is then known exactly.
    z = centred / se if se > 0 else math.copysign(math.inf, centred) if centred else 0.0
    p = float(sps.norm.cdf(z))
    return HoldoutTest(diff, se, z, p, alpha, margin, p < alpha)


# ---------------------------------------------------------------------------------------
# Promotion monitor
# ---------------------------------------------------------------------------------------


class Reaction(enum.Enum):
    """What the caller should do with a regression."""

    ROLLBACK = "rollback"
    REOPEN = "reopen"
    NOTIFY_ONLY = "notify_only"


def _default_detector() -> CusumSettings:
    """Downward CUSUM on batch means: k=0.5 sd, ARL0 = 10,000 batches, 50-batch burn-in."""
    return CusumSettings(
        k=0.5, h=cusum_threshold_for_arl(10_000.0, 0.5), direction=Direction.DOWN, burn_in=50
    )


@dataclass(frozen=True)
class MonitorSettings:
    """How a promoted variant is watched.

    The detector sees means of ``batch_size`` rewards (CLT makes skewed rewards closer to
    normal, which the ARL approximation assumes); its ``k``/``h``/``burn_in`` are in batches.
    ``holdout_margin`` is the promotion's indifference margin in reward units; None: the
    promotion rule's default, 1% of the champion's mean.

    >>> MonitorSettings(batch_size=200, reaction=Reaction.ROLLBACK).holdout_alpha
    0.01
    """

    detector: CusumSettings | PageHinkleySettings = field(default_factory=_default_detector)
    batch_size: int = 100
    reaction: Reaction = Reaction.REOPEN
    holdout_margin: float | None = None
    holdout_alpha: float = 0.01
    holdout_min_samples: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.detector, CusumSettings | PageHinkleySettings):
            raise TypeError("detector must be CusumSettings or PageHinkleySettings")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise TypeError("batch_size must be an int")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not isinstance(self.reaction, Reaction):
            raise TypeError("reaction must be a Reaction")
        m = self.holdout_margin
        if m is not None and not (math.isfinite(m) and m >= 0):
            raise ValueError(f"holdout_margin must be finite and >= 0 or None, got {m}")
        if not 0 < self.holdout_alpha < 1:
            raise ValueError(f"holdout_alpha must be in (0, 1), got {self.holdout_alpha}")
        if isinstance(self.holdout_min_samples, bool) or not isinstance(
            self.holdout_min_samples, int
        ):
            raise TypeError("holdout_min_samples must be an int")
        if self.holdout_min_samples < 2:
            raise ValueError(f"holdout_min_samples must be >= 2, got {self.holdout_min_samples}")


_REACTION_ACTION: Mapping[Reaction, Action | None] = {
    Reaction.ROLLBACK: Action.ROLLBACK,
    Reaction.REOPEN: Action.REOPEN,
    Reaction.NOTIFY_ONLY: None,
}


@dataclass(frozen=True)
class Regression:
    """A detected post-promotion regression; the caller applies :attr:`action`."""

    experiment: str
    variant: int
    kind: str  # "drift" (detector on the promoted stream) or "holdout" (z test)
    at: float
    reason: str
    reaction: Reaction
    samples: int
    statistic: float
    threshold: float
    promoted_mean: float
    holdout_mean: float | None = None
    p_value: float | None = None
    holdout_drifted: bool = False

    @property
    def action(self) -> Action | None:
        """Lifecycle action for the reaction (None for NOTIFY_ONLY).

        ROLLBACK is refused by the lifecycle when there is no earlier champion; callers
        should then fall back to REOPEN.
        """
        return _REACTION_ACTION[self.reaction]

    def details(self) -> dict[str, Any]:
        """JSON-compatible details for events and webhooks."""
        return {
            "kind": self.kind,
            "reaction": self.reaction.value,
            "samples": self.samples,
            "statistic": self.statistic,
            "threshold": self.threshold,
            "promoted_mean": self.promoted_mean,
            "holdout_mean": self.holdout_mean,
            "p_value": self.p_value,
            "holdout_drifted": self.holdout_drifted,
        }


class _Stream:
    """One watched reward stream: raw moments, a batch accumulator and a detector."""

    def __init__(self, settings: MonitorSettings) -> None:
        self.stats = RunningStats()
        self.detector = make_detector(settings.detector)
        self.batch = settings.batch_size
        self.pending: FloatArray = np.empty(0, dtype=np.float64)

    def state(self) -> dict[str, Any]:
        """Moments, the detector and the unfinished batch."""
        return {
            "stats": self.stats.state(),
            "detector": self.detector.state(),
            "pending": self.pending.tolist(),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state`."""
        self.stats.load_state(state["stats"])
        self.detector.load_state(state["detector"])
        self.pending = np.asarray(state["pending"], dtype=np.float64)

    def feed(self, values: FloatArray) -> bool:
        """Add rewards; True if the detector alarmed."""
        self.stats.add_many(values)
        buf = np.concatenate((self.pending, values)) if self.pending.size else values
        full = buf.size - buf.size % self.batch
        self.pending = buf[full:].copy()
        if full == 0:
            return self.detector.alarm
        means = buf[:full].reshape(-1, self.batch).mean(axis=1)
        self.detector.update_many(means)
        return self.detector.alarm


class PromotionMonitor:
    """Watches a promoted variant (and the previous champion's holdout) for regressions.

    >>> events = []
    >>> mon = PromotionMonitor("checkout", 2, holdout_variant=0, emit=events.append,
    ...     settings=MonitorSettings(batch_size=1, detector=CusumSettings(
    ...         k=0.1, h=4.0, mean=0.1, sd=0.3)))
    >>> reg = mon.observe_many([0.0] * 40, now=1.7e9)
    >>> reg.kind, reg.action, [e.type.value for e in events]
    ('drift', <Action.REOPEN: 'REOPEN'>, ['DRIFT_DETECTED', 'RETRAIN_REQUESTED'])
    """

    def __init__(
        self,
        experiment: str,
        variant: int,
        *,
        holdout_variant: int | None = None,
        settings: MonitorSettings | None = None,
        emit: Callable[[Event], None] | None = None,
    ) -> None:
        if not isinstance(experiment, str) or not experiment:
            raise ValueError("experiment must be a non-empty str")
        if isinstance(variant, bool) or not isinstance(variant, int) or variant < 0:
            raise ValueError(f"variant must be an int >= 0, got {variant!r}")
        if holdout_variant is not None and (
            isinstance(holdout_variant, bool)
            or not isinstance(holdout_variant, int)
            or holdout_variant < 0
            or holdout_variant == variant
        ):
            raise ValueError(f"holdout_variant must be another int >= 0, got {holdout_variant!r}")
        self.experiment = experiment
        self.variant = variant
        self.holdout_variant = holdout_variant
        self.settings = settings if settings is not None else MonitorSettings()
        self._emit = emit
        self._promoted = _Stream(self.settings)
        self._holdout = _Stream(self.settings)
        self._look = 0
        self._last_test: HoldoutTest | None = None
        self._regression: Regression | None = None

    def state(self) -> dict[str, Any]:
        """Everything the monitor has learnt, JSON-compatible, for :meth:`load_state`.

        A monitor restored from it and fed the same rewards afterwards behaves exactly as
        this one would (same alarms, same statistics); a triggered one stays triggered,
        with its regression, and reports nothing again.
        """
        last, reg = self._last_test, self._regression
        return {
            "promoted": self._promoted.state(),
            "holdout": self._holdout.state(),
            "look": self._look,
            "last_test": None if last is None else dataclasses.asdict(last),
            "regression": None
            if reg is None
            else {**dataclasses.asdict(reg), "reaction": reg.reaction.value},
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state` of a monitor with the same settings."""
        self._promoted.load_state(state["promoted"])
        self._holdout.load_state(state["holdout"])
        self._look = int(state["look"])
        last, reg = state["last_test"], state["regression"]
        self._last_test = None if last is None else HoldoutTest(**last)
        self._regression = (
            None if reg is None else Regression(**{**reg, "reaction": Reaction(reg["reaction"])})
        )

    @property
    def triggered(self) -> bool:
        """True once a regression was reported (the monitor then ignores further data)."""
        return self._regression is not None

    @property
    def regression(self) -> Regression | None:
        """The regression reported, if any."""
        return self._regression

    @property
    def detector(self) -> Detector:
        """Detector on the promoted stream."""
        return self._promoted.detector

    @property
    def holdout_detector(self) -> Detector:
        """Detector on the holdout stream (informational: a shared drift hints at traffic)."""
        return self._holdout.detector

    @property
    def promoted_stats(self) -> Moments:
        """Raw reward moments of the promoted variant since promotion."""
        return self._promoted.stats.moments()

    @property
    def holdout_stats(self) -> Moments:
        """Raw reward moments of the holdout since promotion."""
        return self._holdout.stats.moments()

    @property
    def last_holdout_test(self) -> HoldoutTest | None:
        """Most recent scheduled holdout comparison."""
        return self._last_test

    def observe(self, value: float, *, now: float, holdout: bool = False) -> Regression | None:
        """Record one reward (``holdout=True`` for the holdout variant's stream)."""
        return self.observe_many([_check_scalar(value)], now=now, holdout=holdout)

    def observe_many(
        self, values: npt.ArrayLike, *, now: float, holdout: bool = False
    ) -> Regression | None:
        """Record rewards; returns a Regression the first time one is detected, else None."""
        arr = _as_finite_1d(values, "values")
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now}")
        if holdout and self.holdout_variant is None:
            raise ValueError("this monitor has no holdout variant")
        if self._regression is not None or arr.size == 0:
            return None
        if holdout:
            self._holdout.feed(arr)
        elif self._promoted.feed(arr):
            det = self._promoted.detector
            return self._report(
                kind="drift",
                now=now,
                reason=(
                    f"{type(det).__name__} alarm on variant {self.variant}: statistic "
                    f"{det.statistic:.3g} > {det.threshold:.3g}"
                ),
                statistic=det.statistic,
                threshold=det.threshold,
            )
        return self._check_holdout(now)

    def _check_holdout(self, now: float) -> Regression | None:
        """Run the scheduled holdout z test if a new look was reached."""
        if self.holdout_variant is None:
            return None
        s = self.settings
        info = min(self._promoted.stats.n, self._holdout.stats.n)
        if info < s.holdout_min_samples * 2**self._look:
            return None
        alpha = s.holdout_alpha * 2.0 ** -(self._look + 1)
        while info >= s.holdout_min_samples * 2**self._look:
            self._look += 1
        margin = s.holdout_margin
        if margin is None:
            # The rule's default margin. Estimating it adds 1% of the champion's noise to the
            # numerator: z's sd is then at most 1.01, which the test ignores.
            margin = 0.01 * abs(self._promoted.stats.mean)
        test = holdout_z_test(self.promoted_stats, self.holdout_stats, margin=margin, alpha=alpha)
        self._last_test = test
        if not test.regressed:
            return None
        return self._report(
            kind="holdout",
            now=now,
            reason=(
                f"variant {self.variant} mean {self._promoted.stats.mean:.4g} below holdout "
                f"{self.holdout_variant} mean {self._holdout.stats.mean:.4g} by more than "
                f"{margin:.4g} (z={test.z:.3g}, p={test.p_value:.3g} < {alpha:.3g})"
            ),
            statistic=test.z,
            threshold=float(sps.norm.ppf(alpha)),
            p_value=test.p_value,
        )

    def _report(
        self,
        *,
        kind: str,
        now: float,
        reason: str,
        statistic: float,
        threshold: float,
        p_value: float | None = None,
    ) -> Regression:
        """Record the regression and emit DRIFT_DETECTED then RETRAIN_REQUESTED."""
        has_holdout = self.holdout_variant is not None and self._holdout.stats.n > 0
        reg = Regression(
            experiment=self.experiment,
            variant=self.variant,
            kind=kind,
            at=float(now),
            reason=reason,
            reaction=self.settings.reaction,
            samples=self._promoted.stats.n,
            statistic=float(statistic),
            threshold=float(threshold),
            promoted_mean=self._promoted.stats.mean,
            holdout_mean=self._holdout.stats.mean if has_holdout else None,
            p_value=p_value,
            holdout_drifted=self._holdout.detector.alarm,
        )
        self._regression = reg
        if self._emit is not None:
            details = MappingProxyType(reg.details())
            for etype in (EventType.DRIFT_DETECTED, EventType.RETRAIN_REQUESTED):
                event = Event(etype, self.experiment, self.variant, reg.at, reason, details)
                try:
                    self._emit(event)
                except Exception:
                    # Emission is best effort: the Regression is still returned to the caller.
                    _log.exception("emitting %s failed", etype.value)
        return reg


# ---------------------------------------------------------------------------------------
# Webhook
# ---------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Recursively convert mappings, tuples, enums and numpy scalars to JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _iso8601(at: float) -> str:
    """UTC timestamp with millisecond precision and a Z suffix."""
    stamp = datetime.fromtimestamp(at, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def webhook_payload(event: Event) -> dict[str, Any]:
    """The documented webhook JSON body for ``event``.

    ``{"event": type, "experiment": str, "variant": int|null, "at": ISO 8601 UTC,
    "reason": str, "details": {...}}``

    >>> webhook_payload(Event(EventType.RETRAIN_REQUESTED, "checkout", 1, 0.0, "drift"))["at"]
    '1970-01-01T00:00:00.000Z'
    """
    return {
        "event": event.type.value,
        "experiment": event.experiment,
        "variant": event.variant,
        "at": _iso8601(event.at),
        "reason": event.reason,
        "details": _jsonable(event.details),
    }


# 408 (timeout) and 429 (rate limited) are worth retrying; other 4xx will fail again.
_RETRYABLE_4XX = frozenset({408, 429})


class WebhookNotifier:
    """POSTs events as JSON from a background thread, with retries and exponential backoff.

    Calling the notifier only enqueues (never blocks, never raises); a full queue drops the
    event with a log line. Delivery failures are logged and counted in :attr:`failed`. With
    ``secret`` the body's HMAC-SHA256 goes in ``X-Allocator-Signature: sha256=<hex>``.

    >>> hook = WebhookNotifier("http://127.0.0.1:9/retrain", timeout=1.0, retries=0)
    >>> hook.close()
    """

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        retries: int = 3,
        *,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        queue_size: int = 1000,
        event_types: Collection[EventType] | None = frozenset({EventType.RETRAIN_REQUESTED}),
        secret: bytes | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        # Only http(s): urllib would also open file:// and ftp:// URLs.
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"url must be an http(s) URL, got {url!r}")
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"timeout must be finite and > 0, got {timeout}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not (math.isfinite(backoff) and backoff >= 0):
            raise ValueError(f"backoff must be finite and >= 0, got {backoff}")
        if not (math.isfinite(max_backoff) and max_backoff >= backoff):
            raise ValueError("max_backoff must be finite and >= backoff")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an int >= 1, got {queue_size!r}")
        if secret is not None and not isinstance(secret, bytes):
            raise TypeError("secret must be bytes")
        self.url = url
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.event_types = None if event_types is None else frozenset(event_types)
        self._secret = secret
        self._queue_size = queue_size
        self._queue: deque[Event] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._busy = False
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="webhook-notifier", daemon=True)
        self._thread.start()

    def __call__(self, event: Event) -> None:
        """Queue ``event`` for delivery if its type is selected; returns immediately."""
        if self.event_types is not None and event.type not in self.event_types:
            return
        with self._cond:
            if self._stop.is_set() or len(self._queue) >= self._queue_size:
                self.dropped += 1
                _log.error(
                    "webhook %s: dropped %s for %s (queue full or closed)",
                    self.url,
                    event.type.value,
                    event.experiment,
                )
                return
            self._queue.append(event)
            self._cond.notify_all()

    notify = __call__

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued event was delivered or given up; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop accepting events, cut backoff waits short and join the worker."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._stop.is_set())
                if not self._queue:
                    return
                event = self._queue.popleft()
                self._busy = True
            try:
                ok = self._deliver(event)
            except Exception:  # a bug here must not kill the worker thread
                _log.exception("webhook %s: unexpected error", self.url)
                ok = False
            with self._cond:
                if ok:
                    self.delivered += 1
                else:
                    self.failed += 1
                self._busy = False
                self._cond.notify_all()

    def _deliver(self, event: Event) -> bool:
        """POST with retries; True on a 2xx answer."""
        body = json.dumps(webhook_payload(event), allow_nan=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "User-Agent": "allocator-webhook/1"}
        if self._secret is not None:
            digest = hmac.new(self._secret, body, hashlib.sha256).hexdigest()
            headers["X-Allocator-Signature"] = f"sha256={digest}"
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
                if self._stop.wait(delay):
                    break
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    resp.read()
                return True
            except urllib.error.HTTPError as exc:
                _log.warning("webhook %s: HTTP %s (attempt %d)", self.url, exc.code, attempt + 1)
                if 400 <= exc.code < 500 and exc.code not in _RETRYABLE_4XX:
                    break
            except (urllib.error.URLError, OSError) as exc:
                _log.warning("webhook %s: %s (attempt %d)", self.url, exc, attempt + 1)
        _log.error(
            "webhook %s: giving up on %s for %s", self.url, event.type.value, event.experiment
        )
        return False


# ---------------------------------------------------------------------------------------
# Prediction / score drift
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KsDrift:
    """Two-sample Kolmogorov-Smirnov comparison of score distributions."""

    statistic: float
    p_value: float
    n_reference: int
    n_current: int
    alpha: float
    drifted: bool


def ks_drift(
    reference_scores: npt.ArrayLike, current_scores: npt.ArrayLike, *, alpha: float = 0.01
) -> KsDrift:
    """KS test of current against reference scores; ``drifted`` when p < alpha.

    >>> ks_drift([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]).statistic
    0.0
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    ref = _as_finite_1d(reference_scores, "reference_scores")
    cur = _as_finite_1d(current_scores, "current_scores")
    if ref.size == 0 or cur.size == 0:
        raise ValueError("reference_scores and current_scores must be non-empty")
    res = sps.ks_2samp(ref, cur)
    stat, p = float(res.statistic), float(res.pvalue)
    return KsDrift(stat, p, int(ref.size), int(cur.size), alpha, p < alpha)


class PsiLevel(enum.Enum):
    """Conventional reading of a PSI value."""

    STABLE = "stable"  # < 0.1
    MODERATE = "moderate"  # 0.1 <= psi < 0.25
    SIGNIFICANT = "significant"  # >= 0.25


PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.25


@dataclass(frozen=True)
class Psi:
    """Population Stability Index with its per-bin breakdown.

    ``edges`` are the inner bin edges (bins are ``[edge_i, edge_{i+1})`` with open outer
    ends), so ``len(fractions) == len(edges) + 1``.
    """

    value: float
    level: PsiLevel
    edges: tuple[float, ...]
    reference_fractions: tuple[float, ...]
    current_fractions: tuple[float, ...]
    contributions: tuple[float, ...]


def psi(
    reference: npt.ArrayLike, current: npt.ArrayLike, bins: int = 10, *, eps: float = 1e-4
) -> Psi:
    """PSI = sum (c_i - r_i) ln(c_i / r_i) over quantile bins of ``reference``.

    Empty-bin fractions are raised to ``eps`` so the log stays finite; tied reference
    quantiles merge bins (fewer than ``bins`` then).

    >>> psi([1, 2, 3, 4], [1, 2, 3, 4], bins=2).value
    0.0
    """
    if isinstance(bins, bool) or not isinstance(bins, int):
        raise TypeError("bins must be an int")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if not (math.isfinite(eps) and 0 < eps < 1):
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    ref = _as_finite_1d(reference, "reference")
    cur = _as_finite_1d(current, "current")
    if ref.size == 0 or cur.size == 0:
        raise ValueError("reference and current must be non-empty")
    inner = np.unique(np.quantile(ref, np.arange(1, bins) / bins))
    n_bins = inner.size + 1
    r = np.bincount(np.searchsorted(inner, ref, side="right"), minlength=n_bins) / ref.size
    c = np.bincount(np.searchsorted(inner, cur, side="right"), minlength=n_bins) / cur.size
    r = np.maximum(r, eps)
    c = np.maximum(c, eps)
    contrib = (c - r) * np.log(c / r)
    value = float(contrib.sum())
    if value >= PSI_SIGNIFICANT:
        level = PsiLevel.SIGNIFICANT
    elif value >= PSI_MODERATE:
        level = PsiLevel.MODERATE
    else:
        level = PsiLevel.STABLE
    return Psi(
        value=value,
        level=level,
        edges=tuple(float(e) for e in inner),
        reference_fractions=tuple(float(v) for v in r),
        current_fractions=tuple(float(v) for v in c),
        contributions=tuple(float(v) for v in contrib),
    )
