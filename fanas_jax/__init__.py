"""fanas_jax: full-attention neural architecture search with context auto-regression."""

__version__ = "0.1.0"
