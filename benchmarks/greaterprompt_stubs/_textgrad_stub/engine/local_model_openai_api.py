"""Stand-in for ...textgrad.engine.local_model_openai_api."""


class ChatExternalClient:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("TextGrad baseline is stubbed out in this benchmark env")
