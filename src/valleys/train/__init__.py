"""The workbench's training code (built on the library, never imported by it).

``config`` holds the run configuration (dataclasses loaded with OmegaConf), ``loop`` the
training loop (:func:`train`, :func:`make_closure`, evaluation), ``checkpoint`` the atomic
checkpoint files, ``log`` the metrics, environment and TensorBoard writers, ``restore``
(:func:`load_run`) a trained model with its dataset for later analyses, ``demo`` the digits
comparison of ``valleys demo``::

    from valleys.train import config, train

    cfg = config.load(["configs/experiments/entropy_sgd_lenet.yaml"], ["run.max_epochs=1"])
    result = train(cfg)        # writes cfg.run.dir; result.final_eval holds the last evaluation
"""

from valleys.train.config import Config
from valleys.train.loop import RunResult, TrainingError, make_closure, train
from valleys.train.restore import LoadedRun, load_run

__all__ = ["Config", "LoadedRun", "RunResult", "TrainingError", "load_run", "make_closure", "train"]
