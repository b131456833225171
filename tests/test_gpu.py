"""The accelerator path on a random-weight Llama model: bfloat16, the inputs store on the device,
generation, the one-hot gradient and the out-of-memory backoff.

Runs on the device ``DSPY_GREATER_TEST_DEVICE`` names (default: cuda when there is one, else cpu),
so the same tests check the CUDA path on a GPU (``benchmarks/gpu_check.sh``) and stay green on the
CPU machines. Random weights cost what a trained model costs; the answers mean nothing.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

from dspy_greater.data import bbh_rows
from dspy_greater.engine.extractor import derive_extractor
from dspy_greater.engine.layout import GreaterLayout
from dspy_greater.engine.model import OptimizerLM
from dspy_greater.engine.config import GreaterConfig
from dspy_greater.engine.search import GreaterSearch, SearchExample

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("DSPY_GREATER_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def tiny_llama():
    """A 2-layer random-weight Llama with the embedded tokenizer, in bfloat16 on the device."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from scale import SHAPES, build_model

    SHAPES["tiny"] = (128, 256, 2, 4, 2, True)
    try:
        return build_model("tiny", torch.bfloat16, DEVICE)
    finally:
        del SHAPES["tiny"]


@pytest.fixture(scope="module")
def task():
    rows = bbh_rows("navigate")[:6]
    extractor = derive_extractor("answer", None, [a for _, a in rows], [q for q, _ in rows])
    return extractor, [SearchExample(q, extractor.canonical(a)) for q, a in rows]


def _search(tiny_llama, extractor, **config):
    model, tokenizer = tiny_llama
    lm = OptimizerLM(model, tokenizer, batch_size=4)
    settings = dict(num_steps=2, batch_size=3, max_reasoning_tokens=6, eval_every=1, seed=0)
    return GreaterSearch(lm, GreaterLayout(tokenizer), extractor, GreaterConfig(**{**settings, **config}))


def test_bfloat16_steps_run_on_the_device_with_the_store_there(tiny_llama, task):
    extractor, examples = task
    search = _search(tiny_llama, extractor)
    result = search.run("Think step by step.", examples[:4], examples[4:])
    assert result.stopped_reason == "completed" and len(result.trace) == 2
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in result.trace)
    stored = list(search.lm._contexts.values())
    assert stored and all(k.device.type == DEVICE and k.dtype == torch.bfloat16 for s in stored for k, _ in s.layers)


def test_generation_runs_to_the_token_limit(tiny_llama, task):
    extractor, examples = task
    search = _search(tiny_llama, extractor)
    ids = search.layout.encode_instruction("Think step by step.")
    reasoning = search.reasoning(ids, examples[:3])
    assert [len(r) <= 6 for r in reasoning] == [True] * 3 and any(len(r) == 6 for r in reasoning)


def _gradient_step(tiny_llama, task):
    """(search, sequences, candidates, prefix) of a gradient at instruction position 1 on three examples."""
    extractor, examples = task
    search = _search(tiny_llama, extractor)
    ids = search.layout.encode_instruction("Think step by step.")
    batch = examples[:3]
    candidates = search.propose(ids, 1, batch, random.Random(0))
    seqs = search.sequences(ids, batch, search.reasoning(ids, batch))
    return search, seqs, candidates, search.prefix(ids, 1, batch)


def test_the_one_hot_gradient_is_finite_and_ranks_every_candidate(tiny_llama, task):
    search, seqs, candidates, _ = _gradient_step(tiny_llama, task)
    loss, grad = search.lm.one_hot_gradient(seqs, 1, candidates, answer_temperature=0.2, fluency_weight=0.2)
    assert grad.shape == (len(candidates),) and torch.isfinite(grad).all() and loss > 0


def test_gradient_checkpointing_on_the_device_gives_the_same_gradient(tiny_llama, task):
    """bfloat16 layers recomputed in the backward pass: the gradient of the plain pass, the model left in
    eval mode with checkpointing off."""
    search, seqs, candidates, prefix = _gradient_step(tiny_llama, task)
    plain, checkpointed = (search.lm.one_hot_gradient(seqs, 1, candidates, answer_temperature=0.2, fluency_weight=0.2,
                                                      prefix=prefix, gradient_checkpointing=flag)[1] for flag in (False, True))
    assert torch.allclose(checkpointed, plain, rtol=2e-2, atol=1e-3)
    model = search.lm.model
    assert not any(m.training or getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_out_of_memory_on_the_device_halves_the_batch_and_completes(tiny_llama, task, monkeypatch):
    extractor, examples = task
    search = _search(tiny_llama, extractor)
    real = search.lm.one_hot_gradient
    sizes = []

    def needs_small_batches(*args, **kwargs):
        sizes.append(search.lm.batch_size)
        if search.lm.batch_size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(search.lm, "one_hot_gradient", needs_small_batches)
    result = search.run("Think step by step.", examples[:4], examples[4:])
    assert result.stopped_reason == "completed" and sizes[:3] == [4, 2, 1] and search.lm.batch_size == 4


@pytest.mark.slow
def test_the_gpu_check_passes_its_cpu_dry_run(tmp_path):
    import json
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    tokenizer, model_cache = tmp_path / "tokenizer", tmp_path / "model_cache"
    model_cache.mkdir()
    subprocess.run([sys.executable, str(root / "benchmarks" / "scale.py"), "tokenizer", "--out", str(tokenizer)],
                   check=True, timeout=300)
    # As on a GPU machine that cannot fetch the embedded model and has no DSPy: the saved tokenizer
    # only, no model load, and importing dspy or litellm fails.
    blocked = tmp_path / "blocked"
    for name in ("dspy", "litellm"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on the GPU machine')\n")
    env = {**os.environ, "PYTHON": sys.executable, "DSPY_GREATER_CACHE": str(model_cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(blocked), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--out", str(tmp_path),
                           "--tokenizer", str(tokenizer)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not list(model_cache.iterdir()), "the check loaded the model instead of the saved tokenizer"
    report = json.loads((tmp_path / "scale_cpu.json").read_text())
    shape = report["shapes"][0]
    assert shape["shape"] == "smollm2-135m" and set(shape["protocols"]) == {"default", "paper"}
    assert all(p["seconds_per_step"] > 0 and p["flops_per_step"] > 0 for p in shape["protocols"].values())
    assert "5 passed" in (tmp_path / "tests.log").read_text()
