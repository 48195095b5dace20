"""Complete a prompt with a trained checkpoint.

    python experiments/generate.py --checkpoint runs/demo --prompt "Once upon a time"
    python experiments/generate.py --checkpoint runs/demo/checkpoints/latest.pt --temperature 0.7 --top-p 0.9

The tokenizer is the one saved in the run folder (``RUN/tokenizer``), or ``--tokenizer DIR``; a
tokenizer other than the one the checkpoint was trained with is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fnlm
from fnlm.tokenizer import ENDOFTEXT
from fnlm.train import resolve_device


def find_files(checkpoint: Path, tokenizer: Path | None) -> tuple[Path, Path]:
    """The checkpoint file and tokenizer folder for a run folder or a checkpoint path."""
    if checkpoint.is_dir():
        checkpoint = checkpoint / "checkpoints" / "latest.pt"
    if not checkpoint.is_file():
        raise SystemExit(f"no checkpoint at {checkpoint}")
    if tokenizer is None:
        for folder in (checkpoint.parent.parent, checkpoint.parent):
            if (folder / "tokenizer" / "vocab.json").is_file():
                tokenizer = folder / "tokenizer"
                break
        else:
            raise SystemExit(f"no tokenizer folder found beside {checkpoint}; pass --tokenizer DIR")
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
        raise SystemExit(f"the checkpoint was trained with ablation {name!r}, which experiments/ablations does not define")
    return ABLATIONS[name].block


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint file, or a run folder (uses its latest.pt)")
    p.add_argument("--tokenizer", type=Path, help="folder with vocab.json and merges.txt (default: the run's)")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
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
