"""Checks of a model handed to an unlearning method, with errors that say what is wrong."""

from __future__ import annotations

import torch


def check_finite_weights(model: torch.nn.Module, who: str) -> None:
    """Raise if any parameter or buffer holds NaN or inf: every loss would then be NaN, and the
    failure would only show up later as a divergence with a misleading step number."""
    bad = [
        name
        for name, t in (*model.named_parameters(), *model.named_buffers())
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(
            f"{who}: the model's weights hold NaN or inf in {bad[:3]}{more}; load a valid checkpoint "
            "(a model that produces NaN cannot be unlearned)"
        )


def check_token_ids(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    """Raise if a token id has no row in the model's input embedding (or is negative): the
    embedding lookup would fail with a bare index error (a device-side assert on a GPU)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if not input_ids.numel():
        return
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one device sync
    if low < 0 or high >= rows:
        raise ValueError(
            f"input_ids hold token ids in [{low}, {high}], but the model's "
            f"embedding has {rows} rows: the tokenizer does not match the model (use the tokenizer the "
            "model was trained with, or resize its embeddings)"
        )
