"""Which teacher layer each student layer learns from.

A layer map is a plain ``dict[int, int]`` from student to teacher layer, in *hidden-state indices*: 0 is the
embedding output and i >= 1 the output of layer i, the indexing of ``TransformerOutput.hidden_states``
(L + 1 entries). Layer i's attention scores are ``attention_scores[i - 1]``; index 0 has none.

* :func:`uniform` -- student layer m learns from teacher layer ``floor(m * L_T / L_S)``: every k-th layer
  when k = L_T / L_S is an integer, the top onto the top (DistilBERT's every-other-layer student, TinyBERT's
  ``g(m) = k * m``, with the embeddings 0 -> 0 when asked);
* :func:`skip` -- PKD-skip: the student's intermediate layers 1 .. L_S - 1 learn from every k-th teacher
  layer (12 -> 6: {2, 4, 6, 8, 10}); the top layer is left to the output loss;
* :func:`last` -- PKD-last: the intermediate layers learn from the last L_S - 1 teacher layers below the
  top (12 -> 6: {7, 8, 9, 10, 11}; 12 -> 3: {10, 11});
* :func:`custom` -- a user-given map, validated.

Every map is validated against both depths: an index past the teacher's (or student's) depth is an error
naming it, before anything is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

LayerMap = dict[int, int]


def _check_depths(n_student: int, n_teacher: int, what: str) -> None:
    for name, n in (("n_student", n_student), ("n_teacher", n_teacher)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{what}: {name} must be an int >= 1, got {n!r}")
    if n_student > n_teacher:
        raise ValueError(f"{what}: the student ({n_student} layers) is deeper than the teacher "
                         f"({n_teacher} layers); give a custom map")


def validate(layer_map: Mapping[int, int], n_student: int, n_teacher: int) -> LayerMap:
    """Checks a map against the depths; returns it as a dict sorted by student layer.

    Raises ValueError naming the first student index outside 0..n_student or teacher index outside
    0..n_teacher (0 = embeddings), or a non-integer index.
    """
    for name, n in (("n_student", n_student), ("n_teacher", n_teacher)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"layer map: {name} must be an int >= 1, got {n!r}")
    if not isinstance(layer_map, Mapping):
        raise TypeError(f"layer map must be a mapping student layer -> teacher layer, got "
                        f"{type(layer_map).__name__}")
    out = {}
    for s, t in layer_map.items():
        for role, i in (("student", s), ("teacher", t)):
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"layer map {s!r} -> {t!r}: {role} layer must be an int, got {type(i).__name__}")
        if not 0 <= s <= n_student:
            raise ValueError(f"layer map {s} -> {t}: student layer {s} is outside the student's depth "
                             f"{n_student} (valid 0..{n_student}, 0 = embeddings)")
        if not 0 <= t <= n_teacher:
            raise ValueError(f"layer map {s} -> {t}: teacher layer {t} is past the teacher's depth "
                             f"{n_teacher} (valid 0..{n_teacher}, 0 = embeddings)")
        out[s] = t
    return dict(sorted(out.items()))


def uniform(n_student: int, n_teacher: int, *, include_embeddings: bool = False) -> LayerMap:
    """Student layer m (1..n_student) -> teacher layer floor(m * n_teacher / n_student); 0 -> 0 if asked."""
    _check_depths(n_student, n_teacher, "uniform layer map")
    out = {0: 0} if include_embeddings else {}
    out.update({m: m * n_teacher // n_student for m in range(1, n_student + 1)})
    return out


def skip(n_student: int, n_teacher: int, *, include_embeddings: bool = False) -> LayerMap:
    """PKD-skip: intermediate student layers m = 1..n_student-1 -> teacher layer floor(m * n_teacher / n_student)."""
    _check_depths(n_student, n_teacher, "skip layer map")
    out = {0: 0} if include_embeddings else {}
    out.update({m: m * n_teacher // n_student for m in range(1, n_student)})
    return out


def last(n_student: int, n_teacher: int, *, include_embeddings: bool = False) -> LayerMap:
    """PKD-last: intermediate student layers m = 1..n_student-1 -> teacher layer n_teacher - n_student + m."""
    _check_depths(n_student, n_teacher, "last layer map")
    out = {0: 0} if include_embeddings else {}
    out.update({m: n_teacher - n_student + m for m in range(1, n_student)})
    return out


def custom(layer_map: Mapping[int, int], n_student: int, n_teacher: int) -> LayerMap:
    """A user-given map, validated (see :func:`validate`)."""
    return validate(layer_map, n_student, n_teacher)


_KINDS: dict[str, Callable[..., LayerMap]] = {"uniform": uniform, "skip": skip, "last": last}
KINDS = tuple(_KINDS)


def build(kind: str, n_student: int, n_teacher: int, *, include_embeddings: bool = False) -> LayerMap:
    """The named map (``"uniform"``, ``"skip"``, ``"last"``) for these depths."""
    if kind not in _KINDS:
        raise ValueError(f"unknown layer map kind {kind!r}; known: {', '.join(KINDS)}")
    return _KINDS[kind](n_student, n_teacher, include_embeddings=include_embeddings)
