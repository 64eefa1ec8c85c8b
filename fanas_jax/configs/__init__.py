"""The configs that --config=configs/NAME.py[:VARIANT] names, shipped in the package so
that an installed fanas_jax runs them from any directory (fanas_jax/config_files.py)."""
