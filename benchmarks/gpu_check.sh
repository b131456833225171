#!/usr/bin/env bash
# The GPU check: the accelerator-path tests on a random-weight model, then benchmarks/scale.py on the
# 1B and 8B shapes, writing JSON and logs to one folder. Needs torch, transformers, accelerate and pytest,
# not DSPy; --wheels installs the package's other dependencies from a local folder (no network needed).
#
#   bash benchmarks/gpu_check.sh --out gpu_check                       # on a CUDA machine
#   bash benchmarks/gpu_check.sh --out gpu_check --wheels /path/wheels # install dspy etc. from wheels first
#   bash benchmarks/gpu_check.sh --out gpu_check --tokenizer .gpu/tokenizer  # offline: the embedded tokenizer,
#        saved beforehand with `python benchmarks/scale.py tokenizer --out .gpu/tokenizer` (the GGUF is 98 MB)
#   bash benchmarks/gpu_check.sh --device cpu --out /tmp/dry           # the dry run: smallest shape, a minute
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda out=gpu_check wheels="" tokenizer=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --tokenizer) tokenizer=$2; shift 2 ;;
    *) echo "gpu_check.sh: unknown option $1 (use --device, --out, --wheels, --tokenizer)" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
mkdir -p "$out"
if [ -n "$wheels" ]; then
  "$python" -m pip install --quiet --no-index --find-links "$wheels" -e . pytest 2>&1 | tee "$out/install.log"
fi
"$python" - <<PY | tee "$out/device.log"
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PY
export DSPY_GREATER_TEST_DEVICE=$device LITELLM_LOCAL_MODEL_COST_MAP=True
if [ -n "$tokenizer" ]; then export DSPY_GREATER_TOKENIZER=$(cd "$tokenizer" && pwd); fi
# --noconftest: the suite's shared fixtures load DSPy; the accelerator path needs only the engine.
"$python" -m pytest -q -p no:cacheprovider --noconftest -m "gpu and not slow" tests/test_gpu.py 2>&1 | tee "$out/tests.log"
if [ "$device" = cpu ]; then
  set -- --shapes smollm2-135m --steps 1 --examples 4 --reasoning-tokens 8 --dtype float32
else
  set -- --shapes llama-3.2-1b llama-3-8b --steps 2 --examples 8 --reasoning-tokens 256 --dtype bfloat16
fi
"$python" benchmarks/scale.py run "$@" --device "$device" --output "$out/scale_$device.json" 2>&1 | tee "$out/scale.log"
echo "gpu_check: done; results in $out"
