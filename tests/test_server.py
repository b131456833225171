"""The local llama.cpp target server: real servers on 127.0.0.1 serving the embedded SmolLM2 GGUF."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("llama_cpp")

from dspy_greater.targets import llama_cpp as server_module  # noqa: E402
from dspy_greater.targets import serve as serve_module  # noqa: E402
from dspy_greater.targets.llama_cpp import LlamaCppServer, TargetServerError  # noqa: E402
from dspy_greater.targets.serve import add_serve_subcommand  # noqa: E402


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def smollm2():
    with LlamaCppServer() as running:
        yield running


def test_lm_answers_and_respects_max_tokens(smollm2):
    assert smollm2.is_running
    assert smollm2.api_base == f"http://127.0.0.1:{smollm2.port}/v1"
    lm = smollm2.lm(max_tokens=8, cache=False)
    assert lm.model == f"openai/{smollm2.alias}"
    outputs = lm("Write a long story about a dragon who learns to fly.")
    assert len(outputs) == 1 and isinstance(outputs[0], str) and outputs[0].strip()
    usage = lm.history[-1]["usage"]
    assert 0 < usage["completion_tokens"] <= 8  # the limit reached llama.cpp as max_tokens and was honoured


def test_lm_overrides_and_paste_line(smollm2):
    kwargs = smollm2.lm_kwargs(max_tokens=64, temperature=0.5)
    assert kwargs["max_tokens"] == 64 and kwargs["temperature"] == 0.5
    assert kwargs["engine"] == "litellm"  # DSPy's native engine sends max_completion_tokens, which llama.cpp ignores
    code = smollm2.lm_code()
    assert code.startswith(f"dspy.LM('openai/{smollm2.alias}', api_base='{smollm2.api_base}'")
    assert smollm2.start() is smollm2  # already running: no second process


def test_port_in_use_names_the_port(smollm2):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LlamaCppServer(port=port)
        with pytest.raises(TargetServerError, match=rf"Port {port}\b.*port=None"):
            server.start()
        assert server.pid is None


def test_port_of_running_server_is_refused(smollm2):
    with pytest.raises(TargetServerError, match=str(smollm2.port)):
        LlamaCppServer(port=smollm2.port).start()


def test_missing_gguf_fails_before_spawning(tmp_path, monkeypatch):
    def no_spawn(*args, **kwargs):
        raise AssertionError("a process was spawned")

    monkeypatch.setattr(subprocess, "Popen", no_spawn)
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(TargetServerError, match="not found") as info:
        LlamaCppServer(missing).start()
    assert str(missing) in str(info.value) and ".gguf" in str(info.value)


def test_not_a_gguf_fails_before_spawning(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was spawned"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(TargetServerError, match="not a GGUF file"):
        LlamaCppServer(fake)


def test_missing_server_package_says_how_to_install(monkeypatch):
    real = server_module._find_spec
    monkeypatch.setattr(server_module, "_find_spec", lambda name: None if name == "uvicorn" else real(name))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was spawned"))
    with pytest.raises(TargetServerError, match=r'pip install "dspy-greater\[server\]"'):
        LlamaCppServer().start()


def test_bad_arguments_are_refused():
    with pytest.raises(TargetServerError, match="port"):
        LlamaCppServer(port=70000)
    with pytest.raises(TargetServerError, match="n_threads"):
        LlamaCppServer(n_threads=0)


def test_corrupt_gguf_fails_with_log_tail(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(4096))
    server = LlamaCppServer(corrupt, startup_timeout=60, log_path=tmp_path / "server.log")
    started = time.monotonic()
    with pytest.raises(TargetServerError) as info:
        server.start()
    message = str(info.value)
    assert str(corrupt) in message and "exited" in message
    assert "Last lines of the server log" in message and str(tmp_path / "server.log") in message
    assert "llama" in message.lower() or "gguf" in message.lower()  # text from the log itself
    assert time.monotonic() - started < 60
    assert not server.is_running and server.pid is None


def test_stop_leaves_no_process(tmp_path):
    server = LlamaCppServer(n_threads=1).start()
    pid = server.pid
    assert pid is not None and not _gone(pid)
    assert os.getpgid(pid) == pid  # its own process group
    log = server.log_path
    assert log is not None and log.exists()
    server.stop()
    assert _gone(pid) and _group_gone(pid)
    assert not server.is_running
    assert not log.exists()  # a temporary log is removed by a clean stop
    server.stop()  # idempotent


def test_context_manager_stops_on_exception():
    pid = None
    with pytest.raises(RuntimeError, match="boom"):
        with LlamaCppServer() as server:
            pid = server.pid
            assert server.is_running
            raise RuntimeError("boom")
    assert pid is not None and _gone(pid) and _group_gone(pid)


def test_server_killed_mid_use_fails_promptly(tmp_path):
    with LlamaCppServer(log_path=tmp_path / "server.log") as server:
        lm = server.lm(max_tokens=2000, cache=False)
        pid = server.pid
        assert lm("Say hi.", max_tokens=2)  # warm the client up, so the next request is sent at once
        outcome: dict = {}

        def call():
            try:
                outcome["result"] = lm("Write a very long story about a dragon, with many chapters.")
            except Exception as error:  # noqa: BLE001 - whatever the client raises
                outcome["error"] = error
            outcome["at"] = time.monotonic()

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        time.sleep(1.5)  # the 2000-token request is still being generated
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        worker.join(timeout=30)
        assert not worker.is_alive(), "the dspy.LM call hung after the server died"
        assert "error" in outcome, outcome
        assert outcome["at"] - killed_at < 15
        assert not server.is_running
        with pytest.raises(TargetServerError, match="SIGKILL"):
            server.ensure_running()
        started = time.monotonic()
        with pytest.raises(Exception):
            lm("Another question?")
        assert time.monotonic() - started < 15
    assert _gone(pid) and server.pid is None


def test_serve_subcommand_arguments():
    parser = argparse.ArgumentParser(prog="dspy-greater")
    add_serve_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "gemma3-270m", "--port", "8123", "--n-ctx", "2048", "--n-threads", "2"])
    assert (args.model, args.port, args.n_ctx, args.n_threads, args.host) == ("gemma3-270m", 8123, 2048, 2, "127.0.0.1")
    assert args.func is serve_module.run_serve


def test_command_line_flags(tmp_path):
    server = LlamaCppServer(port=8123, n_threads=2, chat_format="chatml", extra_args=("--n_batch", "128"))
    command = server.command()
    assert command[command.index("--n_threads") + 1] == "2"
    assert command[command.index("--port") + 1] == "8123"
    assert command[command.index("--chat_format") + 1] == "chatml"
    assert command[-2:] == ["--n_batch", "128"]
    assert "--n_threads" not in LlamaCppServer(port=8123).command()  # None: llama.cpp chooses


_PARENT_SCRIPT = """
import sys, threading, time
from dspy_greater.targets.llama_cpp import LlamaCppServer
main_server = LlamaCppServer(log_path=sys.argv[1] + '/main.log').start()
holder = {}
worker = threading.Thread(target=lambda: holder.setdefault("server", LlamaCppServer(log_path=sys.argv[1] + '/thread.log').start()))
worker.start(); worker.join()   # the forking thread has exited: its server must survive that
time.sleep(1.0)
print(main_server.pid, holder["server"].pid, holder["server"].is_running, flush=True)
time.sleep(600)
"""


def test_no_orphans_when_the_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", _PARENT_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline().split()
        assert len(line) == 3, f"parent script failed: {line}"
        main_pid, thread_pid, thread_alive = int(line[0]), int(line[1]), line[2]
        assert thread_alive == "True" and not _gone(thread_pid)  # survived its thread's exit
        assert not _gone(main_pid)
        parent.kill()  # SIGKILL: no atexit, no finally blocks
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (_gone(main_pid) and _gone(thread_pid)):
            time.sleep(0.1)
        assert _gone(main_pid), "server started from the main thread outlived its parent"
        assert _gone(thread_pid), "server started from a worker thread outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
