"""Plain-text completions for base models (no chat template), as a ``dspy.LM``.

A base model such as Gemma-3-270M has no chat template: llama.cpp then formats chat requests
with a fallback (llama-2) template the model never saw, and it rambles. ``dspy.LM(...,
model_type="text")`` does not help either: DSPy 3.4 joins the message contents with blank lines
and appends ``"BEGIN RESPONSE:"``. :class:`PlainTextLM` is a ``dspy.LM`` whose engine sends the
prompt *verbatim* to an OpenAI-compatible ``/v1/completions`` endpoint through LiteLLM
(``litellm.text_completion``), so that :class:`~dspy_greater.targets.adapter.GReaTerAdapter` can send a
target LM exactly the plain-text layout the optimizer scored::

    <inputs>\\n\\n<instruction>\\n\\nAnswer:<reasoning><extractor><answer>

Everything else is DSPy's own machinery (the engine is a DSPy 3.4 custom engine,
``complete(Request) -> Response``): every call is recorded in ``lm.history`` (with ``prompt``
holding the text sent and ``usage`` the server's token counts), usage reaches
``dspy.track_usage``, responses go through DSPy's cache (``cache=True``) and failures through
its retries (``num_retries``).

How a call becomes one prompt: ``lm(prompt="...")`` (what ``GReaTerAdapter`` does) sends the
string unchanged. ``lm(messages=[...])`` with a single user message sends its content unchanged;
several messages (e.g. from ``ChatAdapter``) are joined with blank lines, system message first,
with nothing appended. Tools, ``response_format`` and logprobs cannot be carried by a plain
completion and raise ``UnsupportedFeatureError``.

Cache keys. DSPy keys its cache on the model string, the messages and the generation options,
not on the engine. :class:`PlainTextLM` therefore uses its own model strings: ``"openai/name"``
is stored as ``"text-completion-openai/name"`` (LiteLLM's name for the completions endpoint), so
its cached replies are never mixed with those of a chat ``dspy.LM("openai/name")``. A plain
``dspy.LM("text-completion-openai/name", model_type="text")`` sharing the same cache would share
keys with it: do not mix the two for one model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import dspy
from dspy.clients.base_lm import LM_CLASS_STATE_KEY, BaseLM
from dspy.lm15 import Request, Response, UnsupportedFeatureError, response_from_openai_chat

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM must not reach for the network

__all__ = ["PlainTextLM", "TextCompletionEngine", "AsyncTextCompletionEngine", "render_prompt", "text_model"]

_TEXT_PREFIX = "text-completion-openai/"


def text_model(model: str) -> str:
    """The model string for LiteLLM's completions endpoint: ``openai/x`` and ``x`` become
    ``text-completion-openai/x``; other provider prefixes are kept (LiteLLM routes them)."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model must be a non-empty string, e.g. 'openai/my-model'")
    if model.startswith(_TEXT_PREFIX):
        return model
    provider, separator, name = model.partition("/")
    if not separator:
        return _TEXT_PREFIX + model
    if provider == "openai":
        return _TEXT_PREFIX + name
    return model


def render_prompt(request: Request) -> str:
    """The one text a plain completion sends for ``request`` (see the module docstring)."""
    texts = []
    system = request.system
    if system is not None:
        if not isinstance(system, str):
            parts = [getattr(part, "text", None) for part in system]
            if any(text is None for text in parts):
                raise UnsupportedFeatureError(
                    "A plain-text completion carries text only; the system prompt has other parts.")
            system = "".join(parts)
        texts.append(system)
    for message in request.messages:
        if message.text is None:
            raise UnsupportedFeatureError(
                f"A plain-text completion carries text only; a {message.role!r} message holds other parts "
                "(images, tool calls or tool results)."
            )
        texts.append(message.text)
    return "\n\n".join(texts)


def _errors(model: str):
    """LiteLLM's exceptions as DSPy's (lm15) errors, so that DSPy's retries classify them."""
    try:
        from dspy.clients.engines.litellm_errors import litellm_errors
    except ImportError:  # a DSPy without this module: errors stay LiteLLM's
        return contextlib.nullcontext()
    return litellm_errors(model=model)


class _TextCompletionConfig:
    def __init__(self, model: str, *, api_base: str | None = None, api_key: str | None = None,
                 timeout: float | None = None):
        self.wire_model = text_model(model)
        self.api_base = api_base
        self.api_key = api_key
        self.timeout = timeout
        self._closed = False

    def arguments(self, request: Request) -> dict[str, Any]:
        """The keyword arguments of ``litellm.text_completion`` for ``request``."""
        if not isinstance(request, Request):
            raise TypeError("A text-completion engine takes a dspy.lm15.Request")
        if self._closed:
            raise RuntimeError("This text-completion engine is closed.")
        config = request.config
        if request.tools:
            raise UnsupportedFeatureError("A plain-text completion cannot carry tools.")
        for name in ("response_format", "logprobs", "tool_choice", "reasoning", "probabilities"):
            if getattr(config, name, None) is not None:
                raise UnsupportedFeatureError(f"A plain-text completion cannot carry {name}.")
        data: dict[str, Any] = {
            "model": self.wire_model,
            "prompt": render_prompt(request),
            "num_retries": 0,  # DSPy retries
            "cache": {"no-cache": True, "no-store": True},  # DSPy caches
        }
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "frequency_penalty", "presence_penalty"):
            value = getattr(config, name, None)
            if value is not None:
                data[name] = value
        if config.stop:
            data["stop"] = list(config.stop)
        data.update(dict(config.extensions or {}))
        for name in ("api_base", "api_key", "timeout"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data

    @staticmethod
    def response(raw: Any, request: Request, prompt: str) -> Response:
        """The completions reply as a DSPy (lm15) ``Response``; ``provider_data["prompt"]`` is the text sent."""
        body = raw.model_dump() if hasattr(raw, "model_dump") else dict(raw)
        choices = body.get("choices") or []
        if len(choices) != 1:
            raise ValueError(f"A completion request returns one choice; the server returned {len(choices)}.")
        choice = choices[0]
        usage = {key: value for key, value in (body.get("usage") or {}).items()
                 if key in ("prompt_tokens", "completion_tokens", "total_tokens") and value is not None}
        chat = {
            "id": body.get("id"),
            "model": body.get("model") or request.model,
            "choices": [{"index": 0, "finish_reason": choice.get("finish_reason") or "stop",
                         "message": {"role": "assistant", "content": choice.get("text") or ""}}],
            "usage": usage,
        }
        response = response_from_openai_chat(chat, model=request.model)
        provider_data = {"endpoint": "completions", "id": body.get("id"), "prompt": prompt}
        return dataclasses.replace(response, provider_data={k: v for k, v in provider_data.items() if v is not None})

    def dump_state(self) -> dict[str, Any]:
        return {"model": self.wire_model, "api_base": self.api_base, "timeout": self.timeout}

    @classmethod
    def load_state(cls, state: dict[str, Any]):
        return cls(**state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.wire_model!r}, api_base={self.api_base!r})"


class TextCompletionEngine(_TextCompletionConfig):
    """A DSPy 3.4 engine: one ``Request`` in, one plain completion through LiteLLM, one ``Response`` out."""

    def complete(self, request: Request) -> Response:
        import litellm

        data = self.arguments(request)
        with _errors(request.model):
            raw = litellm.text_completion(**data)
        return self.response(raw, request, data["prompt"])

    def stream(self, request: Request):
        raise UnsupportedFeatureError("PlainTextLM does not stream; call it without dspy.streamify.")

    def close(self) -> None:
        self._closed = True


class AsyncTextCompletionEngine(_TextCompletionConfig):
    """The async counterpart of :class:`TextCompletionEngine` (``litellm.atext_completion``)."""

    async def complete(self, request: Request) -> Response:
        import litellm

        data = self.arguments(request)
        with _errors(request.model):
            raw = await litellm.atext_completion(**data)
        return self.response(raw, request, data["prompt"])

    async def stream(self, request: Request):
        raise UnsupportedFeatureError("PlainTextLM does not stream; call it without dspy.streamify.")
        yield  # pragma: no cover (an async generator)

    async def aclose(self) -> None:
        self._closed = True


class PlainTextLM(dspy.LM):
    """A ``dspy.LM`` for base models: each call is one verbatim prompt to ``/v1/completions``.

    ``model_type`` is ``"text"``; :class:`~dspy_greater.targets.adapter.GReaTerAdapter` sees it and sends
    the optimizer's plain-text layout as the prompt. History, usage tracking, DSPy's cache and
    retries work as for any ``dspy.LM``.

    Args:
        model: ``"openai/<name>"`` for an OpenAI-compatible server (llama.cpp, vLLM); stored as
            ``"text-completion-openai/<name>"`` (see the module docstring on cache keys). Other
            LiteLLM provider prefixes are passed through.
        api_base: The server's base URL, e.g. ``"http://127.0.0.1:8080/v1"``.
        api_key: Its API key (local servers take any string).
        timeout: Seconds per request.
        temperature, max_tokens, cache, num_retries, callbacks: As for ``dspy.LM``.
        **kwargs: Default generation options (``stop``, ``top_p``, ``seed``, ...).
    """

    #: ``GReaTerAdapter`` checks this: the prompt reaches the model unchanged.
    sends_prompt_verbatim = True

    def __init__(self, model: str, *, api_base: str | None = None, api_key: str | None = None,
                 timeout: float | None = None, temperature: float | None = None, max_tokens: int | None = None,
                 cache: bool = True, num_retries: int = 3, callbacks=None, **kwargs):
        for name in ("model_type", "engine", "async_engine"):
            if name in kwargs:
                raise TypeError(f"PlainTextLM sets {name} itself (plain-text completions); do not pass {name}=.")
        options = {"api_base": api_base, "api_key": api_key, "timeout": timeout}
        super().__init__(
            text_model(model), model_type="text", temperature=temperature, max_tokens=max_tokens, cache=cache,
            num_retries=num_retries, callbacks=callbacks,
            engine=TextCompletionEngine(model, **options), async_engine=AsyncTextCompletionEngine(model, **options),
            **kwargs,
        )

    @property
    def api_base(self) -> str | None:
        """The server's base URL (held by the engine: DSPy refuses client settings on a custom-engine LM)."""
        return self.engine.api_base

    def dump_state(self) -> dict[str, Any]:
        """State to rebuild this LM (``api_key`` excluded, as DSPy does)."""
        state = BaseLM.dump_state(self)
        state.pop("model_type", None)
        state.update(api_base=self.engine.api_base, timeout=self.engine.timeout)
        return state

    @classmethod
    def load_state(cls, state: dict[str, Any], *, allow_custom_lm_class: bool = False) -> PlainTextLM:
        state = dict(state)
        state.pop(LM_CLASS_STATE_KEY, None)
        return cls(**state)

    def __repr__(self) -> str:
        return f"PlainTextLM({self.model!r}, api_base={self.engine.api_base!r})"
