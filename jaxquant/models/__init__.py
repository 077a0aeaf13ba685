"""Llama-family models in Flax NNX; loading and saving (Hugging Face, GGUF, quantized directories); generation.

transformers provides configurations and tokenizers only; the model code is jaxquant's.
"""

from jaxquant.models.blocks import LlamaBlockFn, LlamaBlocks
from jaxquant.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, config_from_hf, load_config
from jaxquant.models.generate import generate, sample_token
from jaxquant.models.llama import KVCache, LlamaForCausalLM, abstract_model, functional
from jaxquant.models.loading import from_pretrained, save_pretrained
from jaxquant.models.names import EXPERT_NAME_TABLES, NAME_TABLE, hf_to_nnx_name, nnx_to_hf_name
from jaxquant.models.quantized_dirs import export_hf_aqlm, export_hf_vptq, load_hf_aqlm, load_quantized_dir

__all__ = [
    "EXPERT_NAME_TABLES",
    "NAME_TABLE",
    "SUPPORTED_ARCHITECTURES",
    "KVCache",
    "LlamaBlockFn",
    "LlamaBlocks",
    "LlamaForCausalLM",
    "ModelConfig",
    "abstract_model",
    "config_from_hf",
    "export_hf_aqlm",
    "export_hf_vptq",
    "from_pretrained",
    "functional",
    "generate",
    "hf_to_nnx_name",
    "load_hf_aqlm",
    "load_config",
    "load_quantized_dir",
    "nnx_to_hf_name",
    "sample_token",
    "save_pretrained",
]
