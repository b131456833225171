"""The chat_adapter layout: the optimizer model sees exactly what DSPy's ChatAdapter sends a chat model.

Real SmolLM2-135M tokenizer (and model, for generation and a tiny search) via the session
fixtures; DSPy's own ``ChatAdapter.format`` and the tokenizer's chat template are the reference.
"""

from __future__ import annotations

import copy
import logging
import random

import dspy
import pytest

from dspy_greater import GReaTerTeleprompter
from dspy_greater.targets.adapter import GReaTerAdapter
from dspy_greater.data import load_examples
from dspy_greater.engine.extractor import derive_extractor
from dspy_greater.chat_layout import ChatAdapterLayout, choose_layout, make_layout
from dspy_greater.planning import predictor_task
from dspy_greater.engine.layout import GreaterLayout
from dspy_greater.metrics import exact_match
from dspy_greater.engine.config import GreaterConfig
from dspy_greater.engine.search import GreaterSearch, SearchExample

pytestmark = pytest.mark.slow

INSTRUCTION = "Given the fields `question`, produce the fields `answer`."
QUESTION = "If you follow these instructions, do you return to the starting point? Take 1 step.\nOptions:\n- Yes\n- No"
REASONING = "One step forward and no step back, so not at the start."


@pytest.fixture(scope="module")
def signature():
    return dspy.ChainOfThought("question -> answer").predict.signature


@pytest.fixture(scope="module")
def chat(optimizer, signature):
    return ChatAdapterLayout(optimizer[1], signature)


def _rendered(tokenizer, signature, instruction, question, outputs=None, adapter=None):
    """DSPy's messages through the chat template (+ the assistant reply ChatAdapter would parse)."""
    adapter = adapter or dspy.ChatAdapter()
    messages = adapter.format(signature.with_instructions(instruction), demos=[], inputs={"question": question})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + (adapter.format_assistant_message_content(signature, outputs) if outputs else "")


def _full(chat, instruction=INSTRUCTION, question=QUESTION, reasoning=REASONING, label="No"):
    return chat.full(chat.inputs_text({"question": question}), chat.encode_instruction(instruction),
                     chat.encode(reasoning), chat.encode(chat.extractor_text), chat.encode(label))


# -- the sequence is ChatAdapter's text ---------------------------------------------------------------


def test_sequence_is_chat_adapter_messages_through_the_chat_template(optimizer, chat, signature):
    tokenizer = optimizer[1]
    seq = _full(chat)
    text = chat.decode(seq.ids)
    reply = {"reasoning": REASONING, "answer": "No"}
    whole = _rendered(tokenizer, signature, INSTRUCTION, QUESTION, reply)
    # Exactly ChatAdapter's conversation, up to and including the label (then "\n\n[[ ## completed ## ]]\n").
    assert whole.startswith(text) and text.endswith("[[ ## answer ## ]]\nNo")
    assert whole[len(text):] == "\n\n[[ ## completed ## ]]\n"
    # The prompt the reasoning is generated from: the rendered messages, then the reasoning marker.
    prompt = chat.prompt(chat.inputs_text({"question": QUESTION}), chat.encode_instruction(INSTRUCTION))
    assert chat.decode(prompt.ids) == _rendered(tokenizer, signature, INSTRUCTION, QUESTION) + "[[ ## reasoning ## ]]\n"
    assert chat.system_role and "<|im_start|>system\nYour input fields are:" in text  # SmolLM2 keeps the system turn


def test_spans_decode_to_instruction_extractor_and_label(chat):
    seq = _full(chat)
    assert chat.decode(seq.ids[seq.instruction_start:seq.instruction_end]) == INSTRUCTION
    assert chat.instruction_text(seq.ids[seq.instruction_start:seq.instruction_end]) == INSTRUCTION
    assert chat.decode(seq.ids[seq.answer_start:seq.answer_end]) == "No"
    extractor = chat.encode(chat.extractor_text)
    assert chat.decode(seq.ids[seq.answer_start - len(extractor):seq.answer_start]) == "\n\n[[ ## answer ## ]]\n"
    before = chat.decode(seq.ids[:seq.instruction_start])
    assert before.endswith("your objective is: \n        ")  # ChatAdapter's indent, outside the instruction


def test_multiline_instruction_is_indented_as_chat_adapter_writes_it(optimizer, chat, signature):
    text = "Read the moves.\nThen answer Yes or No."
    ids = chat.encode_instruction(text)
    assert chat.decode(ids) == "Read the moves.\n        Then answer Yes or No."
    assert chat.instruction_text(ids) == text
    prompt = chat.prompt(chat.inputs_text({"question": QUESTION}), ids)
    assert chat.decode(prompt.ids) == _rendered(optimizer[1], signature, text, QUESTION) + "[[ ## reasoning ## ]]\n"


def test_predict_without_reasoning_answers_right_after_the_prompt(optimizer):
    signature = dspy.Predict("question -> answer").signature
    layout = ChatAdapterLayout(optimizer[1], signature)
    assert not layout.reasons and layout.extractor_text == "[[ ## answer ## ]]\n"
    seq = layout.full(layout.inputs_text({"question": QUESTION}), layout.encode_instruction(INSTRUCTION), [],
                      layout.encode(layout.extractor_text), layout.encode("Yes"))
    whole = _rendered(optimizer[1], signature, INSTRUCTION, QUESTION, {"answer": "Yes"})
    assert whole.startswith(layout.decode(seq.ids)) and layout.decode(seq.ids).endswith("assistant\n[[ ## answer ## ]]\nYes")


def test_multiple_inputs_are_chat_adapter_sections(optimizer):
    signature = dspy.ChainOfThought("context, question -> answer").predict.signature
    layout = ChatAdapterLayout(optimizer[1], signature)
    values = {"context": "A sunny day.", "question": "Is it raining?"}
    inputs_text = layout.inputs_text(values)
    assert inputs_text.startswith("[[ ## context ## ]]\nA sunny day.\n\n[[ ## question ## ]]\nIs it raining?")
    messages = dspy.ChatAdapter().format(signature.with_instructions("Answer."), demos=[], inputs=values)
    rendered = optimizer[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert layout.decode(layout.prompt(inputs_text, layout.encode_instruction("Answer.")).ids) == \
        rendered + "[[ ## reasoning ## ]]\n"


def test_template_without_system_role_merges_it_into_the_user_turn(optimizer, signature):
    tokenizer = copy.deepcopy(optimizer[1])
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    layout = ChatAdapterLayout(tokenizer, signature)
    assert not layout.system_role
    system, user = (m["content"] for m in dspy.ChatAdapter().format(
        signature.with_instructions(INSTRUCTION), demos=[], inputs={"question": QUESTION}))
    prompt = layout.prompt(layout.inputs_text({"question": QUESTION}), layout.encode_instruction(INSTRUCTION))
    assert layout.decode(prompt.ids) == (f"<|im_start|>user\n{system}\n\n{user}<|im_end|>\n<|im_start|>assistant\n"
                                         "[[ ## reasoning ## ]]\n")


def test_no_chat_template_gets_dspys_text_completion_prompt(optimizer, signature):
    tokenizer = copy.deepcopy(optimizer[1])
    tokenizer.chat_template = None
    layout = ChatAdapterLayout(tokenizer, signature)
    system, user = (m["content"] for m in dspy.ChatAdapter().format(
        signature.with_instructions(INSTRUCTION), demos=[], inputs={"question": QUESTION}))
    prompt = layout.prompt(layout.inputs_text({"question": QUESTION}), layout.encode_instruction(INSTRUCTION))
    bos = tokenizer.bos_token or ""
    assert layout.decode(prompt.ids) == f"{bos}{system}\n\n{user}\n\nBEGIN RESPONSE:\n[[ ## reasoning ## ]]\n"


def test_adapters_that_are_not_chat_adapters_are_refused(optimizer, signature):
    with pytest.raises(TypeError, match="ChatAdapter"):
        ChatAdapterLayout(optimizer[1], signature, adapter=GReaTerAdapter())


# -- JSONAdapter and XMLAdapter: their own messages and replies ----------------------------------------


@pytest.mark.parametrize("adapter, reply_end, generated_after", [
    (dspy.JSONAdapter(), '"\n}', '",\n  "answer": "No"\n}'),
    (dspy.XMLAdapter(), "\n</answer>", "\n</reasoning>\n\n<answer>\nNo\n</answer>"),
])
def test_json_and_xml_replies_are_modelled_from_the_adapter(optimizer, signature, adapter, reply_end, generated_after):
    tokenizer = optimizer[1]
    layout = ChatAdapterLayout(tokenizer, signature, adapter=adapter)
    text = layout.decode(_full(layout).ids)
    whole = _rendered(tokenizer, signature, INSTRUCTION, QUESTION, {"reasoning": REASONING, "answer": "No"}, adapter)
    # The adapter's own conversation up to and including the label; what follows closes the reply.
    assert whole.startswith(text) and whole[len(text):] == reply_end
    reply = text.split("<|im_start|>assistant\n")[-1]
    assert adapter.parse(signature, reply + reply_end) == {"reasoning": REASONING, "answer": "No"}
    prompt = layout.prompt(layout.inputs_text({"question": QUESTION}), layout.encode_instruction(INSTRUCTION))
    assert layout.decode(prompt.ids) == _rendered(tokenizer, signature, INSTRUCTION, QUESTION, adapter=adapter) + layout.opening
    # Generated reasoning ends where the adapter's text between reasoning and answer starts.
    assert layout.decode(layout.finish_reasoning(layout.encode(REASONING + generated_after))) == REASONING


def test_json_replies_with_a_non_text_answer_are_refused(optimizer):
    signature = dspy.ChainOfThought("question -> answer: int").predict.signature
    with pytest.raises(TypeError, match="non-text field 'answer'"):
        ChatAdapterLayout(optimizer[1], signature, adapter=dspy.JSONAdapter())
    assert ChatAdapterLayout(optimizer[1], signature, adapter=dspy.XMLAdapter()).stop_strings == ("</reasoning>",)


def test_make_layout(optimizer, signature):
    assert type(make_layout("greater", optimizer[1])) is GreaterLayout
    assert make_layout("chat_adapter", optimizer[1], signature=signature).name == "chat_adapter"
    with pytest.raises(ValueError, match="signature"):
        make_layout("chat_adapter", optimizer[1])
    with pytest.raises(ValueError, match="Unknown layout"):
        make_layout("chat", optimizer[1])


# -- reasoning stops at the next field marker ----------------------------------------------------------


def test_finish_reasoning_cuts_before_the_next_marker(chat):
    ids = chat.encode("Go left, then right.\n\n[[ ## answer ## ]]\nYes\n\n[[ ## completed ## ]]")
    assert chat.decode(chat.finish_reasoning(ids)) == "Go left, then right."
    plain = chat.encode("No marker here.")
    assert chat.finish_reasoning(plain) == plain
    assert chat.decode(chat.finish_reasoning(chat.encode("Trailing space.\n\n"))) == "Trailing space."
    assert chat.finish_reasoning(chat.encode("[[ ## answer ## ]]\nYes")) == []


def test_generate_stops_at_a_stop_string(lm, chat):
    prompt = chat.prompt(chat.inputs_text({"question": QUESTION}), chat.encode_instruction(INSTRUCTION)).ids
    free = lm.generate([prompt], max_new_tokens=16)[0]
    text = chat.decode(free)
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]  # a string the model writes anyway, a few tokens in
    stopped = lm.generate([prompt], max_new_tokens=16, stop_strings=[stop])[0]
    assert stop in chat.decode(stopped) and not any(stop in chat.decode(stopped[:k]) for k in range(len(stopped)))
    assert stopped == free[:len(stopped)] and len(stopped) < len(free)


# -- proposals stay conditioned on the example ---------------------------------------------------------


def test_proposal_context_is_inputs_then_instruction_prefix(chat):
    inputs_text = chat.inputs_text({"question": QUESTION})
    prefix = chat.encode_instruction(INSTRUCTION)[:3]
    text = chat.decode(chat.proposal_context(inputs_text, prefix))
    assert text.endswith(f"<|im_start|>user\n[[ ## question ## ]]\n{QUESTION}\n\n{chat.decode(prefix)}")
    assert "Respond with the corresponding output fields" not in text
    assert not chat.proposals_share_prefix and GreaterLayout.proposals_share_prefix


def test_proposals_differ_by_example_in_the_chat_layout(lm, chat):
    """The scoring prefix (system message) is the same for every example; the proposals' context is not."""
    extractor = derive_extractor("answer", None, ["Yes", "No"], [QUESTION])
    search = GreaterSearch(lm, chat, extractor, GreaterConfig(topk=5, intersect_q=1, intersect_size=1,
                                                              min_candidates=1))
    examples = [SearchExample(chat.inputs_text({"question": q}), "No") for q in
                [QUESTION, "Is 17 a prime number?\nOptions:\n- Yes\n- No"]]
    instruction = chat.encode_instruction(INSTRUCTION)
    prefix = search.prefix(instruction, 2, examples)
    assert prefix.ids[0] == prefix.ids[1]  # the system message does not see the example
    contexts = [chat.proposal_context(e.inputs_text, instruction[:2]) for e in examples]
    logprobs = lm.next_token_logprobs(contexts)
    assert not logprobs[0].allclose(logprobs[1])
    got = search.propose(instruction, 2, examples, random.Random(0), prefix)
    again = search.propose(instruction, 2, examples, random.Random(0), None)
    assert got == again  # with or without the scoring prefix: proposals come from proposal_context
    plain = GreaterSearch(lm, chat, extractor, GreaterConfig(topk=5, intersect_q=1, intersect_size=1,
                                                             min_candidates=1, prefix_cache=False))
    assert plain.propose(instruction, 2, examples, random.Random(0), None) == got  # stored inputs or not


# -- a tiny search and the teleprompter option ---------------------------------------------------------


def _navigate(n):
    examples = sorted(load_examples("navigate"), key=lambda e: len(e.question))
    return examples[:n]


def test_compile_runs_a_short_search_in_the_chat_adapter_layout(optimizer, caplog):
    program = dspy.ChainOfThought("question -> answer")
    train = _navigate(3)
    tp = GReaTerTeleprompter(metric=exact_match, layout="chat_adapter", num_steps=2, batch_size=3,
                             max_reasoning_tokens=8, num_finalists=1, eval_every=2, progress=True)  # INFO shown
    tp.use_loaded_model(*optimizer)
    with caplog.at_level(logging.INFO, logger="dspy_greater"):
        optimized = tp.compile(program, trainset=train)
    result = optimized.greater_results["predict"]
    assert result["layout"] == {"name": "chat_adapter", "adapter": "ChatAdapter", "reason": "layout='chat_adapter'"}
    assert result["extractor"]["text"] == "\n\n[[ ## answer ## ]]\n"
    assert [r["position"] for r in result["trace"]] == [0, 1]
    assert result["best_instruction"] == optimized.predict.signature.instructions
    assert "chat_adapter layout" in caplog.text
    # The reasoning the search generates in this layout never holds a field marker.
    search, _ = tp._search(predictor_task(program, train))
    examples = [SearchExample(search.layout.inputs_text({"question": e.question}), e.answer) for e in train]
    reasoning = search.reasoning(search.layout.encode_instruction(result["best_instruction"]), examples)
    assert all("[[ ##" not in search.layout.decode(r) and 0 < len(r) <= 8 for r in reasoning)


def test_compile_in_a_program_that_runs_with_json_adapter_searches_its_json_replies(optimizer):
    program = dspy.ChainOfThought("question -> answer")
    train = _navigate(3)
    tp = GReaTerTeleprompter(metric=exact_match, num_steps=1, batch_size=3, max_reasoning_tokens=8, num_finalists=1,
                             progress=False)
    tp.use_loaded_model(*optimizer)
    with dspy.context(adapter=dspy.JSONAdapter()):
        optimized = tp.compile(program, trainset=train)
    result = optimized.greater_results["predict"]
    assert result["layout"]["name"] == "chat_adapter" and result["layout"]["adapter"] == "JSONAdapter"
    assert result["extractor"]["text"] == '",\n  "answer": "'
    assert result["trace"][0]["step"] == 0


def test_json_adapter_with_a_non_text_answer_falls_back_to_chat_adapter_replies(optimizer):
    program = dspy.ChainOfThought("question -> answer: int")
    train = [dspy.Example(question=f"What is {i} + 1?", answer=i + 1).with_inputs("question") for i in range(4)]
    task = predictor_task(program, train)
    with dspy.context(adapter=dspy.JSONAdapter()):
        layout, info = choose_layout("auto", optimizer[1], task.signature, task.output_field)
    assert info["adapter"] == "ChatAdapter" and "ChatAdapter's replies are modelled instead" in info["reason"]
    assert layout.stop_strings == ("[[ ##",)


def test_layout_option_is_validated():
    with pytest.raises(ValueError, match="layout must be one of 'auto', 'greater', 'chat_adapter'.*'chat_adapter'"):
        GReaTerTeleprompter(metric=exact_match, layout="chatadapter")
    with pytest.raises(ValueError, match="layout must be one of"):
        GReaTerTeleprompter(metric=exact_match, layout=None)
    assert GReaTerTeleprompter(metric=exact_match).get_params()["layout"] == "auto"


@pytest.mark.parametrize("option, adapter, expected, formatter", [
    ("auto", None, "greater", None),
    ("auto", dspy.ChatAdapter(), "chat_adapter", "ChatAdapter"),
    ("auto", dspy.JSONAdapter(), "chat_adapter", "JSONAdapter"),
    ("auto", dspy.XMLAdapter(), "chat_adapter", "XMLAdapter"),
    ("auto", GReaTerAdapter(), "greater", None),
    ("greater", dspy.ChatAdapter(), "greater", None),
    ("chat_adapter", None, "chat_adapter", "ChatAdapter"),
    ("chat_adapter", GReaTerAdapter(), "chat_adapter", "ChatAdapter"),
])
def test_auto_layout_follows_the_configured_adapter(optimizer, option, adapter, expected, formatter):
    program = dspy.ChainOfThought("question -> answer")
    task = predictor_task(program, _navigate(2))
    with dspy.context(adapter=adapter):
        layout, info = choose_layout(option, optimizer[1], task.signature, task.output_field)
    assert layout.name == info["name"] == expected
    if formatter:
        assert type(layout.adapter).__name__ == formatter


def test_a_checkpoint_from_one_adapters_layout_is_not_resumed_in_another(lm, signature):
    extractor = derive_extractor("answer", None, ["Yes", "No"], ["q"])
    examples = [SearchExample("q", "Yes")]
    stamps = {type(a).__name__: GreaterSearch(lm, ChatAdapterLayout(lm.tokenizer, signature, adapter=a), extractor,
                                              GreaterConfig())._fingerprint(INSTRUCTION, examples, examples)
              for a in (dspy.ChatAdapter(), dspy.JSONAdapter(), dspy.XMLAdapter())}
    assert len(set(stamps.values())) == 3
