"""The search engine: GReaTer's token search on a PyTorch causal LM, with no knowledge of DSPy.

- ``config``: the hyper-parameters (:class:`~dspy_greater.engine.config.GreaterConfig`);
- ``search``: the loop, propose -> reason -> gradient -> select
  (:class:`~dspy_greater.engine.search.GreaterSearch`), with ``proposals`` (the candidate rule),
  ``reasoning`` (the optimizer model's reasoning, generated once per example and instruction) and
  ``records`` (examples, step records, run state, result);
- ``model``: the optimizer model's operations (:class:`~dspy_greater.engine.model.OptimizerLM`:
  proposals' distributions, generation, scoring), with ``gradient`` (the one-hot gradient),
  ``losses`` (answer loss and fluency), ``kv_cache`` (prefix and inputs caches), ``sampling``
  (sampled generation from a local generator) and ``vocabulary`` (allowed tokens);
- ``layout`` (the paper's token layout), ``extractor`` (answer formats), ``checkpoint`` (saving
  and resuming a run), ``memory`` (a step's memory, estimated and checked before the first step),
  ``text`` (text shared with the target-side adapter).
"""
