"""Shared fixtures: a tiny Transformer and id/mask batches (left padding and holes included)."""

import jax
import numpy as np
import onnxruntime as ort
import pytest

from models.transformer import Transformer, TransformerConfig

TINY = {"vocab_size": 30, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 24,
        "max_position_embeddings": 16}
CONSTRAINTS = ("sequence <= 16",)


def batch(b: int, s: int, seed: int = 0, vocab: int = 30) -> dict:
    """input_ids [b, s] int32 and an attention mask with right padding, left padding and a hole."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, s)).astype(np.int32)
    mask = np.ones((b, s), np.int32)
    if s > 2:
        mask[0, s - 2:] = 0
        if b > 1:
            mask[1, :1] = 0
        if b > 2:
            mask[2, s // 2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def make_model(**overrides):
    cfg = TransformerConfig(**{**TINY, **overrides})
    model = Transformer(cfg)
    variables = model.init(jax.random.key(0), batch(2, 5)["input_ids"])
    return model, variables


def ort_run(path: str, feeds: dict) -> list:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def jax_outputs(model, variables, feeds: dict) -> list:
    """The model's output leaves, computed by JAX (jit: op-by-op dispatch is slower than one compile)."""
    out = jax.jit(lambda v, kw: model.apply(v, **kw))(variables, feeds)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(out)]


@pytest.fixture
def tiny():
    return make_model()
