"""jaxquant: 1-4 bit quantization of language models in JAX.

The public API, re-exported by name; nothing is defined here.

Names are imported on first use (``jaxquant.lazy_exports``).
"""

from typing import TYPE_CHECKING

from jaxquant.lazy_exports import install_lazy_exports

_EXPORTS = {
    "io": "jaxquant.io",
    "models": "jaxquant.models",
    "ops": "jaxquant.ops",
    "pipeline": "jaxquant.pipeline",
    "select": "jaxquant.select",
    "calibrate": "jaxquant.calibrate:calibrate",
    "LayerStats": "jaxquant.stats:LayerStats",
    "store_embeddings": "jaxquant.embeddings:store_embeddings",
    "decoded_value_and_grad": "jaxquant.finetune.pv:decoded_value_and_grad",
    "pv_tuning": "jaxquant.finetune.pv:pv_tuning",
    "VStep": "jaxquant.finetune.pv:VStep",
    "AdditiveQuantized": "jaxquant.qarray:AdditiveQuantized",
    "ScalarQuantized": "jaxquant.qarray:ScalarQuantized",
    "QuantizedArray": "jaxquant.qarray:QuantizedArray",
    "register_array_type": "jaxquant.qarray:register_array_type",
    "Method": "jaxquant.methods:Method",
    "Reencoder": "jaxquant.methods.reencoding:Reencoder",
    "register_method": "jaxquant.methods:register",
    "named_recipe": "jaxquant.recipes_named:named_recipe",
    "dequantize": "jaxquant.qarray:dequantize",
    "is_quantized": "jaxquant.qarray:is_quantized",
    "merge": "jaxquant.qarray:merge",
    "split": "jaxquant.qarray:split",
    "tree_bits": "jaxquant.qarray:tree_bits",
    "quantize": "jaxquant.quantize:quantize",
    "swap_linear": "jaxquant.ops.intercept:swap_linear",
    "quantized_linen_interceptor": "jaxquant.ops.intercept:quantized_linen_interceptor",
    "quantize_weight": "jaxquant.quantize:quantize_weight",
    "AQLM": "jaxquant.recipes:AQLM",
    "GPTQ": "jaxquant.recipes:GPTQ",
    "RTN": "jaxquant.recipes:RTN",
    "recipe_from_dict": "jaxquant.recipes_named:recipe_from_dict",
    "recipe_to_dict": "jaxquant.recipes_named:recipe_to_dict",
}
install_lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from jaxquant import io, models, ops, pipeline, select
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
    from jaxquant.recipes import AQLM, GPTQ, RTN
    from jaxquant.recipes_named import named_recipe, recipe_from_dict, recipe_to_dict
    from jaxquant.stats import LayerStats
