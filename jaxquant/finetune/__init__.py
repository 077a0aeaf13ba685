"""Fine-tuning of quantized models: block fine-tuning (``block``), PV-Tuning (``pv``), losses."""

from jaxquant.finetune.block import BlockFinetuneConfig, FinetuneReport, finetune_block, relative_error
from jaxquant.finetune.losses import accumulate_gradients, distillation_loss, kl_divergence, shard_batch
from jaxquant.finetune.pv import PVState, PVTuning, decoded_value_and_grad, pv_tuning

__all__ = [
    "BlockFinetuneConfig",
    "FinetuneReport",
    "PVState",
    "PVTuning",
    "accumulate_gradients",
    "decoded_value_and_grad",
    "distillation_loss",
    "finetune_block",
    "kl_divergence",
    "pv_tuning",
    "relative_error",
    "shard_batch",
]
