"""Benchmarks that ship with the library: the training step (`train.py`) and its Hugging Face peer (`hf.py`)."""
