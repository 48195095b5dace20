"""Cross-entropy loss and perplexity for next-token prediction."""

from __future__ import annotations

import math

import torch

from fnlm.types import Float, Int, Tensor

__all__ = ["cross_entropy", "perplexity"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def cross_entropy(
    logits: Float[Tensor, "*batch vocab"], targets: Int[Tensor, "*batch"]
) -> Float[Tensor, ""]:
    """Mean cross-entropy of `targets` under the softmax of `logits`.

    Per position, `loss = logsumexp(logits) - logits[target]`, computed with the row maximum
    subtracted first, so `exp` never overflows and `log(softmax)` is never formed: the log and the
    exp of the target's own term cancel exactly. float16/bfloat16 logits are upcast to float32
    (float32/float64 are kept). Target ids are not range-checked here (that would force a device
    sync); an out-of-range id fails inside `gather`.

    Example: `cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))` is `log(2)`.

    **Arguments:**

    - `logits`: unnormalised scores, shape `(*batch, vocab)`; any number of leading dims.
    - `targets`: integer class ids in `[0, vocab)`, shape `(*batch)`.

    **Returns:**

    The mean over all leading positions, a 0-d tensor (float32, or float64 for float64 logits).
    """
    if logits.ndim < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets must have the shape of logits without the last (vocab) dim: "
            f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)}"
        )
    if logits.dtype in _LOW_PRECISION:
        logits = logits.float()
    row_max = logits.detach().amax(dim=-1, keepdim=True)
    shifted = logits - row_max
    log_normaliser = shifted.exp().sum(dim=-1).log()
    target_shifted = shifted.gather(-1, targets.unsqueeze(-1).long()).squeeze(-1)
    return (log_normaliser - target_shifted).mean()


def perplexity(loss: float | Tensor) -> float | Tensor:
    """Perplexity `exp(loss)` of a *mean* per-token cross-entropy (natural log).

    Pass the value returned by :func:`cross_entropy` (or an average of such values weighted by
    token count); perplexities of separate batches must not be averaged directly.

    **Arguments:**

    - `loss`: mean cross-entropy in nats, a float or a 0-d tensor.

    **Returns:**

    `exp(loss)`, of the same kind as `loss` (float in, float out; tensor in, tensor out).
    """
    if isinstance(loss, Tensor):
        if loss.ndim != 0:
            raise ValueError(f"perplexity expects a mean (0-d) loss, got shape {tuple(loss.shape)}")
        return loss.exp()
    return math.exp(loss)
