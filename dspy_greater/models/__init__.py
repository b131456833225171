"""Loading the optimizer model: Hugging Face hub ids, local folders and GGUF files."""
