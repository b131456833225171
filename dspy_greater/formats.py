"""Text pieces shared by the optimizer's layout and the adapter that replays it on a target LM.

Kept in one light module (no torch, no DSPy) so that ``layout.GreaterLayout`` and
``adapter.GReaTerAdapter`` cannot drift apart.
"""

#: Between the example's inputs and the instruction (both layouts).
SEPARATOR = "\n\n"

#: After the instruction, in the plain-text layout used for models without a chat template:
#: ``inputs + SEPARATOR + instruction + PLAIN_ANSWER_CUE``, then the model's reasoning.
PLAIN_ANSWER_CUE = "\n\nAnswer:"
