"""The ops of unlearn_fast: each with a plain-PyTorch reference and fast backends."""

from unlearn_fast.ops.ce_curvature import CurvatureProduct, ce_curvature, reference_ce_curvature  # noqa: F401
from unlearn_fast.ops.expert_ffn import expert_ffn, reference_expert_ffn  # noqa: F401
from unlearn_fast.ops.moe_routing import (  # noqa: F401
    Routing,
    expert_attribution,
    reference_routing_gates,
    router_anchor_loss,
    router_score_anchor_loss,
    routing_gates,
)
from unlearn_fast.ops.solver_update import cg_update, damped_dots, xpay  # noqa: F401
from unlearn_fast.ops.sophia_update import reference_sophia_update, sophia_update  # noqa: F401
from unlearn_fast.ops.token_logprobs import (
    IGNORE_INDEX,
    TokenLogProbs,
    TokenLogProbSum,
    reference_token_logprobs,
    sample_labels,
    token_logprob_sum,
    token_logprobs,
)

__all__ = [
    "IGNORE_INDEX",
    "TokenLogProbs",
    "TokenLogProbSum",
    "reference_token_logprobs",
    "sample_labels",
    "token_logprob_sum",
    "token_logprobs",
]
