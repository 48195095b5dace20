"""The record every ablation is: a name, a description, and how it changes the model.

An ablation is defined once. The assignment's four change the config's name fields
(`norm`, `norm_position`, `position`, `ffn`), which pick the library's parts (`fnlm.no_norm`,
`fnlm.post_norm_block`, `fnlm.nope_self_attention`, `fnlm.silu_ffn`); so a checkpoint's config is
enough to rebuild the model. An ablation the config cannot name passes its own `block` (and
`init_block` when it needs parameters) into `fnlm.transformer_lm`; checkpoints record its name.
"""

from __future__ import annotations

import dataclasses
import functools
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
    - `configure`: `config -> config`, the change told through the config's fields.
    - `block`: `block(layer_params, x, ctx) -> x` passed to `fnlm.transformer_lm` (and
      `fnlm.generate`), for a change the config cannot name; `None` keeps the config's block.
    - `init_block`: `init_block(config, *, generator, device, dtype) -> layer params` for such a block.
    """

    name: str
    description: str
    configure: Callable[[TransformerConfig], TransformerConfig] = _same
    block: Callable | None = None
    init_block: Callable | None = None

    def config_for(self, config: TransformerConfig) -> TransformerConfig:
        """The config this ablation trains with, from the baseline's."""
        return self.configure(config)

    @property
    def model_fn(self) -> Callable:
        """`(params, token_ids, config) -> logits`: `fnlm.transformer_lm`, with `block` when given."""
        return fnlm.transformer_lm if self.block is None else functools.partial(fnlm.transformer_lm, block=self.block)

    @property
    def init_fn(self) -> Callable:
        """`(config, *, seed, device, dtype) -> params`: `fnlm.init_transformer_lm`, with `init_block` when given."""
        if self.init_block is None:
            return fnlm.init_transformer_lm
        return functools.partial(fnlm.init_transformer_lm, init_block=self.init_block)


def with_fields(**changes) -> Callable[[TransformerConfig], TransformerConfig]:
    """A `configure` that sets fixed config fields, e.g. `with_fields(norm="none")`."""
    return lambda config: dataclasses.replace(config, **changes)
