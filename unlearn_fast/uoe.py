"""``unlearn_fast.uoe``: UOE's public names (the method lives in :mod:`unlearn_fast.methods.uoe`)."""

from unlearn_fast.methods.uoe import UOE, ExpertAttribution, UOEConfig, UOEResult, attribute_experts

__all__ = ["UOE", "ExpertAttribution", "UOEConfig", "UOEResult", "attribute_experts"]
