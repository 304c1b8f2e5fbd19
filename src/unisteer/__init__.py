"""unisteer: activation steering, LoRA and one-layer fine-tuning as one dynamic weight update.

    import unisteer as us
    model, tokenizer = us.load_model("smollm2-135m-instruct")
    update = us.create_update(model, "vector", layer=15)
    with us.Steering(model, update, multiplier=4.0):
        ...

The method step by step (the same functions the CLI and `unisteer run` call; `unisteer.api`):
`load_dataset`, `train`, `sweep`, `fit`, `evaluate`, `table3`, `generate`, `report`, `run`.
"""

from .api import (
    EvalResult,
    FitResult,
    Generations,
    SweepResult,
    Table3,
    TrainResult,
    evaluate,
    fit,
    generate,
    load_dataset,
    report,
    run,
    sweep,
    table3,
    train,
)
from .data.pairs import PairDataset, PolarityPair
from .engine.architecture import ModelStructure, model_structure
from .engine.control_vector import export_control_vector, import_control_vector
from .engine.hub import pull_update, push_update
from .engine.merge import MergedUpdate, merge
from .engine.models import ALIASES, DEFAULT_MODEL, load_model
from .engine.prefix import capture_layer_input, run_from_layer
from .engine.scoring import CompletionScores, completion_nll
from .engine.steering import Steering
from .engine.storage import export_peft_adapter, load_update, save_update
from .engine.updates import (
    FORMS,
    INSERTIONS,
    LocalWeightUpdate,
    LoRAUpdate,
    Positions,
    Update,
    UpdateSpec,
    VectorUpdate,
    create_update,
)
from .errors import ConfigError, DataError, ModelError, UnisteerError, UpdateMismatchError
from .training.diffmean import diffmean_update

__version__ = "0.1.0"

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "FORMS",
    "INSERTIONS",
    "CompletionScores",
    "ConfigError",
    "DataError",
    "EvalResult",
    "FitResult",
    "Generations",
    "LoRAUpdate",
    "LocalWeightUpdate",
    "MergedUpdate",
    "ModelError",
    "ModelStructure",
    "PairDataset",
    "PolarityPair",
    "Positions",
    "Steering",
    "SweepResult",
    "Table3",
    "TrainResult",
    "UnisteerError",
    "Update",
    "UpdateMismatchError",
    "UpdateSpec",
    "VectorUpdate",
    "capture_layer_input",
    "completion_nll",
    "create_update",
    "diffmean_update",
    "evaluate",
    "export_control_vector",
    "export_peft_adapter",
    "fit",
    "generate",
    "import_control_vector",
    "load_dataset",
    "load_model",
    "load_update",
    "merge",
    "model_structure",
    "pull_update",
    "push_update",
    "report",
    "run",
    "run_from_layer",
    "save_update",
    "sweep",
    "table3",
    "train",
]
