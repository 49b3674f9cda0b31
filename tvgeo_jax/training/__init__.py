"""Layer 3: fine-tuning: optimizer, the jitted train step, the loop in phases, concurrent
groups, checkpoints, run directories, presets.

Public entry points: ``TrainConfig`` and ``presets.resolve`` (hyper-parameters),
``loop.finetune`` (a whole run into a run directory), ``group.finetune_many`` (several
tasks in one compiled step), ``step.make_train_step`` (the compiled function; the eval
step is ``tvgeo_jax.evaluation.scoring.make_eval_step``), ``runs.load_run``.
"""
from tvgeo_jax.training.config import TrainConfig, RESUME_IGNORED
from tvgeo_jax.training.early_stopping import EarlyStopping

__all__ = ["TrainConfig", "RESUME_IGNORED", "EarlyStopping"]
