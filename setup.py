"""Installs fanas_jax; `pip install -e .[test]` adds what the test suite needs (the
notebook tests too).

jax, flax, orbax-checkpoint and grain are capped at the newest minor release tested;
constraints/py311.txt and constraints/py313.txt pin every version tested.
"""
from setuptools import find_packages, setup

setup(
    name="fanas_jax",
    version="0.1.0",
    description=("Full-attention neural architecture search with context "
                 "auto-regression, in JAX/Flax."),
    packages=find_packages(include=["fanas_jax", "fanas_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "absl-py",
        "array-record",
        "chex",
        "flax>=0.10,<0.13",
        "grain>=0.2.10,<0.3",
        "jax>=0.6,<0.13",
        "matplotlib",
        "ml-collections",
        "numpy",
        "optax",
        "orbax-checkpoint<0.13",
        "pillow",
        "scikit-learn",
        "tensorboardX",
        "tensorflow-datasets>=4.9.7",
        "tqdm",
    ],
    extras_require={"test": ["ipykernel", "jupytext", "nbclient", "nbformat", "pytest",
                             "pytest-xdist"]},
)
