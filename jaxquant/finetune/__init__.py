"""Fine-tuning of quantized models: block fine-tuning (``block``), PV-Tuning (``pv``), the
resumable distillation loop (``distillation``), losses.

Names are imported on first use (``jaxquant.lazy_exports``).
"""

from typing import TYPE_CHECKING

from jaxquant.lazy_exports import install_lazy_exports

_EXPORTS = {
    "BlockFinetuneConfig": "jaxquant.finetune.block:BlockFinetuneConfig",
    "FinetuneReport": "jaxquant.finetune.block:FinetuneReport",
    "DistillConfig": "jaxquant.finetune.distillation:DistillConfig",
    "DistillResult": "jaxquant.finetune.distillation:DistillResult",
    "distill": "jaxquant.finetune.distillation:distill",
    "finetune_block": "jaxquant.finetune.block:finetune_block",
    "relative_error": "jaxquant.finetune.block:relative_error",
    "accumulate_gradients": "jaxquant.finetune.losses:accumulate_gradients",
    "distillation_loss": "jaxquant.finetune.losses:distillation_loss",
    "kl_divergence": "jaxquant.finetune.losses:kl_divergence",
    "shard_batch": "jaxquant.finetune.losses:shard_batch",
    "PVState": "jaxquant.finetune.pv:PVState",
    "PVTuning": "jaxquant.finetune.pv:PVTuning",
    "VStep": "jaxquant.finetune.pv:VStep",
    "v_step": "jaxquant.finetune.pv:v_step",
    "straight_through_buffers": "jaxquant.finetune.pv:straight_through_buffers",
    "continuous_grads": "jaxquant.finetune.pv:continuous_grads",
    "decoded_value_and_grad": "jaxquant.finetune.pv:decoded_value_and_grad",
    "pv_tuning": "jaxquant.finetune.pv:pv_tuning",
}
install_lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from jaxquant.finetune.block import BlockFinetuneConfig, FinetuneReport, finetune_block, relative_error
    from jaxquant.finetune.distillation import DistillConfig, DistillResult, distill
    from jaxquant.finetune.losses import accumulate_gradients, distillation_loss, kl_divergence, shard_batch
    from jaxquant.finetune.pv import PVState, PVTuning, VStep, continuous_grads, decoded_value_and_grad
    from jaxquant.finetune.pv import pv_tuning, straight_through_buffers, v_step
