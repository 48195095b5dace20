"""The record every ablation is: a name, the two functions it trains with, its config selectors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import fnlm
from fnlm import TransformerConfig


def _same(config: TransformerConfig) -> TransformerConfig:
    return config


@dataclass(frozen=True)
class Ablation:
    """A named variant of the LM.

    **Fields:**

    - `name`: short identifier (the runner's `--only` value and table row).
    - `description`: one line for the table's legend.
    - `model_fn`: `(params, token_ids (..., seq), config) -> logits (..., seq, vocab)`, the LM with
      the ablation's parts passed in.
    - `init_fn`: `(config, *, seed, device, dtype) -> params`.
    - `configure`: `config -> config`, the same change told through the config's name and size
      fields, so that a checkpoint records what was trained (`fnlm.transformer_lm` with the
      configured config computes the same logits as `model_fn`, where a selector exists).
    """

    name: str
    description: str
    model_fn: Callable = fnlm.transformer_lm
    init_fn: Callable = fnlm.init_transformer_lm
    configure: Callable[[TransformerConfig], TransformerConfig] = _same

    def config_for(self, config: TransformerConfig) -> TransformerConfig:
        """The config this ablation trains with, from the baseline's."""
        return self.configure(config)


def with_fields(**changes) -> Callable[[TransformerConfig], TransformerConfig]:
    """A `configure` that sets fixed config fields, e.g. `with_fields(norm="none")`."""
    return lambda config: dataclasses.replace(config, **changes)


BASELINE = Ablation(
    "baseline",
    "pre-norm RMSNorm, RoPE, SwiGLU (the assignment's model)",
)
