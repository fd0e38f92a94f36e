"""Training: config, TrainState, pure train/eval steps (one device, shard_map, pmap), the fit loop."""

from alignq_jax.training.state import TrainConfig, TrainState, create_train_state, make_model, make_optimizer
from alignq_jax.training.steps import Steps, canonical_state, eval_step, make_steps, train_step

__all__ = [
    "Steps", "TrainConfig", "TrainState", "canonical_state", "create_train_state", "eval_step", "make_model",
    "make_optimizer", "make_steps", "train_step",
]

from alignq_jax.training.loop import BatchStreams, FitResult, evaluate, evaluate_datasets, fit, load_variables, train_on_arrays  # noqa: E402

__all__ += ["BatchStreams", "FitResult", "evaluate", "evaluate_datasets", "fit", "load_variables", "train_on_arrays"]

from alignq_jax.training.batchnorm import batch_stats_paths, reestimate_batch_stats  # noqa: E402
from alignq_jax.training.trained import TrainedModel  # noqa: E402

__all__ += ["TrainedModel", "batch_stats_paths", "reestimate_batch_stats"]
