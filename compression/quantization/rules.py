"""Quantization rules, the modules they select, and the shared interception machinery.

**Rules.** A :class:`QuantRule` is a regex over slash-joined module paths (``re.search``) plus how to quantize
what it selects (qwix's ``QuantizationRule`` idea). For each intercepted module call the *first* rule whose
``module_path`` matches and whose ``module_types`` contain the module's class decides; a rule with
``weights=False, inputs=False`` matched first leaves the module in float (an exclusion). :data:`DEFAULT_RULES`
match deployment (TensorRT's explicit-quantization recipe): per-channel symmetric int8 weights on the output
axis, per-tensor symmetric int8 activations at the input of every Dense/DenseGeneral/Conv/Einsum, and one
input scale shared by the ``query``/``key``/``value`` projections of one attention block (they read the same
tensor, which a deployed engine quantizes once), and likewise by the ``forward``/``backward`` input projections
of a bidirectional LSTM layer. A fused ``qkv`` Dense has one input and shares naturally.
Embeddings are left in float by default (TensorRT's BERT keeps the embedding gathers in float); add
``"Embed"`` to a rule's ``module_types`` to quantize tables per row.

**Formats.** A rule's ``format`` is ``"int"`` (the integer grid of ``bits``: int8 by default) or ``"fp8"``
(E4M3FN, scale ``amax / 448``; weights and activations alike, weights per channel when ``per_channel``), so one
model can mix formats: the first matching rule decides each module's. :data:`FP8_RULES` are the default rules
in FP8, and :func:`with_format` turns any rule list into another format. FP8 calibrates with ``max``,
``percentile`` or ``mse`` (TensorRT's entropy calibration is defined on the 128 levels of int8).

**What is quantized per module class** (``weight_axes``: the per-channel, i.e. output, axes of the weight):

===============  ==========================  =====================  ==========================================
class            activation                  weight                 weight_axes
===============  ==========================  =====================  ==========================================
``Dense``        the input ``[..., in]``     kernel ``[in, out]``   ``-1``
``DenseGeneral`` the input                   kernel                 the last ``len(features)`` axes
``Conv``         the input ``[B, ..., C]``   kernel ``[..., C, F]`` ``-1``
``Einsum``       the input                   kernel                 kernel axes in the output, not in the input
``Embed`` call   (integer ids: none)         table ``[V, E]``       ``0`` (one scale per row)
``Embed.attend`` the query                   table ``[V, E]``       ``0`` (rows are the outputs)
===============  ==========================  =====================  ==========================================

**Interception.** Flax's ``Dense``/``DenseGeneral``/``Conv``/``Einsum``/``Embed`` all pass their operands
through the module attribute ``promote_dtype`` right after fetching their parameters, and ``Dense``/``Conv``
take their contraction from ``dot_general``/``conv_general_dilated`` attributes. :func:`quant_interceptor`
swaps these attributes on the intercepted (bound) module for the duration of that one call (and restores
them), so one hook sees the exact activation and weight every module class computes with, for every model
family, without re-implementing any module.

**The "quant" collection** (scales live there, so they checkpoint, pmap and export with the model)::

    quant/<module path>/input_scale            float32 []   per-tensor activation scale
    quant/<module path>/input_zero_point       float32 []   asymmetric rules only (integer-valued)
    quant/<owner path>/shared_input_scale      float32 []   one scale shared by a group (and zero point)
    quant/<module path>/kernel_scale           float32 [out...]  after conversion to int8 (see int8.py)

:func:`find_input_qparams` resolves a module's activation parameters in that tree (own, else the nearest
ancestor's shared ones): this is what the export path calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from compression.quantization.calibrators import Calibrator, get_calibrator
from compression.quantization.qarray import MIN_SCALE, check_bits, check_format
from compression.transform import module_path

QUANT = "quant"  # the variable collection of scales

MODULE_TYPES: dict[str, type] = {
    "Dense": nn.Dense,
    "DenseGeneral": nn.DenseGeneral,
    "Conv": nn.Conv,
    "Einsum": nn.Einsum,
    "Embed": nn.Embed,
}
DEFAULT_MODULE_TYPES = ("Dense", "DenseGeneral", "Conv", "Einsum")
_METHODS = {"Embed": ("__call__", "attend")}  # others: "__call__"


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """What to quantize in the modules whose path matches ``module_path``.

    Attributes:
      module_path: regex searched in the slash-joined module path (e.g. ``"encoder/layer_0/attention/query"``).
      weights: fake-quantize the module's weight (symmetric, per-channel on the output axes if
        ``per_channel``, else per-tensor; scale = max |w| per channel, recomputed at each call).
      inputs: fake-quantize the module's input activation, per-tensor, with a calibrated scale.
      per_channel: per-output-channel weight scales (deployment default) or one per tensor.
      bits: bits of weights and activations, 2..8.
      symmetric: activation grid: symmetric narrow signed (TensorRT) or asymmetric unsigned (ONNX Runtime
        uint8). Weights are always symmetric. Asymmetric activations calibrate with ``"max"`` (min/max) only.
      calibrator: how activation scales are calibrated: ``"max"``, ``"percentile[:P]"``, ``"mse"``,
        ``"entropy"`` or a :class:`~compression.quantization.calibrators.Calibrator`.
      module_types: module classes the rule applies to (names in :data:`MODULE_TYPES`).
      share_input_scale_group: a group (number or name) of ``module_path``: modules whose match ends this group
        at the same path prefix share one input scale, stored at that prefix (which must be an ancestor
        module's path, e.g. the attention block for ``r"^(.*)/(query|key|value)$"`` with group 1).
      required: a required rule that matches no module is an error at calibration/initialisation.
      format: ``"int"`` (integer grid of ``bits``) or ``"fp8"`` (E4M3FN: 8 bits, symmetric; calibrators
        ``max``, ``percentile`` or ``mse``).
    """

    module_path: str = ".*"
    weights: bool = True
    inputs: bool = True
    per_channel: bool = True
    bits: int = 8
    symmetric: bool = True
    calibrator: str | Calibrator = "max"
    module_types: tuple[str, ...] = DEFAULT_MODULE_TYPES
    share_input_scale_group: int | str | None = None
    required: bool = True
    format: str = "int"

    def __post_init__(self):
        try:
            pattern = re.compile(self.module_path)
        except re.error as e:
            raise ValueError(f"QuantRule.module_path {self.module_path!r} is not a valid regex: {e}") from None
        check_bits(self.bits)
        try:
            check_format(self.format, self.bits, self.symmetric)
        except ValueError as e:
            raise ValueError(f"QuantRule {self.module_path!r}: {e}") from None
        types = (self.module_types,) if isinstance(self.module_types, str) else tuple(self.module_types)
        object.__setattr__(self, "module_types", types)
        unknown = [t for t in self.module_types if t not in MODULE_TYPES]
        if unknown or not self.module_types:
            raise ValueError(f"QuantRule {self.module_path!r}: unknown module_types {unknown or '()'}; "
                             f"known: {', '.join(MODULE_TYPES)}")
        calibrator = get_calibrator(self.calibrator)
        if self.format not in calibrator.formats:
            raise ValueError(f"QuantRule {self.module_path!r}: calibrator {calibrator.name!r} does not calibrate the "
                             f"{self.format} format (it calibrates {', '.join(calibrator.formats)})")
        if not self.symmetric and calibrator.needs_histogram:
            raise ValueError(f"QuantRule {self.module_path!r}: asymmetric activations calibrate with 'max' "
                             f"(min/max) only, got calibrator {calibrator.name!r}")
        group = self.share_input_scale_group
        if group is not None:
            if isinstance(group, str) and group not in pattern.groupindex:
                raise ValueError(f"QuantRule {self.module_path!r}: share_input_scale_group {group!r} is not a "
                                 f"named group of the regex (named groups: {sorted(pattern.groupindex)})")
            if isinstance(group, int) and not 1 <= group <= pattern.groups:
                raise ValueError(f"QuantRule {self.module_path!r}: share_input_scale_group {group} is not a "
                                 f"group of the regex ({pattern.groups} groups)")

    def get_calibrator(self) -> Calibrator:
        return get_calibrator(self.calibrator)

    def describe(self, index: int) -> str:
        return f"QuantRule #{index} (module_path={self.module_path!r}, module_types={list(self.module_types)})"


DEFAULT_RULES: tuple[QuantRule, ...] = (
    # query/key/value of one block read the same tensor: one input scale, stored at their parent module.
    QuantRule(r"^(.*)/(query|key|value)$", share_input_scale_group=1, required=False),
    # both directions of a bidirectional LSTM layer project the same input (one X of ONNX's LSTM op).
    QuantRule(r"^(.*)/(forward|backward)/input$", share_input_scale_group=1, required=False),
    QuantRule(r".*"),
)



def check_rules(rules: Sequence[QuantRule]) -> tuple[QuantRule, ...]:
    """Validates a rule list (non-empty, all :class:`QuantRule`)."""
    if isinstance(rules, QuantRule):
        rules = (rules,)
    rules = tuple(rules)
    if not rules:
        raise ValueError("no quantization rules given")
    for r in rules:
        if not isinstance(r, QuantRule):
            raise TypeError(f"rules must be QuantRule objects, got {type(r).__name__}")
    return rules


def with_format(rules: Sequence[QuantRule], format: str) -> tuple[QuantRule, ...]:
    """``rules`` with every quantizing rule in ``format`` (``"int"`` or ``"fp8"``; exclusions unchanged).

    Raises ``ValueError`` naming the rule when one cannot be in that format (to FP8: an entropy calibrator, an
    asymmetric or a low-bit rule)."""
    return tuple(r if not (r.weights or r.inputs) else dataclasses.replace(r, format=format)
                 for r in check_rules(rules))


FP8_RULES: tuple[QuantRule, ...] = with_format(DEFAULT_RULES, "fp8")


# ---------------------------------------------------------------------------------------------------------
# Targets: one intercepted module call and how its rule quantizes it


@dataclasses.dataclass(frozen=True)
class Target:
    """An intercepted module call selected by a rule.

    Attributes:
      path: the module path as a tuple of names.
      kind: key of :data:`MODULE_TYPES`.
      method: the intercepted method (``"__call__"`` or ``"attend"``).
      rule_index, rule: the deciding rule.
      input_index: position of the activation among the operands ``promote_dtype`` receives (``None``: no
        float activation, e.g. ``Embed`` lookups).
      weight_index: position of the weight among those operands.
      weight_axes: per-channel axes of the weight (``None``: per-tensor).
      owner: path of the module whose "quant" variables hold the input scale (``path`` unless shared).
    """

    path: tuple[str, ...]
    kind: str
    method: str
    rule_index: int
    rule: QuantRule
    input_index: int | None
    weight_index: int
    weight_axes: tuple[int, ...] | None
    owner: tuple[str, ...]

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def shared(self) -> bool:
        return self.owner != self.path

    @property
    def quantize_input(self) -> bool:
        return self.rule.inputs and self.input_index is not None

    @property
    def quantize_weight(self) -> bool:
        return self.rule.weights

    @property
    def active(self) -> bool:
        return self.quantize_input or self.quantize_weight

    @property
    def scale_name(self) -> str:
        return "shared_input_scale" if self.shared else "input_scale"

    @property
    def zero_point_name(self) -> str:
        return "shared_input_zero_point" if self.shared else "input_zero_point"


def module_kind(module: nn.Module) -> str | None:
    """The :data:`MODULE_TYPES` key of ``module``'s class, or ``None``."""
    for kind, cls in MODULE_TYPES.items():
        if isinstance(module, cls):
            return kind
    return None


def _einsum_weight_axes(module: nn.Einsum, args, kwargs) -> tuple[int, ...]:
    spec = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
    spec = (spec or "").replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        raise ValueError(f"Einsum {module_path(module)}: cannot read its equation {spec!r}")
    operands, out = spec.split("->")
    lhs, rhs = operands.split(",")
    if "." in rhs:
        raise ValueError(f"Einsum {module_path(module)}: per-channel quantization of a kernel with '...' in "
                         f"{spec!r} is not supported; set per_channel=False in its rule")
    return tuple(i for i, c in enumerate(rhs) if c in out and c not in lhs)


def _weight_axes(kind: str, method: str, module: nn.Module, args, kwargs) -> tuple[int, ...]:
    if kind in ("Dense", "Conv"):
        return (-1,)
    if kind == "DenseGeneral":
        features = module.features if isinstance(module.features, tuple) else (module.features,)
        return tuple(range(-len(features), 0))
    if kind == "Einsum":
        return _einsum_weight_axes(module, args, kwargs)
    return (0,)  # Embed: rows


def _owner(rule: QuantRule, match: re.Match, path: tuple[str, ...]) -> tuple[str, ...]:
    group = rule.share_input_scale_group
    if group is None:
        return path
    name = "/".join(path)
    if match.group(group) is None:
        raise ValueError(f"{name}: share_input_scale_group {group!r} of rule {rule.module_path!r} did not "
                         "participate in the match")
    prefix = name[:match.end(group)]
    for k in range(1, len(path)):
        if "/".join(path[:k]) == prefix:
            return path[:k]
    raise ValueError(f"{name}: share_input_scale_group {group!r} of rule {rule.module_path!r} ends at "
                     f"{prefix!r}, which is not the path of an ancestor module")


def resolve(module: nn.Module, method: str, args, kwargs, rules: Sequence[QuantRule]) -> Target | None:
    """The :class:`Target` of this module call under ``rules`` (``None``: not a quantizable call/no rule)."""
    kind = module_kind(module)
    if kind is None or method not in _METHODS.get(kind, ("__call__",)):
        return None
    path = tuple(str(p) for p in module.path)
    name = "/".join(path)
    for i, rule in enumerate(rules):
        if kind not in rule.module_types:
            continue
        match = re.search(rule.module_path, name)
        if match is None:
            continue
        if kind == "Embed":
            input_index, weight_index = (None, 0) if method == "__call__" else (0, 1)
        else:
            input_index, weight_index = 0, 1
        axes = _weight_axes(kind, method, module, args, kwargs) if rule.per_channel else None
        return Target(path, kind, method, i, rule, input_index, weight_index, axes, _owner(rule, match, path))
    return None


class Tracker:
    """Records the targets met while tracing (in call order) to check rules and name modules in errors."""

    def __init__(self):
        self.targets: dict[tuple[tuple[str, ...], str], Target] = {}

    def add(self, target: Target) -> None:
        self.targets.setdefault((target.path, target.method), target)

    def check(self, rules: Sequence[QuantRule], what: str) -> None:
        """Raises if a required rule matched nothing, or if nothing at all is quantized."""
        used = {t.rule_index for t in self.targets.values()}
        unused = [r.describe(i) for i, r in enumerate(rules) if r.required and i not in used]
        if unused:
            raise ValueError(f"{what}: {'; '.join(unused)} matched no module (or only modules claimed by an "
                             "earlier rule). Check the regex against the module paths, or set required=False.")
        if not any(t.active for t in self.targets.values()):
            raise ValueError(f"{what}: the rules select no module to quantize")
        owners: dict[tuple[str, ...], Target] = {}
        for t in self.targets.values():
            if not t.quantize_input:
                continue
            first = owners.setdefault((t.owner, t.scale_name), t)
            if (first.rule.bits, first.rule.symmetric, first.rule.format, first.rule.get_calibrator()) != (
                    t.rule.bits, t.rule.symmetric, t.rule.format, t.rule.get_calibrator()):
                raise ValueError(f"{what}: {first.name} and {t.name} share an input scale at "
                                 f"{'/'.join(t.owner)!r} but their rules quantize differently")


# ---------------------------------------------------------------------------------------------------------
# Interception


class OperandHook:
    """Stands in for a module's ``promote_dtype`` during one call: ``fn(promote, args, dtype, inexact)``."""

    def __init__(self, promote: Callable, fn: Callable):
        self.promote = promote
        self.fn = fn

    def __call__(self, *args, dtype=None, inexact=True):
        return self.fn(self.promote, args, dtype, inexact)


def promoted(fn: Callable[[list], list]) -> Callable:
    """An :class:`OperandHook` function that promotes as the module would, then maps the operand list."""

    def hook(promote, args, dtype, inexact):
        return fn(list(promote(*args, dtype=dtype, inexact=inexact)))

    return hook


@contextlib.contextmanager
def swapped_attributes(module: nn.Module, **attributes):
    """Sets attributes of a bound Flax module for the duration of one call, then restores them.

    Flax modules are frozen dataclasses; the bound instance is private to the running ``apply``, and the
    attributes swapped here (``promote_dtype``, ``dot_general``) are read only inside the call.
    """
    old = {k: getattr(module, k) for k in attributes}
    for k, v in attributes.items():
        object.__setattr__(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            object.__setattr__(module, k, v)


OnTarget = Callable[[Target, nn.Module, Callable, tuple, dict], Any]


def quant_interceptor(rules: Sequence[QuantRule], on_target: OnTarget, tracker: Tracker | None = None):
    """A ``nn.intercept_methods`` interceptor calling ``on_target(target, module, next_fun, args, kwargs)``
    for every active target of ``rules`` (other calls run unchanged).

    Raises if a module is already being quantized by another quantization interceptor (two quantization
    transforms stacked would quantize twice).
    """
    rules = check_rules(rules)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        target = resolve(module, context.method_name, args, kwargs, rules)
        if target is None:
            return next_fun(*args, **kwargs)
        if isinstance(module.promote_dtype, OperandHook):
            raise ValueError(  # noqa: TRY004 (a usage error, not a wrong argument type)
                f"module {target.name} is quantized twice: two quantization transforms are stacked "
                "(fake_quant/calibration/int8 wrap the model once)")
        if tracker is not None:
            tracker.add(target)
        if not target.active:
            return next_fun(*args, **kwargs)
        return on_target(target, module, next_fun, args, kwargs)

    return interceptor


def hooked_call(module: nn.Module, next_fun, args, kwargs, hook: Callable, **more_attributes):
    """Runs the intercepted call with ``promote_dtype`` replaced by ``OperandHook(promote_dtype, hook)``."""
    with swapped_attributes(module, promote_dtype=OperandHook(module.promote_dtype, hook), **more_attributes):
        return next_fun(*args, **kwargs)


def trace_targets(apply_fn: Callable, variables: Mapping, *args, rules: Sequence[QuantRule] = DEFAULT_RULES,
                  what: str = "quantization", **kwargs) -> list[Target]:
    """The targets of ``rules`` in ``apply_fn(variables, *args, **kwargs)``, in call order.

    Traces abstractly (``jax.eval_shape``: nothing runs) and checks the rules (see :meth:`Tracker.check`).
    """
    rules = check_rules(rules)
    tracker = Tracker()

    def record(target, module, next_fun, a, kw):
        return next_fun(*a, **kw)

    def traced(v):
        with nn.intercept_methods(quant_interceptor(rules, record, tracker)):
            return apply_fn(v, *args, **kwargs)

    jax.eval_shape(traced, variables)
    tracker.check(rules, what)
    return list(tracker.targets.values())


# ---------------------------------------------------------------------------------------------------------
# Scale variables


def scale_owner(module: nn.Module, target: Target) -> nn.Module:
    """The bound module holding ``target``'s input scale (``module`` itself, or the sharing ancestor)."""
    m = module
    while isinstance(m, nn.Module):
        if tuple(str(p) for p in m.path) == target.owner:
            return m
        m = m.parent
    raise ValueError(f"{target.name}: no ancestor module at {'/'.join(target.owner)!r} to hold the shared "
                     "input scale")


def read_input_qparams(module: nn.Module, target: Target):
    """(scale, zero_point or None) of ``target``'s input from the "quant" collection; clear error if missing."""
    owner = scale_owner(module, target)
    if not owner.has_variable(QUANT, target.scale_name):
        raise ValueError(f"module {target.name}: no activation scale in the {QUANT!r} collection "
                         f"(expected {QUANT}/{'/'.join(target.owner)}/{target.scale_name}); calibrate the model "
                         "first (quantization.calibrate, or fake_quant(...).init)")
    scale = owner.get_variable(QUANT, target.scale_name)
    zero_point = None
    if not target.rule.symmetric:
        if not owner.has_variable(QUANT, target.zero_point_name):
            raise ValueError(f"module {target.name}: asymmetric rule but no {target.zero_point_name} in the "
                             f"{QUANT!r} collection")
        zero_point = owner.get_variable(QUANT, target.zero_point_name)
    return scale, zero_point


def check_scales(quant: Mapping, what: str) -> None:
    """Raises ``ValueError`` naming the variable if a scale in a "quant" tree is not finite or below
    :data:`~compression.quantization.qarray.MIN_SCALE` (e.g. learned scales an optimizer pushed to zero; see
    :func:`compression.quantization.qat.project_scales`), or if a zero point is not finite."""
    if not isinstance(quant, Mapping):
        raise TypeError(f"{what}: the {QUANT!r} collection must be a dict, got {type(quant).__name__}")
    for key, value in traverse_util.flatten_dict(dict(quant)).items():
        a = np.asarray(jax.device_get(value), np.float64)
        name = f"{QUANT}/{'/'.join(map(str, key))}"
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{what}: {name} is not finite ({a.ravel()[~np.isfinite(a.ravel())][:3]})")
        if "scale" in str(key[-1]) and np.any(a < MIN_SCALE * (1 - 1e-6)):
            raise ValueError(f"{what}: {name} has a scale below {MIN_SCALE:g} (min {a.min():g}); a zero or "
                             "negative scale cannot quantize. Recalibrate, or floor learned scales with "
                             "quantization.project_scales")


def find_input_qparams(quant: Mapping, path: str | Sequence[str]):
    """The activation (scale, zero_point or None) of the module at ``path`` in a "quant" tree, or ``None``.

    Looks for the module's own ``input_scale``, else the nearest ancestor's ``shared_input_scale`` (as the
    interceptors store them). ``path``: slash-joined or a tuple of names.
    """
    parts = tuple(path.split("/")) if isinstance(path, str) else tuple(path)

    def node(p):
        n = quant
        for k in p:
            if not isinstance(n, Mapping) or k not in n:
                return None
            n = n[k]
        return n if isinstance(n, Mapping) else None

    own = node(parts)
    if own is not None and "input_scale" in own:
        return own["input_scale"], own.get("input_zero_point")
    for k in range(len(parts) - 1, 0, -1):
        anc = node(parts[:k])
        if anc is not None and "shared_input_scale" in anc:
            return anc["shared_input_scale"], anc.get("shared_input_zero_point")
    return None
