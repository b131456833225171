"""Plain-text completions for base models: ``PlainTextLM``, ``GReaTerAdapter``'s text layout, GGUF
chat-template detection, and target-aware selection on a predictor's own LM.

The live tests run the real Gemma-3-270M (a base model whose GGUF has no chat template) served by
llama.cpp on 127.0.0.1, one server for the module, with short token limits (the machine's 2 CPU
cores are shared).
"""

import asyncio
import copy
import json
import types
import urllib.request
import uuid

import dspy
import pytest
import torch
from dspy.lm15 import Config, Message, Request, UnsupportedFeatureError

from dspy_greater import GReaTerTeleprompter
from dspy_greater.targets.adapter import GReaTerAdapter
from dspy_greater.data import load_examples, split_examples
from dspy_greater.engine.extractor import Extractor, derive_extractor
from dspy_greater.engine.layout import GreaterLayout
from dspy_greater.models.loading import default_model_path, gemma3_270m_path
from dspy_greater.metrics import exact_match
from dspy_greater.targets.plain_text import PlainTextLM, TextCompletionEngine, render_prompt, text_model

INSTRUCTION = "Given the fields `question`, produce the fields `answer`."
YES_NO = Extractor("choice", "\nTherefore, the final answer (Yes or No) is", ("Yes", "No"))
A_B = Extractor("letter", "\nTherefore, the final answer (one of (A), (B)) is (", ("(A)", "(B)"))


class ScriptedLM:
    """Records requests and replies with scripted texts; ``model_type`` as given."""

    def __init__(self, replies, model_type="text", **kwargs):
        self.replies, self.model_type, self.kwargs = list(replies), model_type, kwargs
        self.requests = []

    def __call__(self, prompt=None, messages=None, **kwargs):
        self.requests.append((prompt, messages, kwargs))
        return [self.replies.pop(0)]

    async def acall(self, prompt=None, messages=None, **kwargs):
        return self(prompt=prompt, messages=messages, **kwargs)


def cot_signature(instruction=INSTRUCTION):
    return dspy.ChainOfThought("question -> answer").predict.signature.with_instructions(instruction)


# -- no server ---------------------------------------------------------------------------------------------


def test_text_model_strings():
    assert text_model("openai/gemma") == "text-completion-openai/gemma"
    assert text_model("gemma") == "text-completion-openai/gemma"
    assert text_model("text-completion-openai/gemma") == "text-completion-openai/gemma"
    assert text_model("together_ai/some/model") == "together_ai/some/model"
    lm = PlainTextLM("openai/gemma", api_base="http://127.0.0.1:9/v1", temperature=0.0, max_tokens=8)
    assert lm.model == "text-completion-openai/gemma" and lm.model_type == "text" and lm.api_base.endswith(":9/v1")
    assert "api_base" not in lm.kwargs  # held by the engine (DSPy refuses client settings on custom engines)
    with pytest.raises(TypeError, match="model_type"):
        PlainTextLM("openai/gemma", model_type="chat")


def test_render_prompt_sends_one_user_message_verbatim_and_joins_several():
    one = Request(model="m", messages=(Message.user("  inputs\n\nDo it.\n\nAnswer:"),))
    assert render_prompt(one) == "  inputs\n\nDo it.\n\nAnswer:"
    several = Request(model="m", system="Be brief.", messages=(Message.user("Q1"), Message.assistant("A1"),
                                                               Message.user("Q2")))
    assert render_prompt(several) == "Be brief.\n\nQ1\n\nA1\n\nQ2"  # no "BEGIN RESPONSE:"
    engine = TextCompletionEngine("openai/m", api_base="http://h/v1", api_key="k", timeout=5)
    args = engine.arguments(Request(model="m", messages=(Message.user("x"),)))
    assert args["model"] == "text-completion-openai/m" and args["prompt"] == "x"
    assert (args["api_base"], args["api_key"], args["timeout"], args["num_retries"]) == ("http://h/v1", "k", 5, 0)
    with pytest.raises(UnsupportedFeatureError, match="logprobs"):  # a plain completion cannot carry it: refused
        engine.arguments(Request(model="m", messages=(Message.user("x"),), config=Config(logprobs=0)))


def test_plain_text_lm_state_round_trip():
    lm = PlainTextLM("openai/gemma", api_base="http://127.0.0.1:9/v1", api_key="secret", temperature=0.0,
                     max_tokens=8, num_retries=1)
    state = lm.dump_state()
    assert "secret" not in json.dumps(state) and state["api_base"] == "http://127.0.0.1:9/v1"
    again = dspy.BaseLM.load_state(state, allow_custom_lm_class=True)
    assert type(again) is PlainTextLM and again.model == lm.model and again.kwargs == lm.kwargs
    assert again.api_base == lm.api_base and again.num_retries == 1
    program = dspy.ChainOfThought("question -> answer")
    program.set_lm(lm)
    assert program.deepcopy().predict.lm.api_base == lm.api_base


def test_adapter_text_prompts_follow_the_plain_layout():
    adapter = GReaTerAdapter({"answer": YES_NO})
    lm = ScriptedLM(["\nThe answer is No.", " No"], max_tokens=64)
    outputs = adapter(lm, {}, cot_signature(), [], {"question": "Q?"})
    assert outputs == [{"reasoning": "The answer is No.", "answer": "No"}]
    (first, first_messages, first_kwargs), (second, second_messages, second_kwargs) = lm.requests
    assert first == f"Q?\n\n{INSTRUCTION}\n\nAnswer:" and first_messages is None
    assert second == f"{first}\nThe answer is No.\nTherefore, the final answer (Yes or No) is"
    assert "max_tokens" not in first_kwargs and second_kwargs == {"max_tokens": 16, "n": 1}
    # A chat LM still gets chat messages.
    chat = ScriptedLM(["No", "No"], model_type="chat")
    adapter(chat, {}, cot_signature(), [], {"question": "Q?"})
    assert chat.requests[0][0] is None and chat.requests[0][1] == [{"role": "user", "content": f"Q?\n\n{INSTRUCTION}"}]


def test_adapter_text_demos_and_async():
    adapter = GReaTerAdapter({"answer": A_B})
    demo = {"question": "Pick.\n(A) x\n(B) y", "reasoning": "x is right.", "answer": "(A)"}
    prompt = adapter.format_text(cot_signature("Choose."), [demo], {"question": "Pick again.\n(A) u\n(B) v"})
    assert prompt == ("Pick.\n(A) x\n(B) y\n\nChoose.\n\nAnswer: x is right.\nTherefore, the final answer (one of "
                      "(A), (B)) is (A)\n\nPick again.\n(A) u\n(B) v\n\nChoose.\n\nAnswer:")
    lm = ScriptedLM([" Hmm.", "B) because"])
    outputs = asyncio.run(adapter.acall(lm, {}, cot_signature("Choose."), [], {"question": "Q"}))
    assert outputs[0]["answer"] == "(B)" and lm.requests[1][0].endswith(" Hmm." + A_B.text)


def test_adapter_text_prompt_is_the_optimizers_plain_text_layout(optimizer):
    """The target's text equals what the optimizer scores for a tokenizer without a chat template:
    BOS (llama.cpp adds it), inputs, instruction, "Answer:", reasoning, extractor."""
    tokenizer = copy.deepcopy(optimizer[1])
    tokenizer.chat_template = None
    layout = GreaterLayout(tokenizer)
    assert not layout.has_chat_template
    question = load_examples("navigate")[0].question
    instruction = "Think about each step, then answer."
    reasoning = " I face forward. Left and right cancel."
    adapter = GReaTerAdapter({"answer": YES_NO})
    lm = ScriptedLM([reasoning, " Yes"])
    adapter(lm, {}, cot_signature(instruction), [], {"question": question})
    prompt, follow_up = lm.requests[0][0], lm.requests[1][0]

    head = layout.prompt(question, layout.encode(instruction))
    assert tokenizer.decode(head.ids) == tokenizer.bos_token + prompt
    full = layout.full(question, layout.encode(instruction), layout.encode(reasoning), layout.encode(YES_NO.text),
                       layout.encode(YES_NO.target("Yes")))
    assert tokenizer.decode(full.ids[: full.answer_start]) == tokenizer.bos_token + follow_up


def test_gguf_chat_template_detection(tmp_path):
    gguf = pytest.importorskip("gguf")
    from dspy_greater.targets.llama_cpp import LlamaCppServer, gguf_chat_template

    assert gguf_chat_template(gemma3_270m_path()) is None  # a base model
    smollm2 = default_model_path()
    reference = gguf.GGUFReader(str(smollm2)).fields["tokenizer.chat_template"].contents()
    assert gguf_chat_template(smollm2) == reference and "im_start" in reference
    # Every value type is skipped correctly; a named template counts when there is no default one.
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_array("tokenizer.ggml.scores", [0.5, 1.5, 2.5])
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_bool("flag", True)
    writer.add_uint64("big", 2**40)
    writer.add_string("tokenizer.chat_template.tool_use", "{{ tools }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert gguf_chat_template(path) == "{{ tools }}"
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf_chat_template(tmp_path / "bad.gguf")

    assert LlamaCppServer("gemma3-270m").plain_text
    assert not LlamaCppServer("gemma3-270m", chat_format="gemma").plain_text
    assert not LlamaCppServer().plain_text
    code = LlamaCppServer("gemma3-270m", port=8123).lm_code()
    assert code.startswith("PlainTextLM('openai/gemma-3-270m-q4_k_m', api_base='http://127.0.0.1:8123/v1'")
    assert "engine" not in code and "model_type" not in code
    assert LlamaCppServer(port=8123).lm_code().startswith("dspy.LM('openai/smollm2")


# -- live: Gemma-3-270M served by llama.cpp ---------------------------------------------------------------

pytest.importorskip("llama_cpp")
from dspy_greater.targets.llama_cpp import LlamaCppServer  # noqa: E402


@pytest.fixture(scope="module")
def gemma():
    with LlamaCppServer("gemma3-270m", n_threads=1) as running:
        yield running
    assert not running.is_running


def _tokenize(server, text):
    url = server.api_base[: -len("/v1")] + "/extras/tokenize"
    request = urllib.request.Request(url, data=json.dumps({"input": text}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["tokens"]


def test_server_lm_is_plain_text_for_a_base_model(gemma):
    lm = gemma.lm(max_tokens=4, cache=False)
    assert type(lm) is PlainTextLM and lm.model == f"text-completion-openai/{gemma.alias}"
    chat = gemma.lm(model_type="chat", max_tokens=4)
    assert type(chat) is dspy.LM and chat.model_type == "chat"  # forced: llama.cpp's fallback chat format

    prompt = "Question: Is ice cold?\n\nAnswer:"
    with dspy.track_usage() as tracker:
        outputs = lm(prompt)
    entry = lm.history[-1]
    assert isinstance(outputs[0], str) and entry["prompt"] == prompt and entry["messages"] is None
    assert entry["response"].provider_data["prompt"] == prompt  # what went on the wire
    # The server saw exactly BOS + the prompt: no chat template, no "BEGIN RESPONSE:".
    tokens = _tokenize(gemma, prompt)
    assert entry["usage"]["prompt_tokens"] == len(tokens) and tokens[0] == 2
    assert 0 < entry["usage"]["completion_tokens"] <= 4
    assert entry["usage"]["total_tokens"] == entry["usage"]["prompt_tokens"] + entry["usage"]["completion_tokens"]
    assert tracker.get_total_tokens()[lm.model]["total_tokens"] == entry["usage"]["total_tokens"]


def test_plain_text_lm_uses_dspys_cache(gemma):
    lm = gemma.lm(max_tokens=3, cache=True)
    prompt = f"Note {uuid.uuid4().hex}:"  # a fresh cache key
    first, second = lm(prompt), lm(prompt)
    assert first == second and len(lm.history) == 2
    assert lm.history[0]["usage"]["completion_tokens"] > 0 and lm.history[1]["usage"] == {}  # the cache hit


def test_chain_of_thought_runs_on_gemma_in_the_plain_layout(gemma):
    lm = gemma.lm(max_tokens=24, cache=False)
    examples = load_examples("navigate")[:3]
    extractor = derive_extractor("answer", None, ["Yes", "No"], [e.question for e in examples])
    assert extractor == YES_NO
    program = dspy.ChainOfThought("question -> answer")
    with dspy.context(lm=lm, adapter=GReaTerAdapter({"answer": extractor}, answer_tokens=4)):
        predictions = [program(**e.inputs()) for e in examples]
        asynchronous = asyncio.run(program.acall(**examples[0].inputs()))
    print("gemma answers:", [p.answer for p in predictions], "gold:", [e.answer for e in examples])
    assert all(p.answer in ("Yes", "No") for p in predictions) and asynchronous.answer in ("Yes", "No")
    assert len(lm.history) == 2 * (len(examples) + 1)  # reasoning, then answer, per prediction
    for i, example in enumerate([*examples, examples[0]]):
        reasoning_call, answer_call = lm.history[2 * i], lm.history[2 * i + 1]
        prompt = f"{example.question}\n\n{INSTRUCTION}\n\nAnswer:"
        assert reasoning_call["prompt"] == prompt and reasoning_call["messages"] is None
        assert answer_call["prompt"] == prompt + reasoning_call["outputs"][0] + YES_NO.text
        assert 0 < reasoning_call["usage"]["completion_tokens"] <= 24
        assert 0 < answer_call["usage"]["completion_tokens"] <= 4
        assert all(entry["usage"]["total_tokens"] > 0 and entry["model_type"] == "text"
                   for entry in (reasoning_call, answer_call))
    assert predictions[0].reasoning == lm.history[0]["outputs"][0].strip()


def test_target_selection_uses_the_predictors_lm(optimizer, gemma):
    """Cross-family compile: SmolLM2 optimizes, Gemma (set on the predictor, not in dspy.settings) selects."""
    train, val = split_examples(load_examples("navigate"), [3, 2], seed=0)
    lm = gemma.lm(max_tokens=12, cache=False)
    student = dspy.ChainOfThought("question -> answer")
    student.set_lm(lm)
    teleprompter = GReaTerTeleprompter(
        metric=exact_match, num_steps=1, batch_size=2, max_reasoning_tokens=8, eval_every=1, keep_current=False,
        progress=False, target_candidates=2, num_threads=1,
    ).use_loaded_model(*optimizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with dspy.context(lm=None, adapter=GReaTerAdapter(answer_tokens=4)):
            optimized = teleprompter.compile(student, trainset=train, valset=val)
    finally:
        torch.set_num_threads(threads)
    selection = optimized.greater_results["predict"]["target_selection"]
    run = types.SimpleNamespace(**selection)
    print("selection on the predictor's LM:", selection)
    assert run.target_lm == "predictor.lm" and run.target_model == lm.model
    assert run.errors == {} and set(run.scores) == set(run.candidates) and len(run.candidates) >= 2
    assert run.calls == run.estimated_calls == len(lm.history) == 2 * len(val) * len(run.candidates)
    assert run.tokens == sum(entry["usage"]["total_tokens"] for entry in lm.history) > 0
    assert all(entry["prompt"].endswith("\n\nAnswer:") for entry in lm.history[0::2])
    assert optimized.predict.signature.instructions == run.chosen
    assert optimized.predict.lm is not None and optimized.predict.lm.model == lm.model  # the target stays set
