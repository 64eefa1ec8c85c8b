"""Every stage of the pipeline, registered by importing the module that defines it.

search_phase1, search_phase2 (fanas_jax/search.py), derive
(fanas_jax/derive_stage.py), train (fanas_jax/train.py), retrieval
(fanas_jax/zero_shot.py), finetune (fanas_jax/finetune.py), baseline
(fanas_jax/baseline.py). A new stage is one `register_stage` function in its
module, imported here.
"""
from fanas_jax import (baseline, derive_stage, finetune, search,  # noqa: F401  (they register)
                       train, zero_shot)
from fanas_jax.stage import STAGES, check_needs, stage_names

__all__ = ["STAGES", "check_needs", "stage_names"]
