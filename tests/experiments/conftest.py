"""Shared fixtures: tiny synthetic teachers (sentiment, NER) built once per test process, reused by the stage tests.

The fixtures import the job machinery when they run, not when this file loads: on an environment without some
of its dependencies (a GPU image without ml_collections, ``make test-gpu``) only the tests that use them fail to
set up (and tests/skip_missing_modules.py reports those as skipped), not every test under tests/experiments.
"""

import jax
import jax.numpy as jnp
import pytest


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """``DIR/model`` of a 2-layer, 2-head, hidden-32 Transformer fine-tuned 48 steps on the synthetic task."""
    from experiments.jobs import registry
    from tests.experiments.tiny import tiny_config

    workdir = tmp_path_factory.mktemp("tiny_teacher")
    registry.run(tiny_config(num_train_steps=48), str(workdir))
    return str(workdir / "model")


@pytest.fixture(scope="session")
def tiny_ner_teacher_dir(tmp_path_factory):
    """``DIR/model`` of a 2-layer, 2-head, hidden-32 Transformer with a token head over a word-level tokenizer
    of the synthetic NER words, saved with the metadata fine-tuning writes (task, kind, label names).

    Randomly initialised, not trained: the distillation tests need a token teacher, not a good one, and
    fine-tuning one would add about 20 s of compilation to the suite.
    """
    import tokenizers
    from tokenizers import models as tok_models
    from tokenizers import pre_tokenizers

    import models
    from experiments.data import load_task
    from models.transformer import Transformer, TransformerConfig

    out = tmp_path_factory.mktemp("tiny_ner_teacher")
    task = load_task("synthetic_ner", word_vocab="build", synthetic_size=256)
    words = ("[PAD]", "[UNK]", "[CLS]", "[SEP]") + task.word_vocab.units[2:]
    tok = tokenizers.Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    cfg = TransformerConfig(vocab_size=len(words), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                            max_position_embeddings=32, head="token", num_labels=task.num_labels)
    params = jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    models.save(out / "model", "transformer", cfg, params, tokenizer_dir=out,
                extra={"task": task.name, "kind": task.kind, "label_names": list(task.label_names), "max_length": 32})
    return str(out / "model")
