"""Argument checks shared by the command-line tools and benchmarks (absl flags).

Every entry point defines its flags in ``define_flags(fv)`` (called only when it runs as a script, so that
importing it defines nothing) and registers a validator per flag with the helpers here: absl runs them when
it parses the command line, so a bad argument stops the run with ``flag --name=value: why`` before any data
or model is loaded. ``main(argv, fv=flags.FLAGS)`` then reads ``fv``; :func:`parse` gives tests and notebooks
a fresh :class:`absl.flags.FlagValues` to pass instead of the global one. Path flags may be local paths or
object-store URLs (``gs://``, :mod:`models.storage`): the checks here read both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from absl import app, flags

import models
from models import storage


def run_script(define: Callable[[flags.FlagValues], None], run: Callable[[flags.FlagValues], object]) -> None:
    """The ``__main__`` block of a tool: its flags defined and parsed (checks included) by absl, then
    ``run(FLAGS)``; positional arguments are a usage error (no tool takes any)."""
    define(flags.FLAGS)

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        run(flags.FLAGS)

    app.run(main)


def parse(define: Callable[[flags.FlagValues], None], argv: list[str]) -> flags.FlagValues:
    """Flags defined by ``define`` parsed from ``argv`` (without the program name) into a new FlagValues;
    raises :class:`absl.flags.Error` (naming the flag) as the command line would fail."""
    fv = flags.FlagValues()
    define(fv)
    fv(["prog", *argv])
    return fv


def check(fv: flags.FlagValues, name: str, ok: Callable[[object], bool], message: str) -> None:
    """Registers ``ok(value)`` as the validator of flag ``name``; an unset (None) flag passes."""
    flags.register_validator(name, lambda v: v is None or bool(ok(v)), message, flag_values=fv)


def model_dir_error(path: str, families: Iterable[str] | None = None) -> str | None:
    """Why ``path`` is not a model directory (of one of ``families``), or None; reads only its config.json."""
    try:
        family = models.read_meta(path)["family"]
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    if families is not None and family not in families:
        return f"{path} holds a {family!r} model; this tool reads {', '.join(families)}"
    return None


def model_dir(fv: flags.FlagValues, name: str, families: Iterable[str] | None = None) -> None:
    """Flag ``name`` must be a model directory written by ``models.save`` (of one of ``families``)."""
    families = None if families is None else tuple(families)
    flags.register_validator(name, lambda v: v is None or model_dir_error(v, families) is None,
                             "is not a model directory (config.json and params.safetensors, models.save)"
                             + ("" if families is None else f" of family {', '.join(families)}"), flag_values=fv)


def directory(fv: flags.FlagValues, name: str) -> None:
    """Flag ``name`` must be an existing directory (local, or a prefix holding objects in a bucket)."""
    check(fv, name, storage.is_dir, "is not a directory")


def file(fv: flags.FlagValues, name: str) -> None:
    """Flag ``name`` must be an existing file."""
    check(fv, name, storage.is_file, "is not a file")


def subset(fv: flags.FlagValues, name: str, known: Iterable[str], *, nonempty: bool = True) -> None:
    """List flag ``name`` (``DEFINE_list``) must name only ``known`` values (and at least one)."""
    known = tuple(known)
    check(fv, name, lambda v: set(v) <= set(known) and (v or not nonempty),
          f"must be a comma-separated {'non-empty ' if nonempty else ''}subset of {','.join(known)}")


def integers(fv: flags.FlagValues, name: str, minimum: int = 0) -> None:
    """List flag ``name`` must be comma-separated integers >= ``minimum``, at least one."""

    def ok(values):
        try:
            return bool(values) and min(int(x) for x in values) >= minimum
        except ValueError:
            return False

    check(fv, name, ok, f"must be comma-separated integers >= {minimum}")


def task(fv: flags.FlagValues, name: str) -> None:
    """Flag ``name`` must be a task name ``experiments.data.load_task`` knows (a fixed name or a generic form)."""
    from experiments.data import known_task_names

    known = known_task_names()
    generic = tuple(k.split("[")[0].split(":")[0].split("/")[0] for k in known if not k.isidentifier())
    check(fv, name, lambda v: v in known or v.split(":")[0].split("/")[0] in generic,
          f"is not a task name; known: {', '.join(known)}")


def calibrator(fv: flags.FlagValues, name: str) -> None:
    """Flag ``name`` (a string, or a list of them) must name known calibrators."""
    from compression.quantization.calibrators import get_calibrator

    def ok(value):
        try:
            for spec in [value] if isinstance(value, str) else value:
                get_calibrator(spec)
        except ValueError:
            return False
        return isinstance(value, str) or bool(value)

    check(fv, name, ok, "must name calibrators: max, percentile[:P], mse, entropy")


def new_output(fv: flags.FlagValues, name: str, overwrite: str = "overwrite") -> None:
    """Flag ``name`` must not exist unless flag ``overwrite`` is set."""
    flags.register_multi_flags_validator(
        [name, overwrite], lambda d: d[name] is None or d[overwrite] or not storage.exists(d[name]),
        f"--{name} exists; pass --{overwrite} to replace it", flag_values=fv)
