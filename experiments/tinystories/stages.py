"""The stages of `experiments/train_tinystories.py`: staged, cached, resumable.

Stages, each skipped when its inputs are unchanged (`RUN/stages.json` records a key per stage: the
content hashes of its input files and the settings it depends on) and each runnable alone with
`--stage`. Each returns a typed result (a frozen dataclass), which `stages.json` keeps:

1. `data` -> `DataResult`: TinyStoriesV2 from `--data DIR` (downloaded when missing), any text pair
   from `--train-file/--valid-file`, or the embedded story corpus (`tinystories.stories`).
2. `tokenizer` -> `TokenizerResult`: byte-level BPE on the training text (`--vocab-size`,
   `<|endoftext|>`) -> `RUN/tokenizer/{vocab.json,merges.txt}`.
3. `encode` -> `EncodeResult`: both texts to uint16 ids -> `RUN/tokens/{train,valid}.bin`, and the
   unigram baseline (the entropy of the validation set's token distribution).
4. `train` -> `TrainResult`: `fnlm.train.train` -> `RUN/metrics.jsonl`, `RUN/loss.png`,
   `RUN/checkpoints/`.
5. `evaluate` -> `EvalResult`: the final checkpoint's loss over the validation tokens in
   consecutive windows -> `RUN/eval.json`.
6. `sample` -> `SampleResult`: completions of a few prompts -> `RUN/samples.txt`.

A run folder refers to its own files by paths relative to itself (files from elsewhere, such as
`--train-file`, by absolute paths), so it can be moved or copied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

import fnlm
from fnlm.tokenizer import ENDOFTEXT
from fnlm.train import HARMLESS_FIELDS, Parallel, evaluate_windows, lm_loss_fn, resolve_device, train

from .cli import STAGES, Settings, resolve_settings
from .download import Corpus, resolve_corpus

__all__ = [
    "STAGES", "DataResult", "TokenizerResult", "EncodeResult", "TrainResult", "EvalResult", "SampleResult",
    "Manifest", "unigram_entropy", "stage_data", "stage_tokenizer", "stage_encode", "stage_train", "stage_evaluate",
    "stage_sample", "load_tokenizer", "model_config_for", "load_token_files", "main",
]


@dataclass(frozen=True)
class DataResult:
    """The run's text corpus: `train`, `valid` files (relative to the run folder when inside it)."""

    train: str
    valid: str
    source: str
    train_bytes: int
    valid_bytes: int
    seconds: float


@dataclass(frozen=True)
class TokenizerResult:
    """The trained tokenizer's files and size (`vocab_size` may be below the one asked for)."""

    vocab: str
    merges: str
    vocab_size: int
    seconds: float
    fingerprint: str = ""


@dataclass(frozen=True)
class EncodeResult:
    """The uint16 token files, their sizes, and the unigram baseline of the validation tokens."""

    train: str
    valid: str
    train_tokens: int
    valid_tokens: int
    train_bytes_per_token: float
    valid_bytes_per_token: float
    unigram_entropy: float
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """`fnlm.train.train`'s summary and the final checkpoint."""

    checkpoint: str
    step: int
    tokens: int
    train_loss: float
    val_loss: float
    val_perplexity: float
    wall_time: float
    tokens_per_sec: float
    params: int
    diverged: bool
    stop_reason: str | None
    resumed_from: int | None
    device: str


@dataclass(frozen=True)
class EvalResult:
    """The final validation loss over consecutive windows, and what it compares with."""

    val_loss: float
    val_perplexity: float
    tokens: int
    unigram_entropy: float
    bits_per_byte: float
    seconds: float


@dataclass(frozen=True)
class SampleResult:
    """Where the samples went and how many tokens they hold."""

    path: str
    generated_tokens: int
    seconds: float


R = TypeVar("R")


class Manifest:
    """`RUN/stages.json`: per stage, the key of its inputs, its outputs and its typed result.

    Paths inside the run folder are stored relative to it; `path(p)` turns a stored path back
    into one that works from the current directory.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = out / "stages.json"
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.state.setdefault("files", {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def rel(self, path: str | os.PathLike) -> str:
        """`path` relative to the run folder when it lies inside it, else absolute."""
        p = Path(path).resolve()
        try:
            return p.relative_to(self.out.resolve()).as_posix()
        except ValueError:
            return str(p)

    def path_of(self, stored: str) -> Path:
        """A stored path as a usable one: relative paths are relative to the run folder."""
        p = Path(stored)
        return p if p.is_absolute() else self.out / p

    def file_hash(self, path: str | os.PathLike) -> str:
        """A content hash, recomputed only when the file's size or mtime changed."""
        p = Path(path).resolve()
        st = p.stat()
        name = self.rel(p)
        cached = self.state["files"].get(name)
        if cached and cached["size"] == st.st_size and cached["mtime_ns"] == st.st_mtime_ns:
            return cached["hash"]
        h = hashlib.blake2b(digest_size=16)
        with open(p, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        digest = h.hexdigest()
        self.state["files"][name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": digest}
        return digest

    def key(self, **inputs: Any) -> str:
        return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def fresh(self, stage: str, key: str) -> bool:
        entry = self.state.get(stage)
        return bool(entry and entry["key"] == key and all(self.path_of(o).exists() for o in entry["outputs"]))

    def result(self, stage: str, cls: type[R]) -> R:
        """The stored result of `stage`; `RuntimeError` when it has not run in this folder."""
        entry = self.state.get(stage)
        if not entry:
            raise RuntimeError(f"stage {stage!r} has not run in this folder yet; run it first (--stage {stage})")
        return cls(**entry["info"])

    def done(self, stage: str, key: str, outputs: Sequence[str | os.PathLike], result: Any) -> None:
        self.state[stage] = {"key": key, "outputs": [self.rel(o) for o in outputs], "info": dataclasses.asdict(result)}
        self.save()


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the empirical token distribution: the loss of the best unigram model.

    **Arguments:**

    - `tokens`: 1-D token ids.
    - `vocab_size`: ids are below it.

    **Returns:** `-sum p log p` over the ids' frequencies in `tokens`.
    """
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _log(msg: str) -> None:
    print(f"[fnlm] {msg}", file=sys.stderr, flush=True)


def _train_key_fields(tc: fnlm.train.TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(tc).items() if k not in HARMLESS_FIELDS}


def stage_data(s: Settings, m: Manifest) -> DataResult:
    """Find or make the two text files."""
    pc = s.pipeline
    if s.train_file:
        key = m.key(train=str(Path(s.train_file).resolve()), valid=str(Path(s.valid_file).resolve()))
    else:
        key = m.key(data=s.data, size=(pc.corpus_train_bytes, pc.corpus_valid_bytes, pc.corpus_seed))
    if not s.force and m.fresh("data", key):
        result = m.result("data", DataResult)
        _log(f"data: cached ({result.source}: {result.train})")
        return result
    t0 = time.perf_counter()
    if s.train_file:
        for f in (s.train_file, s.valid_file):
            if not Path(f).is_file():
                raise FileNotFoundError(f"text file {f!r} does not exist")
        corpus = Corpus(Path(s.train_file).resolve(), Path(s.valid_file).resolve(), "files")
    else:
        corpus = resolve_corpus(
            s.data, s.out / "data", embedded_train_bytes=pc.corpus_train_bytes,
            embedded_valid_bytes=pc.corpus_valid_bytes, seed=pc.corpus_seed, download_missing=s.download,
            progress=s.progress,
        )
    result = DataResult(m.rel(corpus.train), m.rel(corpus.valid), corpus.source, corpus.train.stat().st_size,
                        corpus.valid.stat().st_size, round(time.perf_counter() - t0, 2))
    m.done("data", key, [corpus.train, corpus.valid], result)
    _log(f"data: {corpus.source} corpus, {result.train_bytes / 1e6:.1f} MB train, {result.valid_bytes / 1e6:.2f} MB valid")
    return result


def stage_tokenizer(s: Settings, m: Manifest, data: DataResult) -> TokenizerResult:
    """Train BPE on the training text."""
    key = m.key(text=m.file_hash(m.path_of(data.train)), vocab_size=s.model.vocab_size, specials=[ENDOFTEXT])
    if not s.force and m.fresh("tokenizer", key):
        result = m.result("tokenizer", TokenizerResult)
        _log(f"tokenizer: cached ({result.vocab_size} tokens)")
        return result
    t0 = time.perf_counter()
    vocab, merges = fnlm.train_bpe(m.path_of(data.train), s.model.vocab_size, [ENDOFTEXT],
                                   num_workers=s.pipeline.bpe_workers, progress=s.progress)
    folder = s.out / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    tok = fnlm.Tokenizer(vocab, merges, [ENDOFTEXT])
    tok.save(folder / "vocab.json", folder / "merges.txt")
    result = TokenizerResult(m.rel(folder / "vocab.json"), m.rel(folder / "merges.txt"), len(vocab),
                             round(time.perf_counter() - t0, 2), tok.fingerprint())
    m.done("tokenizer", key, [folder / "vocab.json", folder / "merges.txt"], result)
    extra = "" if len(vocab) == s.model.vocab_size else f" (asked for {s.model.vocab_size}; the corpus ran out of pairs)"
    _log(f"tokenizer: {len(vocab)} tokens{extra} in {result.seconds:.1f}s")
    return result


def load_tokenizer(m: Manifest, tok: TokenizerResult) -> fnlm.Tokenizer:
    """The tokenizer written by the tokenizer stage."""
    return fnlm.Tokenizer.from_files(m.path_of(tok.vocab), m.path_of(tok.merges), [ENDOFTEXT])


def stage_encode(s: Settings, m: Manifest, data: DataResult, tok_result: TokenizerResult) -> EncodeResult:
    """Encode both texts to uint16 files, with token counts and the unigram baseline."""
    texts = {"train": m.path_of(data.train), "valid": m.path_of(data.valid)}
    key = m.key(train=m.file_hash(texts["train"]), valid=m.file_hash(texts["valid"]),
                vocab=m.file_hash(m.path_of(tok_result.vocab)), merges=m.file_hash(m.path_of(tok_result.merges)))
    if not s.force and m.fresh("encode", key):
        result = m.result("encode", EncodeResult)
        _log(f"encode: cached ({result.train_tokens:,} train tokens)")
        return result
    t0 = time.perf_counter()
    tok = load_tokenizer(m, tok_result)
    folder = s.out / "tokens"
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "valid"):
        counts[split] = fnlm.encode_file(tok, texts[split], folder / f"{split}.bin", num_workers=s.pipeline.encode_workers,
                                         progress=s.progress)
    valid = np.memmap(folder / "valid.bin", dtype=np.uint16, mode="r")
    result = EncodeResult(m.rel(folder / "train.bin"), m.rel(folder / "valid.bin"), counts["train"], counts["valid"],
                          data.train_bytes / max(counts["train"], 1), data.valid_bytes / max(counts["valid"], 1),
                          unigram_entropy(valid, tok_result.vocab_size), round(time.perf_counter() - t0, 2))
    m.done("encode", key, [folder / "train.bin", folder / "valid.bin"], result)
    _log(f"encode: {result.train_tokens:,} train / {result.valid_tokens:,} valid tokens in {result.seconds:.1f}s; "
         f"unigram entropy of the validation set (baseline) {result.unigram_entropy:.3f} nats/token")
    return result


def model_config_for(s: Settings, tok: TokenizerResult) -> fnlm.TransformerConfig:
    """The model config with `vocab_size` set to the trained tokenizer's size."""
    return dataclasses.replace(s.model, vocab_size=tok.vocab_size)


def load_token_files(m: Manifest, enc: EncodeResult, config: Any) -> tuple[np.ndarray, np.ndarray]:
    """The encoded train and validation ids as checked memmaps."""
    def load(p: str) -> np.ndarray:
        return fnlm.load_tokens(m.path_of(p), dtype=np.uint16, vocab_size=config.vocab_size,
                                context_length=config.context_length)

    return load(enc.train), load(enc.valid)


def stage_train(
    s: Settings, m: Manifest, tok: TokenizerResult, enc: EncodeResult, *, model_fn: Callable | None = None,
    init_fn: Callable | None = None, parallel: Parallel = Parallel(), checkpoint_data: dict[str, Any] | None = None,
) -> TrainResult:
    """Train (or resume) with `fnlm.train.train`."""
    config = model_config_for(s, tok)
    key = m.key(train=m.file_hash(m.path_of(enc.train)), valid=m.file_hash(m.path_of(enc.valid)),
                model=dataclasses.asdict(config), opt=_train_key_fields(s.train), world=parallel.world_size)
    latest = s.out / "checkpoints" / "latest.pt"
    if not s.force and m.fresh("train", key):
        result = m.result("train", TrainResult)
        if parallel.is_main:
            _log(f"train: cached (step {result.step}, val loss {result.val_loss:.4f})")
        return result
    train_tokens, valid_tokens = load_token_files(m, enc, config)
    extra = {"tokenizer_dir": "tokenizer", "tokenizer_fingerprint": tok.fingerprint, **(checkpoint_data or {})}
    summary = train(config, s.train, train_tokens, valid_tokens, s.out, model_fn=model_fn, init_fn=init_fn,
                    resume=s.resume, overwrite=s.force, parallel=parallel, extra_checkpoint_data=extra)
    result = TrainResult(checkpoint=m.rel(latest), **summary)
    if parallel.is_main:
        m.done("train", key, [latest, s.out / "metrics.jsonl"], result)
        _log(f"train: {result.step} steps, val loss {result.val_loss:.4f} (perplexity {result.val_perplexity:.2f}), "
             f"{result.tokens_per_sec:,.0f} tokens/s, {result.wall_time:.0f}s")
    return result


def _load_params(path: Path, device: torch.device) -> tuple[Any, fnlm.TransformerConfig]:
    ck = fnlm.load_checkpoint(path, map_location=device)
    return ck["params"], fnlm.TransformerConfig(**ck["config"])


def stage_evaluate(s: Settings, m: Manifest, enc: EncodeResult, trained: TrainResult,
                   model_fn: Callable | None = None) -> EvalResult:
    """Score the final checkpoint on consecutive validation windows; writes `RUN/eval.json`."""
    ckpt = m.path_of(trained.checkpoint)
    key = m.key(ckpt=m.file_hash(ckpt), valid=m.file_hash(m.path_of(enc.valid)), limit=s.pipeline.final_eval_tokens)
    if not s.force and m.fresh("evaluate", key):
        result = m.result("evaluate", EvalResult)
        _log(f"evaluate: cached (val loss {result.val_loss:.4f})")
        return result
    t0 = time.perf_counter()
    device = resolve_device(s.train.device)
    params, config = _load_params(ckpt, device)
    bf16 = s.train.autocast == "bf16" or (s.train.autocast == "auto" and device.type == "cuda")
    loss_fn = lm_loss_fn(model_fn or fnlm.transformer_lm, config,
                         torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else None)
    valid = np.memmap(m.path_of(enc.valid), dtype=np.uint16, mode="r")
    loss, count = evaluate_windows(loss_fn, params, valid, context_length=config.context_length,
                                   batch_size=max(1, s.train.batch_size), device=device,
                                   max_tokens=s.pipeline.final_eval_tokens)
    result = EvalResult(loss, math.exp(loss), count, enc.unigram_entropy, loss / math.log(2) / enc.valid_bytes_per_token,
                        round(time.perf_counter() - t0, 2))
    (s.out / "eval.json").write_text(json.dumps(dataclasses.asdict(result), indent=1))
    m.done("evaluate", key, [s.out / "eval.json"], result)
    _log(f"evaluate: val loss {loss:.4f} (perplexity {math.exp(loss):.2f}) over {count:,} tokens; "
         f"unigram baseline {enc.unigram_entropy:.3f}")
    return result


SAMPLE_PROMPTS = ("One day, a little", "Once upon a time, there was a")


def stage_sample(s: Settings, m: Manifest, tok_result: TokenizerResult, trained: TrainResult) -> SampleResult:
    """Generate a few stories from the final checkpoint; writes `RUN/samples.txt`."""
    pc = s.pipeline
    ckpt = m.path_of(trained.checkpoint)
    key = m.key(ckpt=m.file_hash(ckpt), vocab=m.file_hash(m.path_of(tok_result.vocab)), settings=dataclasses.asdict(pc))
    out_path = s.out / "samples.txt"
    if not s.force and m.fresh("sample", key):
        _log(f"sample: cached ({out_path})")
        return m.result("sample", SampleResult)
    t0 = time.perf_counter()
    params, config = _load_params(ckpt, resolve_device(s.train.device))
    tok = load_tokenizer(m, tok_result)
    eot = tok.encode(ENDOFTEXT)[0]
    prompts = [pc.prompt, *SAMPLE_PROMPTS, ""][: pc.num_samples]
    prompts += [""] * (pc.num_samples - len(prompts))
    pieces = [f"# {pc.num_samples} samples from {m.rel(ckpt)} (temperature {pc.temperature}, top-p {pc.top_p}, "
              f"at most {pc.sample_tokens} new tokens, seed {pc.sample_seed})\n"]
    generated = 0
    for i, prompt in enumerate(prompts):
        new = fnlm.generate(params, config, tok.encode(prompt) if prompt else [eot], max_new_tokens=pc.sample_tokens,
                            temperature=pc.temperature, top_p=pc.top_p, eos_id=eot, seed=pc.sample_seed + i)
        generated += len(new)
        pieces.append(f"\n--- sample {i + 1} (prompt: {prompt!r})\n{(prompt + tok.decode(new)).strip()}\n")
    out_path.write_text("".join(pieces), encoding="utf-8")
    result = SampleResult(m.rel(out_path), generated, round(time.perf_counter() - t0, 2))
    m.done("sample", key, [out_path], result)
    _log(f"sample: {pc.num_samples} samples -> {out_path}")
    return result


def main(
    argv: Sequence[str] | None = None,
    *,
    model_fn: Callable | None = None,
    init_fn: Callable | None = None,
    parallel: Parallel = Parallel(),
) -> dict[str, Any]:
    """Run the selected stages; returns `{stage: result}` for those that ran or were cached.

    **Arguments:**

    - `argv`: command-line arguments (default `sys.argv[1:]`).
    - `model_fn`, `init_fn`: passed to the trainer and `model_fn` to the evaluation (default: the
      library's Transformer LM). Samples always use `fnlm.generate`, i.e. the config's model.
    - `parallel`: data-parallel hooks; stages other than `train` run on rank 0 only, the
      others wait at `parallel.barrier()`.
    """
    t_start = time.perf_counter()
    s = resolve_settings(argv)
    s.out.mkdir(parents=True, exist_ok=True)
    if parallel.is_main:
        _log(f"preset {s.preset}, run folder {s.out}, stages {','.join(s.stages)}")
    want = set(s.stages)

    def stage(name: str, cls: type, fn: Callable, *args: Any) -> Any:
        if name not in want:
            return Manifest(s.out).result(name, cls)
        out = fn(s, Manifest(s.out), *args) if parallel.is_main else None
        parallel.barrier()
        return out if out is not None else Manifest(s.out).result(name, cls)

    results: dict[str, Any] = {}
    results["data"] = data = stage("data", DataResult, stage_data)
    results["tokenizer"] = tok = stage("tokenizer", TokenizerResult, stage_tokenizer, data)
    results["encode"] = enc = stage("encode", EncodeResult, stage_encode, data, tok)
    if "train" in want:
        results["train"] = trained = stage_train(s, Manifest(s.out), tok, enc, model_fn=model_fn, init_fn=init_fn,
                                                 parallel=parallel)
        parallel.barrier()
    elif {"evaluate", "sample"} & want:
        trained = Manifest(s.out).result("train", TrainResult)
    if "evaluate" in want:
        results["evaluate"] = stage("evaluate", EvalResult, lambda s_, m_: stage_evaluate(s_, m_, enc, trained, model_fn))
    if "sample" in want:
        results["sample"] = stage("sample", SampleResult, stage_sample, tok, trained)
    if parallel.is_main:
        _summary(s, results, time.perf_counter() - t_start)
    return results


def _summary(s: Settings, results: dict[str, Any], seconds: float) -> None:
    lines = [f"done in {seconds:.0f}s; run folder {s.out}"]
    enc, ev, tr = results.get("encode"), results.get("evaluate"), results.get("train")
    if tr:
        lines.append(f"  trained {tr.step} steps, {tr.tokens:,} tokens, {tr.tokens_per_sec:,.0f} tokens/s, "
                     f"{tr.wall_time:.0f}s of training on {tr.device}")
    if ev and enc:
        lines.append(f"  validation loss {ev.val_loss:.4f} nats/token (perplexity {ev.val_perplexity:.2f}); "
                     f"unigram baseline {enc.unigram_entropy:.3f}")
    if "sample" in results:
        text = (s.out / results["sample"].path).read_text(encoding="utf-8").split("\n--- ")
        if len(text) > 1:
            lines.append("  first sample:\n    " + text[1].split("\n", 1)[1].strip().replace("\n", "\n    "))
    print("\n".join(lines), flush=True)
