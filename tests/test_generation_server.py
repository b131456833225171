"""Reasoning generated on a real llama.cpp server serving the embedded GGUF (the optimizer model's weights).

With ``DSPY_GREATER_GENERATION_SERVER`` set to an OpenAI-compatible URL (``http://127.0.0.1:8000/v1``),
the same tests run against that server instead: it must serve the embedded model's weights (how the
vLLM recipe of docs/performance.md is checked).
"""

import logging
import os
import re

import dspy
import pytest

from dspy_greater import GReaTerTeleprompter
from dspy_greater.data import load_examples
from dspy_greater.targets.generation import CompletionServerGenerator, GenerationServerError, check_generation_server
from dspy_greater.engine.model import OptimizerLM
from dspy_greater.models.loading import gemma3_270m_path
from dspy_greater.targets.llama_cpp import LlamaCppServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    url = os.environ.get("DSPY_GREATER_GENERATION_SERVER")
    if url:
        yield url
        return
    with LlamaCppServer(n_threads=1) as running:
        yield running


@pytest.fixture(scope="module")
def prompts(optimizer):
    tokenizer = optimizer[1]
    questions = [e.question for e in load_examples("navigate")[:3]]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{q}\nLet's think step by step."}],
                                           add_generation_prompt=True, tokenize=False) for q in questions]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def test_server_generation_follows_the_same_weights_as_pytorch(optimizer, server, prompts):
    model, tokenizer = optimizer
    generator = CompletionServerGenerator(server, tokenizer)
    served = OptimizerLM(model, tokenizer, batch_size=4, generator=generator)
    local = OptimizerLM(model, tokenizer, batch_size=4)

    remote_rows = served.generate(prompts, max_new_tokens=12)
    local_rows = local.generate(prompts, max_new_tokens=12)

    assert generator.requests == len(prompts)
    assert all(0 < len(row) <= 12 for row in remote_rows)
    # Same weights, different arithmetic (llama.cpp's quantized kernels): greedy decoding agrees on
    # the first token and may part at a near-tie soon after (seen: "Yes\n- No" against "Yes\n\nThe answer").
    assert all(r[:1] == l_[:1] for r, l_ in zip(remote_rows, local_rows)), (
        [tokenizer.decode(r) for r in remote_rows], [tokenizer.decode(r) for r in local_rows])


def test_stop_strings_are_applied_to_served_text(optimizer, server, prompts):
    model, tokenizer = optimizer
    served = OptimizerLM(model, tokenizer, generator=CompletionServerGenerator(server, tokenizer))
    full = served.generate(prompts[:1], max_new_tokens=16)[0]
    assert len(full) >= 3
    stop = tokenizer.decode(full[1:2])
    cut = served.generate(prompts[:1], max_new_tokens=16, stop_strings=[stop])[0]
    assert stop in tokenizer.decode(cut)
    assert len(cut) < len(full)


def test_compile_generates_on_the_server(tiny_teleprompter, server):
    train = load_examples("navigate")[:6]
    teleprompter = tiny_teleprompter(target_candidates=0, generation_server=server)
    compiled = teleprompter.compile(dspy.ChainOfThought("question -> answer"), trainset=train[:4], valset=train[4:])

    assert teleprompter._lm.generator.requests >= 3
    assert compiled.greater_results["predict"]["trace"][0]["step"] == 0
    assert teleprompter.get_params()["generation_server"] == getattr(server, "api_base", server)


def test_unreachable_server_names_the_url_and_the_fix(optimizer):
    with pytest.raises(GenerationServerError, match=r"127\.0\.0\.1:9/v1/models.*generation_server"):
        CompletionServerGenerator("http://127.0.0.1:9/v1", optimizer[1], timeout=5)


def test_generation_server_must_be_a_url():
    with pytest.raises(ValueError, match="http"):
        GReaTerTeleprompter(generation_server="localhost:8000")


def test_a_down_server_fails_compile_before_the_model_loads(no_model):
    teleprompter = GReaTerTeleprompter(generation_server="http://127.0.0.1:9/v1", progress=False)
    train = load_examples("navigate")[:6]
    with pytest.raises(GenerationServerError, match=r"Cannot reach .*127\.0\.0\.1:9/v1/models"):
        teleprompter.compile(dspy.ChainOfThought("question -> answer"), trainset=train[:4], valset=train[4:])


def test_a_model_the_server_does_not_serve_fails_before_the_model_loads(no_model, server):
    served = getattr(server, "alias", None) or check_generation_server(server)
    teleprompter = GReaTerTeleprompter(generation_server=server, generation_model="no-such-model", progress=False)
    train = load_examples("navigate")[:6]
    with pytest.raises(GenerationServerError, match=rf"does not serve 'no-such-model'.*{re.escape(served)}.*generation_model="):
        teleprompter.compile(dspy.ChainOfThought("question -> answer"), trainset=train[:4], valset=train[4:])


def test_a_server_that_adds_bos_sees_the_prompt_tokens_once(caplog):
    """Gemma's tokenizer adds BOS and so does the server (llama.cpp by the GGUF's flag): the prompt's
    own BOS is left out of the text, or the server would read two."""
    import json
    import urllib.request

    from transformers import AutoTokenizer

    path = gemma3_270m_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tokenizer("<start_of_turn>user\nWhich way?<end_of_turn>\n<start_of_turn>model\n").input_ids
    assert ids[0] == tokenizer.bos_token_id
    with LlamaCppServer(path, n_threads=1) as gemma:
        generator = CompletionServerGenerator(gemma, tokenizer)
        text = generator.prompt_text(ids)
        request = urllib.request.Request(gemma.api_base.removesuffix("/v1") + "/extras/tokenize",
                                         json.dumps({"input": text}).encode(), {"Content-Type": "application/json"})
        served = json.loads(urllib.request.urlopen(request, timeout=60).read())["tokens"]
    assert served == ids
    with caplog.at_level(logging.WARNING, logger="dspy_greater"):  # a prompt without BOS gets one there
        generator.prompt_text(ids[1:])
        generator.prompt_text(ids[1:])
    assert [r.message for r in caplog.records].count(
        "The prompts sent to the generation server do not start with BOS, which the server adds: its reasoning "
        "follows a BOS the optimizer model's sequences lack.") == 1
