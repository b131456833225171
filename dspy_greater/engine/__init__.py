"""The search engine: GReaTer's token search on a PyTorch causal LM, with no knowledge of DSPy.

``config`` (hyper-parameters), ``search`` (the loop: propose, reason, gradient, select), ``model``
(the optimizer model's forwards: generation, scoring, the one-hot gradient), ``layout`` (the
paper's token layout), ``extractor`` (answer formats), ``checkpoint`` (saving and resuming a run),
``text`` (text shared with the target-side adapter).
"""
