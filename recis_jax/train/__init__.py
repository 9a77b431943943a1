"""Training: the jitted steps, the host loop (Trainer) and the config-driven main job.

    from recis_jax.train import Task, Trainer
"""

from recis_jax.train.step import TrainState, init_state, make_eval_step, make_train_step
from recis_jax.train.task import Task
from recis_jax.train.trainer import Trainer, TrainingError
from recis_jax.train.sharded import ShardedTrainer

__all__ = ["ShardedTrainer", "Task", "TrainState", "Trainer", "TrainingError", "init_state", "make_eval_step",
           "make_train_step"]
