"""unlearn_fast: fast, kernel-backed machine unlearning for large language models."""

from unlearn_fast.backend import available_backends
from unlearn_fast.methods.llmeraser import LLMEraser
from unlearn_fast.methods.soul import SOUL, SOULConfig, SOULResult
from unlearn_fast.methods.uoe import UOE, UOEConfig, UOEResult, attribute_experts
from unlearn_fast.ops import token_logprob_sum, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "LLMEraser",
    "SOUL",
    "SOULConfig",
    "SOULResult",
    "UOE",
    "UOEConfig",
    "UOEResult",
    "attribute_experts",
    "available_backends",
    "token_logprob_sum",
    "token_logprobs",
    "__version__",
]
