"""Stand-in for greaterprompt.core.TextGrad.textgrad_ollm.textgrad.engine."""
