"""Reasoning generation through an OpenAI-compatible completion server.

Generation is the largest share of a search step. A server that batches requests (vLLM on a GPU)
or runs a quantized copy of the weights (llama.cpp) can take it over while the gradient and the
scoring stay in PyTorch. :class:`CompletionServerGenerator` sends each prompt, as text, to
``<api_base>/completions`` and tokenizes the reply with the optimizer model's tokenizer, so the
search carries on with token ids as usual.

The server must serve the *same model* as the optimizer model (for the embedded default, the
same GGUF: ``LlamaCppServer()``); otherwise the reasoning comes from another model and the
gradient is taken over text the optimizer model would not have written. Results are close to,
not identical with, PyTorch's: a server computes in its own precision (llama.cpp: quantized
weights), and the prompt goes over the wire as text, which the server tokenizes again.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from transformers import PreTrainedTokenizerBase

from dspy_greater.engine.vocabulary import continuation_encoder

logger = logging.getLogger(__name__)


class GenerationServerError(RuntimeError):
    """The completion server cannot be reached or answers with an error."""


def server_address(server: Any) -> tuple[str, str | None]:
    """``(api_base, model alias or None)`` of a URL or a ``LlamaCppServer``; ValueError otherwise."""
    if hasattr(server, "api_base"):  # a LlamaCppServer
        return server.api_base, getattr(server, "alias", None)
    if not isinstance(server, str) or not server.startswith(("http://", "https://")):
        raise ValueError(f"generation_server must be an http(s) URL such as 'http://127.0.0.1:8000/v1' or a "
                         f"LlamaCppServer, got {server!r}.")
    return server, None


def check_generation_server(
    api_base: Any, model: str | None = None, *, api_key: str | None = None, timeout: float = 30.0
) -> str:
    """The model name to request: ``model``, else the server's alias (a ``LlamaCppServer``), else the
    first one ``GET <api_base>/models`` lists.

    Raises:
        GenerationServerError: The server cannot be reached, lists no models, or does not serve ``model``.
    """
    url, alias = server_address(api_base)
    models = [m.get("id") for m in _request(f"{url.rstrip('/')}/models", None, api_key, timeout).get("data", [])]
    if not models:
        raise GenerationServerError(f"The generation server at {url} lists no models; pass the name it serves "
                                    "(generation_model=, or model= for CompletionServerGenerator).")
    if model is not None and model not in models:
        raise GenerationServerError(f"The generation server at {url} does not serve {model!r}; it lists {models}. "
                                    "Pass one of them as generation_model=.")
    return model or alias or models[0]


def _request(url: str, payload: dict | None, api_key: str | None, timeout: float) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="GET" if payload is None else "POST")
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:500]
        raise GenerationServerError(f"The generation server answered {error.code} at {url}: {detail}") from error
    except (urllib.error.URLError, OSError) as error:
        raise GenerationServerError(
            f"Cannot reach the generation server at {url} ({error}). Start it first (for the embedded model: "
            "`dspy-greater serve`, or use a LlamaCppServer() context), or leave generation_server unset to "
            "generate in PyTorch."
        ) from error


class CompletionServerGenerator:
    """Generates with ``POST <api_base>/completions`` (temperature 0 is greedy).

    Args:
        api_base: The server's OpenAI base URL, e.g. ``"http://127.0.0.1:8000/v1"``; a
            :class:`~dspy_greater.targets.llama_cpp.LlamaCppServer` is accepted too (its URL and alias are used).
        tokenizer: The optimizer model's tokenizer (decodes prompts, encodes replies).
        model: The model name the server expects; ``None`` takes the first one ``/models`` lists.
        api_key: Sent as a bearer token when given.
        concurrency: Requests in flight at once. vLLM batches them; llama-cpp-python's server
            answers one at a time, so more than 1 only queues there.
        timeout: Seconds per request.
    """

    def __init__(
        self,
        api_base: Any,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 4,
        timeout: float = 300.0,
    ):
        url, alias = server_address(api_base)
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}.")
        self.api_base = url.rstrip("/")
        self.tokenizer = tokenizer
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout = timeout
        self.model = model or alias or check_generation_server(url, api_key=api_key, timeout=timeout)
        self.requests = 0
        # Servers tokenize a text prompt as the tokenizer does by default, BOS included (vLLM, and
        # llama.cpp by the GGUF's flag): a prompt that already starts with BOS goes without it.
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
        self._server_bos = [bos] if adds_bos else []
        self._warned_bos = False
        self._encode_reply = continuation_encoder(tokenizer)  # the reply continues the prompt

    def __repr__(self) -> str:
        return f"CompletionServerGenerator({self.api_base!r}, model={self.model!r})"

    def _call(self, path: str, payload: dict | None = None) -> dict:
        return _request(f"{self.api_base}{path}", payload, self.api_key, self.timeout)

    def prompt_text(self, prompt: list[int]) -> str:
        """The text to send for ``prompt`` (token ids): the server re-tokenizes it, BOS included, so
        its tokens are ``prompt``'s wherever the tokenizer encodes the decoded text back to the same
        ids (pieces tokenized apart can merge differently)."""
        if self._server_bos:
            if prompt[:1] == self._server_bos:
                prompt = prompt[1:]
            elif not self._warned_bos:
                self._warned_bos = True
                logger.warning("The prompts sent to the generation server do not start with BOS, which the server "
                               "adds: its reasoning follows a BOS the optimizer model's sequences lack.")
        return self.tokenizer.decode(prompt, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _complete(self, prompt: list[int], max_new_tokens: int, temperature: float, top_p: float) -> list[int]:
        payload = {
            "model": self.model,
            "prompt": self.prompt_text(prompt),
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
        }
        reply = self._call("/completions", payload)
        self.requests += 1
        text = reply["choices"][0]["text"]
        return self._encode_reply(text)[:max_new_tokens]

    def __call__(
        self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0
    ) -> list[list[int]]:
        """The continuation of each prompt, as token ids of the optimizer model's tokenizer."""
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(len(prompts), 1))) as pool:
            return list(pool.map(lambda p: self._complete(p, max_new_tokens, temperature, top_p), prompts))
