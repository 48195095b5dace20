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

Before any stage runs, `resolve_settings` checks the settings and `preflight` the run folder; a
problem is a `ConfigError` that says what to change (the script prints it in one line, exit code
2). No checkpoint is deleted unless `--overwrite` is given: a folder holding an earlier run's
checkpoints is continued with `--resume` or refused. Ctrl-C in training saves a checkpoint and
the script says how to continue (exit code 130).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

import fnlm
from fnlm.precision import lm_loss_fn_with
from fnlm.checkpoint import callable_spec, model_fn_of, remove_stale_temporaries, resolve_checkpoint
from fnlm.tokenizer import ENDOFTEXT
from fnlm.train import (
    HARMLESS_FIELDS, Parallel, RunFolderLocked, RunLock, TrainingInterrupted, evaluate_windows,
    resolve_device, resume_mismatches, train,
)

from .cli import FIELD_FLAGS, PROG, STAGES, ConfigError, Settings, flag_name, resolve_settings
from .download import TINYSTORIES_FILES, TINYSTORIES_URL, Corpus, DownloadError, resolve_corpus

__all__ = [
    "STAGES", "DataResult", "TokenizerResult", "EncodeResult", "TrainResult", "EvalResult", "SampleResult",
    "Manifest", "unigram_entropy", "stage_data", "stage_tokenizer", "stage_encode", "stage_train", "stage_evaluate",
    "stage_sample", "load_tokenizer", "model_config_for", "load_token_files", "plan", "preflight", "main", "script",
    "ConfigError", "StageInterrupted", "NEEDS", "RESULTS", "TrainingDiverged", "StageFailed",
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
    mfu: float | None = None


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

NEEDS: dict[str, tuple[str, ...]] = {
    "data": (), "tokenizer": ("data",), "encode": ("data", "tokenizer"), "train": ("tokenizer", "encode"),
    "evaluate": ("encode", "train"), "sample": ("tokenizer", "train"),
}


class TrainingDiverged(RuntimeError):
    """The train stage stopped early (a loss or gradient norm that is not finite, or a hook's stop);
    the script says so in one line and exits with code 1. `checkpoint` is the last good one."""

    def __init__(self, step: int, reason: str, checkpoint: Path | None, checkpoint_step: int | None):
        kept = (f"the last good checkpoint is {checkpoint} (step {checkpoint_step})" if checkpoint is not None
                else "no checkpoint was kept")
        super().__init__(f"training stopped at step {step}: {reason}; {kept}; start over with --overwrite and a lower "
                         "--lr (or other settings), or give another --out")
        self.step, self.reason, self.checkpoint = step, reason, checkpoint


class StageFailed(RuntimeError):
    """A stage met an operating-system error (a full disk, a file it may not write); the script says
    which stage, the error, and the last good checkpoint, in one line (exit code 1)."""

    def __init__(self, stage: str, out: Path, error: OSError):
        what = error.strerror or str(error)
        where = f": {error.filename}" if error.filename else ""
        latest = _last_good(out)
        if stage == "train" and latest:
            kept = f"the last good checkpoint is {latest[0]} (step {latest[1]}): continue with --resume once fixed"
        else:
            kept = "the finished stages are kept: rerun the same command once fixed" + (
                f" (the last good checkpoint is {latest[0]}, step {latest[1]})" if latest else "")
        super().__init__(f"the {stage} stage failed: {what}{where}; {kept}")
        self.stage, self.out, self.error = stage, out, error


def _last_good(out: Path) -> tuple[Path, int] | None:
    """The checkpoint `OUT/checkpoints/latest.pt` stands for, and its step (from its name), if any."""
    latest = out / "checkpoints" / "latest.pt"
    try:
        target = resolve_checkpoint(latest)
    except ValueError:
        return None
    if not latest.is_file() or not target.is_file():
        return None
    digits = "".join(ch for ch in target.stem if ch.isdigit())
    return target, int(digits) if digits else -1


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage other than training's loop; `stage` names it, `out` is the run folder."""

    def __init__(self, stage: str, out: Path):
        super().__init__(f"interrupted during the {stage} stage")
        self.stage, self.out = stage, out


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in sorted(set(old) | set(new)) for line in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    if old == new:
        return []
    name = prefix.rstrip(".")
    if isinstance(old, str) and isinstance(new, str) and len(old) == len(new) == 32:
        return [f"the contents of {name}"]
    leaf = name.rsplit(".", 1)[-1]
    return [f"{FIELD_FLAGS.get(leaf, name)} {old!r} -> {new!r}"]


_INFO_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "str | None": (str, type(None)),
               "int | None": (int, type(None)), "float | None": (int, float, type(None))}


def _entry_problem(entry: Any, cls: type) -> str | None:
    """Why a stage's entry in `stages.json` cannot be used (hand-edited or damaged), or `None`."""
    if not isinstance(entry, dict):
        return "is not a JSON object"
    if not isinstance(entry.get("key"), str):
        return "has no string \"key\""
    outputs = entry.get("outputs")
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        return "has no list of \"outputs\""
    info = entry.get("info")
    if not isinstance(info, dict):
        return "has no \"info\" object"
    for f in dataclasses.fields(cls):
        if f.name not in info:
            if f.default is dataclasses.MISSING:
                return f"lacks info.{f.name}"
            continue
        value, allowed = info[f.name], _INFO_TYPES.get(str(f.type), (object,))
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            return f"has info.{f.name} = {value!r}, not a {f.type}"
    unknown = sorted(set(info) - {f.name for f in dataclasses.fields(cls)})
    return f"has unknown info field(s) {unknown}" if unknown else None


class Manifest:
    """`RUN/stages.json`: per stage, its inputs and their key, its outputs (with their sizes and
    hashes, checked before a stage counts as cached) and its typed result.

    Paths inside the run folder are stored relative to it, so the folder can be moved or copied;
    `path_of(p)` turns a stored path back into one that works from the current directory. A file
    that is not valid JSON, or a stage entry that is damaged, is a `ConfigError` saying so (the
    stages are never run on a guess).
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = out / "stages.json"
        self.state: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"files": {}}
        fix = "fix it, or delete it to redo the stages (checkpoints are kept)"
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{self.path} is not valid JSON ({e}); {fix}") from None
        except OSError as e:
            raise ConfigError(f"{self.path} cannot be read ({e.strerror}); {fix}") from None
        if not isinstance(state, dict):
            raise ConfigError(f"{self.path} does not hold a JSON object; {fix}")
        for stage, cls in RESULTS.items():
            problem = _entry_problem(state[stage], cls) if stage in state else None
            if problem:
                raise ConfigError(f"{self.path}: the {stage} stage's entry {problem}; fix it, or delete that entry "
                                  "(or the file) to redo the stage")
        if not isinstance(state.get("files"), dict):
            state["files"] = {}
        return state

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
        if (isinstance(cached, dict) and cached.get("size") == st.st_size and cached.get("mtime_ns") == st.st_mtime_ns
                and isinstance(cached.get("hash"), str)):
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

    def why_stale(self, stage: str, inputs: dict[str, Any]) -> str | None:
        """`None` when `stage` ran here with these inputs and its outputs are as it left them, else why not."""
        entry = self.state.get(stage)
        if not entry:
            return "it has not finished in this folder"
        if entry["key"] != self.key(**inputs):
            old = entry.get("inputs")
            changes = _diff(old, json.loads(json.dumps(inputs, default=str))) if old else []
            return "its inputs changed" + (f" ({'; '.join(changes[:4])})" if changes else "")
        return self.outputs_problem(entry)

    def outputs_problem(self, entry: dict[str, Any]) -> str | None:
        recorded = entry.get("output_files") if isinstance(entry.get("output_files"), dict) else {}
        for out in entry["outputs"]:
            path = self.path_of(out)
            if not path.exists():
                return f"its output {out} is missing"
            want = recorded.get(out)
            if not isinstance(want, dict):
                continue
            if path.stat().st_size != want.get("size") or self.file_hash(path) != want.get("hash"):
                return f"its output {out} is not as the stage wrote it ({path.stat().st_size:,} bytes)"
        return None

    def fresh(self, stage: str, inputs: dict[str, Any]) -> bool:
        return self.why_stale(stage, inputs) is None

    def result(self, stage: str, cls: type[R]) -> R:
        """The stored result of `stage`; `ConfigError` when it has not run in this folder."""
        entry = self.state.get(stage)
        if not entry:
            raise ConfigError(f"the {stage} stage has not run in {self.out} yet; run it first (--stage {stage})")
        return cls(**entry["info"])

    def forget(self, stage: str) -> None:
        """Drop `stage`'s entry before it runs again, so that a crash in it leaves it not done."""
        if self.state.pop(stage, None) is not None:
            self.save()

    def done(self, stage: str, inputs: dict[str, Any], outputs: Sequence[str | os.PathLike], result: Any) -> None:
        files = {self.rel(o): {"size": Path(o).stat().st_size, "hash": self.file_hash(o)} for o in outputs}
        self.state[stage] = {"key": self.key(**inputs), "inputs": json.loads(json.dumps(inputs, default=str)),
                             "outputs": [self.rel(o) for o in outputs], "output_files": files,
                             "info": dataclasses.asdict(result)}
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
    return {k: v for k, v in tc.flat().items() if k not in HARMLESS_FIELDS}


def _data_inputs(s: Settings, m: Manifest) -> dict[str, Any]:
    if s.train_file:
        return {"train": str(Path(s.train_file).resolve()), "valid": str(Path(s.valid_file).resolve())}
    if s.data:
        return {"data": str(Path(s.data).resolve())}
    pc = s.pipeline
    return {"data": None, "size": (pc.corpus_train_bytes, pc.corpus_valid_bytes, pc.corpus_seed)}


def _tokenizer_inputs(s: Settings, m: Manifest, data: DataResult) -> dict[str, Any]:
    return {"text": m.file_hash(m.path_of(data.train)), "vocab_size": s.model.vocab_size, "specials": [ENDOFTEXT]}


def _encode_inputs(s: Settings, m: Manifest, data: DataResult, tok: TokenizerResult) -> dict[str, Any]:
    return {"train": m.file_hash(m.path_of(data.train)), "valid": m.file_hash(m.path_of(data.valid)),
            "vocab": m.file_hash(m.path_of(tok.vocab)), "merges": m.file_hash(m.path_of(tok.merges))}


def _train_inputs(s: Settings, m: Manifest, tok: TokenizerResult, enc: EncodeResult, world_size: int) -> dict[str, Any]:
    return {"train": m.file_hash(m.path_of(enc.train)), "valid": m.file_hash(m.path_of(enc.valid)),
            "model": dataclasses.asdict(model_config_for(s, tok)), "opt": _train_key_fields(s.train),
            "world": world_size}


def stage_data(s: Settings, m: Manifest) -> DataResult:
    """Find or make the two text files."""
    pc = s.pipeline
    inputs = _data_inputs(s, m)
    if not s.force and m.fresh("data", inputs):
        result = m.result("data", DataResult)
        _log(f"data: cached ({result.source}: {result.train})")
        return result
    m.forget("data")
    t0 = time.perf_counter()
    if s.train_file:
        corpus = Corpus(Path(s.train_file).resolve(), Path(s.valid_file).resolve(), "files")
    else:
        try:
            corpus = resolve_corpus(
                s.data, s.out / "data", embedded_train_bytes=pc.corpus_train_bytes,
                embedded_valid_bytes=pc.corpus_valid_bytes, seed=pc.corpus_seed, download_missing=s.download,
                progress=s.progress, fallback=False,
            )
        except DownloadError as e:
            urls = " ".join(TINYSTORIES_URL.format(name=n) for n in TINYSTORIES_FILES)
            raise ConfigError(f"--data {s.data}: TinyStories is not there and could not be downloaded ({e}); fetch it "
                              f"with: wget -P {s.data} {urls} (or drop --data to train on the embedded story corpus)"
                              ) from None
    result = DataResult(m.rel(corpus.train), m.rel(corpus.valid), corpus.source, corpus.train.stat().st_size,
                        corpus.valid.stat().st_size, round(time.perf_counter() - t0, 2))
    m.done("data", inputs, [corpus.train, corpus.valid], result)
    _log(f"data: {corpus.source} corpus, {result.train_bytes / 1e6:.1f} MB train, {result.valid_bytes / 1e6:.2f} MB valid")
    return result


def stage_tokenizer(s: Settings, m: Manifest, data: DataResult) -> TokenizerResult:
    """Train BPE on the training text."""
    inputs = _tokenizer_inputs(s, m, data)
    if not s.force and m.fresh("tokenizer", inputs):
        result = m.result("tokenizer", TokenizerResult)
        _log(f"tokenizer: cached ({result.vocab_size} tokens)")
        return result
    m.forget("tokenizer")
    t0 = time.perf_counter()
    vocab, merges = fnlm.train_bpe(m.path_of(data.train), s.model.vocab_size, [ENDOFTEXT],
                                   num_workers=s.pipeline.bpe_workers, progress=s.progress)
    folder = s.out / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    tok = fnlm.Tokenizer(vocab, merges, [ENDOFTEXT])
    _save_tokenizer(tok, folder)
    result = TokenizerResult(m.rel(folder / "vocab.json"), m.rel(folder / "merges.txt"), len(vocab),
                             round(time.perf_counter() - t0, 2), tok.fingerprint())
    m.done("tokenizer", inputs, [folder / "vocab.json", folder / "merges.txt"], result)
    extra = "" if len(vocab) == s.model.vocab_size else f" (asked for {s.model.vocab_size}; the corpus ran out of pairs)"
    _log(f"tokenizer: {len(vocab)} tokens{extra} in {result.seconds:.1f}s")
    return result


def _save_tokenizer(tok: fnlm.Tokenizer, folder: Path) -> None:
    """`vocab.json` and `merges.txt` written under temporary names and renamed when both are complete."""
    remove_stale_temporaries(folder)
    tag = f"{os.getpid()}.{secrets.token_hex(4)}"
    temps = {name: folder / f".{name}.{tag}.tmp" for name in ("vocab.json", "merges.txt")}
    try:
        tok.save(temps["vocab.json"], temps["merges.txt"])
        for name, tmp in temps.items():
            os.replace(tmp, folder / name)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def load_tokenizer(m: Manifest, tok: TokenizerResult) -> fnlm.Tokenizer:
    """The tokenizer written by the tokenizer stage."""
    return fnlm.Tokenizer.from_files(m.path_of(tok.vocab), m.path_of(tok.merges), [ENDOFTEXT])


def stage_encode(s: Settings, m: Manifest, data: DataResult, tok_result: TokenizerResult) -> EncodeResult:
    """Encode both texts to uint16 files, with token counts and the unigram baseline."""
    texts = {"train": m.path_of(data.train), "valid": m.path_of(data.valid)}
    inputs = _encode_inputs(s, m, data, tok_result)
    if not s.force and m.fresh("encode", inputs):
        result = m.result("encode", EncodeResult)
        _log(f"encode: cached ({result.train_tokens:,} train tokens)")
        return result
    m.forget("encode")
    t0 = time.perf_counter()
    tok = load_tokenizer(m, tok_result)
    folder = s.out / "tokens"
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "valid"):
        counts[split] = fnlm.encode_file(tok, texts[split], folder / f"{split}.bin", num_workers=s.pipeline.encode_workers,
                                         progress=s.progress)
    valid = np.fromfile(folder / "valid.bin", dtype=np.uint16)
    result = EncodeResult(m.rel(folder / "train.bin"), m.rel(folder / "valid.bin"), counts["train"], counts["valid"],
                          data.train_bytes / max(counts["train"], 1), data.valid_bytes / max(counts["valid"], 1),
                          unigram_entropy(valid, tok_result.vocab_size), round(time.perf_counter() - t0, 2))
    m.done("encode", inputs, [folder / "train.bin", folder / "valid.bin"], result)
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


def _check_token_counts(s: Settings, enc: EncodeResult) -> None:
    """`ConfigError` when a split has fewer tokens than one training window needs."""
    need = s.model.context_length + 1
    for split, count in (("train", enc.train_tokens), ("valid", enc.valid_tokens)):
        if count < need:
            more = (f"--corpus-{split}-bytes" if not (s.data or s.train_file) else "a longer text file")
            raise ConfigError(f"the {split} text encodes to {count:,} tokens, fewer than --context-length "
                              f"{s.model.context_length} + 1; lower --context-length to {count - 1} or less, or give "
                              f"more text ({more})")


def _load_for_resume(latest: Path) -> dict[str, Any]:
    try:
        return fnlm.load_checkpoint(latest)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"cannot resume: {e}") from None


def _check_resumable(s: Settings, ck: dict[str, Any], latest: Path, tok: TokenizerResult, world_size: int) -> None:
    """`ConfigError` unless checkpoint `ck` can be continued with these settings and this tokenizer."""
    stored = ck.get("tokenizer_fingerprint")
    if stored and tok.fingerprint and stored != tok.fingerprint:
        raise ConfigError(f"cannot resume {latest}: it was trained with tokenizer {stored[:12]}, but {s.out}/tokenizer "
                          f"is now {tok.fingerprint[:12]}; restore the earlier --vocab-size and data, or start over "
                          "with --overwrite")
    problems = _mismatches(s, ck, tok, world_size)
    if not problems:
        return
    if _finished(ck):
        raise ConfigError(f"cannot resume {latest}: that run finished (step {ck['step']}) with {problems}; a finished "
                          "run cannot go on with other settings: start over with --overwrite (deletes its "
                          "checkpoints), or give another --out")
    raise ConfigError(f"cannot resume {latest}: it was trained with {problems}; rerun with those settings to continue "
                      f"it, or start over with --overwrite (deletes its checkpoints)")


def _finished(ck: dict[str, Any]) -> bool:
    tc = ck.get("train_config") or {}
    try:
        total = fnlm.train.TrainConfig.from_dict(tc).total_steps(ck["config"]["context_length"])
    except (TypeError, ValueError, KeyError):
        return False
    return ck["step"] >= total


def _mismatches(s: Settings, ck: dict[str, Any], tok: TokenizerResult | None, world_size: int) -> str:
    """The settings that keep `ck` from being continued, as flags (`--lr 0.003 (now 0.01)`); empty
    when none. Without a tokenizer yet, the vocabulary size is not compared."""
    config = model_config_for(s, tok) if tok is not None else s.model
    problems = resume_mismatches(ck, config, s.train, world_size=world_size)
    if tok is None:
        problems.pop("model.vocab_size", None)
    shown = []
    for name, (stored, now) in problems.items():
        field = name.rsplit(".", 1)[-1]
        flag = flag_name(field) if "." in name else "processes, --data-shards"
        shown.append(f"{flag} {stored} (now {now})")
    return ", ".join(shown)


def _warn_epochs(s: Settings, enc: EncodeResult, config: Any) -> None:
    """A note when the token budget is many passes over the training data (a small --train-file
    under a large preset)."""
    total = s.train.total_steps(config.context_length) * s.train.batch_size * config.context_length
    passes = total / max(enc.train_tokens, 1)
    if passes >= 10:
        _log(f"note: the run's budget of {total / 1e6:,.1f}M tokens ({s.preset} preset"
             f"{'' if s.train.max_tokens is None else ', --max-tokens'}) is {passes:,.0f} passes over the "
             f"{enc.train_tokens / 1e6:,.2f}M training tokens, so the model will mostly memorise them; give --steps "
             "or --max-tokens for a shorter run, or --preset to pick another")


def stage_train(
    s: Settings, m: Manifest, tok: TokenizerResult, enc: EncodeResult, *, model_fn: Callable | None = None,
    init_fn: Callable | None = None, parallel: Parallel = Parallel(), checkpoint_data: dict[str, Any] | None = None,
) -> TrainResult:
    """Train (or resume) with `fnlm.train.train`; `TrainingDiverged` when the run stops early."""
    config = model_config_for(s, tok)
    inputs = _train_inputs(s, m, tok, enc, parallel.world_size)
    latest = s.out / "checkpoints" / "latest.pt"
    if not s.force and not s.overwrite and m.fresh("train", inputs):
        result = m.result("train", TrainResult)
        if parallel.is_main:
            _log(f"train: cached (step {result.step}, val loss {result.val_loss:.4f})")
        return result
    _check_token_counts(s, enc)
    if s.resume:
        _check_resumable(s, _load_for_resume(latest), latest, tok, parallel.world_size)
    elif not s.overwrite:
        _refuse_earlier_run(s, m, m.why_stale("train", inputs) or "--force reruns it", {"tokenizer": tok},
                            parallel.world_size)
    if parallel.is_main:
        _warn_epochs(s, enc, config)
        m.forget("train")
    train_tokens, valid_tokens = load_token_files(m, enc, config)
    extra = {"tokenizer_dir": "tokenizer", "tokenizer_fingerprint": tok.fingerprint, **(checkpoint_data or {})}
    try:
        summary = train(config, s.train, train_tokens, valid_tokens, s.out, model_fn=model_fn, init_fn=init_fn,
                        resume=s.resume, overwrite=s.overwrite, parallel=parallel, extra_checkpoint_data=extra)
    except FileExistsError as e:
        raise ConfigError(f"{e}; continue it with --resume, or start over with --overwrite (deletes it)") from None
    if summary["diverged"]:
        good = _last_good(s.out)
        raise TrainingDiverged(summary["step"], summary["stop_reason"], good[0] if good else None,
                               good[1] if good else None)
    fields = {f.name for f in dataclasses.fields(TrainResult)}
    result = TrainResult(**{**{k: v for k, v in summary.items() if k in fields}, "checkpoint": m.rel(latest)})
    if parallel.is_main:
        m.done("train", inputs, [latest, s.out / "metrics.jsonl"], result)
        _log(f"train: {result.step} steps, val loss {result.val_loss:.4f} (perplexity {result.val_perplexity:.2f}), "
             f"{result.tokens_per_sec:,.0f} tokens/s on average, {result.wall_time:.0f}s")
    return result


def _load_model(path: Path, device: torch.device, what: str) -> tuple[Any, fnlm.TransformerConfig, Callable]:
    """Params, config and model function of checkpoint `path`; `ConfigError` (naming `what`) when
    the checkpoint cannot be loaded or its model function cannot be rebuilt here."""
    try:
        ck = fnlm.load_checkpoint(path, map_location=device)
        fn = model_fn_of(ck)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{what}: {e}") from None
    return ck["params"], fnlm.TransformerConfig(**ck["config"]), fn


def _generate_block(fn: Callable, what: str) -> Callable | None:
    """The `block` to pass `fnlm.generate` for a model trained with `fn`; `ConfigError` when
    `fnlm.generate` cannot run that model."""
    if fn is fnlm.transformer_lm:
        return None
    if isinstance(fn, functools.partial) and fn.func is fnlm.transformer_lm and not fn.args \
            and set(fn.keywords) <= {"block"}:
        return fn.keywords.get("block")
    raise ConfigError(f"{what}: the checkpoint was trained with model function {callable_spec(fn)}, "
                      "which fnlm.generate cannot run; use the code that trained it")


def stage_evaluate(s: Settings, m: Manifest, enc: EncodeResult, trained: TrainResult,
                   model_fn: Callable | None = None) -> EvalResult:
    """Score the final checkpoint on consecutive validation windows; writes `RUN/eval.json`."""
    ckpt = m.path_of(trained.checkpoint)
    inputs = {"ckpt": m.file_hash(ckpt), "valid": m.file_hash(m.path_of(enc.valid)),
              "limit": s.pipeline.final_eval_tokens}
    if not s.force and m.fresh("evaluate", inputs):
        result = m.result("evaluate", EvalResult)
        _log(f"evaluate: cached (val loss {result.val_loss:.4f})")
        return result
    t0 = time.perf_counter()
    device = resolve_device(s.train.device)
    params, config, recorded = _load_model(ckpt, device, "evaluate")
    loss_fn = lm_loss_fn_with(model_fn or recorded, config, fnlm.train.precision_of(s.train, device),
                              device_type=device.type)
    valid = np.memmap(m.path_of(enc.valid), dtype=np.uint16, mode="r")
    loss, count = evaluate_windows(loss_fn, params, valid, context_length=config.context_length,
                                   batch_size=max(1, s.train.batch_size), device=device,
                                   max_tokens=s.pipeline.final_eval_tokens)
    result = EvalResult(loss, math.exp(loss), count, enc.unigram_entropy, loss / math.log(2) / enc.valid_bytes_per_token,
                        round(time.perf_counter() - t0, 2))
    (s.out / "eval.json").write_text(json.dumps(dataclasses.asdict(result), indent=1))
    m.done("evaluate", inputs, [s.out / "eval.json"], result)
    _log(f"evaluate: val loss {loss:.4f} (perplexity {math.exp(loss):.2f}) over {count:,} tokens; "
         f"unigram baseline {enc.unigram_entropy:.3f}")
    return result


SAMPLE_PROMPTS = ("One day, a little", "Once upon a time, there was a")


def stage_sample(s: Settings, m: Manifest, tok_result: TokenizerResult, trained: TrainResult) -> SampleResult:
    """Generate a few stories from the final checkpoint; writes `RUN/samples.txt`."""
    pc = s.pipeline
    ckpt = m.path_of(trained.checkpoint)
    inputs = {"ckpt": m.file_hash(ckpt), "vocab": m.file_hash(m.path_of(tok_result.vocab)),
              "settings": dataclasses.asdict(pc)}
    out_path = s.out / "samples.txt"
    if not s.force and m.fresh("sample", inputs):
        _log(f"sample: cached ({out_path})")
        return m.result("sample", SampleResult)
    t0 = time.perf_counter()
    params, config, fn = _load_model(ckpt, resolve_device(s.train.device), "sample")
    block = _generate_block(fn, "sample")
    tok = load_tokenizer(m, tok_result)
    eot = tok.encode(ENDOFTEXT)[0]
    prompts = [pc.prompt, *SAMPLE_PROMPTS, ""][: pc.num_samples]
    prompts += [""] * (pc.num_samples - len(prompts))
    pieces = [f"# {pc.num_samples} samples from {m.rel(ckpt)} (temperature {pc.temperature}, top-p {pc.top_p}, "
              f"at most {pc.sample_tokens} new tokens, seed {pc.sample_seed})\n"]
    generated = 0
    for i, prompt in enumerate(prompts):
        new = fnlm.generate(params, config, tok.encode(prompt) if prompt else [eot], max_new_tokens=pc.sample_tokens,
                            temperature=pc.temperature, top_p=pc.top_p, eos_id=eot, seed=pc.sample_seed + i,
                            block=block)
        generated += len(new)
        pieces.append(f"\n--- sample {i + 1} (prompt: {prompt!r})\n{(prompt + tok.decode(new)).strip()}\n")
    out_path.write_text("".join(pieces), encoding="utf-8")
    result = SampleResult(m.rel(out_path), generated, round(time.perf_counter() - t0, 2))
    m.done("sample", inputs, [out_path], result)
    _log(f"sample: {pc.num_samples} samples -> {out_path}")
    return result


RESULTS: dict[str, type] = {"data": DataResult, "tokenizer": TokenizerResult, "encode": EncodeResult,
                            "train": TrainResult, "evaluate": EvalResult, "sample": SampleResult}
_INPUTS: dict[str, Callable[..., dict[str, Any]]] = {
    "data": _data_inputs, "tokenizer": _tokenizer_inputs, "encode": _encode_inputs, "train": _train_inputs,
}


def plan(s: Settings, m: Manifest, *, world_size: int = 1) -> tuple[dict[str, str | None], dict[str, Any]]:
    """What the stages up to `train` will do, as far as can be known before any runs.

    **Arguments:**

    - `s`, `m`: the settings and the run folder's manifest.
    - `world_size`: processes that will train.

    **Returns:** `(why, known)`: `why[stage]` is `None` when the stage will not run (cached, or
    not selected) and otherwise the reason it runs; `known[stage]` is its result when that is
    already on disk and will not change.
    """
    want = set(s.stages)
    why: dict[str, str | None] = {}
    known: dict[str, Any] = {}
    for stage in ("data", "tokenizer", "encode", "train"):
        deps = NEEDS[stage]
        if stage not in want:
            why[stage] = None
            if stage in m.state:
                known[stage] = m.result(stage, RESULTS[stage])
            continue
        if s.force:
            why[stage] = "--force reruns it"
            continue
        if stage == "train" and s.overwrite:
            why[stage] = "--overwrite trains it from step 0"
            continue
        rerun = [d for d in deps if d not in known]
        if rerun:
            why[stage] = f"the {rerun[0]} stage runs before it"
            continue
        args = [known[d] for d in deps] + ([world_size] if stage == "train" else [])
        why[stage] = m.why_stale(stage, _INPUTS[stage](s, m, *args))
        if why[stage] is None:
            known[stage] = m.result(stage, RESULTS[stage])
    return why, known


def _check_prerequisites(s: Settings, m: Manifest) -> None:
    want = set(s.stages)
    exporting = [("export-hf", ("tokenizer", "train"))] if s.export_hf is not None else []
    for stage, deps in [(stage, NEEDS[stage]) for stage in s.stages] + exporting:
        for dep in deps:
            if dep in want:
                continue
            entry = m.state.get(dep)
            problem = m.outputs_problem(entry) if entry else None
            if not entry or problem:
                what = f"which {s.out} does not have yet" if not entry else f"but {problem.removeprefix('its ')}"
                raise ConfigError(f"--stage {','.join(s.stages)}: the {stage} stage needs the {dep} stage's output, "
                                  f"{what}; add {dep} to --stage (or run all stages)")


def preflight(s: Settings, m: Manifest, *, world_size: int = 1) -> None:
    """Checks of the run folder before any stage runs; raises `ConfigError` saying what to change.

    - every selected stage has its inputs: selected too, or done earlier in this folder (intact);
    - `--resume`: there is a checkpoint, it loads (see `fnlm.load_checkpoint`), the stages before
      training keep their inputs, and its settings and tokenizer match (when known already);
    - without `--resume`: training would not start over in a folder holding an earlier run's
      checkpoints or metrics log, unless `--overwrite`; the refusal suggests only what would work
      (`--resume` for an unfinished run whose settings match). When only an earlier stage's output
      is missing or damaged, that stage is redone first and the train stage decides after it
      (identical outputs leave the run cached);
    - the token files (when already made) hold more tokens than the context length.

    **Arguments:**

    - `s`, `m`: the settings and the run folder's manifest.
    - `world_size`: processes that will train.
    """
    _check_prerequisites(s, m)
    if "train" not in s.stages:
        return
    why, known = plan(s, m, world_size=world_size)
    if "encode" in known and why["train"] is not None:
        _check_token_counts(s, known["encode"])
    if s.resume:
        _preflight_resume(s, m, why, known, world_size)
    elif why["train"] is not None and not s.overwrite:
        changed = [why[d] for d in ("data", "tokenizer", "encode") if why[d] and not why[d].startswith("the ")
                   and not why[d].startswith("its output") and why[d] != "it has not finished in this folder"]
        if changed or not why["train"].startswith("the "):
            _refuse_earlier_run(s, m, changed[0] if changed else why["train"], known, world_size)


def _earlier_log(out: Path) -> int:
    """The number of records in `OUT/metrics.jsonl` (0 when there is none)."""
    return len(fnlm.train.read_metrics(out / "metrics.jsonl"))


def _preflight_resume(s: Settings, m: Manifest, why: dict[str, Any], known: dict[str, Any], world_size: int) -> None:
    folder = s.out / "checkpoints"
    latest = folder / "latest.pt"
    if not latest.is_file():
        steps = [p.name for p in sorted(folder.glob("step_*.pt"))]
        if steps:
            advice = (f"the folder holds {', '.join(steps)}: to resume from one, copy it to latest.pt (in {folder}: cp "
                      f"{steps[-1]} latest.pt)")
        elif _earlier_log(s.out):
            advice = "the folder holds an earlier run's metrics.jsonl but no checkpoint: start over with --overwrite"
        else:
            advice = "run without --resume to start training"
        raise ConfigError(f"--resume: nothing to resume, {latest} does not exist; {advice}")
    if why["train"] is None:
        return
    for stage in ("data", "tokenizer", "encode"):
        if why[stage] and why[stage].startswith("its inputs changed"):
            detail = why[stage].removeprefix("its inputs changed")
            raise ConfigError(f"cannot resume {latest}: the {stage} stage's inputs changed since it was written"
                              f"{detail}, so the training data would differ; restore those settings to continue "
                              "it, or start over with --overwrite")
    ck = _load_for_resume(latest)
    if "tokenizer" in known:
        _check_resumable(s, ck, latest, known["tokenizer"], world_size)


def _refuse_earlier_run(s: Settings, m: Manifest, why: str, known: dict[str, Any], world_size: int) -> None:
    """`ConfigError` when training would start over (because of `why`) in a folder holding an earlier run."""
    folder = s.out / "checkpoints"
    latest = folder / "latest.pt"
    earlier = sorted(folder.glob("step_*.pt"))
    other = "or give another --out"
    if not (earlier or latest.exists()):
        records = _earlier_log(s.out)
        if records:
            raise ConfigError(f"{s.out / 'metrics.jsonl'} holds the log of an earlier run ({records} records) that "
                              f"left no checkpoint; start over with --overwrite (deletes it), {other}")
        return
    newest = earlier[-1].name if earlier else latest.name
    overwrite = "start over with --overwrite (deletes its checkpoints)"
    if "train" in m.state:
        raise ConfigError(f"{folder} holds a finished run (newest checkpoint {newest}) that training would replace: "
                          f"{why}; {overwrite}, {other}")
    try:
        ck = fnlm.load_checkpoint(latest)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{folder} holds an unfinished run whose latest checkpoint cannot be loaded ({e}); "
                          f"{overwrite}, {other}") from None
    problems = _mismatches(s, ck, known.get("tokenizer"), world_size)
    if problems:
        raise ConfigError(f"{folder} holds an unfinished run (newest checkpoint {newest}) trained with {problems}; "
                          f"continue it with --resume and those settings, or {overwrite}, {other}")
    raise ConfigError(f"{folder} holds an unfinished run (newest checkpoint {newest}); continue it with --resume, or "
                      f"{overwrite}, {other}")


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
      library's Transformer LM; a later run evaluates with the model function the checkpoint
      records). Samples use `fnlm.generate`, with the recorded block of a
      `functools.partial(fnlm.transformer_lm, block=...)`; another model function is refused.
    - `parallel`: data-parallel hooks; stages other than `train` run on rank 0 only, the
      others wait at `parallel.barrier()`.

    The run folder is locked (`fnlm.train.RunLock`) before the settings of the folder are checked
    and held until the last stage ends; `--threads` applies to every stage.

    **Raises:** `ConfigError` for settings or a run folder that cannot work (before any stage
    runs, except where only a stage's output can tell), or a folder another run holds;
    `TrainingDiverged` when training stops early; `StageFailed` for an operating-system error in a
    stage (a full disk); `fnlm.train.TrainingInterrupted` on Ctrl-C in training (after saving a
    checkpoint) and `StageInterrupted` in another stage.
    """
    t_start = time.perf_counter()
    s = resolve_settings(argv)
    if s.train.shard is not None:
        if parallel.world_size < 2:
            raise ConfigError(f"--shard {s.train.shard} splits the training state over several processes: launch with "
                              f"torchrun --nproc-per-node N {PROG} ... (N >= 2), or drop --shard")
        if parallel.sharding is None:
            from fnlm.train.sharding import make_sharded_parallel

            parallel = make_sharded_parallel(parallel, s.train.shard)
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    with _locked(s.out, parallel) as lock:
        m = Manifest(s.out)
        preflight(s, m, world_size=parallel.world_size)
        if lock is not None and lock.taken_over:
            _log(f"note: {lock.takeover_note()}")
        if parallel.is_main:
            _log(f"preset {s.preset}, run folder {s.out}, stages {','.join(s.stages)}, {torch.get_num_threads()} "
                 f"torch thread(s)")
            for note in s.notes:
                _log(f"note: {note}")
        results, want = _run_stages(s, m, parallel, model_fn, init_fn)
        if parallel.is_main:
            _summary(s, {k: v for k, v in results.items() if k in want}, time.perf_counter() - t_start)
    return {k: v for k, v in results.items() if k in want}


def _run_stages(s: Settings, m: Manifest, parallel: Parallel, model_fn: Callable | None,
                init_fn: Callable | None) -> tuple[dict[str, Any], set[str]]:
    want = set(s.stages)
    needed = want | {d for stage in want for d in NEEDS[stage]}
    results: dict[str, Any] = {}
    current = "data"
    try:
        for name in STAGES:
            if name not in needed:
                continue
            current = name
            results[name] = _run_stage(name, name in want, s, m, results, parallel, model_fn, init_fn)
        if s.export_hf is not None and parallel.is_main:
            current = "export"
            results["export_hf"] = export_hf(s, m, results.get("tokenizer") or m.result("tokenizer", TokenizerResult),
                                             results.get("train") or m.result("train", TrainResult))
            want.add("export_hf")
    except (TrainingInterrupted, StageInterrupted):
        raise
    except KeyboardInterrupt:
        raise StageInterrupted(current, s.out) from None
    except OSError as e:
        raise StageFailed(current, s.out, e) from None
    return results, want


@contextlib.contextmanager
def _locked(out: Path, parallel: Parallel) -> Any:
    """Hold `out`'s `RunLock` (on rank 0) for the stages, taking over a stale one quietly (the note is
    printed once the run goes ahead); a folder this call made is removed again when nothing was
    written to it (a run refused before any stage)."""
    if not parallel.is_main:
        yield None
        return
    made = [p for p in [out, *out.absolute().parents] if not p.exists()]
    try:
        lock = RunLock(out, quiet=True).acquire()
    except RunFolderLocked as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"--out {out}: the run folder cannot be made or locked ({e.strerror or e})") from None
    try:
        yield lock
    finally:
        lock.release()
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break


def export_hf(s: Settings, m: Manifest, tok: TokenizerResult, trained: TrainResult) -> Path:
    """Write the final checkpoint and the run's tokenizer to `s.export_hf` as a Hugging Face Llama folder."""
    params, config, fn = _load_model(m.path_of(trained.checkpoint), torch.device("cpu"), "--export-hf")
    if _generate_block(fn, "--export-hf") is not None:
        raise ConfigError(f"--export-hf: the checkpoint was trained with another block "
                          f"({callable_spec(fn)}), which a Llama folder cannot hold; drop --export-hf")
    fnlm.export_hf(params, config, s.export_hf, tokenizer=load_tokenizer(m, tok))
    _log(f"export: {s.export_hf} (a Hugging Face Llama folder: transformers' AutoModelForCausalLM and AutoTokenizer "
         f"load it; python experiments/generate.py --hf {s.export_hf})")
    return s.export_hf


def _run_stage(name: str, selected: bool, s: Settings, m: Manifest, results: dict[str, Any], parallel: Parallel,
               model_fn: Callable | None, init_fn: Callable | None) -> Any:
    mine = m if parallel.is_main else Manifest(s.out)
    if not selected:
        return mine.result(name, RESULTS[name])
    r = results
    if name == "train":
        out = stage_train(s, mine, r["tokenizer"], r["encode"], model_fn=model_fn, init_fn=init_fn, parallel=parallel)
        parallel.barrier()
        return out
    calls: dict[str, Callable[[], Any]] = {
        "data": lambda: stage_data(s, m),
        "tokenizer": lambda: stage_tokenizer(s, m, r["data"]),
        "encode": lambda: stage_encode(s, m, r["data"], r["tokenizer"]),
        "evaluate": lambda: stage_evaluate(s, m, r["encode"], r["train"], model_fn),
        "sample": lambda: stage_sample(s, m, r["tokenizer"], r["train"]),
    }
    out = calls[name]() if parallel.is_main else None
    parallel.barrier()
    return out if out is not None else Manifest(s.out).result(name, RESULTS[name])


def _summary(s: Settings, results: dict[str, Any], seconds: float) -> None:
    lines = [f"done in {seconds:.0f}s; run folder {s.out}"]
    enc, ev, tr = results.get("encode"), results.get("evaluate"), results.get("train")
    if tr:
        mfu = f" (MFU {tr.mfu:.1%})" if tr.mfu else ""
        lines.append(f"  trained {tr.step} steps, {tr.tokens:,} tokens, {tr.tokens_per_sec:,.0f} tokens/s on average"
                     f"{mfu}, {tr.wall_time:.0f}s of training on {tr.device}")
    if ev and enc:
        lines.append(f"  validation loss {ev.val_loss:.4f} nats/token (perplexity {ev.val_perplexity:.2f}); "
                     f"unigram baseline {enc.unigram_entropy:.3f}")
    if "sample" in results:
        text = (s.out / results["sample"].path).read_text(encoding="utf-8").split("\n--- ")
        if len(text) > 1:
            lines.append("  first sample:\n    " + text[1].split("\n", 1)[1].strip().replace("\n", "\n    "))
    print("\n".join(lines), flush=True)


def script() -> int:
    """`train_tinystories.py`'s entry: `main` (under torchrun when launched so) with every error
    the user can fix, and Ctrl-C, reported in one line on stderr; returns the exit code.

    **Returns:** 0 when done; 2 for a `ConfigError` (the message says what to change, e.g. a
    folder another run holds); 1 when training stopped early (`TrainingDiverged`: a loss or
    gradient norm that is not finite) or a stage met an operating-system error (`StageFailed`: a
    full disk), naming the last good checkpoint; 130 on Ctrl-C, after "saved step N to PATH;
    continue with --resume" when training was interrupted.
    """
    from fnlm.train import parallel as dist

    try:
        dist.run(main, device=lambda: resolve_settings().train.device)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (TrainingDiverged, StageFailed) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except TrainingInterrupted as e:
        if e.checkpoint is not None:
            print(f"saved step {e.step} to {e.checkpoint}; continue with --resume", file=sys.stderr, flush=True)
        return 130
    except StageInterrupted as e:
        latest = e.out / "checkpoints" / "latest.pt"
        where = "; the finished stages are kept: rerun the same command to continue"
        if e.stage == "train" and latest.exists():
            where = f"; {latest} holds the last checkpoint: continue with --resume"
        print(f"interrupted during the {e.stage} stage{where}", file=sys.stderr, flush=True)
        return 130
    return 0
