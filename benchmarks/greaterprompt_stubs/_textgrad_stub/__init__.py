"""Stand-in for greaterprompt.core.TextGrad.textgrad_ollm.textgrad (the TextGrad
baseline). GreaterOptimizer never uses it; the real one needs diskcache, openai,
... and writes ./logs/ on import. Only TextGradOptimizer touches `tg.*`; its
method signature annotates `tg.Variable`, evaluated when optimizer.py is
imported, so that one name must exist."""


class Variable:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("TextGrad baseline is stubbed out in this benchmark env")
