"""The ``dspy-greater serve`` subcommand: a llama.cpp server in the foreground until Ctrl-C.

:func:`add_serve_subcommand` registers it on the command line's subparsers; :func:`run_serve` runs
it. The server itself is :class:`~dspy_greater.targets.llama_cpp.LlamaCppServer`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from dspy_greater.targets.llama_cpp import GEMMA3_270M_NAME, LlamaCppServer, TargetServerError

__all__ = ["add_serve_subcommand", "run_serve"]

_WATCH_SECONDS = 0.5


def add_serve_subcommand(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to an argparse subparsers object; the parser's ``func`` default is :func:`run_serve`."""
    serve = subparsers.add_parser(
        "serve",
        help="run llama.cpp's OpenAI-compatible server on a GGUF file as a DSPy target LM (until Ctrl-C)",
        description="Run llama.cpp's OpenAI-compatible server in the foreground and print the dspy.LM line "
        "that reaches it. Stop it with Ctrl-C.",
    )
    serve.add_argument("--model", default=None,
                       help=f"a .gguf file, or {GEMMA3_270M_NAME!r} (default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--port", type=int, default=None, help="port to listen on (default: a free port)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--n-ctx", type=int, default=4096, help="context size in tokens (default: 4096)")
    serve.add_argument("--n-threads", type=int, default=None, help="decoding threads (default: llama.cpp's choice)")
    serve.add_argument("--alias", default=None, help="model name the server answers to (default: from the file name)")
    serve.add_argument("--chat-format", default=None, help="llama-cpp-python chat format (default: the GGUF's template)")
    serve.add_argument("--log-file", default=None, help="write the server's log here (default: a temporary file)")
    serve.set_defaults(func=run_serve)
    return serve


def run_serve(args: argparse.Namespace) -> int:
    """Run the server for ``args`` (from :func:`add_serve_subcommand`) until Ctrl-C or SIGTERM.

    Returns:
        0 after Ctrl-C or SIGTERM.

    Raises:
        SystemExit: With code 1, after printing the error, when the server cannot start or dies.
    """
    server = _start_server(args)
    previous = None
    if threading.current_thread() is threading.main_thread():
        def _on_sigterm(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _print_usage(server)
        while server.is_running:
            time.sleep(_WATCH_SECONDS)
        print(
            f"dspy-greater serve: error: the server exited ({server.exit_status or 'exit code 0'}).\n"
            f"Last lines of its log ({server.log_path}):\n{server.log_tail()}",
            file=sys.stderr,
        )
        server.stop()
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("\nStopping the server ...", flush=True)
        server.stop()
        return 0
    finally:
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _start_server(args: argparse.Namespace) -> LlamaCppServer:
    """Build and start the server; print the error and exit with code 1 when it cannot start."""
    try:
        server = LlamaCppServer(
            args.model, host=args.host, port=args.port, n_ctx=args.n_ctx, n_threads=args.n_threads,
            alias=getattr(args, "alias", None), chat_format=getattr(args, "chat_format", None),
            log_path=getattr(args, "log_file", None),
        )
        print(f"Starting llama.cpp server for {server.model_path} ...", flush=True)
        server.start()
    except TargetServerError as error:
        print(f"dspy-greater serve: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    return server


def _print_usage(server: LlamaCppServer) -> None:
    """Print where the server listens and the line that reaches it from DSPy."""
    print(f"Serving {server.alias!r} (pid {server.pid}) at {server.api_base}", flush=True)
    print(f"Log: {server.log_path}")
    print("Use it from DSPy with:")
    code = server.lm_code()
    if code.startswith("PlainTextLM("):
        print("    from dspy_greater.targets.plain_text import PlainTextLM  # the GGUF has no chat template: plain completions")
    print(f"    {code}")
    print("Press Ctrl-C to stop.", flush=True)
