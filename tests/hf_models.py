"""Models shared by the Hugging Face format tests: a tiny random Llama written by
transformers, and its decoder linears replaced by quantized arrays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from jaxquant.select import flatten_with_paths


def quantize_decoder_linears(model: Any, make: Callable[[str, int, int], Any]) -> dict[str, Any]:
    """Replace every decoder linear kernel (not the head) of ``model`` in place by
    ``make(path, d_out, d_in)``; returns ``{path: array}``."""
    state = nnx.state(model, nnx.Param)
    done = {}
    for path, leaf in flatten_with_paths(state):
        if path.endswith("kernel") and path.startswith("layers/"):
            d_in, d_out = leaf.shape
            done[path] = make(path, d_out, d_in)
            node = state
            parts = path.split("/")
            for part in parts[:-1]:
                node = node[int(part) if part.isdigit() else part]
            node[parts[-1]].set_value(done[path])
    nnx.update(model, state)
    return done


def tiny_transformers_llama(directory: Any) -> Any:
    """A 2-layer random Llama written to ``directory`` by transformers itself (seeded), loaded by jaxquant."""
    import torch
    import transformers

    from jaxquant.models.loading import from_pretrained

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    return from_pretrained(directory)
