"""Complete a prompt with a trained checkpoint.

    python experiments/generate.py --checkpoint runs/demo --prompt "Once upon a time"
    python experiments/generate.py --checkpoint runs/demo/checkpoints/latest.pt --temperature 0.7 --top-p 0.9
    python experiments/generate.py --hf hf_model --prompt "Once upon a time"
    python experiments/generate.py --llama2c stories15M.bin --llama2c-tokenizer tokenizer.bin

The tokenizer is the one saved in the run folder (``RUN/tokenizer``), or ``--tokenizer DIR``; a
tokenizer other than the one the checkpoint was trained with is refused.
With ``--hf DIR`` it is DIR's ``tokenizer.json`` (byte-level BPE, as ``fnlm.export_hf`` writes);
with ``--llama2c`` the ``--llama2c-tokenizer`` file. Without a tokenizer the model starts from
``--prompt-ids`` (default: its BOS id, or 0) and the ids are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import fnlm
from fnlm.tokenizer import ENDOFTEXT
from fnlm.train import resolve_device


def _fail(message: str) -> None:
    """One line on stderr and exit code 2: the user gave something that cannot work."""
    print(f"generate.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


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
    return checkpoint, tokenizer


def check_tokenizer(ck: dict, tok: fnlm.Tokenizer, ckpt_path: Path, tok_dir: Path) -> None:
    """Exit with code 2 when the checkpoint records another tokenizer (`Tokenizer.fingerprint`) than `tok`."""
    trained = ck.get("tokenizer_fingerprint")
    if trained and trained != tok.fingerprint():
        print(f"generate.py: error: {ckpt_path} was trained with tokenizer {trained[:12]}, but {tok_dir} holds "
              f"tokenizer {tok.fingerprint()[:12]}; pass --tokenizer with the folder of the run that made the checkpoint",
              file=sys.stderr)
        raise SystemExit(2)


def _ablation_block(name: str | None):
    """The block of a named ablation the config cannot express (e.g. `qk_norm`), else `None`."""
    if name is None:
        return None
    from ablations import ABLATIONS

    if name not in ABLATIONS:
        _fail(f"the checkpoint was trained with ablation {name!r}, which experiments/ablations does not define")
    return ABLATIONS[name].block


def load_foreign(args: argparse.Namespace) -> tuple[dict, fnlm.TransformerConfig, object | None, int | None, list[int]]:
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


def generate_foreign(args: argparse.Namespace, p: argparse.ArgumentParser) -> str:
    """Generate from an ``--hf`` or ``--llama2c`` model; a wrong path is a one-line error (exit 2)."""
    try:
        params, config, tok, eos, start = load_foreign(args)
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    if args.prompt is not None and tok is None:
        p.exit(2, f"{p.prog}: error: --prompt needs a tokenizer; give --prompt-ids without one\n")
    if args.prompt_ids is not None:
        start = [int(i) for i in args.prompt_ids.replace(",", " ").split()]
    elif tok is not None:
        start = tok.encode(args.prompt if args.prompt is not None else "Once upon a time")
    device = resolve_device(args.device)
    params = fnlm.tree_map(lambda t: t.to(device), params)
    try:
        ids = fnlm.generate(params, config, start, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, eos_id=eos, seed=args.seed)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    text = tok.decode(start + ids) if tok is not None else " ".join(map(str, start + ids))
    print(text)
    return text


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a checkpoint file, or a run folder (uses its latest.pt)")
    source.add_argument("--hf", type=Path, metavar="DIR", help="a Hugging Face Llama folder (fnlm.export_hf's, or any fnlm can read)")
    source.add_argument("--llama2c", type=Path, metavar="PATH", help="a llama2.c legacy .bin model")
    p.add_argument("--llama2c-tokenizer", type=Path, metavar="PATH", help="llama2.c's tokenizer.bin, to encode the prompt and decode")
    p.add_argument("--prompt-ids", metavar="IDS", help="start from these token ids (e.g. '1 403 9'), for a model without a tokenizer")
    p.add_argument("--tokenizer", type=Path, help="folder with vocab.json and merges.txt (default: the run's)")
    p.add_argument("--prompt", default=None, help="the text to continue (default: 'Once upon a time')")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.checkpoint is None:
        return generate_foreign(args, p)
    args.prompt = "Once upon a time" if args.prompt is None else args.prompt
    ckpt_path, tok_dir = find_files(args.checkpoint, args.tokenizer)
    device = resolve_device(args.device)
    ck = fnlm.load_checkpoint(ckpt_path, map_location=device)
    config = fnlm.TransformerConfig(**ck["config"])
    tok = fnlm.Tokenizer.from_files(tok_dir / "vocab.json", tok_dir / "merges.txt", [ENDOFTEXT])
    check_tokenizer(ck, tok, ckpt_path, tok_dir)
    eot = tok.encode(ENDOFTEXT)[0]
    prompt_ids = tok.encode(args.prompt) if args.prompt else [eot]
    block = _ablation_block(ck.get("ablation"))
    ids = fnlm.generate(ck["params"], config, prompt_ids, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, eos_id=eot, seed=args.seed, block=block)
    text = args.prompt + tok.decode(ids)
    print(text)
    return text


if __name__ == "__main__":
    main()
