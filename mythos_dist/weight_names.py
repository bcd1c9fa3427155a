"""Names of the MoE weights: stacked in the model, one per expert in an export, and as DeepSpeed
keys them in its checkpoints. Defined once here, so reading a checkpoint needs no DeepSpeed."""

from __future__ import annotations

import re

# (stacked name in GroupedExperts, per-expert name in exports and DeepSpeed's files)
EXPERT_WEIGHTS = (("w_in_EDH", "w_in_DH"), ("w_out_EHD", "w_out_HD"))
# DeepSpeed's expert checkpoint code finds experts by this key segment and renumbers the index
# after it from local to global ids; it treats any other key containing "expert" as an expert too.
DS_EXPERT_SEGMENT = "deepspeed_moe.experts.deepspeed_experts."
DS_MOE_LAYER = "layer."  # DeepSpeed's MoE wraps our MoEFFN as `.layer`
ROUTER_BIAS = "router.expert_bias"
ROUTER_BIAS_DS = "router.balance_bias"  # `expert_bias` renamed so DeepSpeed keeps it dense
DS_EXPERT_KEY = re.compile(rf"^(.*)\.{re.escape(DS_EXPERT_SEGMENT)}(\d+)\.(w_in_DH|w_out_HD)$")
