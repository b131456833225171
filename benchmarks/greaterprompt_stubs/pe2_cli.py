"""Stand-in for greaterprompt.core.pe2.cli (the APE/APO/PE2 baselines)."""


def ape_apo_pe2_optimizer(*args, **kwargs):
    raise NotImplementedError("APE/APO/PE2 baselines are stubbed out in this benchmark env")
