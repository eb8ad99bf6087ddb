"""L0 hard-concrete gates (Louizos et al. 2018) on heads, FFN units and hidden units (McCarley et al. 2019).

Each unit j of a gated site has a learnable ``log_alpha_j`` in the ``"gates"`` collection. In training (when
the ``"gates"`` RNG is supplied) a gate is sampled from the hard-concrete distribution

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  z = clip(s (zeta - gamma) + gamma, 0, 1)

and at evaluation (no ``"gates"`` RNG) the deterministic estimate z = clip(sigmoid(log_alpha)(zeta - gamma) +
gamma, 0, 1) is used. The expected number of non-zero gates is sum_j sigmoid(log_alpha_j - beta log(-gamma /
zeta)). :func:`lagrangian_penalty` turns a target sparsity into the Lagrangian term of Wang et al. / CoFi
(lambda_1 (s - t) + lambda_2 (s - t)^2, maximised over the lambdas), so "50% of FFN units" is what you get.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from compression.pruning.site_masks import broadcast_to_axis, is_site_call, kind_pattern, masks_by_path, unflatten
from compression.transform import Transform, intercepting

GATES = "gates"
GATES_RNG = "gates"
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
EPS = 1e-6


def sample_gates(key: jax.Array, log_alpha: jax.Array, beta: float = BETA) -> jax.Array:
    """One hard-concrete sample per unit, float32 in [0, 1], differentiable in ``log_alpha``."""
    u = jax.random.uniform(key, log_alpha.shape, jnp.float32, EPS, 1.0 - EPS)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / beta)
    return jnp.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def deterministic_gates(log_alpha: jax.Array) -> jax.Array:
    """The test-time gate estimate, float32 in [0, 1]."""
    return jnp.clip(jax.nn.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def prob_nonzero(log_alpha: jax.Array, beta: float = BETA) -> jax.Array:
    """P(z_j != 0) per unit; its sum is the expected L0 norm."""
    return jax.nn.sigmoid(log_alpha - beta * math.log(-GAMMA / ZETA))


def init_log_alpha(drop_init: float) -> float:
    """log_alpha such that a unit starts with P(gate closed) about ``drop_init`` (as in the reference code)."""
    if not 0.0 < drop_init < 1.0:
        raise ValueError(f"drop_init must be in (0, 1), got {drop_init}")
    return math.log(1.0 - drop_init) - math.log(drop_init)


def l0_gates(kinds: str = "heads|ffn", drop_init: float = 0.1, collection: str = GATES) -> Transform:
    """Hard-concrete gates at the sites whose kind matches ``kinds`` (``heads``, ``ffn``, ``hidden``).

    Sampled when the ``"gates"`` RNG stream is passed to apply (training), deterministic otherwise. Train the
    ``collection`` alongside the parameters and add :func:`expected_l0` / :func:`lagrangian_penalty` to the loss.
    """
    pattern = kind_pattern(kinds)
    if pattern.match("layer"):
        raise ValueError("L0 gates act on units (heads, ffn, hidden); drop whole layers with LayerDrop")
    start = init_log_alpha(drop_init)

    def interceptor(next_fun, args, kwargs, context):
        if not is_site_call(context, pattern):
            return next_fun(*args, **kwargs)
        module, x = context.module, args[0]
        log_alpha = module.variable(collection, "log_alpha",
                                    lambda: jnp.full((x.shape[module.axis],), start, jnp.float32)).value
        if module.has_rng(GATES_RNG):
            z = sample_gates(module.make_rng(GATES_RNG), log_alpha)
        else:
            z = deterministic_gates(log_alpha)
        return next_fun(x * broadcast_to_axis(z, x, module.axis), *args[1:], **kwargs)

    return intercepting(f"l0_gates[{kinds}]", interceptor, collections=(collection,), init_rngs=(GATES_RNG,))


def _select(gates: dict, site_filter: str | None) -> dict[str, jax.Array]:
    by_path = masks_by_path(gates)
    if site_filter is None:
        return by_path
    selected = {p: v for p, v in by_path.items() if site_filter in p}
    if not selected:
        raise ValueError(f"no gates match {site_filter!r}; gated sites: {sorted(by_path)}")
    return selected


def expected_l0(gates: dict, site_filter: str | None = None) -> tuple[jax.Array, int]:
    """(expected number of open gates, total units) over the gate sites whose path contains ``site_filter``."""
    selected = _select(gates, site_filter)
    return sum(prob_nonzero(v).sum() for v in selected.values()), sum(v.size for v in selected.values())


def expected_sparsity(gates: dict, site_filter: str | None = None) -> jax.Array:
    """1 - expected L0 / units: the expected fraction of pruned units."""
    l0, total = expected_l0(gates, site_filter)
    return 1.0 - l0 / total


def lagrangian_penalty(sparsity: jax.Array, target: float, lambda_1: jax.Array, lambda_2: jax.Array) -> jax.Array:
    """lambda_1 (s - t) + lambda_2 (s - t)^2; minimise over gates, maximise over the lambdas (negate their
    gradients, e.g. ``optax.scale(-1)`` in their optimizer). ``target`` may be traced (a ramp inside a jitted
    step); its range is then the caller's to check."""
    if not isinstance(target, jax.core.Tracer) and not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    gap = sparsity - target
    return lambda_1 * gap + lambda_2 * gap * gap


def achieved_sparsity(gates: dict, site_filter: str | None = None) -> float:
    """Fraction of units whose deterministic gate is exactly 0 (what compaction removes)."""
    selected = _select(gates, site_filter)
    zeros = sum(int((deterministic_gates(v) == 0).sum()) for v in selected.values())
    return zeros / sum(v.size for v in selected.values())


def deterministic_masks(gates: dict) -> dict:
    """The gates collection as a masks tree (``mask`` leaves of deterministic gate values) for compaction."""
    return unflatten({p: deterministic_gates(v) for p, v in masks_by_path(gates).items()})
