#!/usr/bin/env bash
# CI: the tokenizer's C extension under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# Builds fnlm/tokenizer/_merge.c with -fsanitize=address,undefined into a temporary copy of the
# package (the normal build in the checkout is left alone), then, with ASan preloaded and every
# Python object allocated by malloc (PYTHONMALLOC=malloc, so that ASan sees a use after free that
# pymalloc would hide), runs the tests that exercise the C code and a seeded fuzz of C against
# the Python reference. Any sanitizer report stops the run with a non-zero exit.
#
#     .ci/sanitize.sh            # from a clean checkout, with the test dependencies installed
#     FUZZ_SECONDS=60 .ci/sanitize.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CC=${CC:-gcc}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

INCLUDE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
SUFFIX=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
cp -r fnlm pyproject.toml "$WORK/"
mkdir -p "$WORK/tests" "$WORK/.ci"
mkdir -p "$WORK/tests/tokenizer"
cp tests/tokenizer/test_merge_c.py tests/tokenizer/test_bpe.py "$WORK/tests/tokenizer/"
cp .ci/fuzz_merge.py "$WORK/.ci/"
find "$WORK" -name "_merge*.so" -delete
"$CC" -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    -shared -fPIC -I"$INCLUDE" fnlm/tokenizer/_merge.c -o "$WORK/fnlm/tokenizer/_merge$SUFFIX"

export LD_PRELOAD
LD_PRELOAD=$("$CC" -print-file-name=libasan.so)
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONMALLOC=malloc
cd "$WORK"
# The sanitized build must be the one imported (not the checkout's, nor an installed one).
PYTHONPATH="$WORK" "$PY" -c "import fnlm.tokenizer._merge as m, sys; assert m.__file__.startswith(sys.argv[1]), m.__file__; print('sanitize: testing', m.__file__)" "$WORK"
# No conftest and no torch: test_merge_c.py (hostile inputs, each in a child process that inherits
# the sanitizer), test_bpe.py (bpe_many against BPE's definition, Hypothesis); the fuzz covers the
# training step (test_train_bpe.py's C-against-Python tests import torch through tests/adapters.py).
PYTHONPATH="$WORK" "$PY" -m pytest -q -p no:cacheprovider --noconftest -x \
    tests/tokenizer/test_merge_c.py tests/tokenizer/test_bpe.py
PYTHONPATH="$WORK" "$PY" .ci/fuzz_merge.py --seconds "${FUZZ_SECONDS:-30}"
echo "sanitize: no AddressSanitizer or UBSan report"
