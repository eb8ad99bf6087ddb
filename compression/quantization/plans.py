"""Per-layer precision plans: each quantized *site* in int8, FP8 or float, chosen by sensitivity.

A **site** is what one precision decision covers: the modules that read one quantized activation through one
scale (the ``query``/``key``/``value`` projections of an attention block, the ``forward``/``backward`` input
projections of a BiLSTM layer: a deployed engine quantizes their shared input once, so they share a format),
or a single module. :func:`find_sites` lists the sites of base rules (:data:`~.rules.DEFAULT_RULES`) with
their matmul FLOPs; a :class:`PrecisionPlan` gives each site a format and turns into rules
(:meth:`PrecisionPlan.rules`) that calibration, :func:`~.qat.fake_quant`, QAT and the Q/DQ export take like
any others::

    sites = find_sites(apply_fn, {"params": params}, **batch)
    plan = PrecisionPlan.uniform(sites, "int8").with_formats({"encoder/layer_5/output": "float"})
    variables = calibrate(apply_fn, {"params": params}, batches, plan.rules())
    logits = fake_quant(plan.rules()).wrap(apply_fn)(variables, **batch).logits

**Sensitivity.** :func:`switched_fake_quant` quantizes every site in the format a traced code selects
(:data:`FORMAT_CODES`), so one compiled model measures any assignment: each site alone quantized, all sites
but one, a candidate plan, without recompiling. (Its int8 sites multiply dequantized operands in float32,
which is within float32 rounding of :func:`~.qat.grid_dot`; the chosen plan is re-evaluated with
:func:`~.qat.fake_quant` itself.)

**Choice** (:func:`choose_plan`): every site starts in its less sensitive low-precision format (int8 on a
tie: it runs on every GPU with int8 tensor cores, FP8 needs compute capability 8.9); sites are then ordered
by sensitivity per FLOP, and the plan keeping the most sites in low precision whose measured metric stays
within ``budget`` of the reference is found by bisection along that order (the first ``k`` sites in float).
Every plan the search accepts was evaluated; the all-float end is the reference itself.

Plans are plain JSON (:meth:`PrecisionPlan.to_dict`/:meth:`PrecisionPlan.from_dict`): what a model directory
carries beside its quantization state (``precision_plan.json``), with the measurements that chose it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from compression.quantization.fake_quant import fake_quantize
from compression.quantization.qarray import normalize_axes, reduce_amax, symmetric_scale
from compression.quantization.rules import (
    DEFAULT_RULES,
    MODULE_TYPES,
    QuantRule,
    Target,
    check_rules,
    find_input_qparams,
    hooked_call,
    quant_interceptor,
)
from compression.transform import Transform

PLAN_FORMATS = ("int8", "fp8", "float")
LOW_PRECISION = ("int8", "fp8")
FORMAT_CODES = {"float": 0, "int8": 1, "fp8": 2}
SWITCH = "precision_switch"  # collection of switched_fake_quant: codes and both formats' scales
PLAN_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Site:
    """One precision decision: the modules reading one quantized activation (or one module).

    Attributes:
      name: the path holding the shared input scale (the attention block), or the module's own path.
      modules: slash-joined paths of its modules, in call order.
      flops: matmul FLOPs of its modules on the traced example (2 per multiply-add).
    """

    name: str
    modules: tuple[str, ...]
    flops: int = 0


def site_of(target: Target) -> str:
    """The site name of a target: its input scale's owner (shared or its own path)."""
    return "/".join(target.owner) if target.quantize_input else target.name


def _flops(kind: str, kernel_shape, out_shape) -> int:
    """Matmul FLOPs of one Dense/Conv-like call: 2 x outputs x (kernel elements per output feature)."""
    features = kernel_shape[-1] if kernel_shape else 1
    return 2 * math.prod(out_shape) * (math.prod(kernel_shape) // max(features, 1))


def find_sites(apply_fn: Callable, variables: Mapping, *args, rules: Sequence[QuantRule] = DEFAULT_RULES,
               **kwargs) -> list[Site]:
    """The sites of ``rules`` in ``apply_fn(variables, *args, **kwargs)`` (traced abstractly), in call order.

    Only modules quantized in full (weight and input) are sites; FLOPs are those of the traced shapes (e.g. a
    batch of one at a typical length).
    """
    rules = check_rules(rules)
    found: dict[str, dict] = {}

    def record(target, module, next_fun, a, kw):
        out = next_fun(*a, **kw)
        if target.quantize_input and target.quantize_weight:
            kernel = module.get_variable("params", "kernel" if target.kind != "Embed" else "embedding")
            entry = found.setdefault(site_of(target), {"modules": [], "flops": 0})
            if target.name not in entry["modules"]:
                entry["modules"].append(target.name)
                shape = out.shape if hasattr(out, "shape") else jax.tree.leaves(out)[0].shape
                entry["flops"] += _flops(target.kind, tuple(kernel.shape), tuple(shape))
        return out

    def traced(v):
        with nn.intercept_methods(quant_interceptor(rules, record)):
            return apply_fn(v, *args, **kwargs)

    jax.eval_shape(traced, variables)
    if not found:
        raise ValueError("find_sites: the rules quantize no module in full (weight and input)")
    return [Site(name, tuple(e["modules"]), int(e["flops"])) for name, e in found.items()]


def _site_regex(site_name: str, modules: Sequence[str]) -> tuple[str, int | None]:
    """``(module_path regex, share_input_scale_group)`` selecting exactly ``modules``; a site whose name is not
    its one module's path shares its input scale at that name (group 1)."""
    if tuple(modules) == (site_name,):
        return f"^{re.escape(site_name)}$", None
    prefix = site_name + "/"
    if not all(m.startswith(prefix) for m in modules):
        raise ValueError(f"site {site_name!r}: modules {list(modules)} are not all under it")
    members = "|".join(re.escape(m[len(prefix):]) for m in modules)
    return f"^({re.escape(site_name)})/(?:{members})$", 1


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """A format per site (see the module docstring).

    Attributes:
      sites: the sites, in call order.
      formats: site name -> ``"int8"``, ``"fp8"`` or ``"float"``.
      calibrators: the activation calibrator of each low-precision format (``max``, ``percentile[:P]``,
        ``mse``; ``entropy`` for int8 only).
      per_channel: per-output-channel weight scales (both formats).
      record: what chose the plan (measurements, budget, evaluations): saved with it, not used by it.
    """

    sites: tuple[Site, ...]
    formats: Mapping[str, str]
    calibrators: Mapping[str, str] = dataclasses.field(default_factory=lambda: {"int8": "max", "fp8": "max"})
    per_channel: bool = True
    record: Mapping = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "sites", tuple(self.sites))
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"a plan lists each site once; repeated: {repeated}")
        missing = sorted(set(names) - set(self.formats))
        unknown = sorted(set(self.formats) - set(names))
        if missing or unknown:
            raise ValueError(f"plan formats must name every site exactly: missing {missing[:3]}, unknown {unknown[:3]}")
        bad = {k: v for k, v in self.formats.items() if v not in PLAN_FORMATS}
        if bad:
            raise ValueError(f"plan formats must be among {PLAN_FORMATS}; got {bad}")
        for fmt in LOW_PRECISION:
            if fmt not in self.calibrators:
                raise ValueError(f"plan calibrators must name one for {fmt}, got {dict(self.calibrators)}")
        object.__setattr__(self, "formats", dict(self.formats))
        object.__setattr__(self, "calibrators", dict(self.calibrators))
        self.rules()  # a bad calibrator fails here, naming the rule

    @classmethod
    def uniform(cls, sites: Sequence[Site], format: str, **kwargs) -> PrecisionPlan:
        """Every site in ``format``."""
        return cls(tuple(sites), {s.name: format for s in sites}, **kwargs)

    def with_formats(self, changes: Mapping[str, str], **record) -> PrecisionPlan:
        """A copy with some sites' formats changed (and ``record`` entries added)."""
        return dataclasses.replace(self, formats={**self.formats, **changes}, record={**self.record, **record})

    def rules(self) -> tuple[QuantRule, ...]:
        """One rule per site (exact module paths; shared input scales kept): ``float`` sites are exclusions,
        modules the plan does not name are left in float."""
        out = []
        for site in self.sites:
            regex, group = _site_regex(site.name, site.modules)
            fmt = self.formats[site.name]
            if fmt == "float":
                out.append(QuantRule(regex, weights=False, inputs=False, module_types=tuple(MODULE_TYPES)))
                continue
            out.append(QuantRule(regex, per_channel=self.per_channel, calibrator=self.calibrators[fmt],
                                 module_types=tuple(MODULE_TYPES), share_input_scale_group=group,
                                 format="int" if fmt == "int8" else "fp8"))
        return tuple(out)

    def flops(self) -> dict[str, int]:
        """Matmul FLOPs of the sites in each format (``int8``, ``fp8``, ``float``), as :func:`find_sites`
        counted them (module matmuls only; the exported graph's count adds the others)."""
        out = dict.fromkeys(PLAN_FORMATS, 0)
        for s in self.sites:
            out[self.formats[s.name]] += s.flops
        return out

    def to_dict(self) -> dict:
        """The JSON form (``precision_plan.json``)."""
        return {"version": PLAN_VERSION, "calibrators": dict(self.calibrators), "per_channel": self.per_channel,
                "sites": [{"site": s.name, "format": self.formats[s.name], "modules": list(s.modules),
                           "flops": s.flops} for s in self.sites],
                "flops": self.flops(), "record": dict(self.record)}

    @classmethod
    def from_dict(cls, d: Mapping) -> PrecisionPlan:
        """The plan of :meth:`to_dict`'s JSON; raises ``ValueError`` on another version or a malformed plan."""
        if not isinstance(d, Mapping) or d.get("version") != PLAN_VERSION or not isinstance(d.get("sites"), list):
            raise ValueError(f"not a precision plan (version {PLAN_VERSION} with a list of sites)")
        sites = tuple(Site(e["site"], tuple(e["modules"]), int(e.get("flops", 0))) for e in d["sites"])
        return cls(sites, {e["site"]: e["format"] for e in d["sites"]}, d.get("calibrators", {}),
                   bool(d.get("per_channel", True)), d.get("record", {}))


# ---------------------------------------------------------------------------------------------------------
# Choosing a plan


def choose_plan(sites: Sequence[Site], sensitivity: Mapping[str, Mapping[str, float]],
                evaluate: Callable[[dict[str, str]], float], *, reference: float, budget: float,
                formats: Sequence[str] = LOW_PRECISION) -> tuple[dict[str, str], dict]:
    """The formats of the plan described in the module docstring, and a record of how it was chosen.

    Args:
      sites: the sites (FLOPs used to order them).
      sensitivity: site -> format -> damage of that site in that format (lower is better; e.g. the output KL
        it adds alone plus the KL it removes when kept float among all others quantized).
      evaluate: formats (site -> format) -> the metric of that plan (on the selection split).
      reference: the float model's metric; a plan is accepted when ``evaluate(plan) >= reference - budget``.
      budget: the allowed drop, in the metric's units.
      formats: the low-precision formats to choose from, most preferred first (wins ties).

    Returns:
      ``(formats, record)``; ``record`` has the starting formats, the demotion ``order``, every
      ``evaluations`` entry ``{"floats": k, "metric": m, "accepted": bool}`` and the chosen ``floats``.
    """
    if not sites:
        raise ValueError("choose_plan: no sites")
    if not formats or any(f not in LOW_PRECISION for f in formats):
        raise ValueError(f"choose_plan: formats must be among {LOW_PRECISION}, got {list(formats)}")
    if budget < 0:
        raise ValueError(f"choose_plan: budget must be >= 0, got {budget}")
    missing = [s.name for s in sites if any(f not in sensitivity.get(s.name, {}) for f in formats)]
    if missing:
        raise ValueError(f"choose_plan: no sensitivity for sites {missing[:3]} in formats {list(formats)}")
    best = {s.name: min(formats, key=lambda f, n=s.name: (sensitivity[n][f], formats.index(f))) for s in sites}
    index = {s.name: i for i, s in enumerate(sites)}
    order = sorted((s for s in sites), key=lambda s: (-sensitivity[s.name][best[s.name]] / max(s.flops, 1),
                                                      index[s.name]))
    order_names = [s.name for s in order]

    def plan(k: int) -> dict[str, str]:
        floats = set(order_names[:k])
        return {s.name: "float" if s.name in floats else best[s.name] for s in sites}

    evaluations = []

    def ok(k: int) -> bool:
        metric = float(evaluate(plan(k)))
        accepted = metric >= reference - budget
        evaluations.append({"floats": k, "metric": metric, "accepted": bool(accepted)})
        return accepted

    n = len(sites)
    if ok(0):
        chosen = 0
    else:  # the smallest k accepted, assuming acceptance grows with k; k = n is the float model itself
        lo, hi = 0, n  # lo rejected, hi accepted
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
        chosen = hi
    record = {"start": best, "order": order_names, "evaluations": evaluations, "floats": chosen,
              "reference": reference, "budget": budget}
    return plan(chosen), record


# ---------------------------------------------------------------------------------------------------------
# Switched fake quantization (measurement)


def _select(code, x, as_int8, as_fp8):
    return jnp.where(code == FORMAT_CODES["int8"], as_int8, jnp.where(code == FORMAT_CODES["fp8"], as_fp8, x))


def switched_fake_quant(rules: Sequence[QuantRule] = DEFAULT_RULES) -> Transform:
    """Fake quantization with each site's format chosen at run time (see the module docstring).

    The wrapped apply reads ``variables[SWITCH]`` = ``{"codes": {site: int32 code}, "int8": int8 "quant"
    collection, "fp8": FP8 "quant" collection}`` (:func:`switch_variables`), all traced: changing the codes
    does not recompile. ``rules`` give the sites and their sharing (symmetric; their formats are ignored).
    ``init`` is not used (calibrate the two collections with
    :func:`~compression.quantization.calibration.collect_statistics` and ``Statistics.scales(format=...)``).
    """
    rules = check_rules(rules)
    if any(not r.symmetric or r.bits != 8 for r in rules if r.weights or r.inputs):
        raise ValueError("switched_fake_quant: the rules must be symmetric and 8-bit (FP8 has no zero point)")

    def init(key, variables, *args, **kwargs):
        raise ValueError("switched_fake_quant has no init: give variables[SWITCH] (switch_variables)")

    def wrap(apply_fn: Callable) -> Callable:
        def wrapped(variables, *args, **kwargs):
            if SWITCH not in variables:
                raise ValueError(f"switched_fake_quant: variables[{SWITCH!r}] is missing (switch_variables)")
            switch = variables[SWITCH]
            inner = {k: v for k, v in variables.items() if k != SWITCH}

            def on_target(target, module, next_fun, a, kw):
                site = site_of(target)
                if site not in switch["codes"]:
                    raise ValueError(f"switched_fake_quant: no format code for site {site!r}")
                code = switch["codes"][site]

                def hook(promote, ops_in, dtype, inexact):
                    ops = list(promote(*ops_in, dtype=dtype, inexact=inexact))
                    x = ops[target.input_index] if target.input_index is not None else None
                    if target.quantize_input and x is not None and jnp.issubdtype(x.dtype, jnp.floating):
                        s8 = jax.lax.stop_gradient(find_input_qparams(switch["int8"], target.path)[0])
                        sf = jax.lax.stop_gradient(find_input_qparams(switch["fp8"], target.path)[0])
                        ops[target.input_index] = _select(code, x, fake_quantize(x, s8),
                                                          fake_quantize(x, sf, format="fp8"))
                    w = ops[target.weight_index]
                    if target.quantize_weight and jnp.issubdtype(w.dtype, jnp.floating):
                        axes = normalize_axes(target.weight_axes, w.ndim)
                        amax = jax.lax.stop_gradient(reduce_amax(w.astype(jnp.float32), axes))
                        ops[target.weight_index] = _select(
                            code, w, fake_quantize(w, symmetric_scale(amax, 8), axis=axes),
                            fake_quantize(w, symmetric_scale(amax, 8, "fp8"), axis=axes, format="fp8"))
                    return ops

                return hooked_call(module, next_fun, a, kw, hook)

            with nn.intercept_methods(quant_interceptor(rules, on_target)):
                return apply_fn(inner, *args, **kwargs)

        return wrapped

    return Transform("switched_fake_quant", init, wrap)


def switch_variables(variables: Mapping, formats: Mapping[str, str], int8_quant: Mapping,
                     fp8_quant: Mapping) -> dict:
    """``variables`` with the :data:`SWITCH` collection of :func:`switched_fake_quant` for ``formats``."""
    codes = {site: jnp.asarray(FORMAT_CODES[f], jnp.int32) for site, f in formats.items()}
    return {**variables, SWITCH: {"codes": codes, "int8": int8_quant, "fp8": fp8_quant}}
