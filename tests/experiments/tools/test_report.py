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


def _entries(points):
    """Report entries at (metric, tokens/s, size MB) points, named like a recipe's models."""
    names = ["teacher", "transformer3", "bilstm", "theseus", "pruned", "int8", "teacher (onnx fp32)",
             "teacher (onnx fp16)", "theseus (onnx fp32)", "bilstm (onnx fp32)"]
    return [report.Entry(name, "/run", "/run/model", "transformer", "accuracy", metric, 1000, size,
                         runtime="onnxruntime" if "onnx" in name else "jax", tokens_per_s=tps,
                         variant="fp16" if "fp16" in name else ("int8" if name == "int8" else "float32"))
            for name, (metric, tps, size) in zip(names, points)]


CROWDED = [(0.93, 1000, 87), (0.93, 1000, 87), (0.90, 2000, 67), (0.93, 1010, 44), (0.925, 1200, 80),
           (0.93, 1005, 22), (0.93, 1000, 87), (0.93, 990, 44), (0.90, 2000, 67), (0.88, 9000, 19)]


@pytest.mark.parametrize("plot", sorted(report.PLOTS))
def test_plot_labels_never_overlap_even_on_coinciding_points(plot):
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    entries = _entries(CROWDED)
    fig = report.metric_figure(entries, entries[0], report.pareto(entries), plot)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text()]
    assert sorted(t.get_text() for t in labels) == sorted(e.name for e in entries)
    boxes = [report.text_box(t, renderer) for t in labels]
    inside = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert inside.x0 <= a.x0 and a.x1 <= inside.x1 and inside.y0 <= a.y0 and a.y1 <= inside.y1, labels[i]
        for j in range(i):
            assert not a.overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    lo, hi = ax.get_ylim()
    assert lo > 0.85 and hi < 0.96  # fitted to the metrics, not 0 - 1
    if plot == "metric_vs_throughput.png":  # the front is drawn even where it is one point
        front = [l for l in ax.get_lines() if isinstance(l, Line2D) and "Pareto" in str(l.get_label())]
        assert len(front) == 1 and len(front[0].get_xdata()) >= 3
    plt.close(fig)


def test_report_html_is_self_contained_and_notes_the_hardware(tmp_path, monkeypatch):
    import re
    monkeypatch.setattr(report.measuring, "environment", lambda: {
        "platform": "cpu", "cpu_model": "AMD EPYC 7B13", "cpu_isa": ["avx2"], "threads": 2, "machine": "x86_64",
        "jax": "0.x"})
    entries = _entries(CROWDED)
    payload = report.write_report(entries, entries[0], str(tmp_path), batch=32, seq=64)
    page = (tmp_path / "report.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)['"]""", page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)  # the plots, embedded
    assert "url(" not in page and "<link" not in page and "<script" not in page
    assert "AMD EPYC 7B13" in page and "no int8 dot-product instructions" in page and "no fp16 arithmetic" in page
    assert len(payload["notes"]) == 3
    md = (tmp_path / "report.md").read_text()
    assert md.count("| teacher (onnx fp32) | onnxruntime |") == 1


def test_runs_and_report_in_a_bucket_match_the_same_on_disk(gcs_bucket, tmp_path):
    """A recipe workdir (a model stage and an export stage with an ONNX file) and the report's folder in a bucket:
    the report's files reach it as objects, with the rows the same folders give on a local disk."""
    import json
    import uuid

    from google.cloud import storage as gcs

    from experiments.runtime import cli
    from experiments.tools import export as export_cli
    from models import storage
    from tests.object_store import blob_names

    cfg = TINY["transformer"]
    model = models.model_class("transformer")(cfg)
    params = jax.jit(model.init)(jax.random.key(0), **report._sample_batch("transformer", cfg, 1, 4))["params"]
    models.save(tmp_path / "m", "transformer", cfg, params)
    export_cli.export_model_dir(str(tmp_path / "m"), str(tmp_path / "onnx"), ["fp32"])
    onnx = (tmp_path / "onnx" / "model_fp32.onnx").read_bytes()
    remote = f"{gcs_bucket[0]}/{uuid.uuid4().hex[:8]}"
    payloads = {}
    for root in (str(tmp_path / "local"), remote):
        models.save(f"{root}/recipe/teacher/model", "transformer", cfg, params, extra={"eval": {"accuracy": 0.85}})
        storage.write_text(f"{root}/recipe/teacher/results.json", json.dumps({"metric_names": ["accuracy"]}))
        storage.write_text(f"{root}/recipe/export/results.json", json.dumps({"models": {"teacher": {
            "model_dir": f"{root}/recipe/teacher/model",
            "files": {"model_fp32.onnx": {"precision": "fp32", "metrics": {"accuracy": 0.84}}}}}}))
        with storage.atomic_file(f"{root}/recipe/export/teacher/model_fp32.onnx") as tmp:
            tmp.write_bytes(onnx)
        fv = cli.parse(report.define_flags, [f"--out_dir={root}/report", "--reference=teacher", "--batch=2",
                                             "--seq=8", "--rounds=1"])
        payloads[root] = report.run(fv, [f"{root}/recipe"])

    assert blob_names(f"{remote}/report") == ["metric_vs_size.png", "metric_vs_throughput.png", "report.html",
                                               "report.json", "report.md"]
    keys = ("name", "family", "metric_name", "metric", "params", "size_mb", "variant", "runtime")
    local, remote_rows = ([{k: m[k] for k in keys} for m in payloads[root]["models"]] for root in payloads)
    assert remote_rows == local and [r["name"] for r in local] == ["teacher", "teacher (onnx fp32)"]
    assert all(m["tokens_per_s"] for m in payloads[remote]["models"])  # both rows were timed
    bucket, _, prefix = remote.removeprefix("gs://").partition("/")
    blobs = gcs.Client().bucket(bucket)
    assert json.loads(blobs.blob(f"{prefix}/report/report.json").download_as_bytes())["models"] == \
        payloads[remote]["models"]
    page = blobs.blob(f"{prefix}/report/report.html").download_as_text()
    assert page.count("src='data:image/png;base64,") == 2
