"""Complete a prompt with a trained checkpoint.

    python experiments/generate.py --checkpoint runs/demo --prompt "Once upon a time"
    python experiments/generate.py --checkpoint runs/demo/checkpoints/latest.pt --temperature 0.7 --top-p 0.9
    python experiments/generate.py --checkpoint runs/demo --prompt-ids "0 412 9" --num-samples 3 --seed 1
    python experiments/generate.py --hf hf_model --prompt "Once upon a time"
    python experiments/generate.py --llama2c stories15M.bin --llama2c-tokenizer tokenizer.bin

The tokenizer is the one saved in the run folder (``RUN/tokenizer``), or ``--tokenizer DIR``; a
tokenizer other than the one the checkpoint was trained with is refused.
With ``--hf DIR`` it is DIR's ``tokenizer.json`` (byte-level BPE, as ``fnlm.export_hf`` writes);
with ``--llama2c`` the ``--llama2c-tokenizer`` file. ``--prompt-ids`` starts from token ids instead
of text (the only way without a tokenizer; default then: the model's BOS id, or 0); without a
tokenizer the ids are printed. ``--num-samples N`` prints N continuations, the i-th drawn with seed
``--seed + i``, separated by a blank line.

Every flag is checked before anything is loaded: a wrong value is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import typing
from pathlib import Path

_SEED_LIMIT = 1 << 63


def _fail(message: str) -> typing.NoReturn:
    """One line on stderr and exit code 2: the user gave something that cannot work."""
    print(f"generate.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        _fail(f"{message} (--help lists the flags)")


def _int_at_least(low: int) -> typing.Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _temperature(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0 = greedy), got {text!r}")
    return value


def _top_p(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _seed(text: str) -> int:
    value = _int_at_least(0)(text)
    if value >= _SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer below 2**63, got {value}")
    return value


def _prompt_ids(text: str) -> list[int]:
    words = text.replace(",", " ").split()
    if not words:
        raise argparse.ArgumentTypeError("expected token ids such as '1 403 9', got none")
    bad = [w for w in words if not w.isdigit() or not w.isascii()]
    if bad:
        raise argparse.ArgumentTypeError(f"expected token ids (integers >= 0) such as '1 403 9', got {bad[0]!r}")
    return [int(w) for w in words]


def _device(text: str) -> str:
    kind, _, index = text.partition(":")
    if text == "auto" or (kind in ("cpu", "cuda", "mps", "xpu") and (not index or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it has none or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.splitlines()[0], formatter_class=_Help)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, metavar="PATH", help="a checkpoint file, or a run folder (uses its latest.pt)")
    source.add_argument("--hf", type=Path, metavar="DIR", help="a Hugging Face Llama folder (fnlm.export_hf's, or any fnlm can read)")
    source.add_argument("--llama2c", type=Path, metavar="PATH", help="a llama2.c legacy .bin model")
    p.add_argument("--llama2c-tokenizer", type=Path, metavar="PATH", help="llama2.c's tokenizer.bin, to encode the prompt and decode (with --llama2c)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="folder with vocab.json and merges.txt (with --checkpoint; default: the run's)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--prompt", default=None, metavar="TEXT", help="the text to continue (default: 'Once upon a time' with a tokenizer)")
    start.add_argument("--prompt-ids", type=_prompt_ids, metavar="IDS", help="start from these token ids (e.g. '1 403 9' or '1,403,9')")
    p.add_argument("--max-new-tokens", type=_int_at_least(0), metavar="N", default=256, help="the most tokens to generate per sample")
    p.add_argument("--temperature", type=_temperature, metavar="T", default=0.8, help="sampling temperature, >= 0 (0 = greedy)")
    p.add_argument("--top-p", type=_top_p, metavar="P", default=0.95, help="nucleus mass, in (0, 1]")
    p.add_argument("--num-samples", type=_int_at_least(1), metavar="N", default=1, help="how many continuations to print")
    p.add_argument("--seed", type=_seed, metavar="N", default=None, help="seed of the first sample; the i-th uses seed + i (default: fresh randomness)")
    p.add_argument("--device", type=_device, metavar="NAME", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, each checked, and their combinations; one line and exit code 2 when wrong."""
    args = build_parser().parse_args(argv)
    if args.tokenizer is not None and args.checkpoint is None:
        _fail("--tokenizer goes with --checkpoint (--hf reads DIR/tokenizer.json, --llama2c --llama2c-tokenizer)")
    if args.llama2c_tokenizer is not None and args.llama2c is None:
        _fail("--llama2c-tokenizer goes with --llama2c")
    return args


def find_files(checkpoint: Path, tokenizer: Path | None) -> tuple[Path, Path]:
    """The checkpoint file and tokenizer folder for a run folder or a checkpoint path."""
    if checkpoint.is_dir():
        checkpoint = checkpoint / "checkpoints" / "latest.pt"
    if not checkpoint.is_file():
        _fail(f"no checkpoint at {checkpoint} (give a run folder or a .pt file)")
    if tokenizer is None:
        for folder in (checkpoint.parent.parent, checkpoint.parent):
            if (folder / "tokenizer" / "vocab.json").is_file():
                tokenizer = folder / "tokenizer"
                break
        else:
            _fail(f"no tokenizer folder found beside {checkpoint}; pass --tokenizer DIR")
    elif not (tokenizer / "vocab.json").is_file() or not (tokenizer / "merges.txt").is_file():
        _fail(f"--tokenizer {tokenizer}: no vocab.json and merges.txt there")
    return checkpoint, tokenizer


def check_tokenizer(ck: dict, tok, ckpt_path: Path, tok_dir: Path) -> None:
    """Exit with code 2 when the checkpoint records another tokenizer (`Tokenizer.fingerprint`) than `tok`."""
    trained = ck.get("tokenizer_fingerprint")
    if trained and trained != tok.fingerprint():
        _fail(f"{ckpt_path} was trained with tokenizer {trained[:12]}, but {tok_dir} holds tokenizer "
              f"{tok.fingerprint()[:12]}; pass --tokenizer with the folder of the run that made the checkpoint")


def _ablation_block(name: str | None):
    """The block of a named ablation the config cannot express (e.g. `qk_norm`), else `None`."""
    if name is None:
        return None
    from ablations import ABLATIONS

    if name not in ABLATIONS:
        _fail(f"the checkpoint was trained with ablation {name!r}, which experiments/ablations does not define")
    return ABLATIONS[name].block


def load_foreign(args: argparse.Namespace) -> tuple[dict, typing.Any, object | None, int | None, list[int]]:
    """Params, config, tokenizer (or None), EOS id and start ids of an ``--hf`` / ``--llama2c`` model.

    Raises FileNotFoundError or ValueError with a one-line message for a wrong path or file."""
    from fnlm import interop

    if args.hf is not None:
        params, config = interop.import_hf(args.hf)
        hf_config = json.loads((args.hf / "config.json").read_text(encoding="utf-8"))
        tok = None
        if (args.hf / "tokenizer.json").is_file():
            try:
                tok = interop.load_hf_tokenizer(args.hf)
            except ValueError as e:
                print(f"note: {e}; printing token ids instead", file=sys.stderr)
        eos, bos = hf_config.get("eos_token_id"), hf_config.get("bos_token_id")
        return params, config, tok, eos if isinstance(eos, int) else None, [bos if isinstance(bos, int) else 0]
    params, config = interop.import_llama2c(args.llama2c)
    tok = interop.load_llama2c_tokenizer(args.llama2c_tokenizer) if args.llama2c_tokenizer else None
    return params, config, tok, interop.Llama2cTokenizer.bos_id, [interop.Llama2cTokenizer.bos_id]


def _samples(args: argparse.Namespace, params: dict, config, start: list[int], eos: int | None, block=None) -> list[list[int]]:
    """`--num-samples` continuations of `start`; a ValueError of `fnlm.generate` (an id outside the
    vocabulary, non-finite logits) is one line and exit code 2."""
    import fnlm

    out = []
    for i in range(args.num_samples):
        seed = None if args.seed is None else (args.seed + i) % _SEED_LIMIT
        try:
            out.append(fnlm.generate(params, config, start, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_p=args.top_p, eos_id=eos, seed=seed, block=block))
        except ValueError as e:
            _fail(str(e).replace("\n", " "))
    return out


def generate_foreign(args: argparse.Namespace) -> str:
    """Generate from an ``--hf`` or ``--llama2c`` model; a wrong path is a one-line error (exit 2)."""
    import fnlm
    from fnlm.train import resolve_device

    try:
        params, config, tok, eos, start = load_foreign(args)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e).replace("\n", " "))
    if args.prompt is not None and tok is None:
        _fail("--prompt needs a tokenizer; give --prompt-ids without one")
    if args.prompt_ids is not None:
        start = args.prompt_ids
    elif tok is not None:
        start = tok.encode(args.prompt if args.prompt is not None else "Once upon a time")
    params = fnlm.tree_map(lambda t: t.to(resolve_device(args.device)), params)
    texts = [tok.decode(start + ids) if tok is not None else " ".join(map(str, start + ids))
             for ids in _samples(args, params, config, start, eos)]
    text = "\n\n".join(texts)
    print(text)
    return text


def generate_checkpoint(args: argparse.Namespace) -> str:
    """Generate from an fnlm checkpoint with its run's tokenizer."""
    import fnlm
    from fnlm.tokenizer import ENDOFTEXT
    from fnlm.train import resolve_device

    ckpt_path, tok_dir = find_files(args.checkpoint, args.tokenizer)
    try:
        ck = fnlm.load_checkpoint(ckpt_path, map_location=resolve_device(args.device))
        config = fnlm.TransformerConfig(**ck["config"])
        tok = fnlm.Tokenizer.from_files(tok_dir / "vocab.json", tok_dir / "merges.txt", [ENDOFTEXT])
    except (FileNotFoundError, ValueError, TypeError) as e:
        _fail(str(e).replace("\n", " "))
    check_tokenizer(ck, tok, ckpt_path, tok_dir)
    eot = tok.encode(ENDOFTEXT)[0]
    if args.prompt_ids is not None:
        prompt, start = None, args.prompt_ids
    else:
        prompt = "Once upon a time" if args.prompt is None else args.prompt
        start = tok.encode(prompt) if prompt else [eot]
    samples = _samples(args, ck["params"], config, start, eot, _ablation_block(ck.get("ablation")))
    texts = [(prompt + tok.decode(ids)) if prompt is not None else tok.decode(start + ids) for ids in samples]
    text = "\n\n".join(texts)
    print(text)
    return text


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.checkpoint is None:
        return generate_foreign(args)
    return generate_checkpoint(args)


if __name__ == "__main__":
    main()
