"""unlearn_fast: fast, kernel-backed machine unlearning for large language models.

Every method has one shape: a config dataclass (``SOULConfig``, ``UOEConfig``,
``LLMEraserConfig``) holding its knobs, a run on a model and data, and an
:class:`UnlearnResult` with ``save(dir)`` / ``UnlearnResult.load(dir, model)``.
"""

from unlearn_fast.backend import available_backends
from unlearn_fast.methods.base import UnlearnResult
from unlearn_fast.methods.llmeraser import EraseResult, LLMEraser, LLMEraserConfig
from unlearn_fast.methods.soul import SOUL, SOULConfig, SOULResult
from unlearn_fast.methods.uoe import UOE, UOEConfig, UOEResult, attribute_experts
from unlearn_fast.objectives import NPO, RMU, GradDiff, GradientAscent, Refusal
from unlearn_fast.ops import token_logprob_sum, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "EraseResult",
    "LLMEraser",
    "LLMEraserConfig",
    "SOUL",
    "SOULConfig",
    "SOULResult",
    "UOE",
    "UOEConfig",
    "UOEResult",
    "UnlearnResult",
    "GradientAscent",
    "GradDiff",
    "NPO",
    "Refusal",
    "RMU",
    "attribute_experts",
    "available_backends",
    "token_logprob_sum",
    "token_logprobs",
    "__version__",
]
