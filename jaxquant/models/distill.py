"""The distillation loss of a Llama-family student against its teacher, built to fit in little memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxquant.finetune.losses import chunked_distillation_loss
from jaxquant.models.llama import LayerStack, LlamaForCausalLM, functional_parts


def lean_distillation(
    model: LlamaForCausalLM, *, chunk_tokens: int = 128
) -> tuple[Callable[..., Any], LayerStack | None]:
    """``(loss, layout)`` for fine-tuning a quantized ``model`` against its float teacher.

    ``loss(student_params, teacher_params, tokens)`` is ``KL(teacher ‖ student)``
    (``jaxquant.finetune.losses.chunked_distillation_loss``) where:

    - logits are formed ``chunk_tokens`` positions at a time (SmolLM2's 49,152-way
      logits cost 200 MB each at 4 x 256 tokens);
    - the student's layers run as one rematerialized scan over stacked parameters, so
      the backward pass keeps one ``[B, T, d]`` input per layer;
    - the teacher, which needs no gradient, runs layer by layer and keeps nothing.

    Pass ``layout`` to ``jaxquant.finetune.pv.decoded_value_and_grad``: the decoded
    weights are then written once, already stacked. It is ``None`` when the layers
    differ in structure; the loss then runs the student layer by layer.
    """
    student_hidden, head = functional_parts(model, scan_layers=True)
    teacher_hidden, _ = functional_parts(model)
    loss = chunked_distillation_loss(student_hidden, head, chunk_tokens=chunk_tokens, teacher_hidden_fn=teacher_hidden)
    return loss, LayerStack.of(model)


__all__ = ["lean_distillation"]
