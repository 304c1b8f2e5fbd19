"""unisteer: activation steering, LoRA and one-layer fine-tuning as one dynamic weight update.

    import unisteer as us
    model, tokenizer = us.load_model("smollm2-135m-instruct")
    update = us.create_update(model, "vector", layer=15)
    with us.Steering(model, update, multiplier=4.0):
        ...
"""

from .architecture import ModelStructure, model_structure
from .data import PairDataset, PolarityPair
from .errors import ConfigError, DataError, ModelError, UnisteerError, UpdateMismatchError
from .hooks import Steering
from .merge import MergedUpdate, merge
from .models import ALIASES, DEFAULT_MODEL, load_model
from .prefix import capture_layer_input, run_from_layer
from .scoring import CompletionScores, completion_nll
from .storage import export_peft_adapter, load_update, save_update
from .training import diffmean_update
from .updates import (
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

__version__ = "0.1.0"

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "FORMS",
    "INSERTIONS",
    "CompletionScores",
    "ConfigError",
    "DataError",
    "LoRAUpdate",
    "LocalWeightUpdate",
    "MergedUpdate",
    "ModelError",
    "ModelStructure",
    "PairDataset",
    "PolarityPair",
    "Positions",
    "Steering",
    "UnisteerError",
    "Update",
    "UpdateMismatchError",
    "UpdateSpec",
    "VectorUpdate",
    "capture_layer_input",
    "completion_nll",
    "create_update",
    "diffmean_update",
    "export_peft_adapter",
    "load_model",
    "load_update",
    "merge",
    "model_structure",
    "run_from_layer",
    "save_update",
]
