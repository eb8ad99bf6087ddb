"""Model FLOPs of the project's model families, counted by hand from their configs (the numerator of MFU).

Convention (the one MFU figures use, e.g. PaLM's appendix B):

* only matrix products count: a product of an ``[m, k]`` and a ``[k, n]`` matrix is ``2 * m * n * k`` FLOPs
  (one multiply and one add per term); embedding lookups, softmax, LayerNorm, GELU, biases, residual adds,
  LSTM gate nonlinearities, pooling and the optimizer update are not counted;
* a forward pass of the Transformer counts, per layer ``i`` with ``T = batch * seq`` tokens, hidden ``H``, ``N_i``
  query heads, ``K_i`` key/value heads of width ``D`` and FFN width ``F_i``: the Q/K/V projections
  ``2 T H (N_i + 2 K_i) D``, the attention scores ``Q K^T`` and the context ``P V`` ``2 * 2 batch N_i seq^2 D``,
  the output projection ``2 T N_i D H`` and the FFN ``2 * 2 T H F_i``; then the task head (sequence: pooler
  ``2 batch H^2`` and classifier ``2 batch H labels``);
* a training step counts 3 forward passes (:data:`TRAIN_MULTIPLIER`): the backward pass takes one product for
  the gradient of the inputs and one for the gradient of the weights per forward product. Dropout, recomputation
  and the float16 loss-scale bookkeeping add nothing.

The same count serves every precision: an int8 or fp8 row does the same products with narrower operands.
"""

from __future__ import annotations

from models.bilstm import BiLSTMConfig
from models.transformer import TransformerConfig

TRAIN_MULTIPLIER = 3  # forward + backward (gradients of inputs and of weights) = 3 forward passes
CONVENTION = ("model FLOPs: matrix products only, 2*m*n*k for an [m, k] @ [k, n] product (attention projections, "
              "scores and context, FFN, pooler, classifier; LSTM input and recurrent products, MLP); embeddings, "
              "softmax, LayerNorm, GELU and elementwise work not counted; a training step = 3 forward passes")


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of ``[m, k] @ [k, n]``: ``2 * m * n * k``."""
    return 2 * m * k * n


def transformer_forward_flops(cfg: TransformerConfig, batch: int, seq: int) -> int:
    """Matrix-product FLOPs of one forward pass of :class:`models.transformer.Transformer` on ``[batch, seq]``
    ids (per-layer head counts, key/value heads and FFN widths of pruned or multi-query configs included).

    Raises ValueError for the masked-LM head, whose vocabulary product the benchmarks do not run.
    """
    t, h, d = batch * seq, cfg.hidden_size, cfg.dim_per_head
    total = 0
    for i in range(cfg.num_layers):
        n, k, f = cfg.heads(i), cfg.kv_heads(i), cfg.ffn_size(i)
        total += matmul_flops(t, h, (n + 2 * k) * d)  # Q, K, V projections
        total += 2 * batch * n * matmul_flops(seq, d, seq)  # scores Q K^T and context P V
        total += matmul_flops(t, n * d, h)  # attention output projection
        total += matmul_flops(t, h, f) + matmul_flops(t, f, h)  # FFN in and out
    if cfg.head == "sequence":
        total += matmul_flops(batch, h, h) + matmul_flops(batch, h, cfg.num_labels)  # pooler, classifier
    elif cfg.head == "token":
        total += matmul_flops(t, h, cfg.num_labels)
    elif cfg.head == "mlm":
        raise ValueError("transformer_forward_flops: the masked-LM head is not counted (no benchmark runs it)")
    return total


def bilstm_forward_flops(cfg: BiLSTMConfig, batch: int, seq: int) -> int:
    """Matrix-product FLOPs of one forward pass of :class:`models.bilstm.BiLSTMClassifier` (single sentence) on
    ``[batch, seq]`` word ids: per layer and direction the input projection ``2 T D_in 4H`` and the recurrent
    product ``2 T H 4H``; attention pooling (if used) ``2 T 2H 2H + 2 T 2H``; the MLP and the classifier.

    Raises ValueError for sentence pairs (``cfg.pair``), which the benchmarks do not run.
    """
    if cfg.pair:
        raise ValueError("bilstm_forward_flops counts single-sentence models; cfg.pair is True")
    t, hid = batch * seq, cfg.hidden_size
    total = 0
    for layer in range(cfg.num_layers):
        d_in = cfg.embed_dim if layer == 0 else 2 * hid
        total += 2 * (matmul_flops(t, d_in, 4 * hid) + matmul_flops(t, hid, 4 * hid))  # two directions
    if cfg.pooling == "attention":
        total += matmul_flops(t, 2 * hid, 2 * hid) + matmul_flops(t, 2 * hid, 1)
    total += matmul_flops(batch, cfg.feature_size, cfg.mlp_hidden) + matmul_flops(batch, cfg.mlp_hidden,
                                                                                 cfg.num_labels)
    return total
