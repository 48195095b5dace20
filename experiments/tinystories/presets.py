"""The run presets and the settings of the stages around training (`PipelineConfig`).

Each preset gives starting values for the configs (`fnlm.TransformerConfig`, `fnlm.train.TrainConfig`
and its `step`, a `fnlm.StepConfig`, and `PipelineConfig`); every value can be overridden by its flag.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["PipelineConfig", "PRESETS"]


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of the stages around training.

    - `corpus_train_bytes`: size of the embedded corpus's training text.
    - `corpus_valid_bytes`: size of the embedded corpus's validation text.
    - `corpus_seed`: seed of the embedded corpus.
    - `bpe_workers`: processes for BPE pre-tokenization (`None`: all CPUs).
    - `encode_workers`: processes for encoding the texts (`None`: all CPUs).
    - `final_eval_tokens`: validation tokens scored by the `evaluate` stage (`None`: all).
    - `num_samples`: stories written by the `sample` stage.
    - `sample_tokens`: the most new tokens per sample.
    - `temperature`: sampling temperature.
    - `top_p`: nucleus-sampling threshold.
    - `sample_seed`: seed of the first sample (the others follow it).
    - `prompt`: the first sample's prompt; the others use a few fixed story openings and one
      starts from nothing.
    """

    corpus_train_bytes: int = 6_000_000
    corpus_valid_bytes: int = 300_000
    corpus_seed: int = 0
    bpe_workers: int | None = None
    encode_workers: int | None = None
    final_eval_tokens: int | None = None
    num_samples: int = 4
    sample_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    sample_seed: int = 0
    prompt: str = "Once upon a time"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "prompt" or (value is None and f.name in _OPTIONAL):
                continue
            want = numbers.Real if f.name in ("temperature", "top_p") else numbers.Integral
            if isinstance(value, bool) or not isinstance(value, want):
                raise TypeError(f"PipelineConfig.{f.name} must be {'a number' if want is numbers.Real else 'an int'}, "
                                f"got {value!r}")
        bad = [f"{name}={getattr(self, name)} ({rule})" for name, rule, ok in self._rules() if not ok]
        if bad:
            raise ValueError(f"invalid PipelineConfig values: {'; '.join(bad)}")

    def _rules(self) -> list[tuple[str, str, bool]]:
        def at_least(name: str, low: int) -> tuple[str, str, bool]:
            value = getattr(self, name)
            rule = f"must be {low} or more" + (", or none" if name in _OPTIONAL else "")
            return name, rule, value is None or value >= low

        t, p = self.temperature, self.top_p
        return [at_least("corpus_train_bytes", 1), at_least("corpus_valid_bytes", 1), at_least("corpus_seed", 0),
                at_least("bpe_workers", 1), at_least("encode_workers", 1), at_least("final_eval_tokens", 1),
                at_least("num_samples", 0), at_least("sample_tokens", 1), at_least("sample_seed", 0),
                ("temperature", "must be a finite number >= 0; 0 is greedy", math.isfinite(t) and t >= 0),
                ("top_p", "must be a number in (0, 1]", math.isfinite(p) and 0 < p <= 1)]


_OPTIONAL = ("bpe_workers", "encode_workers", "final_eval_tokens")



_CPU_MODEL = dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344, rope_theta=10_000.0)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        "model": dict(vocab_size=10_000, context_length=64, d_model=64, num_layers=2, num_heads=2, d_ff=192, rope_theta=10_000.0),
        "train": dict(batch_size=16, steps=60, eval_interval=20, eval_batches=4, checkpoint_interval=20, log_interval=5),
        "step": dict(lr=3e-3, min_lr=3e-4, warmup_steps=10, weight_decay=0.1),
        "pipeline": dict(corpus_train_bytes=400_000, corpus_valid_bytes=40_000, final_eval_tokens=4096, num_samples=2,
                         sample_tokens=48),
    },
    "demo": {
        "model": dict(vocab_size=10_000, context_length=256, d_model=128, num_layers=4, num_heads=4, d_ff=384, rope_theta=10_000.0),
        "train": dict(batch_size=16, steps=400, eval_interval=50, eval_batches=16, checkpoint_interval=100,
                      log_interval=10),
        "step": dict(lr=3e-3, min_lr=3e-4, warmup_steps=30, weight_decay=0.1),
        "pipeline": dict(corpus_train_bytes=6_000_000, corpus_valid_bytes=300_000, final_eval_tokens=None, num_samples=4,
                         sample_tokens=256),
    },
    "cpu": {
        "model": dict(_CPU_MODEL),
        "train": dict(batch_size=32, steps=5000, eval_interval=250, eval_batches=20, checkpoint_interval=500,
                      log_interval=10),
        "step": dict(lr=2e-3, min_lr=2e-4, warmup_steps=200, weight_decay=0.1),
        "pipeline": dict(final_eval_tokens=262_144, num_samples=4, sample_tokens=256),
    },
    "h100": {
        "model": dict(_CPU_MODEL),
        "train": dict(batch_size=128, steps=10_000, max_tokens=327_680_000, eval_interval=500, eval_batches=40,
                      checkpoint_interval=1000, log_interval=20),
        "step": dict(lr=3e-3, min_lr=3e-4, warmup_steps=500, weight_decay=0.1),
        "pipeline": dict(final_eval_tokens=None, num_samples=4, sample_tokens=256),
    },
}

