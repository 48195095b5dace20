"""The TinyStories application of fnlm: `experiments/train_tinystories.py` and its parts.

- `stages`: the cached, resumable stages (data -> tokenizer -> encode -> train -> evaluate ->
  sample), each returning a typed result, and `main`;
- `cli`: the command line (flags generated from the config dataclasses) and `resolve_settings`;
- `presets`: `PRESETS` and `PipelineConfig`;
- `download`: the resumable TinyStories download and `resolve_corpus`;
- `stories`: the embedded story grammar, a corpus that needs no network.

Scripts in `experiments/` import it as `tinystories` (Python puts the script's folder on
`sys.path`); the tests add `experiments/` to their path the same way.
"""
