"""Building the DSPy LM that reaches a llama.cpp server.

:meth:`~dspy_greater.targets.llama_cpp.LlamaCppServer.lm` and ``lm_code`` use these functions;
they know nothing of the server process, only its alias, URL and whether the model is a base
model. Two facts about llama.cpp's OpenAI-compatible server shape the options:

* **Token limit.** DSPy's native engine sends the limit as ``max_completion_tokens``, which
  llama.cpp ignores (it generates until end-of-sequence). The LiteLLM engine sends
  ``max_tokens``, which llama.cpp honours, so chat LMs get ``engine="litellm"`` (pass
  ``engine=...`` to override).
* **Base models.** A GGUF without a chat template gets llama.cpp's fallback ``llama-2`` chat
  format on ``/v1/chat/completions``, which a base model never saw. Such models get a
  :class:`~dspy_greater.targets.plain_text.PlainTextLM` (``model_type="text"``): plain
  ``/v1/completions``, each prompt sent verbatim. llama.cpp adds the BOS token when the GGUF asks
  for it (``tokenizer.ggml.add_bos_token``), as the optimizer's plain-text layout does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_lm", "lm_code", "lm_kwargs"]

_DEFAULT_MAX_TOKENS = 512
_DEFAULT_TIMEOUT = 300.0
_DEFAULT_RETRIES = 1


def lm_kwargs(alias: str, api_base: str, plain_text: bool, /, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of the LM for a server (``model`` included).

    Args:
        alias: The model name the server answers to.
        api_base: The server's base URL, ``http://host:port/v1``.
        plain_text: True for a base model: the LM is then a ``PlainTextLM``
            (``model_type="text"``); a ``model_type`` override picks the kind.
        **overrides: Replace any default, or add options for the LM.
    """
    text = overrides.get("model_type", "text" if plain_text else "chat") == "text"
    kwargs: dict[str, Any] = {
        "model": f"openai/{alias}",
        "api_base": api_base,
        "api_key": "local",
    }
    if text:
        kwargs["model_type"] = "text"  # PlainTextLM: /v1/completions through LiteLLM, max_tokens honoured
    else:
        kwargs["engine"] = "litellm"  # sends max_tokens, which llama.cpp honours (see the module docstring)
    kwargs.update({
        "temperature": 0.0,
        "max_tokens": _DEFAULT_MAX_TOKENS,
        "cache": True,
        # Connection errors are immediate (a dead server refuses connections), so one retry is
        # enough; the timeout covers a hung server and requests queued behind others.
        "num_retries": _DEFAULT_RETRIES,
        "timeout": _DEFAULT_TIMEOUT,
    })
    kwargs.update(overrides)
    return kwargs


def build_lm(options: dict[str, Any]):
    """The LM for ``options`` from :func:`lm_kwargs`: a ``PlainTextLM`` for ``model_type="text"``, else a ``dspy.LM``."""
    import dspy

    options = dict(options)
    model = options.pop("model")
    if options.get("model_type") == "text":
        from dspy_greater.targets.plain_text import PlainTextLM

        options.pop("model_type")
        return PlainTextLM(model, **options)
    return dspy.LM(model, **options)


def lm_code(options: dict[str, Any]) -> str:
    """A ready-to-paste Python expression building the same LM as :func:`build_lm`."""
    options = dict(options)
    model = options.pop("model")
    name = "dspy.LM"
    if options.get("model_type") == "text":
        options.pop("model_type")
        name = "PlainTextLM"
    args = ", ".join(f"{key}={value!r}" for key, value in options.items())
    return f"{name}({model!r}, {args})"
