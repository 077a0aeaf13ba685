"""Fine-tuning of quantized models: block fine-tuning (``block``), PV-Tuning (``pv``), the
resumable distillation loop (``distillation``), losses.

Names are imported on first use (``jaxquant.lazy_exports``).
"""

from typing import TYPE_CHECKING

from jaxquant.lazy_exports import install_lazy_exports

__all__ = install_lazy_exports(__name__)

if TYPE_CHECKING:  # the exports: what type checkers see, and what install_lazy_exports reads
    from jaxquant.finetune.block import BlockFinetuneConfig, FinetuneReport, finetune_block, relative_error
    from jaxquant.finetune.distillation import DistillConfig, DistillResult, distill
    from jaxquant.finetune.losses import accumulate_gradients, distillation_loss, kl_divergence, shard_batch
    from jaxquant.finetune.pv import PVState, PVTuning, VStep, continuous_grads, decoded_value_and_grad
    from jaxquant.finetune.pv import pv_tuning, straight_through_buffers, v_step
