"""Scale: the search's cost on the 135M-8B optimizer-model shapes, with random weights.

A model's cost does not depend on its weights, so a Llama-architecture model built from a config
with random weights has the real shapes, memory and FLOPs. Random weights rarely stop, so every
reasoning runs to its token limit: generation is measured at its worst case. All shapes use the
embedded model's tokenizer, so their vocabulary is SmolLM2's 49,152 rows (Llama-3's is 128,256:
its embedding and output layer would hold about 1 B more parameters at 8B).

    python benchmarks/scale.py run --shapes smollm2-135m smollm2-360m smollm2-1.7b --steps 3
    python benchmarks/scale.py fit benchmarks/results/scale_cpu.json     # cost model and projection
    python benchmarks/scale.py tokenizer --out .gpu/tokenizer   # for a machine that cannot fetch the model

``run`` measures each shape in a fresh process (peak memory is its own): N steps of the default
search and of the paper's protocol step (``GreaterConfig.faithful()`` at the given examples and
reasoning length), per step the time and its breakdown (propose / generate / gradient / select),
reasoning tokens generated, matrix FLOPs (``torch.utils.flop_counter``) and the achieved FLOP/s
against a measured matrix-multiply peak of the device, and peak memory (RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU). ``fit`` fits time per step = a + b x (parameters x
tokens processed) on the smaller shapes, checks it on the largest measured one, and projects an 8B
compile on one H100 from the FLOPs and the memory traffic of generation.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = pathlib.Path(__file__).resolve().parent
#: Where the embedded tokenizer is read from, as saved by ``scale.py tokenizer`` (optional).
TOKENIZER_ENV_VAR = "DSPY_GREATER_TOKENIZER"

# (hidden, intermediate, layers, attention heads, key/value heads, tied embeddings)
SHAPES = {
    "smollm2-135m": (576, 1536, 30, 9, 3, True),
    "smollm2-360m": (960, 2560, 32, 15, 5, True),
    "smollm2-1.7b": (2048, 8192, 24, 32, 32, True),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, True),
    "llama-3-8b": (4096, 14336, 32, 32, 8, False),
}
# One H100 SXM: dense bf16 tensor-core peak and HBM3 bandwidth (vendor figures).
H100_BF16_FLOPS = 989e12
H100_BYTES_PER_S = 3.35e12


def llama_config(shape: str, vocab_size: int, **token_ids):
    """A ``LlamaConfig`` with ``shape``'s dimensions (``SHAPES``) and ``vocab_size`` rows."""
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, tied = SHAPES[shape]
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                       tie_word_embeddings=tied, **token_ids)


def embedded_tokenizer():
    """The embedded model's tokenizer: from ``$DSPY_GREATER_TOKENIZER`` (a folder written by
    ``scale.py tokenizer``) where set, as on a machine that cannot fetch the model, else the model's own."""
    folder = os.environ.get(TOKENIZER_ENV_VAR)
    if folder:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from dspy_greater.models.loading import load_optimizer_model

    return load_optimizer_model()[1]


def build_model(shape: str, dtype, device: str):
    """A random-weight LlamaForCausalLM with ``shape``'s dimensions and the embedded tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = embedded_tokenizer()
    config = llama_config(shape, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def matmul_peak(device: str, dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matrix product on ``device``: the practical peak achieved FLOP/s is read against."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    (a @ b).sum().item()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def measure(args) -> dict:
    """One shape, in this process: ``steps`` steps of each protocol."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dspy_greater.data import bbh_rows
    from dspy_greater.engine.extractor import derive_extractor
    from dspy_greater.engine.layout import GreaterLayout
    from dspy_greater.engine.model import OptimizerLM
    from dspy_greater.engine.config import GreaterConfig
    from dspy_greater.engine.search import GreaterSearch, SearchExample

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = build_model(args.shape, dtype, args.device)
    params = sum(p.numel() for p in model.parameters())
    rows = bbh_rows("navigate")[: args.examples + 2]
    extractor = derive_extractor("answer", None, [a for _, a in rows], [q for q, _ in rows])
    examples = [SearchExample(q, extractor.canonical(a)) for q, a in rows]
    train, heldout = examples[: args.examples], examples[args.examples:]
    report = {"shape": args.shape, "parameters": params, "device": args.device, "dtype": args.dtype,
              "threads": args.threads, "examples": args.examples, "reasoning_tokens": args.reasoning_tokens,
              "matmul_peak_flops": matmul_peak(args.device, dtype), "protocols": {}}
    for protocol in args.protocols:
        settings = dict(num_steps=args.steps, max_reasoning_tokens=args.reasoning_tokens, eval_every=10**6)
        config = (GreaterConfig.faithful(**settings) if protocol == "paper" else
                  GreaterConfig(batch_size=min(6, args.examples), **settings))
        lm = OptimizerLM(model, tokenizer, batch_size=args.model_batch_size)
        search = GreaterSearch(lm, GreaterLayout(tokenizer), extractor, config)
        ids = search.layout.encode_instruction("Use proper logical reasoning and think step by step.")
        rng = __import__("random").Random(0)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steps, position = [], 0
        for step in range(args.steps):
            generated_before = sum(len(r) for r in search._reasoning.values())
            counter = FlopCounterMode(display=False)
            started = time.perf_counter()
            with counter:
                record = search._step(step, ids, position, train, rng, len(ids))
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            ids, position = record["instruction_ids"], search._advance(record["instruction_ids"], position)
            flops = counter.get_total_flops()
            steps.append({"seconds": seconds, "breakdown": record["seconds"], "flops": flops,
                          "achieved_flops": flops / seconds,
                          "tokens_generated": sum(len(r) for r in search._reasoning.values()) - generated_before})
        peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        later = steps[1:] or steps
        report["protocols"][protocol] = {
            "examples_per_step": config.batch_size or len(train), "steps": steps, "peak_memory_bytes": peak,
            "seconds_per_step": sum(s["seconds"] for s in later) / len(later),
            "flops_per_step": sum(s["flops"] for s in later) / len(later),
            "tokens_generated_per_step": sum(s["tokens_generated"] for s in later) / len(later),
        }
        p = report["protocols"][protocol]
        print(f"{args.shape} {protocol}: {p['seconds_per_step']:.1f} s/step, "
              f"{p['flops_per_step'] / p['seconds_per_step'] / report['matmul_peak_flops']:.0%} of the matmul peak, "
              f"{peak / 2**30:.1f} GiB peak", flush=True)
    return report


def run(args) -> None:
    reports = []
    for shape in args.shapes:
        out = subprocess.run([sys.executable, __file__, "measure", "--shape", shape, *_shared(args)],
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{shape} failed")
        print(out.stdout.rsplit("\n@@", 1)[0], flush=True)
        reports.append(json.loads(out.stdout.rsplit("\n@@", 1)[1]))
    path = pathlib.Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
                                "load_average": os.getloadavg(), "shapes": reports}, indent=1))
    print(f"wrote {path}")


def _shared(args) -> list[str]:
    return ["--steps", str(args.steps), "--examples", str(args.examples), "--reasoning-tokens",
            str(args.reasoning_tokens), "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
            "--model-batch-size", str(args.model_batch_size), "--protocols", *args.protocols]


def fit(args) -> None:
    """Time per step against the work of a step, fitted on the two smallest shapes, checked on the largest.

    Two models, each with two constants fitted: ``linear``, a + b x FLOPs (the same line as
    a + b' x parameters x tokens); ``matmul+vector``, a + FLOPs / (the matmul peak measured in the
    fitted shapes' runs) + c x FLOPs / hidden size, where the last term is the work that grows with
    tokens x layers x hidden size rather than its square (norms, activations, attention's softmax,
    memory traffic), so its share of a step falls as the model widens.
    """
    data = json.loads(pathlib.Path(args.report).read_text())
    out = {"report": args.report, "protocols": {}}
    for protocol in ("default", "paper"):
        shapes = sorted((s for s in data["shapes"] if protocol in s["protocols"]), key=lambda s: s["parameters"])
        if len(shapes) < 3:
            continue
        flops = [s["protocols"][protocol]["flops_per_step"] for s in shapes]
        seconds = [s["protocols"][protocol]["seconds_per_step"] for s in shapes]
        peak = (shapes[0]["matmul_peak_flops"] + shapes[1]["matmul_peak_flops"]) / 2  # measured beside the fitted shapes
        matrix = [f / peak for f in flops]
        vector = [f / SHAPES[s["shape"]][0] for f, s in zip(flops, shapes)]
        models = {}
        for name, fixed, xs in (("linear", [0.0] * len(shapes), flops), ("matmul+vector", matrix, vector)):
            ys = [t - m for t, m in zip(seconds, fixed)]
            b = (ys[1] - ys[0]) / (xs[1] - xs[0])
            a = ys[0] - b * xs[0]
            predicted = a + fixed[-1] + b * xs[-1]
            models[name] = {"a": a, "b": b, "predicted_largest": predicted, "error": predicted / seconds[-1] - 1}
            print(f"{protocol}, {name}: fitted on the two smallest shapes, predicts {predicted:.1f} s/step for the "
                  f"largest against {seconds[-1]:.1f} measured ({predicted / seconds[-1] - 1:+.0%})")
        out["protocols"][protocol] = {"measured_largest": seconds[-1], "models": models}
    out["projection_8b_h100"] = project_8b()
    for name, p in out["projection_8b_h100"].items():
        print(f"8B on one H100, {name}: {p['hours']:.2f} h ({p['steps']} steps, {p['seconds_per_step']:.1f} s/step)")
    out["memory_8b"] = memory_8b()
    for name, m in out["memory_8b"].items():
        print(f"8B step memory, {name}: {m['describe']}")
    path = pathlib.Path(args.output or pathlib.Path(args.report).with_name("scale_projection.json"))
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    plot(data, path.with_suffix(".png"))


def plot(data: dict, path: pathlib.Path) -> None:
    """Seconds per step and peak memory against parameters, one line per protocol (log-log)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    for protocol, marker in (("default", "o"), ("paper", "s")):
        shapes = sorted((s for s in data["shapes"] if protocol in s["protocols"]), key=lambda s: s["parameters"])
        params = [s["parameters"] / 1e9 for s in shapes]
        time_ax.plot(params, [s["protocols"][protocol]["seconds_per_step"] for s in shapes], marker=marker,
                     label=protocol)
        memory_ax.plot(params, [s["protocols"][protocol]["peak_memory_bytes"] / 2**30 for s in shapes], marker=marker,
                       label=protocol)
    device = data["shapes"][0]["device"]
    sizes = sorted({s["parameters"] for s in data["shapes"]})
    for ax, label in ((time_ax, "seconds per step"), (memory_ax, "peak memory, GiB")):
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel=label)
        ax.set_xticks([n / 1e9 for n in sizes], [f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" for n in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Search step cost against model size ({device}, random weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def project_8b(mfu: float = 0.4, prompt_tokens: int = 250) -> dict:
    """An 8B step on one H100 from first principles: matrix FLOPs at ``mfu`` of the bf16 peak, and
    generation bound by memory reads: the weights once per decoding step (batched rows share the
    read) plus every row's KV cache so far."""
    hidden, inter, layers, heads, kv, _ = SHAPES["llama-3-8b"]
    per_layer = 2 * hidden * hidden + 2 * hidden * hidden * kv // heads + 3 * hidden * inter
    params = layers * per_layer + 2 * 128256 * hidden
    weight_bytes = 2 * params
    kv_bytes_per_token = layers * 2 * kv * (hidden // heads) * 2
    out = {}
    for name, steps, examples, reasoning, finalists, regenerate, batch in (
            ("default compile", 10, 6, 256, 3, False, 6), ("paper protocol", 100, 50, 1024, 3, True, 50)):
        sequence = prompt_tokens + reasoning
        generations = 1 + (finalists if regenerate else 0)
        cache_bytes = examples * (prompt_tokens + reasoning / 2) * kv_bytes_per_token  # mean over the decoding steps
        read_bytes = weight_bytes * max(1, examples // 64 + 1) + cache_bytes
        decode_seconds = generations * reasoning * read_bytes / H100_BYTES_PER_S
        forward_flops = 2 * params * sequence * examples
        flops = forward_flops * (1 + 3 + finalists)  # proposals + forward and backward + finalist scoring
        seconds = decode_seconds + flops / (mfu * H100_BF16_FLOPS)
        out[name] = {"steps": steps, "examples": examples, "reasoning_tokens": reasoning, "seconds_per_step": seconds,
                     "hours": steps * seconds / 3600, "assumptions": f"{mfu:.0%} of bf16 peak for matrix work; "
                     "decoding reads the weights once per token for up to 64 rows, and each row's KV cache"}
    return out


def memory_8b(sequence_tokens: int = 1300, batch: int = 8) -> dict:
    """The search's own memory estimate (``engine.memory``) of an 8B bfloat16 step with the paper's
    1024 reasoning tokens (about ``sequence_tokens`` in all), with and without gradient checkpointing;
    the model is built on the meta device, so nothing is allocated."""
    import torch
    from transformers import LlamaForCausalLM

    from dspy_greater.engine.memory import estimate_step_memory

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config("llama-3-8b", 128256)).to(torch.bfloat16)
    out = {}
    for checkpointing in (True, False):
        estimate = estimate_step_memory(model, sequence_tokens=sequence_tokens, batch=batch,
                                        gradient_checkpointing=checkpointing, inputs_store_mb=512)
        out[f"gradient_checkpointing={checkpointing}"] = {
            "sequence_tokens": sequence_tokens, "batch": batch, "peak_bytes": estimate.peak,
            "fits_80gb": estimate.peak < 80e9, "describe": estimate.describe()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "measure"):
        s = sub.add_parser(name)
        if name == "run":
            s.add_argument("--shapes", nargs="+", default=["smollm2-135m", "smollm2-360m", "smollm2-1.7b"],
                           choices=sorted(SHAPES))
            s.add_argument("--output", default=str(HERE / "results" / "scale_cpu.json"))
        else:
            s.add_argument("--shape", required=True, choices=sorted(SHAPES))
        s.add_argument("--steps", type=int, default=3)
        s.add_argument("--examples", type=int, default=8)
        s.add_argument("--reasoning-tokens", type=int, default=48)
        s.add_argument("--device", default="cpu")
        s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--model-batch-size", type=int, default=8)
        s.add_argument("--protocols", nargs="+", default=["default", "paper"], choices=["default", "paper"])
    f = sub.add_parser("fit")
    f.add_argument("report")
    f.add_argument("--output", default=None)
    t = sub.add_parser("tokenizer", help=f"save the embedded tokenizer to a folder (for ${TOKENIZER_ENV_VAR})")
    t.add_argument("--out", required=True)
    args = p.parse_args()
    if args.command == "tokenizer":
        embedded_tokenizer().save_pretrained(args.out)
    elif args.command == "measure":
        print("\n@@" + json.dumps(measure(args)))
    elif args.command == "run":
        run(args)
    else:
        fit(args)


if __name__ == "__main__":
    main()
