"""experiments.tools.report: the generated timing batch fits every model family (the CNN-LSTM's character width is
the model's own)."""

import jax
import pytest

import models
from experiments.tools import report
from experiments.runtime import trainer
from models.bilstm import BiLSTMConfig
from models.cnn_lstm import CNNLSTMConfig
from models.transformer import TransformerConfig

TINY = {
    "transformer": TransformerConfig(vocab_size=40, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                                     max_position_embeddings=16, num_labels=2),
    "bilstm": BiLSTMConfig(vocab_size=40, embed_dim=8, hidden_size=4, mlp_hidden=8, num_labels=2, pair=True),
    "cnn_lstm": CNNLSTMConfig(vocab_size=40, char_vocab_size=20, word_embed_dim=8, char_embed_dim=4, char_filters=4,
                              max_chars_per_token=7, hidden_size=4, num_labels=5),
}


@pytest.mark.parametrize("family", sorted(TINY))
def test_sample_batch_runs_through_the_model(family):
    cfg = TINY[family]
    batch = report._sample_batch(family, cfg, 3, 10)
    if family == "cnn_lstm":
        assert batch["char_ids"].shape == (3, 10, 7)
    model = models.model_class(family)(cfg)
    variables = jax.jit(model.init)(jax.random.key(0), *[batch[k] for k in batch])
    out = trainer.model_outputs(model.apply, variables["params"], {}, batch, train=False)
    assert out.logits.shape[0] == 3 and out.logits.shape[-1] == cfg.num_labels


def test_a_run_reports_the_metric_of_the_model_it_saved(tmp_path):
    """L0 exports its last step, compacted: the report takes the saved model's own metrics (0.85 here), not the
    run's best evaluation of the gated model (0.90)."""
    import json
    cfg = TINY["transformer"]
    model = models.model_class("transformer")(cfg)
    params = jax.jit(model.init)(jax.random.key(0), **report._sample_batch("transformer", cfg, 1, 4))["params"]
    models.save(tmp_path / "run" / "model", "transformer", cfg, params, extra={"eval": {"accuracy": 0.85}})
    (tmp_path / "run" / "results.json").write_text(json.dumps(
        {"metric_names": ["accuracy"], "best": {"accuracy": 0.90}, "final": {"accuracy": 0.86}}))
    [entry] = report.collect([str(tmp_path / "run")])
    assert (entry.metric_name, entry.metric) == ("accuracy", 0.85)
