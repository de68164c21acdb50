"""Text side: the CLIP tokenizer (`tokenizer`)."""

from claver_jax.text.tokenizer import Tokenizer, load_tokenizer

__all__ = ['Tokenizer', 'load_tokenizer']
