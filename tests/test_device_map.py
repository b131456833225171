"""A model split by accelerate's ``device_map`` runs the search as the whole model does.

On the CPU machines the split puts one decoder layer's weights on disk (accelerate loads them for
each forward); on a GPU machine the same hooks move activations between devices.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from accelerate import dispatch_model

from dspy_greater.data import load_examples
from dspy_greater.engine.config import GreaterConfig
from dspy_greater.engine.extractor import derive_extractor
from dspy_greater.engine.layout import GreaterLayout
from dspy_greater.engine.model import OptimizerLM
from dspy_greater.engine.search import GreaterSearch, SearchExample


@pytest.fixture(scope="module")
def random_llama():
    """A 2-layer random-weight Llama with the embedded tokenizer, float32 on the CPU."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from scale import SHAPES, build_model

    SHAPES["tiny"] = (128, 256, 2, 4, 2, True)
    try:
        return build_model("tiny", torch.float32, "cpu")
    finally:
        del SHAPES["tiny"]


def _run(model, tokenizer):
    rows = load_examples("navigate")[:6]
    extractor = derive_extractor("answer", None, [r.answer for r in rows], [r.question for r in rows])
    examples = [SearchExample(r.question, extractor.canonical(r.answer)) for r in rows]
    config = GreaterConfig(num_steps=2, batch_size=3, max_reasoning_tokens=6, eval_every=1, seed=0)
    search = GreaterSearch(OptimizerLM(model, tokenizer, batch_size=4), GreaterLayout(tokenizer), extractor, config)
    return search.run("Think step by step.", examples[:4], examples[4:])


def test_a_search_on_a_split_model_equals_the_search_on_the_whole_model(random_llama, tmp_path):
    model, tokenizer = random_llama
    whole = _run(model, tokenizer)
    split_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                 "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    split = dispatch_model(copy.deepcopy(model), device_map=split_map, offload_dir=str(tmp_path))
    assert getattr(split, "hf_device_map", None) == split_map
    result = _run(split, tokenizer)
    assert [r.chosen for r in result.trace] == [r.chosen for r in whole.trace]
    assert [r.loss for r in result.trace] == pytest.approx([r.loss for r in whole.trace], rel=1e-4)
    assert result.best_instruction == whole.best_instruction
