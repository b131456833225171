"""benchmarks/speed.py --table: the README's speed tables rebuilt from the committed reports (no model)."""

import pathlib
import subprocess
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def test_tables_rebuilt_from_committed_reports():
    reports = [BENCHMARKS / "results" / f"speed_navigate_{tokens}tokens_10steps.json" for tokens in (48, 128)]
    out = subprocess.run([sys.executable, str(BENCHMARKS / "speed.py"), "--table", *map(str, reports)],
                         capture_output=True, text=True, check=True).stdout
    # The figures of benchmarks/README.md section 1 (side-by-side rows and the reproduction rows).
    assert "| ours | 6 | 4.20 (7.0x) |" in out
    assert "| greaterprompt | 8 | 65.02 |" in out
    assert "| 48 | speed_navigate_48tokens_10steps.json | 4.20 s (7.0x), 4.607 | 2.37 s (12.4x), 4.607 |" in out
    assert "| 128 | speed_navigate_128tokens_10steps.json | 5.77 s (11.3x), 4.389 |" in out
    assert out.rstrip().endswith("65.02 s, 4.689 |")
