"""A Llama-family decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU,
and the sparse mixtures of SwiGLU experts of Mixtral and Qwen2-MoE.

Numerics follow the Hugging Face reference (norms and softmax in float32, rotary tables
in float32 cast to the activation dtype) so that logits agree to float32 rounding.

Every linear layer computes through ``jaxquant.ops.matmul(x, kernel)`` with a Flax
``(d_in, d_out)`` kernel stored in a parameter named ``kernel``. The module never looks
at the kernel itself (no ``.shape``/``.astype``), so a quantized array put in its place
with ``nnx.update`` (or ``nnx.merge``) runs unchanged, and calibration that records
``matmul`` inputs sees every linear layer.

Parameter paths (NNX state): ``embed/embedding``, ``layers/{i}/input_norm/scale``,
``layers/{i}/attn/{q,k,v,o}_proj/{kernel,bias}``, ``layers/{i}/post_attn_norm/scale``,
``layers/{i}/mlp/{gate,up,down}_proj/kernel``, ``final_norm/scale``, ``lm_head/kernel``
(absent when the head is tied to the embedding). A mixture-of-experts layer has
``layers/{i}/mlp/router/kernel`` and ``layers/{i}/mlp/experts/{j}/{gate,up,down}_proj/kernel``
in place of the MLP's kernels: every expert a leaf of its own, for recipes by pattern; with a
shared expert also ``layers/{i}/mlp/shared_expert/{gate,up,down}_proj/kernel`` and
``layers/{i}/mlp/shared_expert_gate/kernel``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import ops
from jaxquant.in_order import signature, stack, unstack
from jaxquant.models.config import ModelConfig
from jaxquant.models.routing import report_router_logits, top_k_routing
from jaxquant.qarray import dequantize, is_quantized

# Per layer (keys, values), each [batch, cache_len, num_kv_heads, head_dim].
KVCache = tuple[tuple[jax.Array, jax.Array], ...]


class _ShapesOnly(nnx.Rngs):
    """The ``rngs`` of ``abstract_model``: weights start as zeros and no key is drawn,
    since drawing keys is most of the time ``eval_shape`` takes to build a model."""

    def __init__(self) -> None:
        super().__init__(0)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, std: float = 0.02) -> jax.Array:
    if isinstance(rngs, _ShapesOnly):
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` through ``ops.matmul``; kernel is ``(d_in, d_out)``."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype: Any, rngs: nnx.Rngs) -> None:
        self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = ops.matmul(x, self.kernel.get_value())
        if self.bias is not None:
            y = y + self.bias.get_value().astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32, scaled in the input dtype (as HF does)."""

    def __init__(self, dim: int, eps: float, dtype: Any) -> None:
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + jnp.float32(self.eps))
        return self.scale.get_value() * h.astype(x.dtype)


def rotary_tables(inv_freq: np.ndarray, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos``/``sin`` tables ``[T, head_dim]`` (float32) for integer ``positions [T]``."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, H, hd]`` by position (the half-split convention of HF Llama)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos.astype(x.dtype)[None, :, None, :]
    sin = sin.astype(x.dtype)[None, :, None, :]
    return x * cos + rotated * sin


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """``[T, S]`` boolean mask: causal, and within ``window`` tokens when one is set.

    A query at position ``p`` sees keys at ``p - window < k <= p`` (the HF convention: a
    window of ``w`` tokens including the query's own).
    """
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask = mask & (k_pos[None, :] > q_pos[:, None] - window)
    return mask


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions and an optional sliding window."""

    def __init__(self, cfg: ModelConfig, window: int | None, *, dtype: Any, rngs: nnx.Rngs) -> None:
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * hd, d, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.window = window

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        q_pos: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None,
        start: jax.Array | int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        b, t, _ = x.shape
        kv, hd = self.num_kv_heads, self.head_dim
        groups = self.num_heads // kv
        q = apply_rotary(self.q_proj(x).reshape(b, t, self.num_heads, hd), cos, sin)
        k = apply_rotary(self.k_proj(x).reshape(b, t, kv, hd), cos, sin)
        v = self.v_proj(x).reshape(b, t, kv, hd)
        if cache is None:
            keys, values, k_pos = k, v, q_pos
        else:
            # Write this chunk at `start`; slots past the newest token hold stale or zero
            # entries that the causal mask hides until a later step overwrites them.
            index = (0, start, 0, 0)
            keys = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), index)
            values = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), index)
            cache = (keys, values)
            k_pos = jnp.arange(keys.shape[1], dtype=jnp.int32)
        # Heads-major operands with a query group's rows merged ([b, kv, groups*t, hd]):
        # plain batched products, which XLA:CPU runs (and differentiates) about 1.4x
        # faster than the same einsums over the [b, t, heads, hd] layout.
        s = keys.shape[1]
        q = q.reshape(b, t, kv, groups, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, groups * t, hd)
        keys_hm = keys.astype(q.dtype).transpose(0, 2, 1, 3)
        values_hm = values.astype(x.dtype).transpose(0, 2, 1, 3)
        scores = jnp.einsum("bkxh,bksh->bkxs", q, keys_hm).astype(jnp.float32).reshape(b, kv, groups, t, s)
        scores = scores * jnp.float32(hd**-0.5)
        mask = attention_mask(q_pos, k_pos, self.window)
        scores = jnp.where(mask[None, None, None], scores, jnp.float32(-jnp.inf))
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype).reshape(b, kv, groups * t, s)
        out = jnp.einsum("bkxs,bksh->bkxh", probs, values_hm).reshape(b, kv, groups, t, hd)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, self.num_heads * hd)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, of hidden width ``width`` (default the
    config's ``intermediate_size``)."""

    def __init__(self, cfg: ModelConfig, width: int | None = None, *, dtype: Any, rngs: nnx.Rngs) -> None:
        d, f = cfg.hidden_size, width or cfg.intermediate_size
        self.gate_proj = Linear(d, f, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def gated_shared_expert(expert: MLP, gate: Linear, x: jax.Array) -> jax.Array:
    """``sigmoid(gate(x)) · expert(x)`` in float32: Qwen2-MoE's shared expert."""
    return jax.nn.sigmoid(gate(x).astype(jnp.float32)) * expert(x).astype(jnp.float32)


class SparseMoE(nnx.Module):
    """A mixture of experts (Mixtral, Qwen2-MoE): a linear router scores the experts per
    token, the ``experts_per_token`` best are kept with their softmax weights (renormalised
    with ``normalize_routing``), and the output is the weighted sum of those experts' SwiGLU
    outputs, plus, with a shared expert, ``sigmoid(shared_expert_gate(x)) · shared_expert(x)``.

    Every expert runs on every token here, its output weighted by zero where it was not
    picked: exact, and simple to compile, at ``num_experts / experts_per_token`` times the
    compute of running only the picked experts. Each expert runs inside
    ``ops.token_mask`` of its own tokens, so that calibration counts only those.
    """

    def __init__(self, cfg: ModelConfig, *, dtype: Any, rngs: nnx.Rngs) -> None:
        self.router = Linear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=dtype, rngs=rngs)
        self.experts = nnx.List([MLP(cfg, cfg.routed_expert_size, dtype=dtype, rngs=rngs)
                                 for _ in range(cfg.num_experts)])
        self.experts_per_token = cfg.experts_per_token
        self.normalize = cfg.normalize_routing
        if cfg.shared_expert_size:
            self.shared_expert = MLP(cfg, cfg.shared_expert_size, dtype=dtype, rngs=rngs)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False, dtype=dtype, rngs=rngs)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(weights, experts)``, each ``[..., experts_per_token]``: the picked experts'
        softmax weights (float32, best first) and their indices."""
        logits = self.router(x)
        report_router_logits(logits, self.experts_per_token)
        return top_k_routing(logits, self.experts_per_token, self.normalize)

    def shared(self, x: jax.Array) -> jax.Array | None:
        """The gated shared expert's output in float32, or ``None`` without one."""
        return None if self.shared_expert is None else gated_shared_expert(self.shared_expert, self.shared_expert_gate, x)

    def __call__(self, x: jax.Array) -> jax.Array:
        weights, experts = self.route(x)
        picked = jax.nn.one_hot(experts, len(self.experts), dtype=jnp.float32)  # [..., k, num_experts]
        # [..., num_experts]: each expert's weight for each token, zero where not picked.
        gates = jnp.einsum("...k,...ke->...e", weights, picked)
        routed = jnp.sum(picked, axis=-2) > 0
        out = jnp.zeros(x.shape, jnp.float32)
        for e, expert in enumerate(self.experts):
            with ops.token_mask(routed[..., e]):
                y = expert(x)
            out = out + y.astype(jnp.float32) * gates[..., e:e + 1]
        shared = self.shared(x)
        return (out if shared is None else out + shared).astype(x.dtype)


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention then MLP (or mixture of experts)."""

    def __init__(self, cfg: ModelConfig, layer: int, *, dtype: Any, rngs: nnx.Rngs) -> None:
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, cfg.window(layer), dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = SparseMoE(cfg, dtype=dtype, rngs=rngs) if cfg.sparse(layer) else MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, q_pos, cache, start):  # noqa: ANN001, ANN204 - see Attention
        h, cache = self.attn(self.input_norm(x), cos, sin, q_pos, cache, start)
        x = x + h
        return x + self.mlp(self.post_attn_norm(x)), cache


class Embedding(nnx.Module):
    """Token embedding table ``[vocab, d]``: dense (any float dtype) or quantized.

    Rows come out in the model's dtype, whatever the table is stored in
    (``jaxquant.store_embeddings``).
    """

    def __init__(self, vocab: int, dim: int, *, dtype: Any, rngs: nnx.Rngs) -> None:
        self.dtype = jnp.dtype(dtype)
        self.embedding = nnx.Param(_normal(rngs, (vocab, dim), dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        table = self.embedding.get_value()
        if is_quantized(table):
            return table.take_rows(tokens, self.dtype)
        return jnp.take(table, tokens, axis=0).astype(self.dtype)


class LlamaForCausalLM(nnx.Module):
    """Llama / Mistral / Qwen2 / Mixtral / Qwen2-MoE decoder with a language-model head.

    ``model(tokens)`` returns logits ``[B, T, vocab]``; ``model.forward(tokens, cache,
    start)`` additionally reads and writes a KV cache (see ``init_cache``).
    """

    def __init__(self, config: ModelConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None) -> None:
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embed = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, i, dtype=dtype, rngs=rngs) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        )

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> KVCache:
        """Zeroed KV cache for ``batch`` sequences of up to ``length`` tokens."""
        cfg = self.config
        dtype = self.dtype if dtype is None else dtype
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))

    def forward(
        self, tokens: jax.Array, cache: KVCache | None = None, start: jax.Array | int = 0
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits for ``tokens [B, T]`` placed at positions ``start .. start+T-1``.

        Args:
            tokens: integer token ids ``[B, T]``.
            cache: per-layer KV cache from ``init_cache`` (or a previous call), or ``None``
                to attend within ``tokens`` only.
            start: position of ``tokens[:, 0]`` (and the cache slot it is written to).

        Returns:
            ``(logits [B, T, vocab] in the model dtype, updated cache or None)``.
        """
        x, new_cache = self.hidden(tokens, cache, start)
        return self.head(x), new_cache

    def hidden(
        self, tokens: jax.Array, cache: KVCache | None = None, start: jax.Array | int = 0, *,
        scan_layers: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """The final-normalised hidden states ``[B, T, d]`` the head turns into logits.

        Arguments as in ``forward``; ``forward`` is ``head`` of this. With
        ``scan_layers`` (and no cache) the layers run as one ``lax.scan`` over their
        stacked parameters, each rematerialized (``jax.checkpoint``), when every layer
        has the same structure and shapes: a gradient then keeps one ``[B, T, d]``
        input per layer instead of every layer's activations (SmolLM2 at 4 x 256
        tokens: 1.4 GB less), and the compiled program holds one layer instead of all.
        Otherwise (layers of different structure, or parameters of different shapes or
        types, e.g. quantized by different recipes) the layers run one by one.
        """
        t = tokens.shape[1]
        q_pos = jnp.asarray(start, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        # Recomputed from the static config at trace time: a constant, never a parameter.
        cos, sin = rotary_tables(self.config.inv_freq(), q_pos)
        x = self.embed(tokens)
        layer_stack = LayerStack.of(self) if scan_layers and cache is None else None
        states = None if layer_stack is None else list(nnx.split(self.layers)[1].values())
        if layer_stack is not None and _first_mismatch(states) is None:
            return self.final_norm(layer_stack.run(stack(states), x, cos, sin, q_pos, start)), None
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, cos, sin, q_pos, None if cache is None else cache[i], start)
            new_cache.append(c)
        return self.final_norm(x), (None if cache is None else tuple(new_cache))

    def head(self, x: jax.Array) -> jax.Array:
        """Logits ``[..., vocab]`` of final-normalised hidden states ``x [..., d]``."""
        if self.lm_head is None:
            return tied_logits(x, self.embed.embedding.get_value())
        return self.lm_head(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``[B, T, vocab]`` for token ids ``[B, T]`` (no cache)."""
        return self.forward(tokens)[0]



def abstract_model(config: ModelConfig, dtype: Any = jnp.float32) -> LlamaForCausalLM:
    """The model's structure with shape-only parameters (``jax.ShapeDtypeStruct``), to be
    filled with ``nnx.update``: no memory allocated and no random numbers drawn."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=_ShapesOnly()))

def tied_logits(x: jax.Array, embedding: Any) -> jax.Array:
    """Logits of a head tied to the embedding table ``[vocab, d]`` (dense or quantized)."""
    if is_quantized(embedding):  # the table [vocab, d] is the head's out_in weight
        return ops.matmul(x, embedding)
    return jnp.einsum("...d,vd->...v", x, embedding.astype(x.dtype))


STACKED = "stacked_layers"


def _raw(params: Any) -> Any:
    """The nested mapping under an NNX state (or the mapping itself)."""
    return params.raw_mapping if isinstance(params, nnx.State) else params


def _first_mismatch(layers: list[Any]) -> int | None:
    """The first layer state that differs from ``layers[0]`` in structure, shape or dtype."""
    first = signature(layers[0])
    return next((i for i, state in enumerate(layers[1:], start=1) if signature(state) != first), None)


class LayerStack:
    """The decoder layers of a model run as one ``lax.scan`` over their stacked parameters.

    ``pack(params)`` turns a parameter state of the model (dense or quantized) into one
    whose per-layer states, ``layers/{i}/...``, are replaced by a single state
    ``stacked_layers/...`` with the layer index as leading axis; ``unpack`` undoes it (a
    gradient computed in packed form comes back in the model's layout). The
    ``functional_parts`` functions take either form. Packing dequantized weights inside a
    jit-compiled step writes them once, in stacked form, instead of once per layer and
    again stacked.

    Build it with ``LayerStack.of(model)``, which is ``None`` when the layers differ in
    structure (e.g. sliding windows on some layers only).
    """

    def __init__(self, layer_graphdef: Any, num_layers: int) -> None:
        self.layer_graphdef = layer_graphdef
        self.num_layers = num_layers

    @classmethod
    def of(cls, model: LlamaForCausalLM) -> LayerStack | None:
        """The stack of ``model``'s layers, or ``None`` if their graph definitions differ."""
        graphdefs = [nnx.graphdef(layer) for layer in model.layers]
        if any(g != graphdefs[0] for g in graphdefs[1:]):
            return None
        return cls(graphdefs[0], len(graphdefs))

    def pack(self, params: Any) -> nnx.State:
        """``params`` with its layers stacked under ``stacked_layers``.

        Raises:
            ValueError: layers whose parameters differ in structure, shape or dtype (for
                example quantized by different methods).
        """
        raw = _raw(params)
        layers = [raw["layers"][i] for i in range(self.num_layers)]
        bad = _first_mismatch(layers)
        if bad is not None:
            raise ValueError(f"layers/{bad} differs from layers/0 in structure, shape or dtype: the layers cannot "
                             "be stacked (quantized by different recipes?)")
        return nnx.State({**{k: v for k, v in raw.items() if k != "layers"}, STACKED: stack(layers)})

    def pack_decoded(self, qparams: Any) -> nnx.State:
        """``pack(dequantize(qparams))`` (float32), with the stacked layers decoded from
        their stacked codes one layer at a time (``lax.map``): the dense stack is written
        once, in place, with no per-layer copy before it (SmolLM2: 0.03 GB of
        temporaries, against 0.41 GB for decoding, then stacking).

        Raises:
            ValueError: as ``pack``.
        """
        raw = _raw(self.pack(qparams))
        rest = dequantize({k: v for k, v in raw.items() if k != STACKED})
        return nnx.State({**_raw(rest), STACKED: jax.lax.map(dequantize, raw[STACKED])})

    def unpack(self, params: Any) -> nnx.State:
        """The inverse of ``pack``."""
        raw = _raw(params)
        layers = dict(enumerate(unstack(raw[STACKED], self.num_layers)))
        return nnx.State({**{k: v for k, v in raw.items() if k != STACKED}, "layers": layers})

    def run(self, states: Any, x: jax.Array, cos: jax.Array, sin: jax.Array, q_pos: jax.Array,
            start: jax.Array | int = 0) -> jax.Array:
        """The layers over ``x`` (no cache), each rematerialized in the backward pass.

        When every leaf of ``states`` is floating, the gradient with respect to
        ``states`` is written over the stacked weights themselves, layer by layer as the
        backward pass finishes with each (``_scan_with_in_place_grads``): weights and
        gradient then share one stack instead of two (SmolLM2: 0.4 GB less).
        """
        graphdef = self.layer_graphdef

        def layer(state: Any, x: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state)(x, cos, sin, q_pos, None, start)[0]

        if all(jnp.issubdtype(jnp.result_type(leaf), jnp.floating) for leaf in jax.tree.leaves(states)):
            return _scan_with_in_place_grads(layer, states, x)

        @jax.checkpoint
        def body(x: jax.Array, state: Any) -> tuple[jax.Array, None]:
            return layer(state, x), None

        return jax.lax.scan(body, x, states)[0]


def _scan_with_in_place_grads(layer: Any, states: Any, x: jax.Array) -> jax.Array:
    """``layer`` applied over the stacked ``states`` in order, differentiable in both.

    The forward pass keeps each layer's input. The backward pass walks the layers in
    reverse, recomputes each one's forward for its pull-back, and writes the layer's
    parameter gradient into the slot of the stack that held its parameters, which no
    later step reads: the stack arrives as the loop's carry and leaves as the gradient.
    ``layer`` may close over arrays that are not differentiated (rotary tables,
    positions).
    """

    @jax.custom_vjp
    def run(states: Any, x: jax.Array) -> jax.Array:
        return jax.lax.scan(lambda h, state: (layer(state, h), None), x, states)[0]

    def forward(states: Any, x: jax.Array) -> tuple[jax.Array, tuple[Any, jax.Array]]:
        out, inputs = jax.lax.scan(lambda h, state: (layer(state, h), h), x, states)
        return out, (states, inputs)

    def backward(saved: tuple[Any, jax.Array], g: jax.Array) -> tuple[Any, jax.Array]:
        slots, inputs = saved
        n = inputs.shape[0]

        def step(k: jax.Array, carry: tuple[Any, jax.Array]) -> tuple[Any, jax.Array]:
            slots, g = carry
            i = n - 1 - k
            state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), slots)
            _, pull_back = jax.vjp(layer, state, jax.lax.dynamic_index_in_dim(inputs, i, keepdims=False))
            d_state, g = pull_back(g)
            slots = jax.tree.map(lambda a, d: jax.lax.dynamic_update_index_in_dim(a, d.astype(a.dtype), i, 0),
                                 slots, d_state)
            return slots, g

        return jax.lax.fori_loop(0, n, step, (slots, g))

    run.defvjp(forward, backward)
    return run(states, x)


def functional(model: LlamaForCausalLM) -> tuple[Any, nnx.State]:
    """Split ``model`` into a pure ``apply_fn(params, tokens) -> logits`` and its ``params``.

    ``params`` is the NNX state; any tree of the same structure (e.g. with quantized
    kernels from ``jaxquant.quantize``) can be passed to ``apply_fn`` instead.
    """
    graphdef, params = nnx.split(model)

    def apply_fn(params: Any, tokens: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params)(tokens)

    return apply_fn, params


def functional_parts(model: LlamaForCausalLM, *, scan_layers: bool = False) -> tuple[Any, Any]:
    """``(hidden_fn, head_fn)``: ``functional``'s ``apply_fn`` cut before the head.

    ``hidden_fn(params, tokens) -> [B, T, d]`` (``LlamaForCausalLM.hidden``, with its
    ``scan_layers``) and ``head_fn(params, x) -> logits`` (``LlamaForCausalLM.head``), so
    that a loss can form logits a slice of tokens at a time
    (``jaxquant.finetune.losses.chunked_distillation_loss``). Both also take parameters
    packed by ``LayerStack.pack``, and then scan the stacked layers.
    """
    graphdef, _ = nnx.split(model)
    embed, final_norm = nnx.graphdef(model.embed), nnx.graphdef(model.final_norm)
    lm_head = None if model.lm_head is None else nnx.graphdef(model.lm_head)
    layer_stack, inv_freq = LayerStack.of(model), model.config.inv_freq()

    def hidden_fn(params: Any, tokens: jax.Array) -> jax.Array:
        if STACKED not in params:
            return nnx.merge(graphdef, params).hidden(tokens, scan_layers=scan_layers)[0]
        q_pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        cos, sin = rotary_tables(inv_freq, q_pos)
        x = layer_stack.run(params[STACKED], nnx.merge(embed, params["embed"])(tokens), cos, sin, q_pos)
        return nnx.merge(final_norm, params["final_norm"])(x)

    def head_fn(params: Any, x: jax.Array) -> jax.Array:
        if STACKED not in params:
            return nnx.merge(graphdef, params).head(x)
        if lm_head is None:
            return tied_logits(x, params["embed"]["embedding"].get_value())
        return nnx.merge(lm_head, params["lm_head"])(x)

    return hidden_fn, head_fn
