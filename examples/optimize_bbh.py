"""Optimize a ChainOfThought program's instruction on a BBH task with the embedded SmolLM2-135M.

    python examples/optimize_bbh.py --task snarks --steps 8

Prints the optimizer model's accuracy, majority-class rate and balanced accuracy on held-out
test examples before and after, then saves the optimized program.
"""

import argparse

import dspy

from dspy_greater import GReaTerTeleprompter
from dspy_greater.data import load_examples, split_examples
from dspy_greater.metrics import exact_match, summarize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="snarks")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="optimized_program.json")
    args = parser.parse_args()

    train, dev, test = split_examples(load_examples(args.task), [24, 16, 40], seed=0)
    program = dspy.ChainOfThought("question -> answer")
    teleprompter = GReaTerTeleprompter(metric=exact_match, num_steps=args.steps)

    def score(p):
        predictions, golds = teleprompter.optimizer_predictions(p, test)
        return summarize(golds, predictions)

    before = score(program)
    optimized = teleprompter.compile(program, trainset=train, valset=dev)
    after = score(optimized)

    print("before:", program.predict.signature.instructions)
    print("after: ", optimized.predict.signature.instructions)
    for name, row in (("before", before), ("after", after)):
        print(f"{name:6} accuracy {row['accuracy']:.3f}  majority {row['majority_rate']:.3f}  "
              f"balanced {row['balanced_accuracy']:.3f}  {row['pred_distribution']}")
    optimized.save(args.out)


if __name__ == "__main__":
    main()
