"""Checks of a model handed to an unlearning method, with errors that say what is wrong."""

from __future__ import annotations

import torch


def check_finite_weights(model: torch.nn.Module, who: str) -> None:
    """Raise if any parameter or buffer holds NaN or inf: every loss would then be NaN, and the
    failure would only show up later as a divergence with a misleading step number."""
    bad = [name for name, t in (*model.named_parameters(), *model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"{who}: the model's weights hold NaN or inf in {bad[:3]}{more}; load a valid checkpoint "
                         "(a model that produces NaN cannot be unlearned)")
