"""Converters from PyTorch / HF checkpoints to claver_jax model directories."""
