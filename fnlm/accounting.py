"""FLOPs, memory and MFU accounting for the pre-norm Transformer LM.

These are the CS336 ``transformer_accounting`` and ``adamw_accounting`` answers as functions of a
config. A config is anything with the attributes ``vocab_size, context_length, d_model,
num_layers, num_heads, d_ff`` (a :class:`fnlm.TransformerConfig` or a ``SimpleNamespace``).

The model counted is fnlm's: token embedding, ``num_layers`` pre-norm blocks (two RMSNorm gains,
``q/k/v/output`` projections without bias, a SwiGLU feed-forward with three matrices ``w1, w3``
of shape ``(d_ff, d_model)`` and ``w2`` of shape ``(d_model, d_ff)``), a final RMSNorm and an
untied LM head. ``swiglu=False`` counts the two-matrix SiLU feed-forward of the ablation instead.

FLOPs count matrix multiplies only, ``2 * m * n * k`` for an ``(m, k) @ (k, n)`` product, and the
attention scores over the full ``seq x seq`` square (as the assignment does; a causal kernel
could skip half). Training is three forward passes' worth (forward + backward at twice the cost).

Example, GPT-2 small shapes with a SwiGLU ``d_ff = 4 * d_model``::

    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(vocab_size=50257, context_length=1024, d_model=768,
    ...                       num_layers=12, num_heads=12, d_ff=3072)
    >>> parameter_count(cfg)
    190460160
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

__all__ = [
    "parameter_count",
    "parameter_counts",
    "forward_flops",
    "forward_flops_total",
    "training_flops",
    "training_flops_per_token",
    "adamw_memory",
    "mfu",
    "measure_matmul_peak",
    "KNOWN_PEAK_FLOPS",
]

FLOAT32_BYTES = 4


def _dims(config: Any) -> tuple[int, int, int, int, int, int]:
    names = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff")
    missing = [n for n in names if not hasattr(config, n)]
    if missing:
        raise TypeError(f"config {config!r:.200} lacks attributes {missing}")
    values = tuple(getattr(config, n) for n in names)
    bad = {n: v for n, v in zip(names, values) if not isinstance(v, int) or v <= 0}
    if bad:
        raise ValueError(f"config dimensions must be positive ints, got {bad}")
    if values[2] % values[4]:
        raise ValueError(f"d_model={values[2]} is not divisible by num_heads={values[4]}")
    return values  # type: ignore[return-value]


def _shape(config: Any, seq_len: int | None, batch_size: int) -> tuple[int, int]:
    seq = config.context_length if seq_len is None else seq_len
    if not isinstance(seq, int) or seq <= 0 or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"seq_len and batch_size must be positive ints, got {seq!r}, {batch_size!r}")
    return seq, batch_size


def parameter_counts(config: Any, *, swiglu: bool = True) -> dict[str, int]:
    """Trainable parameters by part.

    Arguments:
        config: model dimensions (``vocab_size, d_model, num_layers, d_ff`` are used).
        swiglu: three feed-forward matrices (SwiGLU) if true, two (SiLU FFN) if false.

    Returns:
        ``{"token_embeddings", "attn", "ffn", "norms", "lm_head"}`` to counts; ``attn``, ``ffn``
        and ``norms`` are summed over all layers (``norms`` includes the final RMSNorm).
    """
    vocab, _, d, layers, _, d_ff = _dims(config)
    ffn_matrices = 3 if swiglu else 2
    return {
        "token_embeddings": vocab * d,
        "attn": layers * 4 * d * d,
        "ffn": layers * ffn_matrices * d * d_ff,
        "norms": (2 * layers + 1) * d,
        "lm_head": vocab * d,
    }


def parameter_count(config: Any, *, swiglu: bool = True) -> int:
    """Total trainable parameters; equals ``tree_size(init_transformer_lm(config))``.

    Arguments:
        config: model dimensions.
        swiglu: three feed-forward matrices if true, two if false.

    Returns:
        The number of scalars over all weights.
    """
    return sum(parameter_counts(config, swiglu=swiglu).values())


def forward_flops(
    config: Any, *, seq_len: int | None = None, batch_size: int = 1, swiglu: bool = True
) -> dict[str, int]:
    """Matrix-multiply FLOPs of one forward pass, by component, summed over layers.

    Arguments:
        config: model dimensions.
        seq_len: tokens per sequence; defaults to ``config.context_length``.
        batch_size: sequences per batch.
        swiglu: count ``ffn_w3`` (SwiGLU) or not (SiLU FFN).

    Returns:
        ``{"q_proj", "k_proj", "v_proj", "output_proj", "attn_scores", "attn_values",
        "ffn_w1", "ffn_w3", "ffn_w2", "lm_head"}`` to FLOPs (``ffn_w3`` is 0 without SwiGLU).
    """
    vocab, _, d, layers, _, d_ff = _dims(config)
    seq, batch = _shape(config, seq_len, batch_size)
    tokens = batch * seq
    projection = layers * 2 * tokens * d * d
    ffn = layers * 2 * tokens * d * d_ff
    return {
        "q_proj": projection,
        "k_proj": projection,
        "v_proj": projection,
        "output_proj": projection,
        "attn_scores": layers * 2 * batch * seq * seq * d,
        "attn_values": layers * 2 * batch * seq * seq * d,
        "ffn_w1": ffn,
        "ffn_w3": ffn if swiglu else 0,
        "ffn_w2": ffn,
        "lm_head": 2 * tokens * d * vocab,
    }


def forward_flops_total(
    config: Any, *, seq_len: int | None = None, batch_size: int = 1, swiglu: bool = True
) -> int:
    """Sum of :func:`forward_flops` (same arguments); returns FLOPs of one forward pass."""
    return sum(forward_flops(config, seq_len=seq_len, batch_size=batch_size, swiglu=swiglu).values())


def training_flops(
    config: Any, *, seq_len: int | None = None, batch_size: int = 1, swiglu: bool = True
) -> int:
    """FLOPs of one training step's forward and backward pass: ``3 x`` the forward FLOPs.

    Arguments:
        config, seq_len, batch_size, swiglu: as for :func:`forward_flops`.

    Returns:
        The FLOPs (the optimizer's elementwise work is not counted).
    """
    return 3 * forward_flops_total(config, seq_len=seq_len, batch_size=batch_size, swiglu=swiglu)


def training_flops_per_token(config: Any, *, seq_len: int | None = None, swiglu: bool = True) -> float:
    """Training FLOPs per token at sequence length ``seq_len`` (default: the context length)."""
    seq, _ = _shape(config, seq_len, 1)
    return training_flops(config, seq_len=seq, swiglu=swiglu) / seq


def adamw_memory(
    config: Any,
    *,
    batch_size: int,
    seq_len: int | None = None,
    swiglu: bool = True,
    bytes_per_element: int = FLOAT32_BYTES,
) -> dict[str, int]:
    """Peak training memory with AdamW, in bytes, by part (the assignment's ``adamw_accounting``).

    Activations are counted as the assignment enumerates them, one tensor saved per listed
    operation: per layer the two RMSNorm outputs, the Q, K and V projections, ``Q K^T``, its
    softmax, the weighted sum of values, the output projection, ``W1``, SiLU and ``W2``; then the
    final RMSNorm, the output embedding (logits) and the cross-entropy's softmax over the logits.
    With ``swiglu`` the SwiGLU's extra ``W3`` output and gating product are added.

    Arguments:
        config: model dimensions.
        batch_size: sequences per batch.
        seq_len: tokens per sequence; defaults to ``config.context_length``.
        swiglu: count the SwiGLU feed-forward (``W3`` and its gate) or the plain SiLU one.
        bytes_per_element: 4 for float32.

    Returns:
        ``{"parameters", "gradients", "optimizer_state", "activations", "total"}`` in bytes;
        the optimizer state is AdamW's first and second moments (two copies of the parameters).
    """
    vocab, _, d, layers, heads, d_ff = _dims(config)
    seq, batch = _shape(config, seq_len, batch_size)
    tokens = batch * seq
    per_layer = (
        2 * tokens * d
        + 3 * tokens * d
        + 2 * batch * heads * seq * seq
        + tokens * d
        + tokens * d
        + 2 * tokens * d_ff
        + tokens * d
        + (2 * tokens * d_ff if swiglu else 0)
    )
    activations = layers * per_layer + tokens * d + 2 * tokens * vocab
    params = parameter_count(config, swiglu=swiglu)
    out = {
        "parameters": params * bytes_per_element,
        "gradients": params * bytes_per_element,
        "optimizer_state": 2 * params * bytes_per_element,
        "activations": activations * bytes_per_element,
    }
    out["total"] = sum(out.values())
    return out


def mfu(tokens_per_s: float, config: Any, peak_flops: float, *, seq_len: int | None = None,
        swiglu: bool = True) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak.

    Arguments:
        tokens_per_s: training throughput in tokens per second.
        config: model dimensions.
        peak_flops: the device's peak FLOP/s (e.g. from :func:`measure_matmul_peak`).
        seq_len: the sequence length trained at; defaults to ``config.context_length``.
        swiglu: as for :func:`forward_flops`.

    Returns:
        ``tokens_per_s * training_flops_per_token / peak_flops`` (a fraction, 1.0 = peak).
    """
    if not tokens_per_s >= 0 or not peak_flops > 0:
        raise ValueError(f"need tokens_per_s >= 0 and peak_flops > 0, got {tokens_per_s!r}, {peak_flops!r}")
    return tokens_per_s * training_flops_per_token(config, seq_len=seq_len, swiglu=swiglu) / peak_flops


KNOWN_PEAK_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
}
"""Dense (no sparsity) bf16 tensor-core peaks in FLOP/s from the vendors' data sheets, keyed by a
substring of ``torch.cuda.get_device_name()``; the first matching key wins, so specific names
(``H100 PCIe``) come before general ones (``H100``, which is the SXM part)."""


def _lookup_peak(device_name: str) -> float | None:
    for key, peak in KNOWN_PEAK_FLOPS.items():
        if key in device_name:
            return peak
    return None


def _measure(device: torch.device, dtype: torch.dtype, size: int, min_seconds: float) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = math.inf
    spent = 0.0
    reps = 1
    while spent < min_seconds:
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        elapsed = time.perf_counter() - start
        spent += elapsed
        best = min(best, elapsed / reps)
        if elapsed < 0.05:
            reps *= 2
    return 2 * size**3 / best


def measure_matmul_peak(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    size: int | None = None,
    min_seconds: float = 0.5,
    use_table: bool = True,
) -> float:
    """The peak matmul FLOP/s to divide by in :func:`mfu`.

    On CUDA with a 16-bit dtype the device's dense bf16 peak is looked up in
    :data:`KNOWN_PEAK_FLOPS` by its name; an unknown GPU, another dtype, or the CPU is measured:
    the best time of a square ``size x size`` matmul over about ``min_seconds``.

    Arguments:
        device: ``"cpu"``, ``"cuda"``, or a ``torch.device``.
        dtype: the matmul dtype (float32 on CPU, bfloat16 on GPU for training).
        size: the matrix side (default 1024 on CPU, 8192 on GPU).
        min_seconds: how long to measure for.
        use_table: look the peak up for known GPUs (False always measures).

    Returns:
        FLOP/s.
    """
    device = torch.device(device)
    if device.type == "cuda" and use_table and dtype in (torch.bfloat16, torch.float16):
        peak = _lookup_peak(torch.cuda.get_device_name(device))
        if peak is not None:
            return peak
    if size is None:
        size = 8192 if device.type == "cuda" else 1024
    return _measure(device, dtype, size, min_seconds)
