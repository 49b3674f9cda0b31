"""Fine-tuning: optimizer, jitted data-parallel train/eval steps, loop, checkpoints.

Public entry points: ``TrainConfig`` and ``presets.resolve`` (hyper-parameters),
``loop.finetune`` (a whole run into a run directory), ``step.make_train_step`` /
``step.make_eval_step`` (the compiled functions), ``sharding.data_mesh``.
"""
from tvgeo_jax.training.config import TrainConfig, RESUME_IGNORED
from tvgeo_jax.training.early_stopping import EarlyStopping

__all__ = ["TrainConfig", "RESUME_IGNORED", "EarlyStopping"]
