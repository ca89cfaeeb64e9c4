"""The chunked LM-head cross-entropy: the standard loss and gradients, without the full logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from olm_cli.errors import RecipeError
from olm_cli.losses import ChunkedLMLoss, chunked_token_losses
from olm_cli.samples import IGNORE_INDEX, collate, per_sample_loss


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunked_token_losses_equal_cross_entropy_and_its_gradients(chunk: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (13,))
    labels[[2, 9]] = IGNORE_INDEX
    upstream = torch.rand(13)  # a different gradient per token, as per-sample weights make it

    chunked = chunked_token_losses(hidden, weight, labels, chunk)
    (chunked * upstream).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    standard = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX,
                                                 reduction="none")
    (standard * upstream).sum().backward()

    torch.testing.assert_close(chunked, standard, atol=1e-5, rtol=1e-5)
    assert chunked[2] == 0 and chunked[9] == 0
    torch.testing.assert_close(got[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], weight.grad, atol=1e-5, rtol=1e-5)


def test_chunked_row_losses_and_model_gradients_equal_the_standard_path() -> None:
    """A right-padded batch, per-sample weights, a chunk that does not divide the tokens."""
    model = tiny_llama(vocab=64)
    batch = collate([np.arange(1, 20) % 64, np.arange(5, 17) % 64, np.arange(30, 33)], pad_id=0)
    weights = torch.tensor([0.3, 1.7, 1.0])

    chunked = ChunkedLMLoss(model, chunk_tokens=7, device=torch.device("cpu"))(model, batch)
    (chunked * weights).sum().backward()
    chunked_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    standard, _ = per_sample_loss(logits, batch["labels"])
    (standard * weights).sum().backward()

    torch.testing.assert_close(chunked, standard, atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(chunked_grads[name], param.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_the_hidden_state_hook_keeps_nothing_outside_the_loss() -> None:
    """The selector's scoring forward and evaluation run through the same model: no activations kept."""
    model = tiny_llama(vocab=64)
    loss = ChunkedLMLoss(model, chunk_tokens=16, device=torch.device("cpu"))
    batch = collate([np.arange(1, 20) % 64], pad_id=0)
    loss(model, batch)
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    assert loss._captured == []


def test_a_model_without_a_linear_head_is_refused_with_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="run.loss_implementation 'chunked' needs a causal LM"):
        ChunkedLMLoss(torch.nn.Linear(4, 4), chunk_tokens=16, device=torch.device("cpu"))
