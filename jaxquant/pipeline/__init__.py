"""Block-sequential quantization of whole models: calibrate → quantize → fine-tune → propagate.

``quantize_model`` is the entry point; ``BlockwiseModel`` is the protocol (embed, blocks,
head) a model implements to be quantized this way (``jaxquant.models.LlamaBlocks`` does
it for the Llama family); ``rundir`` holds the crash-safe on-disk state.

Names are imported on first use (``jaxquant.lazy_exports``).
"""

from typing import TYPE_CHECKING

from jaxquant.lazy_exports import install_lazy_exports

_EXPORTS = {
    "BlockFinetuneConfig": "jaxquant.finetune.block:BlockFinetuneConfig",
    "BlockwiseModel": "jaxquant.pipeline.blocks:BlockwiseModel",
    "ComposedApply": "jaxquant.pipeline.blocks:ComposedApply",
    "as_blockwise": "jaxquant.pipeline.blocks:as_blockwise",
    "register_blockwise": "jaxquant.pipeline.blocks:register_blockwise",
    "QuantizeResult": "jaxquant.pipeline.run:QuantizeResult",
    "assemble": "jaxquant.pipeline.run:assemble",
    "quantize_model": "jaxquant.pipeline.run:quantize_model",
}
install_lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from jaxquant.finetune.block import BlockFinetuneConfig
    from jaxquant.pipeline.blocks import BlockwiseModel, ComposedApply, as_blockwise, register_blockwise
    from jaxquant.pipeline.run import QuantizeResult, assemble, quantize_model
