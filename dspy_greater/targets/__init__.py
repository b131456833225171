"""The target side: running an optimized program on a target LM.

``adapter`` (``GReaTerAdapter``, the paper's layout as a DSPy adapter), ``plain_text``
(``PlainTextLM`` for completion endpoints), ``llama_cpp`` (a local llama.cpp server process),
``lm_factory`` (the ``dspy.LM`` for a running server), ``serve`` (the ``dspy-greater serve``
command), ``generation`` (the optimizer model's reasoning generated on a completion server).
"""
