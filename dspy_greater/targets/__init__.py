"""The target side: running an optimized program on a target LM.

``adapter`` (``GReaTerAdapter``, the paper's layout as a DSPy adapter), ``plain_text``
(``PlainTextLM`` for completion endpoints), ``llama_cpp`` (a local llama.cpp server process),
``generation`` (the optimizer model's reasoning generated on a completion server).
"""
