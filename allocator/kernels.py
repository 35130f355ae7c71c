"""Numba kernels: pure functions over contiguous arrays, indexed by arm number.

Everything here is ``@njit(cache=True, nogil=True)``: no objects, no dicts, no I/O. State
is passed in and mutated in place (the generator state, the sufficient statistics) or
written to an output array, so callers own all memory and the GIL is released while a
kernel runs.

Layouts shared by every kernel:

* ``rng``: ``uint64[4]``, a xoshiro256++ state (Blackman & Vigna). Seed it with
  :func:`seed_state`; :func:`jump` advances it by 2**128 draws for an independent stream.
* ``stats``: ``float64[K, 3]`` sufficient statistics per arm: weighted count ``n``, sum of
  rewards ``s`` and sum of squared rewards ``ss``. With discounting (``gamma < 1``) all three
  decay together, so they stay a consistent weighted sample.

Samplers are exact: Gamma by Marsaglia & Tsang's squeeze (2000), the normal by a 256-layer
ziggurat, Beta as G_a / (G_a + G_b). Numpy's generator costs ~50 ns per Beta draw in a numba
loop; these cost a few ns per Gamma, which is what makes exact Thompson sampling at
hundreds of ns per decision possible.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# ----------------------------------------------------------------------------------------
# xoshiro256++ generator
# ----------------------------------------------------------------------------------------

_SM_INC = np.uint64(0x9E3779B97F4A7C15)
_SM_M1 = np.uint64(0xBF58476D1CE4E5B9)
_SM_M2 = np.uint64(0x94D049BB133111EB)
_JUMP = np.array(
    [0x180EC6D33CFD0ABA, 0xD5A61266F0C9392C, 0xA9582618E03FC9AA, 0x39ABDC4529B1661C],
    dtype=np.uint64,
)
_TWO_M53 = 1.0 / 9007199254740992.0  # 2**-53


@njit(cache=True, nogil=True, inline="always")
def _rotl(x: np.uint64, k: int) -> np.uint64:
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


@njit(cache=True, nogil=True)
def seed_state(seed: int) -> np.ndarray:
    """Expand a 64-bit seed into a xoshiro256++ state with splitmix64 (never all zero)."""
    state = np.empty(4, dtype=np.uint64)
    x = np.uint64(seed)
    for i in range(4):
        x = x + _SM_INC
        z = x
        z = (z ^ (z >> np.uint64(30))) * _SM_M1
        z = (z ^ (z >> np.uint64(27))) * _SM_M2
        state[i] = z ^ (z >> np.uint64(31))
    return state


@njit(cache=True, nogil=True, inline="always")
def next_u64(s: np.ndarray) -> np.uint64:
    """Next 64 random bits (xoshiro256++)."""
    s0 = s[0]
    s1 = s[1]
    s2 = s[2]
    s3 = s[3]
    result = _rotl(s0 + s3, 23) + s0
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = _rotl(s3, 45)
    s[0] = s0
    s[1] = s1
    s[2] = s2
    s[3] = s3
    return result


@njit(cache=True, nogil=True)
def jump(s: np.ndarray) -> None:
    """Advance the state by 2**128 draws: non-overlapping streams from one seed."""
    t0 = np.uint64(0)
    t1 = np.uint64(0)
    t2 = np.uint64(0)
    t3 = np.uint64(0)
    for j in range(4):
        word = _JUMP[j]
        for b in range(64):
            if (word >> np.uint64(b)) & np.uint64(1):
                t0 ^= s[0]
                t1 ^= s[1]
                t2 ^= s[2]
                t3 ^= s[3]
            next_u64(s)
    s[0] = t0
    s[1] = t1
    s[2] = t2
    s[3] = t3


@njit(cache=True, nogil=True, inline="always")
def uniform(s: np.ndarray) -> float:
    """Uniform on [0, 1) with 53 random bits."""
    # Through int64: uint64 -> double has no single x86-64 instruction and costs a branch.
    return float(np.int64(next_u64(s) >> np.uint64(11))) * _TWO_M53


@njit(cache=True, nogil=True, inline="always")
def uniform_open(s: np.ndarray) -> float:
    """Uniform on (0, 1): safe to take the log of."""
    return (float(np.int64(next_u64(s) >> np.uint64(11))) + 0.5) * _TWO_M53


@njit(cache=True, nogil=True)
def fill_uniform(s: np.ndarray, out: np.ndarray) -> None:
    """Fill ``out`` with uniforms on [0, 1)."""
    for i in range(out.shape[0]):
        out[i] = uniform(s)


# ----------------------------------------------------------------------------------------
# Standard normal: 256-layer ziggurat (Marsaglia & Tsang 2000), 52-bit mantissas
# ----------------------------------------------------------------------------------------

_ZIG_R = 3.6541528853610088  # start of the tail for 256 layers
_ZIG_V = 4.92867323399e-3  # area of each layer


def _ziggurat_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer tables: ki (accept bound), wi (scale), fi (density at the layer edge)."""
    m = 2.0**52
    ki = np.zeros(256, dtype=np.uint64)
    wi = np.zeros(256, dtype=np.float64)
    fi = np.zeros(256, dtype=np.float64)
    dn = _ZIG_R
    tn = dn
    q = _ZIG_V / math.exp(-0.5 * dn * dn)
    ki[0] = np.uint64(int((dn / q) * m))
    ki[1] = 0
    wi[0] = q / m
    wi[255] = dn / m
    fi[0] = 1.0
    fi[255] = math.exp(-0.5 * dn * dn)
    for i in range(254, 0, -1):
        dn = math.sqrt(-2.0 * math.log(_ZIG_V / dn + math.exp(-0.5 * dn * dn)))
        ki[i + 1] = np.uint64(int((dn / tn) * m))
        tn = dn
        fi[i] = math.exp(-0.5 * dn * dn)
        wi[i] = dn / m
    return ki, wi, fi


_ZIG_KI, _ZIG_WI, _ZIG_FI = _ziggurat_tables()
_ZIG_INV_R = 1.0 / _ZIG_R
_MASK52 = np.uint64(0x000FFFFFFFFFFFFF)
_U8 = np.uint64(8)
_U1 = np.uint64(1)
_UFF = np.uint64(0xFF)


@njit(cache=True, nogil=True)
def _normal_slow(s: np.ndarray, idx: int, x: float, rabs: np.uint64) -> float:
    """The rare (~1%) branch of the ziggurat: the tail or the wedge of a layer."""
    if idx == 0:
        while True:
            xx = -_ZIG_INV_R * math.log(uniform_open(s))
            yy = -math.log(uniform_open(s))
            if yy + yy > xx * xx:
                if (rabs >> _U8) & _U1:
                    return -(_ZIG_R + xx)
                return _ZIG_R + xx
    if (_ZIG_FI[idx - 1] - _ZIG_FI[idx]) * uniform(s) + _ZIG_FI[idx] < math.exp(-0.5 * x * x):
        return x
    return math.nan  # rejected: the caller draws again


@njit(cache=True, nogil=True, inline="always")
def normal(s: np.ndarray) -> float:
    """One standard normal draw."""
    while True:
        r = next_u64(s)
        idx = int(r & _UFF)
        r >>= _U8
        rabs = (r >> _U1) & _MASK52
        x = float(np.int64(rabs)) * _ZIG_WI[idx]
        if r & _U1:
            x = -x
        if rabs < _ZIG_KI[idx]:
            return x
        y = _normal_slow(s, idx, x, rabs)
        if not math.isnan(y):
            return y


@njit(cache=True, nogil=True)
def fill_normal(s: np.ndarray, out: np.ndarray) -> None:
    """Fill ``out`` with standard normal draws."""
    for i in range(out.shape[0]):
        out[i] = normal(s)


# ----------------------------------------------------------------------------------------
# Gamma and Beta (Marsaglia & Tsang 2000)
# ----------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _gamma_dc(s: np.ndarray, d: float, c: float) -> float:
    """Gamma(shape=d + 1/3) for shape >= 1, with d and c = 1/sqrt(9d) precomputed."""
    while True:
        x = normal(s)
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        u = uniform_open(s)
        x2 = x * x
        if u < 1.0 - 0.0331 * x2 * x2:
            return d * v
        if math.log(u) < 0.5 * x2 + d * (1.0 - v + math.log(v)):
            return d * v


@njit(cache=True, nogil=True)
def log_gamma_variate(s: np.ndarray, shape: float) -> float:
    """log of a Gamma(shape, 1) draw; stays finite for tiny shapes where the draw underflows."""
    if shape >= 1.0:
        d = shape - 1.0 / 3.0
        return math.log(_gamma_dc(s, d, 1.0 / math.sqrt(9.0 * d)))
    # Boost: G(a) = G(a + 1) * U**(1/a); kept in logs because U**(1/a) underflows for small a.
    d = shape + 1.0 - 1.0 / 3.0
    g = _gamma_dc(s, d, 1.0 / math.sqrt(9.0 * d))
    return math.log(g) + math.log(uniform_open(s)) / shape


@njit(cache=True, nogil=True)
def gamma_variate(s: np.ndarray, shape: float) -> float:
    """One Gamma(shape, scale=1) draw, shape > 0."""
    if shape >= 1.0:
        d = shape - 1.0 / 3.0
        return _gamma_dc(s, d, 1.0 / math.sqrt(9.0 * d))
    return math.exp(log_gamma_variate(s, shape))


@njit(cache=True, nogil=True)
def beta_variate(s: np.ndarray, a: float, b: float) -> float:
    """One Beta(a, b) draw as G_a / (G_a + G_b)."""
    if a >= 1.0 and b >= 1.0:
        x = gamma_variate(s, a)
        y = gamma_variate(s, b)
        return x / (x + y)
    la = log_gamma_variate(s, a)
    lb = log_gamma_variate(s, b)
    return 1.0 / (1.0 + math.exp(lb - la))


@njit(cache=True, nogil=True)
def fill_gamma(s: np.ndarray, shape: float, out: np.ndarray) -> None:
    """Fill ``out`` with Gamma(shape, 1) draws."""
    for i in range(out.shape[0]):
        out[i] = gamma_variate(s, shape)


@njit(cache=True, nogil=True)
def fill_beta(s: np.ndarray, a: float, b: float, out: np.ndarray) -> None:
    """Fill ``out`` with Beta(a, b) draws."""
    for i in range(out.shape[0]):
        out[i] = beta_variate(s, a, b)


# ----------------------------------------------------------------------------------------
# Register-state variants for the hottest loop
# ----------------------------------------------------------------------------------------
# Calling next_u64(s) stores the state to memory and loads it back on the next draw; the
# store-to-load forwarding sits on xoshiro's dependency chain and costs ~5 ns per Gamma.
# Batch kernels therefore carry the state in four local words and only spill it to ``s``
# for the rare ziggurat tail/wedge branch, and once at the end.


@njit(cache=True, nogil=True, inline="always")
def _step(
    s0: np.uint64, s1: np.uint64, s2: np.uint64, s3: np.uint64
) -> tuple[np.uint64, np.uint64, np.uint64, np.uint64, np.uint64]:
    result = _rotl(s0 + s3, 23) + s0
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = _rotl(s3, 45)
    return result, s0, s1, s2, s3


@njit(cache=True, nogil=True, inline="always")
def _gamma_reg(
    s: np.ndarray, s0: np.uint64, s1: np.uint64, s2: np.uint64, s3: np.uint64, d: float, c: float
) -> tuple[float, np.uint64, np.uint64, np.uint64, np.uint64]:
    """:func:`_gamma_dc` with the generator state in registers; same draws, same order."""
    while True:
        r, s0, s1, s2, s3 = _step(s0, s1, s2, s3)
        idx = int(r & _UFF)
        r >>= _U8
        rabs = (r >> _U1) & _MASK52
        x = float(np.int64(rabs)) * _ZIG_WI[idx]
        if r & _U1:
            x = -x
        if rabs >= _ZIG_KI[idx]:
            s[0] = s0
            s[1] = s1
            s[2] = s2
            s[3] = s3
            x = _normal_slow(s, idx, x, rabs)
            s0 = s[0]
            s1 = s[1]
            s2 = s[2]
            s3 = s[3]
            if math.isnan(x):
                continue
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        r, s0, s1, s2, s3 = _step(s0, s1, s2, s3)
        u = (float(np.int64(r >> np.uint64(11))) + 0.5) * _TWO_M53
        x2 = x * x
        if u < 1.0 - 0.0331 * x2 * x2:
            return d * v, s0, s1, s2, s3
        if math.log(u) < 0.5 * x2 + d * (1.0 - v + math.log(v)):
            return d * v, s0, s1, s2, s3


# ----------------------------------------------------------------------------------------
# Posterior parameters from sufficient statistics
# ----------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def beta_params(stats: np.ndarray, alpha0: float, beta0: float, out: np.ndarray) -> None:
    """Beta posterior per arm into ``out[K, 2]``: (alpha0 + s, beta0 + n - s).

    Rewards in [0, 1] that are not 0/1 count fractionally (the Bernoulli trick of Agrawal &
    Goyal, whose regret bounds hold for any bounded reward).
    """
    for k in range(stats.shape[0]):
        out[k, 0] = alpha0 + stats[k, 1]
        out[k, 1] = beta0 + max(stats[k, 0] - stats[k, 1], 0.0)


@njit(cache=True, nogil=True)
def normal_gamma_params(
    stats: np.ndarray, mu0: float, kappa0: float, shape0: float, rate0: float, out: np.ndarray
) -> None:
    """Normal-Gamma posterior per arm into ``out[K, 4]``: (mu_n, kappa_n, shape_n, rate_n).

    The rate uses the centred sum of squares (ss - s**2/n), clipped at 0, rather than
    ss + kappa0*mu0**2 - kappa_n*mu_n**2: the latter cancels catastrophically for large n.
    """
    for k in range(stats.shape[0]):
        n = stats[k, 0]
        s = stats[k, 1]
        ss = stats[k, 2]
        kappa_n = kappa0 + n
        out[k, 0] = (kappa0 * mu0 + s) / kappa_n
        out[k, 1] = kappa_n
        out[k, 2] = shape0 + 0.5 * n
        if n > 0.0:
            mean = s / n
            m2 = max(ss - s * mean, 0.0)
            d = mean - mu0
            out[k, 3] = rate0 + 0.5 * m2 + 0.5 * kappa0 * n * d * d / kappa_n
        else:
            out[k, 3] = rate0


# ----------------------------------------------------------------------------------------
# Thompson sampling
# ----------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _gamma_consts(shape: float) -> tuple[float, float, float]:
    """(d, c, 1/shape) for Marsaglia-Tsang; shapes < 1 are boosted to shape + 1."""
    d = (shape if shape >= 1.0 else shape + 1.0) - 1.0 / 3.0
    return d, 1.0 / math.sqrt(9.0 * d), 1.0 / shape


@njit(cache=True, nogil=True)
def _beta_consts(params: np.ndarray) -> np.ndarray:
    """Per arm (d_a, c_a, 1/a, d_b, c_b, 1/b, boosted?) so a batch computes each once."""
    k_arms = params.shape[0]
    consts = np.empty((k_arms, 7), dtype=np.float64)
    for k in range(k_arms):
        da, ca, ia = _gamma_consts(params[k, 0])
        db, cb, ib = _gamma_consts(params[k, 1])
        consts[k, 0] = da
        consts[k, 1] = ca
        consts[k, 2] = ia
        consts[k, 3] = db
        consts[k, 4] = cb
        consts[k, 5] = ib
        consts[k, 6] = 1.0 if (params[k, 0] < 1.0 or params[k, 1] < 1.0) else 0.0
    return consts


@njit(cache=True, nogil=True, inline="always")
def _beta_draw_c(s: np.ndarray, consts: np.ndarray, k: int) -> float:
    """A Beta draw for arm k from its precomputed constants."""
    if consts[k, 6] == 0.0:
        x = _gamma_dc(s, consts[k, 0], consts[k, 1])
        y = _gamma_dc(s, consts[k, 3], consts[k, 4])
        return x / (x + y)
    la = math.log(_gamma_dc(s, consts[k, 0], consts[k, 1]))
    if consts[k, 2] > 1.0:
        la += math.log(uniform_open(s)) * consts[k, 2]
    lb = math.log(_gamma_dc(s, consts[k, 3], consts[k, 4]))
    if consts[k, 5] > 1.0:
        lb += math.log(uniform_open(s)) * consts[k, 5]
    return 1.0 / (1.0 + math.exp(lb - la))


@njit(cache=True, nogil=True)
def ts_beta_choose(s: np.ndarray, params: np.ndarray) -> int:
    """One Thompson decision over Beta posteriors ``params[K, 2]``."""
    best = 0
    best_v = -1.0
    for k in range(params.shape[0]):
        v = beta_variate(s, params[k, 0], params[k, 1])
        if v > best_v:
            best_v = v
            best = k
    return best


@njit(cache=True, nogil=True)
def ts_beta_batch(s: np.ndarray, params: np.ndarray, out: np.ndarray) -> None:
    """``out.shape[0]`` independent Thompson decisions over Beta posteriors."""
    consts = _beta_consts(params)
    k_arms = params.shape[0]
    fast = True
    for k in range(k_arms):
        if consts[k, 6] != 0.0:
            fast = False
    if not fast:
        for i in range(out.shape[0]):
            best = 0
            best_v = -1.0
            for k in range(k_arms):
                v = _beta_draw_c(s, consts, k)
                if v > best_v:
                    best_v = v
                    best = k
            out[i] = best
        return
    s0 = s[0]
    s1 = s[1]
    s2 = s[2]
    s3 = s[3]
    for i in range(out.shape[0]):
        # x/(x+y) > bx/(bx+by)  <=>  x*(bx+by) > bx*(x+y) for positive draws: the comparison
        # needs no division.
        best = 0
        bx, s0, s1, s2, s3 = _gamma_reg(s, s0, s1, s2, s3, consts[0, 0], consts[0, 1])
        by, s0, s1, s2, s3 = _gamma_reg(s, s0, s1, s2, s3, consts[0, 3], consts[0, 4])
        bt = bx + by
        for k in range(1, k_arms):
            x, s0, s1, s2, s3 = _gamma_reg(s, s0, s1, s2, s3, consts[k, 0], consts[k, 1])
            y, s0, s1, s2, s3 = _gamma_reg(s, s0, s1, s2, s3, consts[k, 3], consts[k, 4])
            if x * bt > bx * (x + y):
                best = k
                bx = x
                bt = x + y
        out[i] = best
    s[0] = s0
    s[1] = s1
    s[2] = s2
    s[3] = s3


@njit(cache=True, nogil=True, inline="always")
def _normal_gamma_draw(s: np.ndarray, params: np.ndarray, k: int) -> float:
    """A draw of the mean from arm k's Normal-Gamma posterior: tau ~ Gamma, mu | tau ~ N."""
    tau = gamma_variate(s, params[k, 2]) / params[k, 3]
    return params[k, 0] + normal(s) / math.sqrt(params[k, 1] * tau)


@njit(cache=True, nogil=True)
def ts_normal_choose(s: np.ndarray, params: np.ndarray) -> int:
    """One Thompson decision over Normal-Gamma posteriors ``params[K, 4]``."""
    best = 0
    best_v = -math.inf
    for k in range(params.shape[0]):
        v = _normal_gamma_draw(s, params, k)
        if v > best_v:
            best_v = v
            best = k
    return best


@njit(cache=True, nogil=True)
def ts_normal_batch(s: np.ndarray, params: np.ndarray, out: np.ndarray) -> None:
    """``out.shape[0]`` Thompson decisions over Normal-Gamma posteriors."""
    for i in range(out.shape[0]):
        out[i] = ts_normal_choose(s, params)


# ----------------------------------------------------------------------------------------
# P(best) and expected loss by Monte Carlo
# ----------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def beta_posterior_draws(s: np.ndarray, params: np.ndarray, draws: int) -> np.ndarray:
    """``draws x K`` samples from independent Beta posteriors."""
    consts = _beta_consts(params)
    k_arms = params.shape[0]
    out = np.empty((draws, k_arms), dtype=np.float64)
    for k in range(k_arms):
        if consts[k, 6] != 0.0:
            # A shape below 1 somewhere: the general path, state through memory.
            for i in range(draws):
                for j in range(k_arms):
                    out[i, j] = _beta_draw_c(s, consts, j)
            return out
    s0 = s[0]
    s1 = s[1]
    s2 = s[2]
    s3 = s[3]
    for i in range(draws):
        for k in range(k_arms):
            x, s0, s1, s2, s3 = _gamma_reg(s, s0, s1, s2, s3, consts[k, 0], consts[k, 1])
            y, s0, s1, s2, s3 = _gamma_reg(s, s0, s1, s2, s3, consts[k, 3], consts[k, 4])
            out[i, k] = x / (x + y)
    s[0] = s0
    s[1] = s1
    s[2] = s2
    s[3] = s3
    return out


@njit(cache=True, nogil=True)
def normal_posterior_draws(s: np.ndarray, params: np.ndarray, draws: int) -> np.ndarray:
    """``draws x K`` samples of each arm's mean from Normal-Gamma posteriors."""
    k_arms = params.shape[0]
    out = np.empty((draws, k_arms), dtype=np.float64)
    for i in range(draws):
        for k in range(k_arms):
            out[i, k] = _normal_gamma_draw(s, params, k)
    return out


@njit(cache=True, nogil=True)
def best_and_loss(samples: np.ndarray, p_best: np.ndarray, loss: np.ndarray) -> None:
    """From posterior samples ``[D, K]``: P(arm is best) and E[max - arm] per arm.

    Ties (possible only with discrete draws) split their win evenly so P(best) sums to 1.
    """
    d_draws, k_arms = samples.shape
    p_best[:] = 0.0
    loss[:] = 0.0
    for i in range(d_draws):
        m = -math.inf
        for k in range(k_arms):
            if samples[i, k] > m:
                m = samples[i, k]
        ties = 0
        for k in range(k_arms):
            if samples[i, k] == m:
                ties += 1
        for k in range(k_arms):
            v = samples[i, k]
            loss[k] += m - v
            if v == m:
                p_best[k] += 1.0 / ties
    for k in range(k_arms):
        p_best[k] /= d_draws
        loss[k] /= d_draws


# ----------------------------------------------------------------------------------------
# UCB family and epsilon-greedy
# ----------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _argmax_random_tie(s: np.ndarray, values: np.ndarray) -> int:
    """Index of the maximum; ties broken uniformly at random (reservoir over the ties)."""
    best = 0
    best_v = values[0]
    ties = 1
    for k in range(1, values.shape[0]):
        v = values[k]
        if v > best_v:
            best_v = v
            best = k
            ties = 1
        elif v == best_v:
            ties += 1
            if uniform(s) * ties < 1.0:
                best = k
    return best


@njit(cache=True, nogil=True)
def ucb1_index(stats: np.ndarray, c: float, out: np.ndarray) -> None:
    """UCB1 (Auer et al. 2002): mean + c * sqrt(2 ln t / n); unplayed arms get +inf."""
    t = 0.0
    for k in range(stats.shape[0]):
        t += stats[k, 0]
    log_t = math.log(max(t, 1.0))
    for k in range(stats.shape[0]):
        n = stats[k, 0]
        if n <= 0.0:
            out[k] = math.inf
        else:
            out[k] = stats[k, 1] / n + c * math.sqrt(2.0 * log_t / n)


@njit(cache=True, nogil=True, inline="always")
def bernoulli_kl(p: float, q: float) -> float:
    """KL(Bernoulli(p) || Bernoulli(q)), with 0 log 0 = 0 and q kept off {0, 1}."""
    eps = 1e-15
    q = min(max(q, eps), 1.0 - eps)
    kl = 0.0
    if p > 0.0:
        kl += p * math.log(p / q)
    if p < 1.0:
        kl += (1.0 - p) * math.log((1.0 - p) / (1.0 - q))
    return kl


@njit(cache=True, nogil=True)
def klucb_bound(mean: float, n: float, budget: float, tol: float) -> float:
    """Largest q in [mean, 1] with n * KL(mean, q) <= budget, by bisection to ``tol``.

    Bisection rather than Newton: KL is convex in q but its derivative blows up near 1,
    and 50 halvings reach 1e-15 unconditionally.
    """
    mean = min(max(mean, 0.0), 1.0)
    lo = mean
    hi = 1.0
    if n * bernoulli_kl(mean, hi) <= budget:
        return 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if n * bernoulli_kl(mean, mid) > budget:
            hi = mid
        else:
            lo = mid
    return lo


@njit(cache=True, nogil=True)
def klucb_index(stats: np.ndarray, c: float, tol: float, out: np.ndarray) -> None:
    """KL-UCB (Garivier & Cappé 2011): n_a KL(mean_a, q) <= log t + c log log t."""
    t = 0.0
    for k in range(stats.shape[0]):
        t += stats[k, 0]
    log_t = math.log(max(t, 1.0))
    budget = log_t
    if c > 0.0 and log_t > 1.0:
        budget += c * math.log(log_t)
    for k in range(stats.shape[0]):
        n = stats[k, 0]
        if n <= 0.0:
            out[k] = math.inf
        else:
            out[k] = klucb_bound(stats[k, 1] / n, n, budget, tol)


@njit(cache=True, nogil=True)
def ucb_normal_index(stats: np.ndarray, out: np.ndarray) -> None:
    """UCB1-Normal (Auer et al. 2002): mean + sqrt(16 var ln(t-1) / n).

    Arms played fewer than ceil(8 ln t) times (or twice: a variance needs two samples)
    are forced first, as the algorithm prescribes; they get +inf.
    """
    t = 0.0
    for k in range(stats.shape[0]):
        t += stats[k, 0]
    force = max(math.ceil(8.0 * math.log(max(t, 1.0))), 2.0)
    log_t1 = math.log(max(t - 1.0, 1.0))
    for k in range(stats.shape[0]):
        n = stats[k, 0]
        if n < force:
            out[k] = math.inf
        else:
            mean = stats[k, 1] / n
            var = max(stats[k, 2] - n * mean * mean, 0.0) / (n - 1.0)
            out[k] = mean + math.sqrt(16.0 * var * log_t1 / n)


@njit(cache=True, nogil=True)
def index_choose(s: np.ndarray, index: np.ndarray) -> int:
    """Deterministic index policy: the arm with the largest index, random among ties."""
    return _argmax_random_tie(s, index)


@njit(cache=True, nogil=True)
def index_batch(s: np.ndarray, index: np.ndarray, out: np.ndarray) -> None:
    """A batch of index-policy decisions; the index is fixed within the batch, ties vary."""
    for i in range(out.shape[0]):
        out[i] = _argmax_random_tie(s, index)


@njit(cache=True, nogil=True)
def greedy_means(stats: np.ndarray, out: np.ndarray) -> None:
    """Empirical mean per arm; +inf for an unplayed arm so each is tried once."""
    for k in range(stats.shape[0]):
        n = stats[k, 0]
        out[k] = stats[k, 1] / n if n > 0.0 else math.inf


@njit(cache=True, nogil=True)
def epsilon_greedy_batch(s: np.ndarray, means: np.ndarray, eps: float, out: np.ndarray) -> None:
    """With probability eps a uniformly random arm, else the best mean (random among ties)."""
    k_arms = means.shape[0]
    for i in range(out.shape[0]):
        if uniform(s) < eps:
            out[i] = min(int(uniform(s) * k_arms), k_arms - 1)
        else:
            out[i] = _argmax_random_tie(s, means)


@njit(cache=True, nogil=True)
def index_allocation(index: np.ndarray, eps: float, out: np.ndarray) -> None:
    """Choice probabilities of (epsilon-)greedy on an index: the exact propensities."""
    k_arms = index.shape[0]
    m = -math.inf
    for k in range(k_arms):
        if index[k] > m:
            m = index[k]
    ties = 0
    for k in range(k_arms):
        if index[k] == m:
            ties += 1
    for k in range(k_arms):
        out[k] = eps / k_arms
        if index[k] == m:
            out[k] += (1.0 - eps) / ties


# ----------------------------------------------------------------------------------------
# Discrete distributions: Vose's alias method
# ----------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def alias_build(p: np.ndarray, prob: np.ndarray, alias: np.ndarray) -> None:
    """Vose (1991): O(K) tables so that a draw is one uniform and one compare.

    ``p`` need not be normalised; it must be non-negative with a positive sum.
    """
    k_arms = p.shape[0]
    total = 0.0
    for k in range(k_arms):
        total += p[k]
    scaled = np.empty(k_arms, dtype=np.float64)
    small = np.empty(k_arms, dtype=np.int64)
    large = np.empty(k_arms, dtype=np.int64)
    ns = 0
    nl = 0
    for k in range(k_arms):
        scaled[k] = p[k] * k_arms / total
        alias[k] = k
        if scaled[k] < 1.0:
            small[ns] = k
            ns += 1
        else:
            large[nl] = k
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        lo = small[ns]
        g = large[nl - 1]
        prob[lo] = scaled[lo]
        alias[lo] = g
        scaled[g] = (scaled[g] + scaled[lo]) - 1.0
        if scaled[g] < 1.0:
            nl -= 1
            small[ns] = g
            ns += 1
    # What is left is 1 up to rounding: those columns keep their own arm.
    for i in range(nl):
        prob[large[i]] = 1.0
    for i in range(ns):
        prob[small[i]] = 1.0


@njit(cache=True, nogil=True, inline="always")
def _alias_draw(s: np.ndarray, prob: np.ndarray, alias: np.ndarray) -> int:
    k_arms = prob.shape[0]
    u = uniform(s) * k_arms
    col = min(int(u), k_arms - 1)
    if u - col < prob[col]:
        return col
    return int(alias[col])


@njit(cache=True, nogil=True)
def alias_choose(s: np.ndarray, prob: np.ndarray, alias: np.ndarray) -> int:
    """One draw from an alias table."""
    return _alias_draw(s, prob, alias)


@njit(cache=True, nogil=True)
def alias_batch(s: np.ndarray, prob: np.ndarray, alias: np.ndarray, out: np.ndarray) -> None:
    """``out.shape[0]`` draws from an alias table: O(1) each, whatever K is."""
    for i in range(out.shape[0]):
        out[i] = _alias_draw(s, prob, alias)


@njit(cache=True, nogil=False)
def alias_at(prob: np.ndarray, alias: np.ndarray, u: float) -> int:
    """The alias-table arm for a given uniform ``u`` in [0, 1): deterministic per unit."""
    k_arms = prob.shape[0]
    x = u * k_arms
    col = min(int(x), k_arms - 1)
    if x - col < prob[col]:
        return col
    return int(alias[col])


# ----------------------------------------------------------------------------------------
# Updates
# ----------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def update(stats: np.ndarray, arm: int, reward: float, gamma: float) -> None:
    """Add one reward to ``stats``; with gamma < 1 every arm's statistics decay first."""
    if gamma < 1.0:
        for k in range(stats.shape[0]):
            stats[k, 0] *= gamma
            stats[k, 1] *= gamma
            stats[k, 2] *= gamma
    stats[arm, 0] += 1.0
    stats[arm, 1] += reward
    stats[arm, 2] += reward * reward


@njit(cache=True, nogil=True)
def update_batch(stats: np.ndarray, arms: np.ndarray, rewards: np.ndarray, gamma: float) -> None:
    """Apply rewards in order: the same result, bit for bit, as calling :func:`update` each."""
    if gamma < 1.0:
        for i in range(arms.shape[0]):
            update(stats, arms[i], rewards[i], gamma)
        return
    for i in range(arms.shape[0]):
        a = arms[i]
        r = rewards[i]
        stats[a, 0] += 1.0
        stats[a, 1] += r
        stats[a, 2] += r * r


@njit(cache=True, nogil=True)
def count_arms(arms: np.ndarray, counts: np.ndarray) -> None:
    """Add the occurrences of each arm in ``arms`` to ``counts``."""
    for i in range(arms.shape[0]):
        counts[arms[i]] += 1


# ----------------------------------------------------------------------------------------
# Policy decisions straight from sufficient statistics: one dispatch per engine call
# ----------------------------------------------------------------------------------------
# The single-decision kernels (thompson_beta_one, table_one, alias_at) deliberately keep
# the GIL (nogil=False): they run for ~1 us, and releasing the GIL means winning it back
# from every other handler thread, which under gRPC load took up to the 5 ms switch
# interval (benchmarks/service.py measured decision p99 9.5 ms with nogil=True, 36-40 us
# without). Batch kernels run long enough that releasing the GIL pays.
# A numba dispatch costs ~0.5 us from Python, so each engine entry point calls exactly one
# of these; they build the posterior parameters or the index internally.


@njit(cache=True, nogil=True)
def thompson_beta(
    s: np.ndarray, stats: np.ndarray, alpha0: float, beta0: float, out: np.ndarray
) -> None:
    """Thompson decisions over Beta(alpha0 + s, beta0 + n - s) posteriors into ``out``."""
    params = np.empty((stats.shape[0], 2), dtype=np.float64)
    beta_params(stats, alpha0, beta0, params)
    if out.shape[0] == 1:
        out[0] = ts_beta_choose(s, params)
    else:
        ts_beta_batch(s, params, out)


@njit(cache=True, nogil=True)
def thompson_normal(
    s: np.ndarray,
    stats: np.ndarray,
    mu0: float,
    kappa0: float,
    shape0: float,
    rate0: float,
    out: np.ndarray,
) -> None:
    """Thompson decisions over Normal-Gamma posteriors into ``out``."""
    params = np.empty((stats.shape[0], 4), dtype=np.float64)
    normal_gamma_params(stats, mu0, kappa0, shape0, rate0, params)
    ts_normal_batch(s, params, out)


@njit(cache=True, nogil=True)
def policy_index(kind: int, stats: np.ndarray, c: float, out: np.ndarray) -> None:
    """The index of an index policy: 0 UCB1, 1 KL-UCB, 2 UCB1-Normal, 3 greedy mean."""
    if kind == 0:
        ucb1_index(stats, c, out)
    elif kind == 1:
        klucb_index(stats, c, 1e-12, out)
    elif kind == 2:
        ucb_normal_index(stats, out)
    else:
        greedy_means(stats, out)


@njit(cache=True, nogil=True)
def index_decide(
    s: np.ndarray, stats: np.ndarray, kind: int, c: float, eps: float, out: np.ndarray
) -> None:
    """Decisions of an (epsilon-)greedy index policy into ``out``; eps = 0 for UCBs."""
    index = np.empty(stats.shape[0], dtype=np.float64)
    policy_index(kind, stats, c, index)
    epsilon_greedy_batch(s, index, eps, out)


@njit(cache=True, nogil=True)
def index_decide_alloc(
    s: np.ndarray,
    stats: np.ndarray,
    kind: int,
    c: float,
    eps: float,
    out: np.ndarray,
    alloc: np.ndarray,
) -> None:
    """:func:`index_decide` plus the exact choice probabilities, from one index.

    The index of KL-UCB costs a bisection per arm; deciding and then asking for the
    propensities computed it twice. Same draws as :func:`index_decide`.
    """
    index = np.empty(stats.shape[0], dtype=np.float64)
    policy_index(kind, stats, c, index)
    index_allocation(index, eps, alloc)
    epsilon_greedy_batch(s, index, eps, out)


@njit(cache=True, nogil=True)
def index_propensities(stats: np.ndarray, kind: int, c: float, eps: float, out: np.ndarray) -> None:
    """Exact choice probabilities of an (epsilon-)greedy index policy into ``out``."""
    index = np.empty(stats.shape[0], dtype=np.float64)
    policy_index(kind, stats, c, index)
    index_allocation(index, eps, out)


@njit(cache=True, nogil=True)
def thompson_beta_pbest(
    s: np.ndarray,
    stats: np.ndarray,
    alpha0: float,
    beta0: float,
    draws: int,
    p_best: np.ndarray,
    loss: np.ndarray,
) -> None:
    """Monte Carlo P(best) and expected loss under Beta posteriors."""
    params = np.empty((stats.shape[0], 2), dtype=np.float64)
    beta_params(stats, alpha0, beta0, params)
    best_and_loss(beta_posterior_draws(s, params, draws), p_best, loss)


@njit(cache=True, nogil=True)
def thompson_normal_pbest(
    s: np.ndarray,
    stats: np.ndarray,
    mu0: float,
    kappa0: float,
    shape0: float,
    rate0: float,
    draws: int,
    p_best: np.ndarray,
    loss: np.ndarray,
) -> None:
    """Monte Carlo P(best) and expected loss under Normal-Gamma posteriors."""
    params = np.empty((stats.shape[0], 4), dtype=np.float64)
    normal_gamma_params(stats, mu0, kappa0, shape0, rate0, params)
    best_and_loss(normal_posterior_draws(s, params, draws), p_best, loss)


@njit(cache=True, nogil=True)
def table_decide(s: np.ndarray, prob: np.ndarray, alias: np.ndarray, out: np.ndarray) -> None:
    """Decisions drawn from an alias table into ``out``."""
    alias_batch(s, prob, alias, out)


@njit(cache=True, nogil=True)
def mix_fixed(
    s: np.ndarray, prob: np.ndarray, alias: np.ndarray, mass: float, out: np.ndarray
) -> None:
    """With probability ``mass`` replace each decision by a draw from a fixed table.

    Traffic shaping as a mixture: a control holdout or per-arm floors take their share off
    the top and leave the policy's relative weights untouched.
    """
    for i in range(out.shape[0]):
        if uniform(s) < mass:
            out[i] = _alias_draw(s, prob, alias)


@njit(cache=True, nogil=True)
def update_epochs(
    stats: np.ndarray,
    epoch_stats: np.ndarray,
    arms: np.ndarray,
    epochs: np.ndarray,
    rewards: np.ndarray,
    gamma: float,
) -> None:
    """Apply rewards to the posterior statistics and, undiscounted, to ``epoch_stats[E, K, 3]``
    at the allocation epoch of the decision each reward belongs to."""
    update_batch(stats, arms, rewards, gamma)
    for i in range(arms.shape[0]):
        e = epochs[i]
        a = arms[i]
        r = rewards[i]
        epoch_stats[e, a, 0] += 1.0
        epoch_stats[e, a, 1] += r
        epoch_stats[e, a, 2] += r * r


@njit(cache=True, nogil=False)
def thompson_beta_one(
    s: np.ndarray, stats: np.ndarray, pulls: np.ndarray, alpha0: float, beta0: float
) -> int:
    """One Thompson decision straight from ``stats``, counted into ``pulls``.

    The single-request hot path: no allocation, the generator in registers, the Gamma
    constants computed inline (two square roots per arm are cheaper than a table here).
    """
    s0 = s[0]
    s1 = s[1]
    s2 = s[2]
    s3 = s[3]
    best = 0
    bx = 0.0
    bt = 1.0
    for k in range(stats.shape[0]):
        a = alpha0 + stats[k, 1]
        b = beta0 + max(stats[k, 0] - stats[k, 1], 0.0)
        if a < 1.0 or b < 1.0:
            # Rare (a prior below 1 and no data): the general path, state through memory.
            s[0] = s0
            s[1] = s1
            s[2] = s2
            s[3] = s3
            la = log_gamma_variate(s, a)
            lb = log_gamma_variate(s, b)
            s0 = s[0]
            s1 = s[1]
            s2 = s[2]
            s3 = s[3]
            m = max(la, lb)
            x = math.exp(la - m)
            t = x + math.exp(lb - m)
        else:
            da = a - 1.0 / 3.0
            db = b - 1.0 / 3.0
            x, s0, s1, s2, s3 = _gamma_reg(s, s0, s1, s2, s3, da, 1.0 / math.sqrt(9.0 * da))
            y, s0, s1, s2, s3 = _gamma_reg(s, s0, s1, s2, s3, db, 1.0 / math.sqrt(9.0 * db))
            t = x + y
        if k == 0 or x * bt > bx * t:
            best = k
            bx = x
            bt = t
    s[0] = s0
    s[1] = s1
    s[2] = s2
    s[3] = s3
    pulls[best] += 1
    return best


@njit(cache=True, nogil=False)
def table_one(s: np.ndarray, prob: np.ndarray, alias: np.ndarray, pulls: np.ndarray) -> int:
    """One draw from an alias table, counted into ``pulls``."""
    arm = _alias_draw(s, prob, alias)
    pulls[arm] += 1
    return arm
