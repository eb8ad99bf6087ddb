"""Data parallelism: 8 forced CPU devices give the update of 1 device; pmap and shard_map agree.

One subprocess (XLA_FLAGS must be set before JAX starts) runs every comparison and prints the maximum
absolute parameter differences as JSON.
"""

import json

import pytest

from tests.multidevice import run_with_devices

SCRIPT = r"""
import json, types
import jax, jax.numpy as jnp, numpy as np, optax
from experiments.runtime import trainer
from experiments.runtime.parallel import DataParallel
from models.transformer import Transformer, TransformerConfig

assert jax.device_count() == 8
rng = np.random.default_rng(0)
B, S = 32, 16

def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

def run(loss_fn, params, tx, batch, mode, devices, steps=2):
    par = DataParallel(mode, devices)
    step = par.compile(trainer.make_train_step(loss_fn, tx, steps_per_epoch=100), donate_state=True)
    state = par.replicate(trainer.TrainState.create(params, tx, jax.random.key(0)))
    for _ in range(steps):
        state, metrics = step(state, par.shard_batch(batch))
    return par.unreplicate(state).params, {k: float(v) for k, v in par.unreplicate(metrics).items()}

# 1) A tiny Transformer sequence classifier, global batch 32 of ragged lengths.
cfg = TransformerConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        max_position_embeddings=S, hidden_dropout_rate=0.0, attention_dropout_rate=0.0, num_labels=3)
model = Transformer(cfg)
lengths = rng.integers(3, S + 1, B)
mask = (np.arange(S)[None] < lengths[:, None]).astype(np.int32)
batch = {"input_ids": (rng.integers(1, 50, (B, S)) * mask).astype(np.int32), "attention_mask": mask,
         "token_type_ids": np.zeros((B, S), np.int32), "labels": rng.integers(0, 3, B).astype(np.int32),
         "example_weight": np.ones(B, np.float32)}
params = model.init(jax.random.key(1), batch["input_ids"][:1])["params"]
tx = trainer.make_optimizer(params, schedule=optax.constant_schedule(1e-3), weight_decay=0.01,
                            no_decay_regex=r"(^|/)(bias|scale)$", grad_clip_norm=1.0, eps=1e-6)
loss_fn = trainer.classification_loss(model.apply)
one, m1 = run(loss_fn, params, tx, batch, "pmap", jax.devices()[:1])
p8, m8 = run(loss_fn, params, tx, batch, "pmap", None)
s8, ms = run(loss_fn, params, tx, batch, "shard_map", None)
out = {"seq_1_vs_8": max_diff(one, p8), "seq_pmap_vs_shard_map": max_diff(p8, s8),
       "seq_moved": max_diff(one, params), "seq_loss": [m1["loss"], m8["loss"], ms["loss"]]}

# 2) Token classification with very uneven valid-token counts per device: the weighted combination
#    must give the global token mean (a plain pmean of per-device means would not).
table = {"table": jnp.asarray(rng.normal(size=(50, 4)), jnp.float32)}
apply = lambda v, ids, **kw: types.SimpleNamespace(logits=v["params"]["table"][ids])
labels = rng.integers(0, 4, (B, S)).astype(np.int32)
labels[4:] = np.where(rng.random((B - 4, S)) < 0.1, labels[4:], -100)  # rows 0-3 (device 0) dense
tok_batch = dict(batch, labels=labels)
tok_loss = trainer.classification_loss(apply)
sgd = optax.sgd(0.5)
one, m1 = run(tok_loss, table, sgd, tok_batch, "pmap", jax.devices()[:1], steps=1)
p8, m8 = run(tok_loss, table, sgd, tok_batch, "pmap", None, steps=1)
s8, _ = run(tok_loss, table, sgd, tok_batch, "shard_map", None, steps=1)
# Independent reference: gradient of the global token-mean cross entropy, computed directly.
def global_mean(p):
    logits = p["table"][tok_batch["input_ids"]]
    valid = labels != -100
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, np.where(valid, labels, 0))
    return jnp.sum(ce * valid) / valid.sum()
ref = jax.tree.map(lambda p, g: p - 0.5 * g, table, jax.grad(global_mean)(table))
out.update(tok_1_vs_8=max_diff(one, p8), tok_pmap_vs_shard_map=max_diff(p8, s8), tok_vs_reference=max_diff(p8, ref),
           tok_loss=[m1["loss"], m8["loss"], float(global_mean(table))])
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def result():
    out = run_with_devices(SCRIPT, n=8)
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_eight_devices_give_the_one_device_update(result):
    assert result["seq_moved"] > 1e-4  # the step really changed the parameters
    assert result["seq_1_vs_8"] <= 1e-5
    assert result["seq_loss"][0] == pytest.approx(result["seq_loss"][1], abs=1e-6)


def test_pmap_and_shard_map_agree(result):
    assert result["seq_pmap_vs_shard_map"] <= 1e-6
    assert result["tok_pmap_vs_shard_map"] <= 1e-6
    assert result["seq_loss"][1] == pytest.approx(result["seq_loss"][2], abs=1e-6)


def test_uneven_token_counts_are_weighted_to_the_global_mean(result):
    assert result["tok_1_vs_8"] <= 1e-5
    assert result["tok_vs_reference"] <= 1e-5
    assert result["tok_loss"][0] == pytest.approx(result["tok_loss"][2], rel=1e-5)
    assert result["tok_loss"][1] == pytest.approx(result["tok_loss"][2], rel=1e-5)


def test_different_software_on_two_processes_is_named():
    from experiments.runtime import parallel
    same = ["python 3.11.9, jax 0.10.2, jaxlib 0.10.2, nlpress abc1234"] * 2
    assert parallel.version_mismatch(same) is None
    message = parallel.version_mismatch([same[0], same[0].replace("jax 0.10.2", "jax 0.11.0")])
    assert "different software" in message and "process 1: python 3.11.9, jax 0.11.0" in message
    assert parallel.software_versions().startswith("python ") and " jax " in f" {parallel.software_versions()}"


VERSION_WORKER = """
import sys
from experiments.runtime import parallel
port, pid = sys.argv[1], int(sys.argv[2])
parallel.initialize_distributed(f"127.0.0.1:{port}", 2, pid, "gloo")
if pid == 1:  # this worker was installed with another JAX
    parallel.software_versions = lambda: "python 3.11.9, jax 9.9.9, jaxlib 9.9.9, nlpress abc1234"
try:
    parallel.check_same_versions()
except RuntimeError as e:
    print(e)
    sys.exit(3)
"""


def test_two_processes_with_different_jax_stop_naming_both():
    """Two real processes joined by jax.distributed: both stop before any work, each naming both versions."""
    import subprocess
    import sys

    from launch.local_multiprocess import free_port
    from tests.multidevice import REPO, device_env

    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", VERSION_WORKER, str(port), str(i)], cwd=REPO,
                              env=device_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 3, err[-2000:]
        assert "different software" in out and "process 1: python 3.11.9, jax 9.9.9" in out
        assert "process 0: python" in out and "process 0: python 3.11.9, jax 9.9.9" not in out
