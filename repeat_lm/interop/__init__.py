"""Interoperability: Hugging Face export/import (`hf`), T5X checkpoints (`t5x`), and loading any of them (`load`)."""
