"""jaxquant: 1-4 bit quantization of language models in JAX.

The public API, re-exported by name; nothing is defined here.
"""

from jaxquant import io, models, ops, pipeline, select
from jaxquant.calibrate import calibrate
from jaxquant.embeddings import store_embeddings
from jaxquant.finetune.pv import decoded_value_and_grad, pv_tuning
from jaxquant.qarray import (
    AdditiveQuantized,
    ScalarQuantized,
    dequantize,
    is_quantized,
    merge,
    split,
    tree_bits,
)
from jaxquant.quantize import quantize, quantize_weight
from jaxquant.recipes import AQLM, GPTQ, RTN, recipe_from_dict, recipe_to_dict

__all__ = [
    "AQLM",
    "GPTQ",
    "RTN",
    "AdditiveQuantized",
    "ScalarQuantized",
    "calibrate",
    "decoded_value_and_grad",
    "dequantize",
    "is_quantized",
    "merge",
    "io",
    "models",
    "ops",
    "pipeline",
    "pv_tuning",
    "quantize",
    "quantize_weight",
    "recipe_from_dict",
    "recipe_to_dict",
    "select",
    "split",
    "store_embeddings",
    "tree_bits",
]
