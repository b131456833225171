"""Stand-in for greaterprompt.core.TextGrad.textgrad_ollm.textgrad.tasks."""


def load_task(*args, **kwargs):
    raise NotImplementedError("TextGrad baseline is stubbed out in this benchmark env")
