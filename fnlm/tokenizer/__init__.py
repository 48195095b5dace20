"""Byte-level BPE: training (`train_bpe`), the `Tokenizer`, and `encode_file`.

Nothing here imports torch: ``from fnlm.tokenizer import train_bpe`` loads only numpy and
``regex`` (and tqdm when a progress bar is asked for).
"""

from fnlm.tokenizer.files import encode_file
from fnlm.tokenizer.gpt2 import ENDOFTEXT
from fnlm.tokenizer.tokenizer import Tokenizer
from fnlm.tokenizer.train import train_bpe

__all__ = ["ENDOFTEXT", "Tokenizer", "encode_file", "train_bpe"]
