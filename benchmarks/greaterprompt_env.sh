#!/usr/bin/env bash
# Builds benchmarks/.venv-greaterprompt: the authors' packaged GReaTer
# (PyPI greaterprompt==1.1.4) in a virtualenv of its own, for
# benchmarks/greaterprompt_runner.py. Idempotent: a second run only checks.
#
# greaterprompt pins an old stack (torch==2.3.1, vllm, streamlit, guidance,
# openai 0.27, ...) that the GReaTer optimizer never touches, so it goes in with
# --no-deps and we add only what `from greaterprompt.optimizer import
# GreaterOptimizer` and the GGUF model load really import:
#   torch             CPU build already on this machine's disk (plain `torch`
#                     would pull a multi-GB CUDA build)
#   transformers      4.48.3, its own pin (5.x changed generate/forward kwargs)
#   accelerate        transformers' low_cpu_mem_usage loading path
#   gguf              transformers' GGUF reader (SmolLM2 ships as .gguf)
#   pandas, numpy, tqdm  imported at the top of greaterprompt/optimizer.py
# The five TextGrad/pe2 baseline modules that optimizer.py imports but
# GreaterOptimizer never calls are replaced by stand-ins from
# benchmarks/greaterprompt_stubs/ at run time (see that folder's loader).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${GREATERPROMPT_VENV:-$HERE/.venv-greaterprompt}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

check() {
    "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as md
want = {"greaterprompt": "1.1.4", "transformers": "4.48.3"}
for name, version in want.items():
    assert md.version(name) == version, (name, md.version(name))
for name in ("torch", "accelerate", "gguf", "pandas", "numpy", "tqdm"):
    md.version(name)
EOF
}

if [ -x "$PY" ] && check; then
    echo "greaterprompt env ready: $VENV"
    exit 0
fi

if [ ! -x "$PY" ]; then
    "$PYTHON" -m venv "$VENV"
fi

# pip warns once per package that this machine's extra local indexes lack it; drop that noise only.
quiet() { "$@" 2> >(grep -v "is neither a file nor a directory" >&2); }
quiet "${PIP[@]}" "$TORCH_SPEC"
quiet "${PIP[@]}" "transformers==4.48.3" accelerate gguf pandas numpy tqdm
quiet "${PIP[@]}" --no-deps "greaterprompt==1.1.4"

check || { echo "greaterprompt env check failed: $VENV" >&2; exit 1; }
echo "greaterprompt env ready: $VENV"
