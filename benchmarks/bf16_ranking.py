"""float32 vs bfloat16: do the one-hot gradients rank the candidate tokens the same way?

For 6 examples of each task (seed 0) and every position of "Let's think step by step.", the same
candidates (proposed in float32) are ranked by the gradient of the same sequences (reasoning
generated in float32, 32 tokens) in both dtypes. Reported: Kendall's tau between the two gradient
vectors and the overlap of the three best (the finalists). One torch thread.

    python benchmarks/bf16_ranking.py          # writes benchmarks/results/bf16_ranking.json
"""

from __future__ import annotations

import json
import pathlib
import random

import torch

from dspy_greater.data import load_examples, split_examples
from dspy_greater.engine.extractor import derive_extractor
from dspy_greater.engine.layout import GreaterLayout
from dspy_greater.models.loading import ModelSpec, load_optimizer_model
from dspy_greater.engine.model import OptimizerLM
from dspy_greater.engine.config import GreaterConfig
from dspy_greater.engine.search import GreaterSearch, SearchExample

RESULT = pathlib.Path(__file__).resolve().parent / "results" / "bf16_ranking.json"
DTYPES = ("float32", "bfloat16")


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a of two equally long score lists (ties count for neither side)."""
    concordant = discordant = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            sign = (a[i] - a[j]) * (b[i] - b[j])
            concordant += sign > 0
            discordant += sign < 0
    return (concordant - discordant) / max(concordant + discordant, 1)


def compare_task(task: str, lms: dict[str, OptimizerLM]) -> dict:
    rows = load_examples(task)
    examples = [SearchExample(e.question, e.answer) for e in split_examples(rows, [6], 0)[0]]
    extractor = derive_extractor("answer", None, [e.answer for e in rows], [e.question for e in rows])
    layout = GreaterLayout(lms["float32"].tokenizer)
    reference = GreaterSearch(lms["float32"], layout, extractor, GreaterConfig(max_reasoning_tokens=32))
    instruction = layout.encode_instruction("Let's think step by step.")
    seqs = reference.sequences(instruction, examples, reference.reasoning(instruction, examples))
    taus, top3 = [], []
    for position in range(len(instruction)):
        candidates = reference.propose(instruction, position, examples, random.Random(0))
        grads = {d: lms[d].one_hot_gradient(seqs, position, candidates, answer_temperature=0.2,
                                            fluency_weight=0.2)[1].float() for d in DTYPES}
        taus.append(kendall_tau(grads["float32"].tolist(), grads["bfloat16"].tolist()))
        best = [set(torch.argsort(grads[d])[:3].tolist()) for d in DTYPES]
        top3.append(len(best[0] & best[1]) / 3)
    return {"positions": len(instruction), "kendall_tau": taus, "top3_overlap": top3,
            "mean_tau": sum(taus) / len(taus), "mean_top3_overlap": sum(top3) / len(top3)}


def main() -> None:
    torch.set_num_threads(1)
    lms = {d: OptimizerLM(*load_optimizer_model(ModelSpec(dtype=d)), batch_size=8) for d in DTYPES}
    report = {task: compare_task(task, lms) for task in ("navigate", "hyperbaton")}
    for task, row in report.items():
        print(f"{task}: mean tau {row['mean_tau']:.3f}, finalist overlap {row['mean_top3_overlap']:.2f}", flush=True)
    RESULT.write_text(json.dumps(report, indent=1))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
