"""The task loss without the full logits: cross-entropy through the LM head in chunks of tokens.

With a 49k-152k vocabulary the ``[batch, tokens, vocab]`` logits (and their float32 copy and
gradient) are the largest tensors of a small model's step. ``run.loss_implementation: chunked``
computes each row's mean next-token loss from the decoder's final hidden states instead,
``run.loss_chunk_tokens`` tokens at a time: :class:`ChunkedCrossEntropy` keeps only the hidden
states and the head's weight for its backward and recomputes one chunk's logits at a time there,
so neither pass holds more than one chunk of logits. On CUDA with the ``liger_kernel`` package
installed, Liger's fused linear cross-entropy kernel does the same in Triton.

The numbers are those of :func:`olm_cli.samples.per_sample_loss` (same shift, same ignored
positions, float32 softmax); only the memory differs. Parts that read the student's logits
(distillation, stored-logit capture) need the standard loss; the recipe refuses the combination.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from olm_cli.errors import RecipeError
from olm_cli.samples import IGNORE_INDEX, row_means, shifted_labels


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of ``hidden @ weight.T`` computed ``chunk`` rows at a time.

    Forward saves the inputs, not the logits; backward recomputes each chunk's softmax and turns
    it into the gradients of ``hidden`` and ``weight``. Unlike a fused kernel that precomputes
    gradients in the forward (correct only for a scalar mean), the incoming gradient may differ
    per token, as the per-sample weights of replay and selection need.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk: int) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk = chunk
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            logits = (hidden[start:end] @ weight.t()).float()
            losses[start:end] = torch.nn.functional.cross_entropy(logits, labels[start:end], ignore_index=IGNORE_INDEX,
                                                                  reduction="none")
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, labels = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = start + ctx.chunk
            h, target = hidden[start:end], labels[start:end]
            # d(-log softmax(z)[y]) / dz = softmax(z) - onehot(y), scaled by this token's incoming gradient.
            grad_logits = torch.softmax((h @ weight.t()).float(), dim=-1)
            valid = (target != IGNORE_INDEX).unsqueeze(1)
            grad_logits.scatter_add_(1, target.clamp(min=0).unsqueeze(1), -valid.float())
            grad_logits *= grad_losses[start:end].unsqueeze(1) * valid
            if grad_hidden is not None:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h.float()
        return grad_hidden, (grad_weight.to(weight.dtype) if grad_weight is not None else None), None, None


def chunked_token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Cross-entropy of every position of ``hidden`` (``[N, H]``) against ``labels`` (``[N]``).

    Under autocast the matmuls run in the autocast dtype, as the standard LM head's would; the
    softmax is float32 either way.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        losses: torch.Tensor = ChunkedCrossEntropy.apply(hidden, weight, labels, chunk)
    return losses


def liger_available(device: torch.device) -> bool:
    """Liger's Triton kernels run on CUDA only, and the package is optional."""
    return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def liger_row_sums(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed token loss through Liger's fused linear cross-entropy (``[B, T, H]`` -> ``[B]``).

    Liger computes its gradients inside the forward and scales them by one scalar in the
    backward, so each row is its own call: every row's scalar gradient (its sample weight) is
    then exact.
    """
    functional = importlib.import_module("liger_kernel.transformers.functional")  # optional: no stubs needed

    return torch.stack([
        functional.liger_fused_linear_cross_entropy(hidden[row], weight, labels[row], ignore_index=IGNORE_INDEX, reduction="sum")
        for row in range(hidden.shape[0])
    ])


class ChunkedLMLoss:
    """Each row's mean next-token loss of a causal LM, without materialising its logits.

    The model still runs through its own ``forward`` (so DDP, Accelerate's autocast wrapper and
    ``torch.compile`` see an ordinary call), asked for the last position's logits only
    (``logits_to_keep=1``); a forward hook on the decoder hands over its final hidden states,
    which go through the LM head here, a chunk at a time.
    """

    head: torch.nn.Linear
    chunk_tokens: int
    use_liger: bool
    _capturing: bool

    def __init__(self, model: torch.nn.Module, *, chunk_tokens: int, device: torch.device) -> None:
        decoder = getattr(model, "get_decoder", lambda: None)()
        head = getattr(model, "get_output_embeddings", lambda: None)()
        if not isinstance(decoder, torch.nn.Module) or not isinstance(head, torch.nn.Linear) or head.bias is not None:
            raise RecipeError(
                "run.loss_implementation 'chunked' needs a causal LM with a decoder and a bias-free linear LM head "
                f"({type(model).__name__} has none); use 'standard'"
            )
        self.head = head
        self.chunk_tokens = chunk_tokens
        self.use_liger = liger_available(device)
        # The hook stays registered (adding and removing it per step would make torch.compile
        # re-trace); it keeps the hidden states only during this loss's own forward, never during
        # the selector's scoring or an evaluation.
        self._capturing = False
        self._captured: list[torch.Tensor] = []
        decoder.register_forward_hook(self._capture)

    def _capture(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if self._capturing:
            self._captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    def __call__(self, forward: Callable[..., Any], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Row losses of ``batch`` (``[B]``, float32, differentiable), ``forward`` being the (wrapped) model."""
        self._capturing = True
        try:
            forward(input_ids=batch["input_ids"], use_cache=False, logits_to_keep=1)
        finally:
            self._capturing = False
        hidden = self._captured.pop()
        self._captured.clear()
        labels = shifted_labels(batch["labels"])
        if self.use_liger:
            return row_means(liger_row_sums(hidden, self.head.weight, labels), labels)
        flat = chunked_token_losses(hidden.reshape(-1, hidden.shape[-1]), self.head.weight, labels.reshape(-1),
                                    self.chunk_tokens)
        return row_means(flat.view(labels.shape).sum(dim=1), labels)
