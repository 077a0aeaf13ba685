"""Storage of quantized trees and tensors: orbax checkpoints, safetensors, GGUF, and the
Hugging Face AQLM and VPTQ formats.

``save``/``load`` write and read any parameter tree (quantized arrays included) as an
orbax checkpoint with a JSON manifest; ``read_hf_aqlm``/``write_hf_aqlm`` convert between
quantized arrays and the tensors of a Hugging Face AQLM directory (which transformers loads
through the ``aqlm`` package); ``write_hf_vptq`` writes ``VPTQQuantized`` arrays as a
Hugging Face VPTQ directory (the ``vptq`` package's layers). Loading such directories
into models, and exporting models to them, is ``jaxquant.models``' job.
"""

from jaxquant.io.checkpoint import CheckpointError, is_checkpoint, load, save
from jaxquant.io.hf_aqlm import is_hf_aqlm, read_hf_aqlm, write_hf_aqlm
from jaxquant.io.hf_vptq import write_hf_vptq
from jaxquant.io.safetensors import read_checkpoint_tensors, read_safetensors, write_safetensors

__all__ = [
    "CheckpointError",
    "is_checkpoint",
    "is_hf_aqlm",
    "load",
    "read_checkpoint_tensors",
    "read_hf_aqlm",
    "read_safetensors",
    "save",
    "write_hf_aqlm",
    "write_hf_vptq",
    "write_safetensors",
]
