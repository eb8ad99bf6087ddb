"""pmap of the Transformer over 8 forced CPU devices, float32 and bfloat16 (in a subprocess)."""

from tests.multidevice import run_with_devices


def test_pmap_matches_single_device():
    run_with_devices("""
import jax, jax.numpy as jnp, numpy as np
from models.transformer import Transformer, TransformerConfig
assert jax.local_device_count() == 8
for dtype in (None, "bfloat16"):
    cfg = TransformerConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
                            max_position_embeddings=12, dtype=dtype)
    model = Transformer(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 50, size=(8, 2, 6)), jnp.int32)
    params = model.init(jax.random.key(0), ids[0])["params"]
    def loss(p, x):
        return jax.lax.pmean(model.apply({"params": p}, x).logits.astype(jnp.float32).sum(), "batch")
    reps = jax.tree.map(
        lambda a: jnp.broadcast_to(a, (8, *a.shape)), params)
    vals, grads = jax.pmap(jax.value_and_grad(loss), axis_name="batch")(reps, ids)
    ref_vals = [model.apply({"params": params}, ids[i]).logits.astype(jnp.float32).sum() for i in range(8)]
    tol = 1e-4 if dtype is None else 0.1
    np.testing.assert_allclose(vals[0], np.mean(ref_vals), rtol=tol, atol=tol)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
print("ok")
""")
