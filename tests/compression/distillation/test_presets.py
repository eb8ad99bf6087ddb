"""Presets: each reproduces its reference's convention (numpy re-statements of the reference formulas),
overrides and schedules, masking, teacher gradients, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression.distillation import PRESETS, distill_loss, get_preset, init_projection
from models.transformer import Transformer, TransformerConfig


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl_rows(s, t, temp):
    ls, lt = _log_softmax(s / temp), _log_softmax(t / temp)
    return np.exp(lt) * (lt - ls)  # per class


def _ce(logits, labels):
    return -_log_softmax(logits)[np.arange(len(labels)), labels].mean()


RNG = np.random.default_rng(0)
S_LOGITS, T_LOGITS = RNG.normal(size=(4, 3)) * 2, RNG.normal(size=(4, 3)) * 2
LABELS = np.array([0, 2, 1, 2])
BATCH = {"labels": LABELS}


def test_hinton_and_distilbert_kl_times_t_squared_batchmean():
    for name, temp, w_kd, w_ce in (("hinton", 4.0, 0.9, 0.1), ("distilbert", 2.0, 0.5, 0.5)):
        loss, aux = distill_loss(PRESETS[name], {"logits": S_LOGITS}, T_LOGITS, BATCH)
        kd = _kl_rows(S_LOGITS, T_LOGITS, temp).sum() / 4 * temp ** 2  # KLDivLoss(batchmean) * T^2
        np.testing.assert_allclose(aux["kd"], kd, rtol=1e-5)
        np.testing.assert_allclose(aux["ce"], _ce(S_LOGITS, LABELS), rtol=1e-5)
        np.testing.assert_allclose(loss, w_kd * kd + w_ce * _ce(S_LOGITS, LABELS), rtol=1e-5)


def test_pkd_kl_mean_over_elements_plus_patience():
    # Student 3 layers, teacher 6: PKD-skip maps student 1, 2 -> teacher 2, 4; PKD-last -> 4, 5.
    s_hs = [RNG.normal(size=(4, 2, 5)) for _ in range(4)]
    t_hs = [RNG.normal(size=(4, 2, 5)) for _ in range(7)]
    student = {"logits": S_LOGITS, "hidden_states": s_hs}
    teacher = {"logits": T_LOGITS, "hidden_states": t_hs}
    kd = 10.0 ** 2 * _kl_rows(S_LOGITS, T_LOGITS, 10.0).mean()  # KLDivLoss() 'mean' over B x C, x T^2

    def patience(layers_s, layers_t):
        ps = np.stack([s_hs[i][:, 0] for i in layers_s], 1)
        pt = np.stack([t_hs[i][:, 0] for i in layers_t], 1)
        ps, pt = ps / np.linalg.norm(ps, axis=2, keepdims=True), pt / np.linalg.norm(pt, axis=2, keepdims=True)
        return np.mean((ps - pt) ** 2)  # F.mse_loss over [B, L, H]

    for name, t_layers in (("pkd", [2, 4]), ("pkd_last", [4, 5])):
        loss, aux = distill_loss(PRESETS[name], student, teacher, BATCH)
        pt = patience([1, 2], t_layers)
        np.testing.assert_allclose(aux["kd"], kd, rtol=1e-5)
        np.testing.assert_allclose(aux["pkd"], pt, rtol=1e-5)
        np.testing.assert_allclose(loss, 0.5 * kd + 0.5 * _ce(S_LOGITS, LABELS) + 100 * pt, rtol=1e-5)


def test_tang_logit_mse_and_textbrewer_soft_ce():
    loss, aux = distill_loss(PRESETS["tang"], {"logits": S_LOGITS}, T_LOGITS, {})
    np.testing.assert_allclose(loss, ((S_LOGITS - T_LOGITS) ** 2).sum(-1).mean(), rtol=1e-5)
    assert set(aux) == {"kd"}
    loss, _ = distill_loss(PRESETS["textbrewer"], {"logits": S_LOGITS}, T_LOGITS, {})
    p_t = np.exp(_log_softmax(T_LOGITS / 4))
    np.testing.assert_allclose(loss, -(p_t * _log_softmax(S_LOGITS / 4)).sum(-1).mean(), rtol=1e-5)


def _tinybert_outputs(b=2, s=3, n_s=2, n_t=4, h_s=4, h_t=6, heads=2, seed=1):
    rng = np.random.default_rng(seed)
    student = {"logits": rng.normal(size=(b, 3)),
               "hidden_states": [rng.normal(size=(b, s, h_s)) for _ in range(n_s + 1)],
               "attention_scores": [rng.normal(size=(b, heads, s, s)) for _ in range(n_s)]}
    teacher = {"logits": rng.normal(size=(b, 3)),
               "hidden_states": [rng.normal(size=(b, s, h_t)) for _ in range(n_t + 1)],
               "attention_scores": [rng.normal(size=(b, heads, s, s)) for _ in range(n_t)]}
    return student, teacher


def test_tinybert_reproduces_task_distill_without_padding():
    student, teacher = _tinybert_outputs()
    proj = {"kernel": RNG.normal(size=(4, 6)), "bias": RNG.normal(size=6)}
    batch = {"attention_mask": np.ones((2, 3), np.int32)}
    loss, aux = distill_loss(PRESETS["tinybert"], student, teacher, batch, projections=proj)
    k = 2  # layers_per_block = 4 / 2
    # soft_cross_entropy: (-p_T * log p_S).mean() over B x C, T = 1
    cls = np.mean(-np.exp(_log_softmax(teacher["logits"])) * _log_softmax(student["logits"]))
    # attention: student layer i (0-based) vs teacher_atts[i * k + k - 1]
    att = sum(np.mean((student["attention_scores"][i] - teacher["attention_scores"][i * k + k - 1]) ** 2)
              for i in range(2))
    # hidden: student_reps[i] (projected by fit_dense) vs teacher_reps[i * k], embeddings included
    hs, ht = student["hidden_states"], teacher["hidden_states"]
    rep = sum(np.mean((hs[i] @ proj["kernel"] + proj["bias"] - ht[i * k]) ** 2) for i in range(3))
    np.testing.assert_allclose(aux["kd"], cls, rtol=1e-5)
    np.testing.assert_allclose(aux["attention"], att, rtol=1e-5)
    np.testing.assert_allclose(aux["hidden"], rep, rtol=1e-5)
    np.testing.assert_allclose(loss, cls + att + rep, rtol=1e-5)
    # The two-stage presets split the same terms.
    l1, aux1 = distill_loss(PRESETS["tinybert_intermediate"], student, teacher, batch, projections=proj)
    l2, aux2 = distill_loss(PRESETS["tinybert_prediction"], student, teacher, batch)
    assert set(aux1) == {"hidden", "attention"} and set(aux2) == {"kd"}
    np.testing.assert_allclose(l1 + l2, loss, rtol=1e-5)


def test_tinybert_padding_keeps_denominator_and_ignores_padded_values():
    student, teacher = _tinybert_outputs(seed=2)
    proj = init_projection(jax.random.key(0), 4, 6)
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    batch = {"attention_mask": mask}
    loss, aux = distill_loss(PRESETS["tinybert_intermediate"], student, teacher, batch, projections=proj)
    # mean_all: masked sum over the full B x S x H (hidden) and B x N x S x S (attention) counts.
    proj_np = {k: np.asarray(v) for k, v in proj.items()}
    hs, ht = student["hidden_states"], teacher["hidden_states"]
    rep = sum((((hs[i] @ proj_np["kernel"] + proj_np["bias"] - ht[2 * i]) ** 2) * mask[..., None]).sum() / (2 * 3 * 6)
              for i in range(3))
    pair = mask[:, None, :, None] * mask[:, None, None, :]
    att = sum((((student["attention_scores"][i] - teacher["attention_scores"][2 * i + 1]) ** 2) * pair).sum()
              / (2 * 2 * 3 * 3) for i in range(2))
    np.testing.assert_allclose(aux["hidden"], rep, rtol=1e-5)
    np.testing.assert_allclose(aux["attention"], att, rtol=1e-5)
    for out in (student, teacher):
        for h in out["hidden_states"]:
            h[1, 2] = 1e3
        for a in out["attention_scores"]:
            a[1, :, 2, :] = -1e3
            a[1, :, :, 2] = 1e3
    loss2, _ = distill_loss(PRESETS["tinybert_intermediate"], student, teacher, batch, projections=proj)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)


def test_distilbert_mlm_token_level_kl_cos_and_mlm_ce():
    rng = np.random.default_rng(3)
    b, s, v, h = 2, 4, 5, 3
    s_logits, t_logits = rng.normal(size=(b, s, v)), rng.normal(size=(b, s, v))
    s_last, t_last = rng.normal(size=(b, s, h)), rng.normal(size=(b, s, h))
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = np.array([[-100, 3, -100, -100], [1, -100, -100, -100]])
    student = {"logits": s_logits, "hidden_states": [s_last]}
    teacher = {"logits": t_logits, "hidden_states": [t_last]}
    loss, aux = distill_loss(PRESETS["distilbert_mlm"], student, teacher, {"labels": labels, "attention_mask": mask})
    sel = mask.astype(bool)
    kd = _kl_rows(s_logits[sel], t_logits[sel], 2.0).sum(-1).mean() * 4  # selected tokens, batchmean, T^2
    cos = 1 - (s_last[sel] * t_last[sel]).sum(-1) / (np.linalg.norm(s_last[sel], axis=-1)
                                                     * np.linalg.norm(t_last[sel], axis=-1))
    mlm = -(_log_softmax(s_logits[0, 1])[3] + _log_softmax(s_logits[1, 0])[1]) / 2
    np.testing.assert_allclose(aux["kd"], kd, rtol=1e-5)
    np.testing.assert_allclose(aux["cos"], cos.mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["ce"], mlm, rtol=1e-5)
    np.testing.assert_allclose(loss, 5 * kd + 2 * mlm + cos.mean(), rtol=1e-5)


def test_example_weight_drops_padding_rows():
    padded_s = np.concatenate([S_LOGITS, [[9.0, -9.0, 0.0]]])
    padded_t = np.concatenate([T_LOGITS, [[-3.0, 3.0, 1.0]]])
    batch = {"labels": np.concatenate([LABELS, [1]]), "example_weight": np.array([1, 1, 1, 1, 0.0])}
    for name in ("hinton", "distilbert", "pkd", "tang", "textbrewer", "tinybert_prediction"):
        preset = get_preset(name, pkd_weight=0.0)
        ref, _ = distill_loss(preset, {"logits": S_LOGITS}, T_LOGITS, BATCH)
        got, _ = distill_loss(preset, {"logits": padded_s}, padded_t, batch)
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=name)


def test_overrides_and_traced_schedules():
    preset = get_preset("distilbert", temperature=3.0)
    assert preset.temperature == 3.0 and PRESETS["distilbert"].temperature == 2.0
    kd_only, aux = distill_loss(preset, {"logits": S_LOGITS}, T_LOGITS, BATCH, weights={"ce": 0.0})
    assert set(aux) == {"kd"}
    np.testing.assert_allclose(kd_only, 0.5 * aux["kd"], rtol=1e-6)

    @jax.jit
    def step(temp, w_kd):
        return distill_loss(PRESETS["hinton"], {"logits": S_LOGITS}, T_LOGITS, BATCH, temperature=temp,
                            weights={"kd": w_kd, "ce": 1.0 - w_kd})[0]

    eager, _ = distill_loss(get_preset("hinton", temperature=3.0, kd_weight=0.7, ce_weight=0.3),
                            {"logits": S_LOGITS}, T_LOGITS, BATCH)
    np.testing.assert_allclose(step(3.0, 0.7), eager, rtol=1e-5)


def test_transformer_student_gets_gradients_teacher_gets_none():
    tiny = dict(vocab_size=40, max_position_embeddings=8, hidden_dropout_rate=0.0, attention_dropout_rate=0.0,
                num_heads=2, num_labels=3)
    t_cfg = TransformerConfig(hidden_size=8, num_layers=2, intermediate_size=16, **tiny)
    s_cfg = TransformerConfig(hidden_size=4, num_layers=1, intermediate_size=8, head_dim=4, **tiny)
    ids = jnp.asarray(np.random.default_rng(4).integers(1, 40, size=(2, 5)), jnp.int32)
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    t_params = jax.jit(Transformer(t_cfg).init)(jax.random.key(0), ids)["params"]
    s_params = jax.jit(Transformer(s_cfg).init)(jax.random.key(1), ids)["params"]
    proj = init_projection(jax.random.key(2), 4, 8)
    batch = {"labels": jnp.array([0, 2]), "attention_mask": mask}

    def loss_fn(s_p, t_p, proj_p):
        kw = dict(attention_mask=mask, output_hidden_states=True, output_attentions=True)
        s_out = Transformer(s_cfg).apply({"params": s_p}, ids, **kw)
        t_out = Transformer(t_cfg).apply({"params": t_p}, ids, **kw)
        return distill_loss(get_preset("tinybert", ce_weight=0.5), s_out, t_out, batch, projections=proj_p)

    (loss, aux), (g_s, g_t, g_p) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True))(
        s_params, t_params, proj)
    assert set(aux) == {"kd", "ce", "hidden", "attention"}
    assert np.isfinite(float(loss))
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in jax.tree.leaves(g_t))
    assert float(jnp.abs(g_p["kernel"]).sum()) > 0
    assert float(jnp.abs(g_s["embeddings"]["word_embeddings"]["embedding"]).sum()) > 0
    assert float(jnp.abs(g_s["encoder"]["layer_0"]["attention"]["query"]["kernel"]).sum()) > 0


def test_bad_inputs_raise_clear_errors():
    student, teacher = _tinybert_outputs()
    mask = {"attention_mask": np.ones((2, 3))}
    with pytest.raises(ValueError, match="unknown distillation preset 'bert'; known: hinton"):
        get_preset("bert")
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        get_preset("hinton", temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0, got -2"):
        distill_loss(PRESETS["hinton"], {"logits": S_LOGITS}, T_LOGITS, BATCH, temperature=-2.0)
    with pytest.raises(ValueError, match=r"unknown preset field\(s\) \['alpha'\]"):
        get_preset("pkd", alpha=0.3)
    with pytest.raises(ValueError, match="kd_weight must be a finite number >= 0"):
        get_preset("pkd", kd_weight=-1.0)
    with pytest.raises(ValueError, match="label sets differ: student logits have 3 classes .* teacher logits 2"):
        distill_loss(PRESETS["hinton"], {"logits": S_LOGITS}, T_LOGITS[:, :2], BATCH)
    with pytest.raises(ValueError, match=r"needs batch\['labels'\]"):
        distill_loss(PRESETS["distilbert"], {"logits": S_LOGITS}, T_LOGITS, {})
    with pytest.raises(ValueError, match="teacher output has no hidden_states; call the model with output_hidden"):
        distill_loss(PRESETS["tinybert"], student, teacher["logits"], mask)
    with pytest.raises(ValueError, match=r"teacher layer 5 is past the teacher's depth 4"):
        distill_loss(PRESETS["tinybert_intermediate"], student, teacher, mask, layer_map={1: 2, 2: 5},
                     projections={"kernel": np.zeros((4, 6))})
    with pytest.raises(ValueError, match="student width 4 != teacher width 6.*projection"):
        distill_loss(PRESETS["tinybert_intermediate"], student, teacher, mask)
    with pytest.raises(ValueError, match=r"needs the token mask batch\['attention_mask'\]"):
        distill_loss(PRESETS["tinybert_intermediate"], student, teacher, {}, projections={"kernel": np.zeros((4, 6))})
    with pytest.raises(ValueError, match=r"unknown loss term\(s\) \['mlm'\]"):
        distill_loss(PRESETS["hinton"], {"logits": S_LOGITS}, T_LOGITS, BATCH, weights={"mlm": 1.0})
    with pytest.raises(ValueError, match="a 1-layer student has none"):
        distill_loss(PRESETS["pkd"], {"logits": S_LOGITS, "hidden_states": [np.zeros((4, 2, 3))] * 2},
                     {"logits": T_LOGITS, "hidden_states": [np.zeros((4, 2, 3))] * 5}, BATCH)


def test_token_level_distillation_for_taggers_with_word_mask():
    rng = np.random.default_rng(5)
    s_logits, t_logits = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 3))
    word_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = np.where(word_mask > 0, rng.integers(0, 3, size=(2, 4)), -100)
    batch = {"labels": labels, "word_mask": word_mask}
    loss, aux = distill_loss(PRESETS["hinton"], {"logits": s_logits}, t_logits, batch, mask_key="word_mask")
    sel = word_mask.astype(bool)
    kd = _kl_rows(s_logits[sel], t_logits[sel], 4.0).sum(-1).mean() * 16
    ce = -_log_softmax(s_logits[sel])[np.arange(6), labels[sel]].mean()
    np.testing.assert_allclose(aux["kd"], kd, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.9 * kd + 0.1 * ce, rtol=1e-5)
    with pytest.raises(ValueError, match=r"token-level logits \(2, 4, 3\) need a token mask"):
        distill_loss(PRESETS["hinton"], {"logits": s_logits}, t_logits, batch)
