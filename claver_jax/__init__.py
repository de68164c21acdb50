"""claver_jax: CLAVER (Kronecker Mask and Interpretive Prompts are Language-Action Video Learners) in JAX."""

__version__ = '0.1.0'
