"""models.io: self-describing model directories (round trip, atomic writes, family registry)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import models
from models import io, storage
from models.tokenization import Tokenizer
from models.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=30, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=12,
                        max_position_embeddings=10, num_labels=3)
IDS = jnp.array([[2, 5, 7, 3, 0]], jnp.int32)


@functools.cache
def _params(seed=0):
    return Transformer(CFG).init(jax.random.key(seed), IDS)["params"]


@pytest.fixture
def vocab_dir(tmp_path):
    d = tmp_path / "vocab"
    d.mkdir()
    (d / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\ncat\n")
    (d / "unrelated.bin").write_bytes(b"x")
    return d


def test_round_trip_restores_model_config_params_and_tokenizer(tmp_path, vocab_dir):
    params = _params()
    path = models.save(tmp_path / "m", "transformer", CFG, params, tokenizer_dir=vocab_dir,
                       extra={"labels": ["neg", "neu", "pos"]})
    assert sorted(p.name for p in path.iterdir()) == ["_COMPLETE", "config.json", "params.safetensors", "vocab.txt"]
    model, config, restored = models.load(path)
    assert isinstance(model, Transformer) and model.config == config == CFG
    assert io.tree_equal(params, restored)
    np.testing.assert_array_equal(model.apply({"params": restored}, IDS).logits,
                                  Transformer(CFG).apply({"params": params}, IDS).logits)
    meta = io.read_meta(path)
    assert meta["family"] == "transformer" and meta["extra"] == {"labels": ["neg", "neu", "pos"]}
    flat = load_file(str(path / "params.safetensors"))  # slash-joined names, one per leaf
    assert "encoder/layer_0/attention/query/kernel" in flat and len(flat) == len(jax.tree.leaves(params))
    assert Tokenizer.from_dir(path).encode(["the cat"], max_length=4)["input_ids"].tolist() == [[2, 5, 6, 3]]


def test_stored_dtypes_are_kept(tmp_path):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
    _, _, restored = io.load(io.save(tmp_path / "m", "transformer", CFG, params))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(restored))
    assert io.tree_equal(params, restored)


def test_existing_directory_is_kept_unless_overwrite(tmp_path):
    path = io.save(tmp_path / "m", "transformer", CFG, _params(0))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        io.save(path, "transformer", CFG, _params(1))
    assert io.tree_equal(io.load(path)[2], _params(0))
    io.save(path, "transformer", CFG, _params(1), overwrite=True)
    assert io.tree_equal(io.load(path)[2], _params(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old copies left


def test_a_crash_while_writing_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    io.save(tmp_path / "old", "transformer", CFG, _params(0))
    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save(tmp_path / "new", "transformer", CFG, _params(1))
    with pytest.raises(OSError, match="disk full"):
        io.save(tmp_path / "old", "transformer", CFG, _params(1), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert io.tree_equal(io.load(tmp_path / "old")[2], _params(0))


def test_family_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown model family 'gpt'; known families: .*transformer"):
        io.save(tmp_path / "a", "gpt", CFG, _params())
    with pytest.raises(ValueError, match="family 'transformer', not 'bilstm'"):
        io.save(tmp_path / "a", "bilstm", CFG, _params())
    path = io.save(tmp_path / "m", "transformer", CFG, _params())
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "family": "gpt"}))
    with pytest.raises(ValueError, match="unknown model family 'gpt'; known families: bilstm, cnn_lstm, transformer"):
        io.load(path)
    monkeypatch.setitem(io._FAMILIES, "ghost", io.FamilyEntry("models._no_such_module", "GhostConfig", "Ghost"))
    (path / "config.json").write_text(json.dumps({**meta, "family": "ghost"}))
    with pytest.raises(ValueError, match="'ghost' is registered at models._no_such_module, which cannot be imported"):
        io.load(path)


def test_not_a_model_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="not a model directory.*load_bert"):
        io.load(tmp_path)
    (tmp_path / "params.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"lacks \['format_version', 'family', 'config'\]"):
        io.load(tmp_path)


def test_bad_params_and_extra(tmp_path):
    with pytest.raises(ValueError, match="leaf a/b is a str"):
        io.save(tmp_path / "a", "transformer", CFG, {"a": {"b": "x"}})
    with pytest.raises(ValueError, match="key 'x/y' under <root>"):
        io.save(tmp_path / "a", "transformer", CFG, {"x/y": np.zeros(2)})
    with pytest.raises(TypeError, match="extra must be JSON-serialisable"):
        io.save(tmp_path / "a", "transformer", CFG, _params(), extra={"f": object()})
    with pytest.raises(FileNotFoundError, match="holds no tokenizer files"):
        io.save(tmp_path / "a", "transformer", CFG, _params(), tokenizer_dir=tmp_path)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("family,module", [("bilstm", "models.bilstm"), ("cnn_lstm", "models.cnn_lstm")])
def test_lstm_families_resolve(family, module):
    pytest.importorskip(module)
    assert io.config_class(family).family == family
    assert isinstance(io.model_class(family), type)


def test_strided_and_transposed_leaves_round_trip(tmp_path):
    """Compaction hands over numpy views (picked columns, transposes): they must be saved in their values,
    not their raw buffers."""
    params = jax.tree.map(np.asarray, _params())
    kernel = params["encoder"]["layer_0"]["intermediate"]["kernel"]
    wide = np.asfortranarray(np.arange(kernel.size * 2, dtype=np.float32).reshape(kernel.shape[0], -1))
    params["encoder"]["layer_0"]["intermediate"]["kernel"] = wide[:, ::2]  # strided, Fortran-ordered view
    params["encoder"]["layer_0"]["attention"]["query"]["kernel"] = np.asarray(
        params["encoder"]["layer_0"]["attention"]["query"]["kernel"]).T.copy().T  # transposed view
    models.save(tmp_path / "m", "transformer", CFG, params)
    _, _, loaded = models.load(tmp_path / "m")
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # 0-d leaves (scales, step counters) keep their shape
    flat = io.flatten_params({"scale": np.float32(0.5), "kernel": wide[:, ::2]})
    assert flat["scale"].shape == () and flat["kernel"].flags["C_CONTIGUOUS"]


def test_damaged_files_are_named(tmp_path):
    path = io.save(tmp_path / "m", "transformer", CFG, _params())
    good = (path / "params.safetensors").read_bytes()
    (path / "params.safetensors").write_bytes(good[:len(good) // 2])  # a copy cut short
    with pytest.raises(ValueError, match=f"{path / 'params.safetensors'} is truncated or corrupt"):
        io.load(path)
    (path / "params.safetensors").write_bytes(good)
    (path / "config.json").write_text('{"format_version": 1, "family": "transf')
    with pytest.raises(ValueError, match=f"{path / 'config.json'} is not valid JSON"):
        io.load(path)
    (path / "config.json").write_bytes(b'{"family": "\xff"}')
    with pytest.raises(ValueError, match=f"{path / 'config.json'} is not valid JSON"):
        io.read_meta(path)


def test_extra_files_are_published_in_the_same_rename(tmp_path):
    quant = {"scale": np.float32(0.25)}
    write = lambda p: np.savez(p, **quant)
    path = io.save(tmp_path / "m", "transformer", CFG, _params(), extra_files={"quant_state.npz": write})
    assert sorted(p.name for p in path.iterdir()) == ["_COMPLETE", "config.json", "params.safetensors", "quant_state.npz"]
    with np.load(path / "quant_state.npz") as data:
        assert data.files == ["scale"] and float(data["scale"]) == 0.25
    # A writer that fails leaves the published directory as it was: old params, no new file.
    def fail(p):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.save(path, "transformer", CFG, _params(1), overwrite=True, extra_files={"other.npz": fail})
    assert io.tree_equal(io.load(path)[2], _params())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and not (path / "other.npz").exists()
    with pytest.raises(FileNotFoundError, match="the writer of 'nothing.bin' wrote no file"):
        io.save(tmp_path / "n", "transformer", CFG, _params(), extra_files={"nothing.bin": lambda p: None})
    with pytest.raises(ValueError, match=r"extra_files: \['config.json'\] must be plain file names"):
        io.save(tmp_path / "n", "transformer", CFG, _params(), extra_files={"config.json": write})
    assert not (tmp_path / "n").exists()


SAVE_THEN_HANG = """
import sys, time
import jax
import numpy as np
from models import io
from models.transformer import Transformer, TransformerConfig
cfg = TransformerConfig(vocab_size=30, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=12,
                        max_position_embeddings=10, num_labels=3)
params = Transformer(cfg).init(jax.random.key(0), np.zeros((1, 5), np.int32))["params"]

def quant_state(path):  # a QAT run's scales, published with the model; the kill lands while they are written
    np.savez(path, scale=np.float32(0.5))
    print("writing", flush=True)
    time.sleep(600)

io.save(sys.argv[1], "transformer", cfg, params, extra_files={"quant_state.npz": quant_state})
"""


def test_a_kill_during_a_qat_save_leaves_no_model_and_the_next_start_cleans_up(tmp_path):
    """SIGKILL of a real process in the middle of publishing model/ with its quant_state.npz: no model/ appears
    (a reader would have taken one without scales for finished), and the next run's start-up removes the
    half-written temporary directory."""
    import signal
    import subprocess
    import sys

    from experiments.runtime import workdir
    from tests.multidevice import REPO

    target = tmp_path / "run" / "model"
    proc = subprocess.Popen([sys.executable, "-c", SAVE_THEN_HANG, str(target)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert not target.exists()
    leftovers = [p.name for p in (tmp_path / "run").iterdir()]
    assert len(leftovers) == 1 and storage.TEMPORARY_PATTERN.match(leftovers[0])  # the killed write, recognisable
    removed = workdir.remove_stale_temporaries(tmp_path / "run")
    assert len(removed) == 1 and list((tmp_path / "run").iterdir()) == []
