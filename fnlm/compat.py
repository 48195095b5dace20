"""`torch.nn.Module` and `torch.optim.Optimizer` shims over fnlm's pure functions, for code that
expects modules (the CS336 adapter interface). Each module stores its parameters under the CS336 state-dict names, builds
them with the matching `init_*` function, and its `forward` calls the pure function on
`self.tree()` (its parameters as a params tree). They hold no logic of their own.

`AdamW`, `clip_gradients_` and `save_module_checkpoint` / `load_module_checkpoint` forward to
`fnlm.optim` and `fnlm.checkpoint` in the same way. (The module checkpoint functions have their own
names: `fnlm.save_checkpoint` is the one checkpoint contract of the library, over params trees.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fnlm import checkpoint as _ckpt
from fnlm import model as _model
from fnlm import nn as _nn
from fnlm.optim import adamw_step, check_hyper, clip_grad_norm_with_norm
from fnlm.tree import tree_unflatten

__all__ = [
    "Linear",
    "Embedding",
    "RMSNorm",
    "SwiGLU",
    "RotaryPositionalEmbedding",
    "MultiHeadSelfAttention",
    "TransformerBlock",
    "TransformerLM",
    "AdamW",
    "clip_gradients_",
    "save_module_checkpoint",
    "load_module_checkpoint",
]


class _Shim(nn.Module):
    def tree(self) -> Any:
        """This module's parameters as an fnlm params tree (shared storage, not copies)."""
        return tree_unflatten(dict(self.named_parameters()))

    def _adopt(self, params: dict[str, Any]) -> None:
        for name, value in params.items():
            if isinstance(value, Tensor):
                self.register_parameter(name, nn.Parameter(value))
            else:
                raise TypeError(f"_adopt expects leaf tensors, got {type(value).__name__} for {name!r}")


def _kw(device: Any, dtype: torch.dtype | None) -> dict[str, Any]:
    return {"device": device, "dtype": dtype or torch.float32}


class Linear(_Shim):
    """`fnlm.linear` as a module: `weight` of shape `(out_features, in_features)`."""

    def __init__(self, in_features: int, out_features: int, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self._adopt(_nn.init_linear(in_features, out_features, **_kw(device, dtype)))

    def forward(self, x: Tensor) -> Tensor:
        return _nn.linear(self.tree(), x)


class Embedding(_Shim):
    """`fnlm.embedding` as a module: `weight` of shape `(num_embeddings, embedding_dim)`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self._adopt(_nn.init_embedding(num_embeddings, embedding_dim, **_kw(device, dtype)))

    def forward(self, token_ids: Tensor) -> Tensor:
        return _nn.embedding(self.tree(), token_ids)


class RMSNorm(_Shim):
    """`fnlm.rmsnorm` as a module: `weight` of shape `(d_model,)`."""

    def __init__(self, d_model: int, eps: float = 1e-5, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self._adopt(_nn.init_rmsnorm(d_model, **_kw(device, dtype)))

    def forward(self, x: Tensor) -> Tensor:
        return _nn.rmsnorm(self.tree(), x, eps=self.eps)


class SwiGLU(_Shim):
    """`fnlm.swiglu` as a module: `w1`, `w2`, `w3` linear submodules."""

    def __init__(self, d_model: int, d_ff: int | None = None, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        d_ff = _nn.swiglu_d_ff(d_model) if d_ff is None else d_ff
        self.w1 = Linear(d_model, d_ff, device, dtype)
        self.w2 = Linear(d_ff, d_model, device, dtype)
        self.w3 = Linear(d_model, d_ff, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _nn.swiglu(self.tree(), x)


class RotaryPositionalEmbedding(nn.Module):
    """`fnlm.rope` as a module; the cos/sin table (`fnlm.rope_cache`) is a non-persistent buffer."""

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device: Any = None):
        super().__init__()
        cache = _nn.rope_cache(d_k, max_seq_len, theta, device=device)
        self.register_buffer("cos", cache.cos, persistent=False)
        self.register_buffer("sin", cache.sin, persistent=False)

    def cache(self) -> _nn.RopeCache:
        return _nn.RopeCache(self.cos, self.sin)

    def forward(self, x: Tensor, token_positions: Tensor) -> Tensor:
        return _nn.rope(x, token_positions, self.cache())


class MultiHeadSelfAttention(_Shim):
    """`fnlm.multihead_self_attention` as a module: `q_proj`, `k_proj`, `v_proj`, `output_proj`;
    RoPE when `theta` is given (with `max_seq_len` positions)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        max_seq_len: int | None = None,
        theta: float | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
            setattr(self, name, Linear(d_model, d_model, device, dtype))
        if theta is not None:
            if max_seq_len is None:
                raise ValueError("MultiHeadSelfAttention with RoPE (theta given) needs max_seq_len")
            self.rope = RotaryPositionalEmbedding(theta, d_model // num_heads, max_seq_len, device)
        else:
            self.rope = None

    def forward(self, x: Tensor, token_positions: Tensor | None = None) -> Tensor:
        cache = None if self.rope is None else self.rope.cache()
        return _nn.multihead_self_attention(self.tree(), x, num_heads=self.num_heads, rope_cache=cache, positions=token_positions)


class TransformerBlock(_Shim):
    """`fnlm.transformer_block` (pre-norm, RoPE) as a module: `attn`, `ln1`, `ffn`, `ln2`."""

    def __init__(
        self, d_model: int, num_heads: int, d_ff: int, max_seq_len: int, theta: float = 10000.0, device: Any = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.num_heads, self.theta = num_heads, theta
        self.attn = MultiHeadSelfAttention(d_model, num_heads, device=device, dtype=dtype)
        self.ln1 = RMSNorm(d_model, device=device, dtype=dtype)
        self.ffn = SwiGLU(d_model, d_ff, device, dtype)
        self.ln2 = RMSNorm(d_model, device=device, dtype=dtype)
        self.max_seq_len = max_seq_len

    def forward(self, x: Tensor, token_positions: Tensor | None = None) -> Tensor:
        ctx = _nn.attention_context(
            num_heads=self.num_heads,
            seq_len=x.shape[-2],
            d_head=x.shape[-1] // self.num_heads,
            rope_theta=self.theta,
            positions=token_positions,
            device=x.device,
        )
        return _model.transformer_block(self.tree(), x, ctx)


class TransformerLM(_Shim):
    """`fnlm.transformer_lm` as a module, with the CS336 state-dict names
    (`token_embeddings`, `layers.{i}.…`, `ln_final`, `lm_head`).

    Construct from the CS336 arguments, or from a `TransformerConfig` with `from_config` (which
    also takes the ablation fields). `forward(in_indices)` returns logits."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        d_ff: int,
        rope_theta: float = 10000.0,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        config: _model.TransformerConfig | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if config is None:
            config = _model.TransformerConfig(vocab_size, context_length, d_model, num_layers, num_heads, d_ff, rope_theta)
        self.config = config
        self._build(_model.init_transformer_lm(config, seed=seed, **_kw(device, dtype)), self)

    @classmethod
    def from_config(cls, config: _model.TransformerConfig, *, seed: int = 0, device: Any = None, dtype: torch.dtype | None = None) -> TransformerLM:
        c = config
        return cls(c.vocab_size, c.context_length, c.d_model, c.num_layers, c.num_heads, c.d_ff, c.rope_theta, device, dtype, config=c, seed=seed)

    @staticmethod
    def _build(tree: dict[str, Any], module: nn.Module) -> None:
        for name, value in tree.items():
            if isinstance(value, Tensor):
                module.register_parameter(name, nn.Parameter(value))
            elif isinstance(value, list):
                children = nn.ModuleList(nn.Module() for _ in value)
                for item, child in zip(value, children):
                    TransformerLM._build(item, child)
                module.add_module(name, children)
            else:
                child = nn.Module()
                TransformerLM._build(value, child)
                module.add_module(name, child)

    def forward(self, in_indices: Tensor) -> Tensor:
        return _model.transformer_lm(self.tree(), in_indices, self.config)

class AdamW(torch.optim.Optimizer):
    """`torch.optim.Optimizer` running :func:`fnlm.adamw_step`'s update on each param group.

    Per-parameter state is `{"step": int, "m": Tensor, "v": Tensor}`, so `state_dict()` /
    `load_state_dict()` round-trip as for any torch optimizer.

    **Arguments:**

    - `params`: parameters or param-group dicts, as for any torch optimizer.
    - `lr`, `betas`, `eps`, `weight_decay`: as in :func:`fnlm.adamw_step`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        check_hyper(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient; returns `closure()`'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_step: dict[int, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                by_step.setdefault(int(state["step"]), []).append(p)
            for done, ps in by_step.items():
                states = [self.state[p] for p in ps]
                opt_state = {"step": done, "m": [st["m"] for st in states], "v": [st["v"] for st in states]}
                new_p, new_state = adamw_step(
                    [p.detach() for p in ps], opt_state, [p.grad for p in ps], lr=group["lr"],
                    betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                )
                torch._foreach_copy_([p.detach() for p in ps], new_p)
                for st, m, v in zip(states, new_state["m"], new_state["v"]):
                    st.update(step=done + 1, m=m, v=v)
        return loss


def clip_gradients_(parameters: Iterable[torch.Tensor], max_l2_norm: float) -> torch.Tensor:
    """Clip the `.grad` of `parameters` in place to global l2 norm `max_l2_norm` (eps 1e-6).

    Parameters without a gradient are skipped. Uses :func:`fnlm.clip_grad_norm_with_norm`.

    **Arguments:**

    - `parameters`: tensors whose `.grad` to clip.
    - `max_l2_norm`: the largest allowed global norm.

    **Returns:**

    The global norm before clipping.
    """
    with_grad = [p for p in parameters if p.grad is not None]
    if not with_grad:
        return torch.tensor(0.0)
    clipped, norm = clip_grad_norm_with_norm([p.grad for p in with_grad], max_l2_norm)
    with torch.no_grad():
        torch._foreach_copy_([p.grad for p in with_grad], clipped)
    return norm


def save_module_checkpoint(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int, out: _ckpt.PathOrFile
) -> None:
    """Save `model.state_dict()`, `optimizer.state_dict()` and `iteration` with :func:`fnlm.save_checkpoint`.

    **Arguments:**

    - `model`, `optimizer`: what to save.
    - `iteration`: completed training iterations.
    - `out`: a path (written atomically) or a binary file object.
    """
    _ckpt.save_checkpoint(
        out, params=model.state_dict(), opt_state=optimizer.state_dict(), step=iteration, config={}
    )


def load_module_checkpoint(src: _ckpt.PathOrFile, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore `model` and `optimizer` from `save_module_checkpoint`'s file; returns the iteration.

    **Arguments:**

    - `src`: a path or a binary file object.
    - `model`, `optimizer`: restored in place.

    **Returns:**

    The saved iteration number.
    """
    ckpt = _ckpt.load_checkpoint(src)
    model.load_state_dict(ckpt["params"])
    optimizer.load_state_dict(ckpt["opt_state"])
    return ckpt["step"]
