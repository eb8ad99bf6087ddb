"""Distillation losses: hand-computed values per normalisation, masking, gradients, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression.distillation import losses as L
from compression.distillation.projections import Projection, init_projection

LN3 = math.log(3.0)
# Two rows whose softened distributions are worked out by hand:
#   row 0: student [0, 0] -> p_S = (1/2, 1/2); teacher [ln 3, 0] -> p_T = (3/4, 1/4)
#   row 1: student [ln 3, 0] -> p_S = (3/4, 1/4); teacher [0, 0] -> p_T = (1/2, 1/2)
STUDENT = np.array([[0.0, 0.0], [LN3, 0.0]])
TEACHER = np.array([[LN3, 0.0], [0.0, 0.0]])
KL_ROWS = (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5),
           0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
SOFT_CE_ROWS = (-(0.75 * math.log(0.5) + 0.25 * math.log(0.5)),
                -(0.5 * math.log(0.75) + 0.5 * math.log(0.25)))


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("kind, rows", [("kl", KL_ROWS), ("soft_ce", SOFT_CE_ROWS)])
@pytest.mark.parametrize("reduction, divisor", [("sum", 1), ("batchmean", 2), ("mean", 4)])
def test_kd_loss_hand_values(kind, rows, reduction, divisor):
    got = L.kd_loss(STUDENT, TEACHER, 1.0, kind=kind, t_squared=False, reduction=reduction)
    np.testing.assert_allclose(got, sum(rows) / divisor, rtol=1e-6)
    # T = 2 on doubled logits gives the same distributions; T^2 multiplies by 4 only when asked.
    plain = L.kd_loss(2 * STUDENT, 2 * TEACHER, 2.0, kind=kind, t_squared=False, reduction=reduction)
    squared = L.kd_loss(2 * STUDENT, 2 * TEACHER, 2.0, kind=kind, t_squared=True, reduction=reduction)
    np.testing.assert_allclose(plain, sum(rows) / divisor, rtol=1e-6)
    np.testing.assert_allclose(squared, 4 * sum(rows) / divisor, rtol=1e-6)


def test_kl_and_soft_ce_differ_by_teacher_entropy_and_share_gradients():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    p_t = np.exp(_np_log_softmax(t / 3.0))
    entropy = -(p_t * np.log(p_t)).sum() / 3
    kl = L.kd_loss(s, t, 3.0, kind="kl", t_squared=False)
    ce = L.kd_loss(s, t, 3.0, kind="soft_ce", t_squared=False)
    np.testing.assert_allclose(ce - kl, entropy, rtol=1e-5)
    g_kl = jax.grad(lambda x: L.kd_loss(x, t, 3.0, kind="kl", t_squared=False))(jnp.asarray(s, jnp.float32))
    g_ce = jax.grad(lambda x: L.kd_loss(x, t, 3.0, kind="soft_ce", t_squared=False))(jnp.asarray(s, jnp.float32))
    np.testing.assert_allclose(g_kl, g_ce, atol=1e-6)


def test_kd_loss_mask_excludes_padding_rows_and_tokens():
    padded_s = np.concatenate([STUDENT, [[50.0, -50.0]]])
    padded_t = np.concatenate([TEACHER, [[-7.0, 9.0]]])
    got = L.kd_loss(padded_s, padded_t, 1.0, kind="kl", t_squared=False, mask=np.array([1, 1, 0]))
    np.testing.assert_allclose(got, sum(KL_ROWS) / 2, rtol=1e-6)
    # Token level [B, S, C]: the two rows as tokens of one sentence, then a padded token.
    tok_s, tok_t = padded_s[None], padded_t[None]
    mask = np.array([[1, 1, 0]])
    for reduction, divisor in (("batchmean", 2), ("mean", 4), ("sum", 1)):
        got = L.kd_loss(tok_s, tok_t, 1.0, kind="kl", t_squared=False, reduction=reduction, mask=mask)
        np.testing.assert_allclose(got, sum(KL_ROWS) / divisor, rtol=1e-6)
    changed = tok_s.copy()
    changed[0, 2] = [-1e3, 1e3]
    np.testing.assert_allclose(L.kd_loss(changed, tok_t, 1.0, kind="kl", t_squared=False, mask=mask),
                               L.kd_loss(tok_s, tok_t, 1.0, kind="kl", t_squared=False, mask=mask), rtol=1e-7)


def test_kd_loss_token_level_matches_numpy_selection():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 4, 3)) * 2, rng.normal(size=(2, 4, 3)) * 2
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    sel = mask.astype(bool)
    ls, lt = _np_log_softmax(s[sel] / 1.5), _np_log_softmax(t[sel] / 1.5)
    kl_rows = (np.exp(lt) * (lt - ls)).sum(-1)  # 5 selected tokens, as DistilBERT's masked_select
    got = L.kd_loss(s, t, 1.5, kind="kl", t_squared=True, reduction="batchmean", mask=mask)
    np.testing.assert_allclose(got, kl_rows.mean() * 1.5 ** 2, rtol=1e-5)


def test_logit_mse_hand_values():
    s, t = np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [1.0, 3.0]])
    # squared errors 1, 4 | 1, 9
    np.testing.assert_allclose(L.logit_mse(s, t, reduction="sum"), 15.0)
    np.testing.assert_allclose(L.logit_mse(s, t, reduction="batchmean"), 7.5)
    np.testing.assert_allclose(L.logit_mse(s, t, reduction="mean"), 3.75)
    np.testing.assert_allclose(L.logit_mse(s, t, mask=np.array([1, 0]), reduction="mean"), 2.5)


def test_cross_entropy_hand_values_and_ignore_index():
    logits = np.array([[0.0, 0.0], [LN3, 0.0], [5.0, -5.0]])
    labels = np.array([0, 1, -100])  # ln 2; -ln(1/4) = ln 4; ignored
    np.testing.assert_allclose(L.cross_entropy(logits, labels), (math.log(2) + math.log(4)) / 2, rtol=1e-6)
    np.testing.assert_allclose(L.cross_entropy(logits, labels, reduction="sum"), math.log(8), rtol=1e-6)
    np.testing.assert_allclose(L.cross_entropy(logits, np.array([0, 1, 0]), mask=np.array([1, 0, 0])),
                               math.log(2), rtol=1e-6)


def test_combined_weights():
    np.testing.assert_allclose(L.combined(2.0, 10.0, 0.25), 0.25 * 2 + 0.75 * 10)
    with pytest.raises(ValueError, match="alpha must be in"):
        L.combined(1.0, 1.0, 1.5)


def test_hidden_cosine_hand_value_and_mask():
    s = np.array([[[1.0, 0.0], [0.0, 2.0], [9.0, -4.0]]])
    t = np.array([[[1.0, 1.0], [0.0, 5.0], [1.0, 7.0]]])
    mask = np.array([[1, 1, 0]])
    # token 0: cos = 1/sqrt(2); token 1: cos = 1; token 2 is padding.
    expected = ((1 - 1 / math.sqrt(2)) + 0.0) / 2
    np.testing.assert_allclose(L.hidden_cosine(s, t, mask), expected, rtol=1e-6)
    np.testing.assert_allclose(L.hidden_cosine(s, t, mask, reduction="sum"), 2 * expected, rtol=1e-6)
    s2 = s.copy()
    s2[0, 2] = [-3.0, 0.5]
    np.testing.assert_allclose(L.hidden_cosine(s2, t, mask), expected, rtol=1e-6)


def test_hidden_mse_reductions_hand_values():
    s = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    t = np.zeros((1, 2, 2))
    mask = np.array([[1, 0]])  # counted squares: 1 + 4 = 5 over one token of width 2 (4 entries in all)
    expect = {"sum": 5.0, "batchmean": 5.0, "mean": 2.5, "mean_all": 1.25}
    for reduction, value in expect.items():
        np.testing.assert_allclose(L.hidden_mse(s, t, mask=mask, reduction=reduction), value)
    np.testing.assert_allclose(L.hidden_mse(s, t), (1 + 4 + 9 + 16) / 4)


def test_hidden_mse_with_projection_dict_and_module():
    s = np.array([[[1.0, 2.0]], [[0.0, -1.0]]])  # [B=2, S=1, H_S=2]
    kernel = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # [2, 3]
    bias = np.array([0.5, 0.0, 0.0])
    t = np.array([[[1.5, 2.0, 0.0]], [[0.5, 0.0, 1.0]]])
    # projected: [1.5, 2, 0] (exact) and [0.5, -1, 1] (error 1 on one entry) -> sum 1, mean 1/6.
    np.testing.assert_allclose(L.hidden_mse(s, t, {"kernel": kernel, "bias": bias}), 1 / 6, rtol=1e-6)
    params = init_projection(jax.random.key(0), 2, 3)
    assert params["kernel"].shape == (2, 3) and params["bias"].shape == (3,)
    via_module = Projection(3).apply({"params": params}, jnp.asarray(s, jnp.float32))
    np.testing.assert_allclose(L.hidden_mse(s, t, params), np.mean((np.asarray(via_module) - t) ** 2), rtol=1e-6)
    np.testing.assert_allclose(L.hidden_mse(s, t, lambda h: h @ kernel + bias), 1 / 6, rtol=1e-6)
    with pytest.raises(ValueError, match="student width 2 != teacher width 3.*projection"):
        L.hidden_mse(s, t)
    with pytest.raises(ValueError, match=r"kernel shape \(3, 3\)"):
        L.hidden_mse(s, t, {"kernel": np.zeros((3, 3))})


def _tinybert_reference(s_scores, t_scores, mask):
    """TinyBERT's procedure: the additive mask is inside its scores; entries <= -100 are zeroed; MSELoss()."""
    add = np.where(mask[:, None, None, :] > 0, 0.0, -10000.0)
    s, t = s_scores + add, t_scores + add
    s, t = np.where(s <= -1e2, 0.0, s), np.where(t <= -1e2, 0.0, t)
    return np.mean((s - t) ** 2)


def test_attention_score_mse_hand_value():
    s = np.zeros((1, 1, 2, 2))
    t = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    mask = np.array([[1, 0]])
    # Only (q=0, k=0) counts: error 1. mean: 1/1; mean_all: 1/4; without query masking (0,0) and (1,0): 1 + 9.
    np.testing.assert_allclose(L.attention_score_mse(s, t, mask, reduction="mean"), 1.0)
    np.testing.assert_allclose(L.attention_score_mse(s, t, mask, reduction="mean_all"), 0.25)
    np.testing.assert_allclose(L.attention_score_mse(s, t, mask, reduction="sum"), 1.0)
    np.testing.assert_allclose(L.attention_score_mse(s, t, mask, reduction="mean_all", mask_queries=False), 2.5)
    np.testing.assert_allclose(L.attention_score_mse(s, t, reduction="mean"), 30 / 4)


def test_attention_score_mse_matches_tinybert_and_ignores_padding():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    got = L.attention_score_mse(s, t, mask, reduction="mean_all", mask_queries=False)
    np.testing.assert_allclose(got, _tinybert_reference(s, t, mask), rtol=1e-5)
    # TextBrewer's masked mean: N * sum_b len_b^2 counted entries.
    pair = mask[:, None, :, None] * mask[:, None, None, :]
    expected_mean = ((s - t) ** 2 * pair).sum() / (3 * (16 + 4))
    np.testing.assert_allclose(L.attention_score_mse(s, t, mask, reduction="mean"), expected_mean, rtol=1e-5)
    # Padded rows and columns of either side do not matter.
    s2, t2 = s.copy(), t.copy()
    s2[1, :, 2:, :] = 1e3
    t2[1, :, :, 3] = -1e3
    for reduction in ("mean", "mean_all", "sum"):
        np.testing.assert_allclose(L.attention_score_mse(s2, t2, mask, reduction=reduction),
                                   L.attention_score_mse(s, t, mask, reduction=reduction), rtol=1e-6)


def test_attention_score_mse_head_average():
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(1, 2, 3, 3)), rng.normal(size=(1, 4, 3, 3))
    expected = np.mean((s.mean(1) - t.mean(1)) ** 2)
    np.testing.assert_allclose(L.attention_score_mse(s, t, heads="average"), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="student has 2 heads and the teacher 4.*heads='average'"):
        L.attention_score_mse(s, t)


def test_pkd_loss_hand_values():
    s = np.array([[[3.0, 4.0]]])  # [B=1, L=1, H=2]: normalised (0.6, 0.8)
    t = np.array([[[2.0, 0.0]]])  # normalised (1, 0); squared distance 0.16 + 0.64 = 0.8
    np.testing.assert_allclose(L.pkd_loss(s, t, reduction="batchmean"), 0.8, rtol=1e-6)
    np.testing.assert_allclose(L.pkd_loss(s, t, reduction="mean"), 0.4, rtol=1e-6)
    np.testing.assert_allclose(L.pkd_loss([s[:, 0]], [t[:, 0]], reduction="mean"), 0.4, rtol=1e-6)
    np.testing.assert_allclose(L.pkd_loss(s, t, reduction="batchmean", normalize=False), 1 + 16, rtol=1e-6)


def test_pkd_loss_matches_pkd_code_convention_and_masks_rows():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(3, 2, 5)), rng.normal(size=(3, 2, 5))
    ns = s / np.linalg.norm(s, axis=2, keepdims=True)
    nt = t / np.linalg.norm(t, axis=2, keepdims=True)
    np.testing.assert_allclose(L.pkd_loss(s, t), np.mean((ns - nt) ** 2), rtol=1e-5)  # F.mse_loss
    paper = ((ns - nt) ** 2).sum((1, 2)).mean()  # sum over layers and units, mean over the batch
    np.testing.assert_allclose(L.pkd_loss(s, t, reduction="batchmean"), paper, rtol=1e-5)
    s2 = s.copy()
    s2[2] = 100.0
    mask = np.array([1, 1, 0])
    np.testing.assert_allclose(L.pkd_loss(s2, t, mask), np.mean((ns - nt)[:2] ** 2), rtol=1e-5)


def _teacher_grad_cases():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 3, 4))
    states = rng.normal(size=(2, 3, 6))
    scores = rng.normal(size=(2, 2, 3, 3))
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    return [
        ("kd", lambda s, t: L.kd_loss(s, t, 2.0, kind="kl", t_squared=True, mask=mask), logits),
        ("soft_ce", lambda s, t: L.kd_loss(s, t, 2.0, kind="soft_ce", t_squared=False, mask=mask), logits),
        ("logit_mse", lambda s, t: L.logit_mse(s, t, mask), logits),
        ("hidden_mse", lambda s, t: L.hidden_mse(s, t, mask=mask), states),
        ("hidden_cosine", lambda s, t: L.hidden_cosine(s, t, mask), states),
        ("attention", lambda s, t: L.attention_score_mse(s, t, mask), scores),
        ("pkd", lambda s, t: L.pkd_loss(s, t), states),
    ]


@pytest.mark.parametrize("name, fn, x", _teacher_grad_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_gradients_flow_only_into_the_student(name, fn, x):
    s = jnp.asarray(x, jnp.float32)
    t = jnp.asarray(x[::-1] + 0.5, jnp.float32)
    g_student, g_teacher = jax.jit(jax.grad(fn, argnums=(0, 1)))(s, t)
    assert float(jnp.abs(g_student).sum()) > 0, name
    np.testing.assert_array_equal(g_teacher, 0.0)


def test_losses_jit_with_traced_temperature():
    f = jax.jit(lambda s, t, temp: L.kd_loss(s, t, temp, kind="kl", t_squared=True))
    np.testing.assert_allclose(f(2 * STUDENT, 2 * TEACHER, 2.0), 4 * sum(KL_ROWS) / 2, rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        L.kd_loss(STUDENT, TEACHER, 0.0, t_squared=True)
    with pytest.raises(ValueError, match="temperature must be > 0, got -1.0"):
        L.kd_loss(STUDENT, TEACHER, -1.0, t_squared=True)
    with pytest.raises(TypeError):
        L.kd_loss(STUDENT, TEACHER, 1.0)  # t_squared must be said
    with pytest.raises(ValueError, match=r"label sets differ: student logits have 2 classes .* teacher logits 3"):
        L.kd_loss(STUDENT, np.zeros((2, 3)), 1.0, t_squared=False)
    with pytest.raises(ValueError, match=r"label sets differ"):
        L.logit_mse(STUDENT, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"student shape \(2, 2\) != teacher shape \(3, 2\)"):
        L.kd_loss(STUDENT, np.zeros((3, 2)), 1.0, t_squared=False)
    with pytest.raises(ValueError, match=r"mask shape \(3,\) does not match the row axes \(2,\)"):
        L.kd_loss(STUDENT, TEACHER, 1.0, t_squared=False, mask=np.ones(3))
    with pytest.raises(ValueError, match="unknown reduction 'mean_all'"):
        L.kd_loss(STUDENT, TEACHER, 1.0, t_squared=False, reduction="mean_all")
    with pytest.raises(ValueError, match="unknown kind 'js'"):
        L.kd_loss(STUDENT, TEACHER, 1.0, kind="js", t_squared=False)
    with pytest.raises(ValueError, match=r"labels outside \[0, 2\)"):
        L.cross_entropy(STUDENT, np.array([0, 2]))
    with pytest.raises(ValueError, match=r"labels shape \(3,\) must equal"):
        L.cross_entropy(STUDENT, np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"student shape \(1, 2, 3\) != teacher shape \(1, 3, 3\)"):
        L.hidden_mse(np.zeros((1, 2, 3)), np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="must be \\[B, N, S, S\\]"):
        L.attention_score_mse(np.zeros((1, 2, 3)), np.zeros((1, 2, 3)))
