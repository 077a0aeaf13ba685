"""jaxquant: 1-4 bit quantization of language models in JAX.

The public API, re-exported by name; nothing is defined here.

Names are imported on first use (``jaxquant.lazy_exports``).
"""

from typing import TYPE_CHECKING

from jaxquant.lazy_exports import install_lazy_exports

__all__ = install_lazy_exports(__name__)

if TYPE_CHECKING:  # the exports: what type checkers see, and what install_lazy_exports reads
    from jaxquant import io, models, ops, pipeline, rotations, search, select
    from jaxquant.calibrate import calibrate
    from jaxquant.embeddings import store_embeddings
    from jaxquant.finetune.pv import VStep, decoded_value_and_grad, pv_tuning
    from jaxquant.methods import Method
    from jaxquant.methods import register as register_method
    from jaxquant.methods.reencoding import Reencoder
    from jaxquant.ops.intercept import quantized_linen_interceptor, swap_linear
    from jaxquant.qarray import AdditiveQuantized, QuantizedArray, ScalarQuantized, register_array_type
    from jaxquant.qarray import dequantize, is_quantized, merge, split, tree_bits
    from jaxquant.quantize import quantize, quantize_weight
    from jaxquant.recipes import AQLM, GPTQ, PVQ, RTN, VPTQ, Kashin, SpQR
    from jaxquant.recipes_named import named_recipe, recipe_from_dict, recipe_to_dict
    from jaxquant.stats import LayerStats
