"""How readable are the instructions a search returns? Their NLL per token under the optimizer model.

Each text is scored alone (after the tokenizer's end-of-text token): the mean negative
log-likelihood of its tokens under the embedded SmolLM2-135M, float32. Lower reads more like
ordinary text. Scored: the instructions the protocol's runs returned (``results/protocol/<config>``),
their start and the program's own instruction, and the final prompts of greaterprompt's speed runs
(``results/speed_navigate_*tokens_10steps.json``) for comparison.

    python benchmarks/readability.py --configs default --output benchmarks/results/readability.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import torch

HERE = pathlib.Path(__file__).resolve().parent


def nll_per_token(model, tokenizer, text: str) -> float:
    """Mean NLL of ``text``'s tokens, each given the end-of-text token and the tokens before it."""
    ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()


def _texts(configs: list[str]) -> dict[str, list[str]]:
    """Groups of texts to score: each configuration's returned instructions, starts, programs', greaterprompt's."""
    groups: dict[str, list[str]] = {}
    for config in configs:
        runs = [json.loads(p.read_text()) for p in sorted((HERE / "results" / "protocol" / config).glob("*_seed*.json"))]
        groups[f"returned by `{config}`"] = [r["returned"] for r in runs]
        groups["the search's start"] = sorted({r["start"] for r in runs})
        groups["the program's own (DSPy's)"] = sorted({r["program_instruction"] for r in runs})
    for path in sorted(HERE.glob("results/speed_navigate_*tokens_10steps.json")):
        report = json.loads(path.read_text())
        groups.setdefault("greaterprompt's final prompts (speed runs)", []).extend(
            report["systems"]["greaterprompt"]["final_prompts"])
    return groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["default"])
    p.add_argument("--output", default=str(HERE / "results" / "readability.json"))
    args = p.parse_args()
    from dspy_greater.models.loading import load_optimizer_model

    torch.set_num_threads(2)
    model, tokenizer = load_optimizer_model()
    report = {"command": "python benchmarks/readability.py --configs " + " ".join(args.configs),
              "groups": {}}
    print("| texts | n | NLL per token, mean | min | max |\n|---|---|---|---|---|")
    for group, texts in _texts(args.configs).items():
        scores = {text: nll_per_token(model, tokenizer, text) for text in dict.fromkeys(texts)}
        values = [scores[t] for t in texts]
        report["groups"][group] = {"texts": scores, "mean": statistics.mean(values), "n": len(values)}
        print(f"| {group} | {len(values)} | {statistics.mean(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    pathlib.Path(args.output).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
