"""The Transform type: a small pure pair (init, wrap) that composes like optax transformations.

A research script composes compression this way::

    variables = model.init(key, batch)
    t = chain(precision.policy("bf16"), quantization.fake_quant(rules), pruning.l0_gates("heads|ffn"))
    variables = t.init(key, variables, model.apply, batch)   # adds the transforms' own collections
    apply = t.wrap(model.apply)                              # same signature as model.apply

``init`` may run the (wrapped) apply function once on sample inputs to discover the shapes at the sites
it acts on; whatever state a transform keeps lives in its own variable collection (``"gates"``,
``"quant"``, ...), so it checkpoints, pmaps and exports with the parameters.

Most transforms act by interception: :func:`intercepting` turns a Flax method interceptor into a Transform.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

Variables = Any
ApplyFn = Callable[..., Any]
InitFn = Callable[..., Variables]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A compression transform.

    Attributes:
      name: short name used in error messages and reports.
      init: ``init(key, variables, apply_fn, *args, **kwargs) -> variables``: returns ``variables`` with the
        transform's collections added. ``apply_fn`` and the sample ``args``/``kwargs`` let it trace the model.
      wrap: ``wrap(apply_fn) -> apply_fn`` with the transform in effect; same signature as ``model.apply``.
    """

    name: str
    init: InitFn
    wrap: Callable[[ApplyFn], ApplyFn]


def _identity_init(key, variables, apply_fn, *args, **kwargs):
    del key, apply_fn, args, kwargs
    return variables


def identity() -> Transform:
    """The transform that does nothing (the neutral element of :func:`chain`)."""
    return Transform("identity", _identity_init, lambda f: f)


def chain(*transforms: Transform) -> Transform:
    """Composes transforms left to right: the first is innermost (closest to the model).

    ``init`` of the chain runs each transform's ``init`` with the apply function already wrapped by the
    transforms before it, so a later transform sees the model as the earlier ones left it.
    """
    for t in transforms:
        if not isinstance(t, Transform):
            raise TypeError(f"chain() takes Transform objects, got {type(t).__name__}")

    def init(key, variables, apply_fn, *args, **kwargs):
        keys = jax.random.split(key, max(len(transforms), 1))
        fn = apply_fn
        for k, t in zip(keys, transforms):
            variables = t.init(k, variables, fn, *args, **kwargs)
            fn = t.wrap(fn)
        return variables

    def wrap(apply_fn):
        for t in transforms:
            apply_fn = t.wrap(apply_fn)
        return apply_fn

    return Transform("+".join(t.name for t in transforms) or "identity", init, wrap)


def module_path(module: nn.Module) -> str:
    """Slash-joined path of a bound module, e.g. ``"encoder/layer_0/attention/query"``."""
    return "/".join(str(p) for p in module.path)


def intercepting(
    name: str,
    interceptor: Callable[..., Any],
    collections: Sequence[str] = (),
    init_rngs: Sequence[str] = (),
) -> Transform:
    """A Transform from a ``flax.linen.intercept_methods`` interceptor.

    Args:
      name: the transform's name.
      interceptor: ``interceptor(next_fun, args, kwargs, context)`` as in ``nn.intercept_methods``. It may
        create variables in ``collections`` on the intercepted module (``context.module.variable(...)``).
      collections: variable collections the interceptor creates; ``init`` runs one forward pass with them
        mutable and adds them to the variables. A collection already present is an error (applying the
        same transform twice).
      init_rngs: extra RNG stream names the interceptor draws from during ``init``.
    """

    def wrap(apply_fn):
        def wrapped(variables, *args, **kwargs):
            with nn.intercept_methods(interceptor):
                return apply_fn(variables, *args, **kwargs)

        return wrapped

    def init(key, variables, apply_fn, *args, **kwargs):
        if not collections:
            return variables
        present = [c for c in collections if c in variables]
        if present:
            raise ValueError(f"transform {name!r}: collection(s) {present} already in the variables; "
                             "was the transform applied twice?")
        rng_names = ("params", "dropout", *init_rngs)
        keys = jax.random.split(key, len(rng_names))
        kwargs = dict(kwargs)
        kwargs.pop("mutable", None)
        kwargs["rngs"] = {**dict(zip(rng_names, keys)), **kwargs.get("rngs", {})}
        _, new = wrap(apply_fn)(variables, *args, mutable=list(collections), **kwargs)
        missing = [c for c in collections if c not in new]
        if missing:
            raise ValueError(f"transform {name!r} created no {missing} variables: no module matched "
                             "(check the rules / site names)")
        return {**variables, **{c: new[c] for c in collections}}

    return Transform(name, init, wrap)


def matches(patterns: str | Sequence[str] | None, path: str) -> bool:
    """True when ``path`` matches any regex in ``patterns`` (``re.search``); ``None`` matches everything."""
    if patterns is None:
        return True
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(re.search(p, path) for p in patterns)
