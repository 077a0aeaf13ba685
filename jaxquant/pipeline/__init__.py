"""Block-sequential quantization of whole models: calibrate → quantize → fine-tune → propagate.

``quantize_model`` is the entry point; ``BlockwiseModel`` is the protocol (embed, blocks,
head) a model implements to be quantized this way (``jaxquant.models.LlamaBlocks`` does
it for the Llama family); ``rundir`` holds the crash-safe on-disk state.

Names are imported on first use (``jaxquant.lazy_exports``).
"""

from typing import TYPE_CHECKING

from jaxquant.lazy_exports import install_lazy_exports

__all__ = install_lazy_exports(__name__)

if TYPE_CHECKING:  # the exports: what type checkers see, and what install_lazy_exports reads
    from jaxquant.finetune.block import BlockFinetuneConfig
    from jaxquant.pipeline.levels import build_level_database, level_dir
    from jaxquant.pipeline.blocks import BlockwiseModel, ComposedApply, as_blockwise, register_blockwise
    from jaxquant.pipeline.run import QuantizeResult, assemble, quantize_model
