"""A few optimiser steps of a model on one batch, outside any Trainer."""


def losses_on_one_batch(model, batch, steps: int) -> list[float]:
    """The model's total loss at each of ``steps`` steps of its own optimiser on ``batch``."""
    optimizer = model.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(steps):
        loss = model.losses(model(batch), batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
