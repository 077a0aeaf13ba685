"""Storage of quantized trees: orbax checkpoints and the Hugging Face AQLM format.

``save``/``load`` write and read any parameter tree (quantized arrays included) as an
orbax checkpoint with a JSON manifest; ``export_hf_aqlm``/``load_hf_aqlm`` convert
between jaxquant models and Hugging Face AQLM model directories, which transformers
loads through the ``aqlm`` package.
"""

from jaxquant.io.checkpoint import CheckpointError, is_checkpoint, load, save
from jaxquant.io.hf_aqlm import (
    export_command,
    export_hf_aqlm,
    is_hf_aqlm,
    load_hf_aqlm,
    read_hf_aqlm,
    write_hf_aqlm,
)

__all__ = [
    "CheckpointError",
    "export_command",
    "export_hf_aqlm",
    "is_checkpoint",
    "is_hf_aqlm",
    "load",
    "load_hf_aqlm",
    "read_hf_aqlm",
    "save",
    "write_hf_aqlm",
]
