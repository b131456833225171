"""`pip install dspy-greater` then the README's quickstart, in a clean virtual environment.

Builds a wheel from the tracked sources, installs it with nothing but the torch build already in
use, and runs the README's quickstart block as written except for two search steps.
"""

import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _quickstart() -> str:
    block = re.search(r"## Quickstart.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no quickstart python block"
    code = block.group(1)
    assert "num_steps=10" in code
    return code.replace("num_steps=10", "num_steps=2")


@pytest.mark.slow
def test_wheel_in_clean_venv_runs_readme_quickstart(tmp_path):
    source = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(source)],
                   check=True)
    (wheel,) = wheels.glob("dspy_greater-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # the build on this machine, not a new download
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", torch_pin, str(wheel)], check=True)

    work = tmp_path / "work"
    work.mkdir()
    script = work / "quickstart.py"
    script.write_text(_quickstart())
    run = subprocess.run([str(python), str(script)], cwd=work, capture_output=True, text=True, timeout=900,
                         env={"PATH": str(env_dir / "bin"), "HOME": str(tmp_path), "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                              "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr[-3000:]
    instruction, last_step = run.stdout.strip().splitlines()[-2:]
    assert instruction.strip() and "'step': 1," in last_step  # the instruction, then the second step's record
    assert (work / "optimized.json").is_file()
    for optional in ("datasets", "llm", "llama_cpp"):  # local files need no datasets; the model needs no llm
        leaked = subprocess.run([str(python), "-c", f"import {optional}"], capture_output=True)
        assert leaked.returncode != 0, f"{optional} is optional; the plain install should not pull it in"
