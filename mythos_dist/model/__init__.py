"""Architecture only: no DeepSpeed, MLflow or files in here (parallelism is applied from outside)."""

from mythos_dist.model.attention import KVCache, attention_window
from mythos_dist.model.rdt import RDT, ParamCount, RDTOutput, count_params
from mythos_dist.model.recurrent import LoopChoice, LoopHalting, LoopPolicy

__all__ = [
    "RDT",
    "KVCache",
    "LoopChoice",
    "LoopHalting",
    "LoopPolicy",
    "ParamCount",
    "RDTOutput",
    "attention_window",
    "count_params",
]
