"""Block-sequential quantization of whole models: calibrate → quantize → fine-tune → propagate.

``quantize_model`` is the entry point; ``BlockwiseModel`` is the protocol (embed, blocks,
head) a model implements to be quantized this way (``LlamaBlocks`` does it for the
Llama family); ``rundir`` holds the crash-safe on-disk state.
"""

from jaxquant.finetune.block import BlockFinetuneConfig
from jaxquant.pipeline.blocks import BlockwiseModel, ComposedApply, LlamaBlockFn, LlamaBlocks, as_blockwise
from jaxquant.pipeline.run import QuantizeResult, assemble, quantize_model

__all__ = [
    "BlockFinetuneConfig",
    "BlockwiseModel",
    "ComposedApply",
    "LlamaBlockFn",
    "LlamaBlocks",
    "QuantizeResult",
    "as_blockwise",
    "assemble",
    "quantize_model",
]
