"""benchmarks/scale.py fit: benchmarks/README.md section 6 rebuilt from the committed measurements."""

import json
import pathlib
import subprocess
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def test_fit_rebuilds_the_scale_section(tmp_path):
    out = tmp_path / "projection.json"
    printed = subprocess.run([sys.executable, str(BENCHMARKS / "scale.py"), "fit",
                              str(BENCHMARKS / "results" / "scale_cpu.json"), "--output", str(out)],
                             capture_output=True, text=True, check=True).stdout
    assert "default, linear: fitted on the two smallest shapes, predicts 83.7 s/step for the largest against 73.4 measured (+14%)" in printed
    assert "paper, linear: fitted on the two smallest shapes, predicts 227.2 s/step for the largest against 168.8 measured (+35%)" in printed
    assert "default, matmul+vector: fitted on the two smallest shapes, predicts 64.9 s/step for the largest against 73.4 measured (-12%)" in printed
    assert "paper, matmul+vector: fitted on the two smallest shapes, predicts 178.0 s/step for the largest against 168.8 measured (+5%)" in printed
    assert "8B on one H100, paper protocol: 1.22 h" in printed
    projection = json.loads(out.read_text())
    memory = projection["memory_8b"]
    assert memory["gradient_checkpointing=True"]["describe"].startswith("19.9 GiB")
    assert memory["gradient_checkpointing=False"]["describe"].startswith("76.4 GiB")
    assert memory["gradient_checkpointing=True"]["fits_80gb"]
    assert projection == {**json.loads((BENCHMARKS / "results" / "scale_projection.json").read_text()),
                          "report": projection["report"]}
