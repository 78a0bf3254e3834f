"""maml_fast: MAML-family meta-learning with the whole meta-batch as one task-batched program.

    import maml_fast as mf
    net = mf.models.conv4(in_channels=1, num_classes=5, hidden=64, downsample="stride")
    learner = mf.MAML(net, inner_lr=0.4, inner_steps=1, first_order=False, backend="auto")
    out = learner(mf.TaskBatch(support_x, support_y, query_x, query_y))
    out.loss.backward()
"""
import warnings

from . import _extension, backends, data, models  # noqa: F401
from .backends import available_backends
from .maml import MAML, FastWeights, MAMLOutput
from .maml_plus_plus import multi_step_loss_weights
from .evaluation import evaluate
from .meta_step import MetaStep
from .task_batch import TaskBatch
from .distributed import DistributedError
from .trainer import CheckpointError, CheckpointWarning, CheckpointWriteError, NonFiniteLossError, Trainer, TrainResult
from .variants import ANIL, MAMLPlusPlus, MetaSGD

__version__ = "0.1.0"

if _extension.LOAD_ERROR:
    warnings.warn(f"maml_fast: compiled ops unavailable, using the pure-PyTorch ops: {_extension.LOAD_ERROR}",
                  stacklevel=2)

__all__ = ["MAML", "ANIL", "MetaSGD", "MAMLPlusPlus", "TaskBatch", "MAMLOutput", "FastWeights", "models",
           "multi_step_loss_weights", "available_backends",
           "MetaStep", "Trainer", "TrainResult", "NonFiniteLossError", "CheckpointError", "CheckpointWarning",
           "CheckpointWriteError", "DistributedError", "evaluate", "data"]
