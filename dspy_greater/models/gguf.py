"""GGUF files: reading their metadata header, and the cache of dequantized copies.

Two users share this knowledge: the optimizer-model loader (:mod:`dspy_greater.models.loading`),
which loads GGUF weights through ``transformers`` and keeps a dequantized copy, and the llama.cpp
target (:mod:`dspy_greater.targets.llama_cpp`), which checks a file's magic and reads its chat
template.

Header reader. :func:`iter_string_metadata` walks the metadata key-value pairs and skips every
value it is not asked for (the tokenizer's vocabulary is skipped, not decoded), so it does not
need the ``gguf`` package and stays fast on large vocabularies.

Dequantized cache. ``transformers`` dequantizes GGUF weights on every load, which is slow; the
dequantized model and tokenizer are therefore saved once, as a plain safetensors folder under
:func:`gguf_cache_path`, and loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pathlib
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "CACHE_ENV_VAR",
    "GGUF_MAGIC",
    "TEMP_PREFIX",
    "build_dequantized_cache",
    "cache_root",
    "default_cache_dir",
    "dequantized_cache_complete",
    "download_gguf",
    "gguf_cache_path",
    "gguf_chat_template",
    "iter_string_metadata",
    "load_dequantized",
    "read_magic",
]

logger = logging.getLogger(__name__)

#: The first four bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
#: Environment variable overriding the default cache directory for dequantized GGUF copies.
CACHE_ENV_VAR = "DSPY_GREATER_CACHE"
#: Prefix of the temporary files and folders written into the cache before an atomic rename.
TEMP_PREFIX = ".tmp-"

# GGUF metadata value types (gguf spec): fixed sizes in bytes; 8 is a string, 9 an array.
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_SUPPORTED_VERSIONS = (2, 3)
_CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
# Files a dequantized cache folder must hold to count as complete.
_CACHE_REQUIRED_FILES = ("config.json", "model.safetensors")
# A temporary build folder older than this is considered abandoned by an interrupted run.
_STALE_TEMP_SECONDS = 3600.0


# --------------------------------------------------------------------------------------------
# The metadata header
# --------------------------------------------------------------------------------------------


def read_magic(path: str | os.PathLike[str]) -> bytes:
    """The first four bytes of ``path`` (:data:`GGUF_MAGIC` for a GGUF file).

    Raises:
        OSError: The file cannot be read.
    """
    with open(path, "rb") as handle:
        return handle.read(4)


class _HeaderReader:
    """Little-endian reads and value skipping over an open GGUF file."""

    def __init__(self, handle: BinaryIO, path: str | os.PathLike[str]) -> None:
        self.handle = handle
        self.path = path

    def read(self, n: int) -> bytes:
        data = self.handle.read(n)
        if len(data) != n:
            raise ValueError(f"{self.path}: truncated GGUF metadata")
        return data

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def string(self) -> str:
        return self.read(self.u64()).decode("utf-8", errors="replace")

    def skip(self, kind: int) -> None:
        """Move past one value of type ``kind`` without decoding it."""
        if kind == _STRING:
            self.handle.seek(self.u64(), io.SEEK_CUR)
        elif kind == _ARRAY:
            item, count = self.u32(), self.u64()
            if item == _STRING:
                for _ in range(count):
                    self.handle.seek(self.u64(), io.SEEK_CUR)
            elif item in _VALUE_SIZES:
                self.handle.seek(_VALUE_SIZES[item] * count, io.SEEK_CUR)
            else:
                for _ in range(count):
                    self.skip(item)
        elif kind in _VALUE_SIZES:
            self.handle.seek(_VALUE_SIZES[kind], io.SEEK_CUR)
        else:
            raise ValueError(f"{self.path}: unknown GGUF value type {kind}")


def iter_string_metadata(
    path: str | os.PathLike[str], wanted: Callable[[str], bool]
) -> Iterator[tuple[str, str]]:
    """Yield ``(key, value)`` for the string-valued metadata keys of a GGUF file that ``wanted`` accepts.

    Keys come in file order; every other value is skipped unread. Stop iterating early to stop
    reading.

    Args:
        path: The GGUF file.
        wanted: Called with each key; ``True`` to read that key's value (when it is a string).

    Raises:
        ValueError: The file is not a GGUF file (v2 or v3) or its header is truncated.
    """
    with open(path, "rb", buffering=1 << 16) as handle:
        reader = _HeaderReader(handle, path)
        if reader.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        version = reader.u32()
        if version not in _SUPPORTED_VERSIONS:
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        reader.u64()  # tensor count
        for _ in range(reader.u64()):
            key = reader.string()
            kind = reader.u32()
            if kind == _STRING and wanted(key):
                yield key, reader.string()
            else:
                reader.skip(kind)


def gguf_chat_template(path: str | os.PathLike[str]) -> str | None:
    """The chat template in a GGUF file's metadata (``tokenizer.chat_template``), or ``None``.

    A named template (``tokenizer.chat_template.<name>``) counts when there is no default one.

    Raises:
        ValueError: The file is not a GGUF file (v2 or v3) or its header is truncated.
    """
    named = None
    entries = iter_string_metadata(path, lambda key: key.startswith(_CHAT_TEMPLATE_KEY))
    with contextlib.closing(entries):
        for key, value in entries:
            if key == _CHAT_TEMPLATE_KEY:
                return value
            named = named or value
    return named


# --------------------------------------------------------------------------------------------
# The dequantized cache
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> pathlib.Path:
    """The default cache root: ``$DSPY_GREATER_CACHE`` if set, else ``~/.cache/dspy_greater``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path.home() / ".cache" / "dspy_greater"


def cache_root(cache_dir: str | os.PathLike[str] | None) -> pathlib.Path:
    """``cache_dir`` expanded, or :func:`default_cache_dir` when it is ``None``."""
    return pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


_FINGERPRINT_BYTES = 1 << 20


def _content_fingerprint(path: pathlib.Path) -> str:
    """Size and the SHA-256 of the first and last MiB: identical copies share it; reading a few
    GiB of weights to hash them all would cost more than it saves."""
    size = path.stat().st_size  # follows symlinks (hub downloads are symlinks to blobs)
    digest = hashlib.sha256(str(size).encode("ascii"))
    with path.open("rb") as handle:
        digest.update(handle.read(_FINGERPRINT_BYTES))
        if size > 2 * _FINGERPRINT_BYTES:
            handle.seek(size - _FINGERPRINT_BYTES)
        digest.update(handle.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()


def _cache_key(gguf_path: pathlib.Path) -> str:
    import transformers

    stem = gguf_path.name[: -len(".gguf")] if gguf_path.name.lower().endswith(".gguf") else gguf_path.name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "model"
    # The transformers version is part of the key: its GGUF conversion (weights and tokenizer)
    # may change between releases.
    fingerprint = "\0".join([_content_fingerprint(gguf_path), transformers.__version__])
    digest = hashlib.sha256(fingerprint.encode("utf-8")).hexdigest()[:12]
    return f"{safe}-{digest}"


def gguf_cache_path(gguf_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Where the dequantized copy of a local GGUF file lives (whether or not it exists yet).

    The folder is ``<cache_dir>/<file stem>-<hash>``, the hash covering the file's size, its first
    and last MiB and the ``transformers`` version: copies of one file in two places share a cache,
    a changed file or a new ``transformers`` gets a fresh copy. Old copies are not deleted.

    Args:
        gguf_path: The GGUF file.
        cache_dir: The cache root. Defaults to :func:`default_cache_dir`.
    """
    path = pathlib.Path(os.path.abspath(pathlib.Path(gguf_path).expanduser()))
    return cache_root(cache_dir) / _cache_key(path)


def dequantized_cache_complete(folder: pathlib.Path) -> bool:
    """Whether ``folder`` holds a complete dequantized copy (config and weights)."""
    return folder.is_dir() and all((folder / name).is_file() for name in _CACHE_REQUIRED_FILES)


def _remove_stale_temps(root: pathlib.Path, key: str) -> None:
    """Delete temporary build folders for ``key`` left behind by interrupted runs."""
    now = time.time()
    for candidate in root.glob(f"{TEMP_PREFIX}{key}-*"):
        try:
            if now - candidate.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(candidate, ignore_errors=True)
        except OSError:
            pass


def load_dequantized(gguf_path: pathlib.Path, dtype: torch.dtype, device_map: Any) -> tuple[Any, Any]:
    """Load a GGUF file with ``transformers``, dequantized to plain dense weights.

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        # Ask for dense weights explicitly: when the `kernels` package is installed, transformers
        # would otherwise keep some architectures' weights in packed GGUF blocks.
        quantization_config=GgufConfig(dequantize=True),
        dtype=dtype,
        device_map=device_map,
    )
    _drop_quantization_config(model)
    return model, tokenizer


def _drop_quantization_config(model: Any) -> None:
    """Make a dequantized GGUF model look like a plain one, so ``save_pretrained`` accepts it.

    With ``GgufConfig(dequantize=True)`` transformers already does this in ``postprocess_model``;
    without it (older releases, the legacy GGUF path) the quantizer stays attached.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def build_dequantized_cache(gguf_path: pathlib.Path, target: pathlib.Path) -> None:
    """Dequantize ``gguf_path`` and save model and tokenizer to ``target``, atomically.

    The copy is written into a temporary folder and renamed into place, so an interrupted run
    never leaves a partial copy; when another process finishes first, its copy is kept.
    """
    import torch

    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, target.name)
    started = time.perf_counter()
    logger.info("Dequantizing %s (once; the result is cached in %s)", gguf_path, target)
    model, tokenizer = load_dequantized(gguf_path, torch.float32, None)
    temp = pathlib.Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}-", dir=root))
    try:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        del model
        os.chmod(temp, 0o755)  # mkdtemp creates it private
        if dequantized_cache_complete(target):
            return  # another process finished first
        if target.exists():  # an incomplete folder (not written by this module): set it aside
            aside = pathlib.Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}-old-", dir=root))
            os.replace(target, aside / "old")
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(temp, target)
        except OSError:
            if not dequantized_cache_complete(target):  # not a lost race: a real error
                raise
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    logger.info("Cached dequantized %s in %s (%.1f s)", gguf_path.name, target, time.perf_counter() - started)


def download_gguf(repo_id: str, filename: str) -> pathlib.Path:
    """Download (or find in the Hugging Face cache) one GGUF file of a hub repository."""
    from huggingface_hub import hf_hub_download

    return pathlib.Path(hf_hub_download(repo_id=repo_id, filename=filename))
