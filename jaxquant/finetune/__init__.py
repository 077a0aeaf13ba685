"""Fine-tuning of quantized models: block fine-tuning (``block``), PV-Tuning (``pv``)."""

from jaxquant.finetune.block import BlockFinetuneConfig, FinetuneReport, finetune_block, relative_error

__all__ = ["BlockFinetuneConfig", "FinetuneReport", "finetune_block", "relative_error"]

# PV-Tuning and distillation losses (issue 7).
from jaxquant.finetune.losses import accumulate_gradients, distillation_loss, kl_divergence, shard_batch  # noqa: E402
from jaxquant.finetune.pv import PVState, PVTuning, decoded_value_and_grad, pv_tuning  # noqa: E402

__all__ += ["PVState", "PVTuning", "accumulate_gradients", "decoded_value_and_grad", "distillation_loss",
            "kl_divergence", "pv_tuning", "shard_batch"]
