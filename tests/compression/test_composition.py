"""Composition in one step: distillation + L0 gates + fake-quant QAT + a bfloat16 policy, chained as transforms
in one jitted train step, equal to the same step assembled from the pieces by hand.

The chained step uses ``chain(l0_gates, fake_quant, policy("bfloat16"))`` and the library's KD loss and
Lagrangian. The hand-built step never touches the gate transform or the policy: it computes the gate values
from the hard-concrete formula itself and multiplies them in through plain site masks, casts the parameters
to bfloat16 itself, and writes the KD loss (KL x T^2) and the Lagrangian term from their formulas. Both run the
same fake-quantized model with the same calibrated scales.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from compression import precision
from compression import quantization as q
from compression.distillation import losses
from compression.pruning import l0, site_masks
from compression.transform import chain
from models.transformer import Transformer, TransformerConfig

T, TARGET, LR = 2.0, 0.5, 0.1
LAMBDAS = (jnp.float32(0.7), jnp.float32(1.3))


def _setup():
    cfg = TransformerConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                            max_position_embeddings=16, num_labels=3, hidden_dropout_rate=0.0,
                            attention_dropout_rate=0.0)
    model = Transformer(cfg)
    k_init, k_ids, k_teacher, k_gates = jax.random.split(jax.random.key(0), 4)
    ids = jax.random.randint(k_ids, (4, 10), 1, cfg.vocab_size)
    mask = jnp.ones_like(ids).at[:, 7:].set(0)
    params = model.init(k_init, ids)["params"]
    teacher_logits = 3.0 * jax.random.normal(k_teacher, (4, cfg.num_labels))
    transform = chain(l0.l0_gates("heads|ffn", drop_init=0.3), q.fake_quant(), precision.policy("bfloat16"))
    variables = transform.init(k_gates, {"params": params}, model.apply, ids, attention_mask=mask)
    # Spread the gates over the open interval of the hard-concrete clip, so every gate takes gradient from
    # both the task loss and the Lagrangian.
    leaves, treedef = jax.tree.flatten(variables[l0.GATES])
    spread = [jnp.linspace(-1.5, 1.5, x.size, dtype=jnp.float32).reshape(x.shape) for x in leaves]
    variables = {**variables, l0.GATES: jax.tree.unflatten(treedef, spread)}
    return model, transform, variables, ids, mask, teacher_logits


def _sgd(tree, grads):
    return jax.tree.map(lambda p, g: p - LR * g, tree, grads)


def test_composed_step_equals_the_pieces_by_hand():
    model, transform, variables, ids, mask, teacher_logits = _setup()
    quant = variables[q.QUANT]
    apply = transform.wrap(model.apply)

    @jax.jit
    def composed_step(params, gates):
        def loss_fn(params, gates):
            logits = apply({"params": params, l0.GATES: gates, q.QUANT: quant}, ids, attention_mask=mask).logits
            kd = losses.kd_loss(logits, teacher_logits, T, t_squared=True)
            return kd + l0.lagrangian_penalty(l0.expected_sparsity(gates), TARGET, *LAMBDAS)

        loss, (g_params, g_gates) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, gates)
        return loss, _sgd(params, g_params), _sgd(gates, g_gates)

    masked_quantized = q.fake_quant().wrap(site_masks.site_masks("heads|ffn").wrap(model.apply))
    log_sparsity_shift = (2.0 / 3.0) * math.log(0.1 / 1.1)  # beta * log(-gamma / zeta)

    @jax.jit
    def by_hand_step(params, gates):
        def loss_fn(params, gates):
            # gate values at evaluation (no gate noise): clip(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)
            z = jax.tree.map(lambda a: jnp.clip(jax.nn.sigmoid(a) * 1.2 - 0.1, 0.0, 1.0), gates)
            masks = jax.tree.map(lambda node: {"mask": node["log_alpha"]}, z,
                                 is_leaf=lambda n: isinstance(n, dict) and "log_alpha" in n)
            bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
            logits = masked_quantized({"params": bf16, "masks": masks, q.QUANT: quant}, ids,
                                      attention_mask=mask).logits.astype(jnp.float32)
            log_p_t = jax.nn.log_softmax(teacher_logits / T)
            log_p_s = jax.nn.log_softmax(logits / T)
            kd = T * T * jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1))
            leaves = jax.tree.leaves(gates)
            open_expected = sum(jnp.sum(jax.nn.sigmoid(a - log_sparsity_shift)) for a in leaves)
            gap = 1.0 - open_expected / sum(a.size for a in leaves) - TARGET
            return kd + LAMBDAS[0] * gap + LAMBDAS[1] * gap * gap

        loss, (g_params, g_gates) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, gates)
        return loss, _sgd(params, g_params), _sgd(gates, g_gates)

    params, gates = variables["params"], variables[l0.GATES]
    loss_c, params_c, gates_c = composed_step(params, gates)
    loss_h, params_h, gates_h = by_hand_step(params, gates)
    assert float(loss_c) > 0.1  # a real loss, not a degenerate zero
    np.testing.assert_allclose(loss_c, loss_h, rtol=1e-5)
    for a, b, before in zip(jax.tree.leaves(params_c), jax.tree.leaves(params_h), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(gates_c), jax.tree.leaves(gates))]
    assert all(moved)  # the step reached every gate site through fake quantization and bfloat16
    for a, b in zip(jax.tree.leaves(gates_c), jax.tree.leaves(gates_h)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
