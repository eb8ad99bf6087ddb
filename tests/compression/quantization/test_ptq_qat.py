"""The library entry points for accuracy scripts: PTQ from training-format batches, int8 conversion, scale
validation, and the QAT loss hook inside experiments/runtime/trainer.py's train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import quantization as q
from experiments.runtime import trainer
from models.transformer import Transformer, TransformerConfig
from tests.multidevice import run_with_devices

CFG = TransformerConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                        max_position_embeddings=12, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _batch(seed, b=4, s=8):
    """A batch as experiments.data yields it (model inputs plus labels and example weights)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((b, s), np.int32)
    mask[0, 5:] = 0  # one padded row
    return {"input_ids": rng.integers(1, CFG.vocab_size, (b, s)).astype(np.int32) * mask,
            "attention_mask": mask, "token_type_ids": np.zeros((b, s), np.int32),
            "labels": rng.integers(0, 2, b).astype(np.int32), "example_weight": np.ones(b, np.float32)}


@pytest.fixture(scope="module")
def setup():
    """The model, its params, calibration batches, and PTQ variables of three calibrators (one collection)."""
    model = Transformer(CFG)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    batches = [_batch(i) for i in range(3)]
    variants = q.post_training_variants(model.apply, params, batches, ("max", "percentile:99.99", "entropy"),
                                        inputs=INPUTS)
    return model, params, batches, variants


_hidden = jax.jit(lambda model, params, ids, mask: model.apply({"params": params}, ids, attention_mask=mask,
                                                               output_hidden_states=True).hidden_states[0],
                  static_argnums=0)


def _embedding_amax(model, params, batches):
    """max |embedding output| over the batches: the input of layer 0's query/key/value (independent of quant)."""
    return max(float(jnp.abs(_hidden(model, params, b["input_ids"], b["attention_mask"])).max()) for b in batches)


def test_ptq_from_training_batches(setup):
    model, params, batches, variants = setup
    variables = variants["max"]
    assert set(variables) == {"params", "quant"} and variables["params"] is params
    shared = variables["quant"]["encoder"]["layer_0"]["attention"]["shared_input_scale"]
    np.testing.assert_allclose(shared, _embedding_amax(model, params, batches) / 127, rtol=1e-5)
    clipped = variants["entropy"]["quant"]["encoder"]["layer_0"]["intermediate"]["input_scale"]
    assert 0 < float(clipped) <= float(variables["quant"]["encoder"]["layer_0"]["intermediate"]["input_scale"])


def test_int8_variables_from_a_training_batch(setup):
    model, params, batches, variants = setup
    variables = variants["percentile:99.99"]
    v8 = q.int8_variables(model.apply, variables, batches[0], inputs=INPUTS)
    w = params["encoder"]["layer_0"]["intermediate"]["kernel"]
    kernel = v8["params"]["encoder"]["layer_0"]["intermediate"]["kernel"]
    assert kernel.dtype == jnp.int8
    expected = np.clip(np.round(np.asarray(w) / (np.abs(np.asarray(w)).max(0) / 127)), -127, 127)  # per column
    np.testing.assert_array_equal(kernel, expected)
    assert v8["quant"]["encoder"]["layer_0"]["intermediate"]["input_scale"] == \
        variables["quant"]["encoder"]["layer_0"]["intermediate"]["input_scale"]


def test_ptq_bad_input(setup):
    model, params, batches, _ = setup
    with pytest.raises(ValueError, match="unknown calibrator 'kl'"):
        q.post_training_quantize(model.apply, params, batches, "kl", inputs=INPUTS)
    with pytest.raises(ValueError, match="none of the inputs"):
        q.post_training_quantize(model.apply, params, [{"labels": np.zeros(2)}], "max", inputs=INPUTS)
    with pytest.raises(ValueError, match="zero calibration batches"):
        q.post_training_quantize(model.apply, params, [], "max", inputs=INPUTS)
    with pytest.raises(ValueError, match="already"):
        q.post_training_quantize(model.apply, {"params": params, "quant": {}}, batches, "max", inputs=INPUTS)


def test_zero_or_infinite_scales_are_refused_and_projected(setup):
    model, params, batches, variants = setup
    variables = variants["max"]
    quant = jax.tree.map(lambda s: s, variables["quant"])
    quant["encoder"]["layer_0"]["intermediate"]["input_scale"] = jnp.float32(-0.5)  # e.g. a learned scale
    with pytest.raises(ValueError, match="quant/encoder/layer_0/intermediate/input_scale has a scale below"):
        q.int8_variables(model.apply, {**variables, "quant": quant}, batches[0], inputs=INPUTS)
    projected = q.project_scales(quant)
    assert float(projected["encoder"]["layer_0"]["intermediate"]["input_scale"]) == pytest.approx(q.MIN_SCALE)
    q.check_scales(projected, "test")
    quant["encoder"]["layer_0"]["intermediate"]["input_scale"] = jnp.float32(np.inf)
    with pytest.raises(ValueError, match="intermediate/input_scale is not finite"):
        q.check_scales(quant, "test")


def test_qat_loss_in_a_two_device_train_step():
    """EMA scales through experiments/runtime/trainer.py under pmap on two devices: each device observes its own half of
    the batch; the updated scales come back as the state's extras, averaged over the devices (the replicas stay
    equal), and the parameters take a step through the straight-through gradients."""
    out = run_with_devices("""
import jax, jax.numpy as jnp, numpy as np, optax
from compression import quantization as q
from experiments.runtime import trainer
from experiments.runtime.parallel import DataParallel
from models.transformer import Transformer
from tests.compression.quantization.test_ptq_qat import CFG, INPUTS, _batch
model = Transformer(CFG)
params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
quant = q.post_training_quantize(model.apply, params, [_batch(0)], "max", inputs=INPUTS)["quant"]
batch = _batch(5, b=8)
decay = 0.5
loss_fn = q.qat_loss(trainer.classification_loss, model.apply, scales="ema", ema_decay=decay)
par = DataParallel("pmap")
assert par.num_devices == 2
tx = optax.sgd(0.1)
step = par.compile(trainer.make_train_step(loss_fn, tx, steps_per_epoch=10))
state = par.replicate(trainer.TrainState.create(params, tx, jax.random.key(0), extras={"quant": quant}))
state, metrics = step(state, par.shard_batch(batch))
shared = np.asarray(state.extras["quant"]["encoder"]["layer_0"]["attention"]["shared_input_scale"])
assert shared.shape == (2,) and shared[0] == shared[1], shared  # replicas agree
emb = jax.jit(lambda ids, m: model.apply({"params": params}, ids, attention_mask=m,
                                         output_hidden_states=True).hidden_states[0])
observed = [float(jnp.abs(emb(batch["input_ids"][r], batch["attention_mask"][r])).max()) / 127
            for r in (slice(0, 4), slice(4, 8))]
old = float(quant["encoder"]["layer_0"]["attention"]["shared_input_scale"])
expected = decay * old + (1 - decay) * np.mean(observed)
np.testing.assert_allclose(shared[0], expected, rtol=1e-5)
assert abs(observed[0] - observed[1]) > 1e-3 * observed[0]  # the two devices did see different ranges
host = par.unreplicate(state)
moved = float(jnp.abs(host.params["encoder"]["layer_0"]["intermediate"]["kernel"]
                      - params["encoder"]["layer_0"]["intermediate"]["kernel"]).max())
assert moved > 0 and np.isfinite(float(par.unreplicate(metrics)["loss"]))
print("ok", shared[0], old)
""", n=2)
    assert out.startswith("ok")


def test_qat_loss_fixed_scales_and_distillation(setup):
    """Fixed scales: the hook's loss is that of the fake-quantized model computed by hand, for a distillation
    loss around the student; bad uses are named."""
    model, params, batches, variants = setup
    quant = variants["percentile:99.99"]["quant"]
    batch = _batch(6)
    fq = q.fake_quant().wrap(model.apply)
    teacher = jax.random.normal(jax.random.key(1), (4, CFG.num_labels)) * 3.0  # a teacher's logits

    def kd(student_logits):
        return jnp.mean(jnp.sum(jax.nn.softmax(teacher) * (jax.nn.log_softmax(teacher)
                                                           - jax.nn.log_softmax(student_logits)), -1))

    def kd_loss(apply_fn):  # a distillation loss around the (quantized) student's apply
        def loss_fn(p, b, rng, extras):
            student = apply_fn({"params": p, **extras}, b["input_ids"], attention_mask=b["attention_mask"]).logits
            return kd(student), trainer.LossAux(weight=jnp.float32(b["labels"].shape[0]))
        return loss_fn

    def by_hand(p):
        return kd(fq({"params": p, "quant": quant}, batch["input_ids"], attention_mask=batch["attention_mask"]).logits)

    loss_fn = q.qat_loss(kd_loss, model.apply, scales="fixed")
    loss, aux = jax.jit(lambda p: loss_fn(p, batch, jax.random.key(0), {"quant": quant}))(params)
    want = jax.jit(by_hand)(params)  # same function, so the same (straight-through) gradients too
    assert float(loss) == pytest.approx(float(want), rel=1e-6) and float(loss) > 0
    assert aux.extras is None  # fixed scales: the trainer keeps its extras
    with pytest.raises(ValueError, match="extras must hold the calibrated 'quant'"):
        loss_fn(params, batch, jax.random.key(0), {})
    with pytest.raises(ValueError, match="learned"):
        q.qat_loss(kd_loss, model.apply, scales="learned")
