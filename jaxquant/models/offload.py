"""Generation with a mixture of experts offloaded (Eliseev and Mazur, 2023).

Most of a mixture-of-experts model's bytes are experts that each token barely touches.
Here the experts live in a slow tier, an ``ExpertStore``: one file per array on disk, or
host memory (the tier to use beside an accelerator). Each layer keeps the experts it used
last in the fast tier, an ``ExpertCache`` of a fixed number of experts per layer, evicting
the least recently used. With prefetch on, a reader thread loads, as soon as layer ``l``'s
router has picked, its missing experts (each load then overlaps the compute of the
experts before it), and behind them the experts that the router of layer ``l + 1``,
applied to layer ``l``'s hidden state, guesses that layer will pick (speculative prefetch).

Everything but the experts (embedding, attention, norms, routers, head) stays resident.
``OffloadedGenerator`` decodes greedily one token at a time and gives the tokens that
``generate`` gives with the whole model in memory: only the picked experts run, summed
in the same order as there, where the others add exact zeros.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.atomic_files import atomic_write
from jaxquant.models.llama import LlamaForCausalLM, _raw, gated_shared_expert, rotary_tables, tied_logits
from jaxquant.models.routing import top_k_routing
from jaxquant.validate import require_positive_int

TIERS = ("disk", "host")


def _read_tail(name: str, nbytes: int) -> np.ndarray:
    """The last ``nbytes`` bytes of a file (a ``.npy`` file's data) as a new ``uint8`` array.

    Plain reads into the array: uncached, they ran at 225 MB/s here against 124 MB/s for a
    copy out of a memory map, whose page faults read the file in small pieces.
    """
    out = np.empty(nbytes, np.uint8)
    view = memoryview(out)
    with open(name, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size < nbytes:
            raise OSError(f"{name}: the file has {size} bytes, fewer than the expert's {nbytes} bytes of data")
        f.seek(size - nbytes)
        done = 0
        while done < nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"{name}: the file ended {nbytes - done} bytes before the expert's data did")
            done += n
    return out


class ExpertStore:
    """Every expert's parameters, outside the fast tier.

    Args:
        tier: ``"disk"``: each array in a ``.npy`` file under ``directory``, read when the
            expert is loaded; ``"host"``: numpy arrays in memory.
        directory: where the disk tier writes (created if needed).
        page_cache: let the operating system keep the disk tier's files in its page
            cache. ``False`` drops each file's pages once it is written or read, so every
            load reads the disk, as on a machine whose memory cannot hold the experts
            (where the page cache would be no help); it also keeps the experts from
            taking memory outside the process.
    """

    def __init__(self, tier: str, directory: str | os.PathLike | None = None, *, page_cache: bool = True) -> None:
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        if tier == "disk":
            if directory is None:
                raise ValueError("the disk tier needs a directory")
            os.makedirs(directory, exist_ok=True)
        elif not page_cache:
            raise ValueError("page_cache=False is for the disk tier; the host tier reads no files")
        self.tier, self.directory = tier, None if directory is None else os.fspath(directory)
        self.page_cache = page_cache
        # Per expert: the tree's structure, and each array's dtype and shape.
        self._layout: dict[tuple[int, int], tuple[Any, list[np.dtype], list[tuple[int, ...]]]] = {}
        self._arrays: dict[tuple[int, int], list[Any]] = {}  # host arrays, or file names
        self._nbytes: dict[tuple[int, int], int] = {}

    @classmethod
    def from_params(cls, params: Any, tier: str, directory: str | os.PathLike | None = None, *,
                    page_cache: bool = True) -> ExpertStore:
        """A store of every expert under ``layers/{i}/mlp/experts/{j}`` of a model's state."""
        store = cls(tier, directory, page_cache=page_cache)
        for i, layer in _raw(params)["layers"].items():
            for j, expert in layer["mlp"].get("experts", {}).items():  # dense layers have none
                store.put(int(i), int(j), expert)
        return store

    def put(self, layer: int, expert: int, params: Any) -> None:
        """Store one expert's parameter tree (dense or quantized arrays)."""
        leaves, treedef = jax.tree.flatten(params)
        arrays = [np.asarray(jax.device_get(leaf)) for leaf in leaves]
        key = (int(layer), int(expert))
        self._layout[key] = (treedef, [a.dtype for a in arrays], [a.shape for a in arrays])
        self._nbytes[key] = int(sum(a.nbytes for a in arrays))
        if self.tier == "host":
            self._arrays[key] = arrays
            return
        names = []
        for k, a in enumerate(arrays):
            name = os.path.join(self.directory, f"layer{key[0]}-expert{key[1]}-{k}.npy")
            # Stored as raw bytes: numpy's format has no bfloat16; the dtype is kept here.
            atomic_write(name, lambda f, a=a: np.save(f, np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
            if not self.page_cache:
                self._drop_pages(name)
            names.append(name)
        self._arrays[key] = names

    def read(self, layer: int, expert: int) -> Any:
        """The expert's parameter tree as numpy arrays in host memory (from disk: read now)."""
        key = (int(layer), int(expert))
        if key not in self._layout:
            raise KeyError(f"the store holds no expert {expert} of layer {layer}")
        treedef, dtypes, shapes = self._layout[key]
        if self.tier == "host":
            return jax.tree.unflatten(treedef, self._arrays[key])
        arrays = []
        for name, dtype, shape in zip(self._arrays[key], dtypes, shapes):
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            arrays.append(_read_tail(name, nbytes).view(dtype).reshape(shape))
            if not self.page_cache:
                self._drop_pages(name)
        return jax.tree.unflatten(treedef, arrays)

    @staticmethod
    def _drop_pages(name: str) -> None:
        """Ask the kernel to forget the file's cached pages (they are clean: written with fsync)."""
        fd = os.open(name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def nbytes(self, layer: int, expert: int) -> int:
        """Bytes one load of the expert moves."""
        return self._nbytes[(int(layer), int(expert))]

    def __len__(self) -> int:
        return len(self._layout)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return (int(key[0]), int(key[1])) in self._layout


@dataclasses.dataclass
class CacheStats:
    """What the expert cache did.

    Attributes:
        lookups: experts asked for, per layer.
        hits: of those, found in the cache, per layer.
        prefetch_hits: found loaded (or loading) by a prefetch, per layer.
        prefetched: loads made for a guess (one cancelled before it ran is not counted).
        bytes_moved: bytes loaded from the slow tier (misses and prefetches).
        guesses: experts guessed for the next layer; ``guessed_right``: of those, picked.
    """

    lookups: list[int]
    hits: list[int]
    prefetch_hits: list[int]
    prefetched: int = 0
    bytes_moved: int = 0
    guesses: int = 0
    guessed_right: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> CacheStats:
        return cls([0] * num_layers, [0] * num_layers, [0] * num_layers)

    def hit_rate(self) -> float:
        """Share of lookups served without waiting on a load started at the lookup."""
        return (sum(self.hits) + sum(self.prefetch_hits)) / max(sum(self.lookups), 1)

    def prefetch_accuracy(self) -> float:
        """Share of guessed experts that the next layer then picked."""
        return self.guessed_right / max(self.guesses, 1)

    def summary(self) -> dict[str, Any]:
        """Totals, rates and the hit rate of each layer, for a results file."""
        return {"lookups": sum(self.lookups), "hits": sum(self.hits), "prefetch_hits": sum(self.prefetch_hits),
                "hit_rate": self.hit_rate(), "prefetched": self.prefetched,
                "prefetch_accuracy": self.prefetch_accuracy(), "bytes_moved": self.bytes_moved,
                "hit_rate_per_layer": [(h + p) / max(n, 1) for h, p, n in
                                       zip(self.hits, self.prefetch_hits, self.lookups)]}


class ExpertCache:
    """Each layer's most recently used experts in the fast tier (device arrays).

    Args:
        store: the slow tier.
        capacity: experts kept per layer; 0 keeps none (every use loads the expert).
        num_layers: layers of the model.
        prefetch_threads: reader threads for ``prefetch`` (0: prefetch loads nothing).
    """

    def __init__(self, store: ExpertStore, capacity: int, num_layers: int, prefetch_threads: int = 1) -> None:
        if not (isinstance(capacity, int) and capacity >= 0):
            raise ValueError(f"capacity must be an int >= 0 (experts per layer), got {capacity!r}")
        self.store, self.capacity = store, capacity
        self.stats = CacheStats.empty(num_layers)
        self._lru: list[collections.OrderedDict[int, Any]] = [collections.OrderedDict() for _ in range(num_layers)]
        # Per layer: expert -> (its load, whether it is a guess).
        self._pending: list[dict[int, tuple[Future, bool]]] = [{} for _ in range(num_layers)]
        self._pool = ThreadPoolExecutor(prefetch_threads) if prefetch_threads else None
        self._stats_lock = threading.Lock()

    def _load(self, layer: int, expert: int, guess: bool = False) -> Any:
        params = jax.device_put(self.store.read(layer, expert))
        # Counted once the load happened: a guess cancelled before it ran moves nothing.
        with self._stats_lock:
            self.stats.bytes_moved += self.store.nbytes(layer, expert)
            self.stats.prefetched += int(guess)
        return params

    def prefetch(self, layer: int, experts: Any, *, guess: bool = True) -> None:
        """Start loading ``experts`` of ``layer`` that are neither cached nor loading, in
        order, on the reader thread.

        Args:
            layer: the layer.
            experts: expert indices.
            guess: ``True``: a speculation (an expert it brings in counts as a prefetch
                hit when used); ``False``: experts known to be needed, loaded ahead so that
                each load overlaps the compute of the experts before it (still misses).
        """
        if self._pool is None:
            return
        for e in map(int, experts):
            if e not in self._lru[layer] and e not in self._pending[layer]:
                self._pending[layer][e] = (self._pool.submit(self._load, layer, e, guess), guess)

    def get(self, layer: int, expert: int) -> Any:
        """The expert's parameters on device: cached, prefetched, or loaded now."""
        stats, lru = self.stats, self._lru[layer]
        stats.lookups[layer] += 1
        if expert in lru:
            stats.hits[layer] += 1
            lru.move_to_end(expert)
            if isinstance(lru[expert], Future):  # a kept prefetch (see ``finish``)
                lru[expert] = lru[expert].result()
            return lru[expert]
        pending = self._pending[layer].pop(expert, None)
        if pending is not None:
            future, guess = pending
            stats.prefetch_hits[layer] += int(guess)
            params = future.result()
        else:
            params = self._load(layer, expert)
        lru[expert] = params
        while len(lru) > self.capacity:
            lru.popitem(last=False)
        return params

    def finish(self, layer: int) -> None:
        """Settle the layer's prefetches that were not used (wrong guesses): kept as the
        least recently used while the layer's cache has room, else dropped (they would
        evict experts the layer did use)."""
        lru = self._lru[layer]
        for expert, (future, _) in self._pending[layer].items():
            if len(lru) < self.capacity:
                lru[expert] = future
                lru.move_to_end(expert, last=False)
            else:
                future.cancel()
        self._pending[layer].clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# The compiled pieces of a decoding step, shared by every generator (the graph definitions
# and the config are static; prefill and single-token steps compile once each).


def _positions(config: Any, x: jax.Array, start: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q_pos = start + jnp.arange(x.shape[1], dtype=jnp.int32)
    return (q_pos, *rotary_tables(config.inv_freq(), q_pos))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _front(config: Any, graphdefs: Any, states: Any, x: jax.Array, cache: Any, start: jax.Array) -> Any:
    """A layer up to its routed experts: attention with the KV cache, the residual, the
    post-attention norm, the router's picks, and the gated shared expert's output (zeros
    without one)."""
    input_norm, attn, post_attn_norm, router, *shared = (None if g is None else nnx.merge(g, s)
                                                         for g, s in zip(graphdefs, states))
    q_pos, cos, sin = _positions(config, x, start)
    h, cache = attn(input_norm(x), cos, sin, q_pos, cache, start)
    x = x + h
    normed = post_attn_norm(x)
    weights, experts = top_k_routing(router(normed), config.experts_per_token, config.normalize_routing)
    shared_out = jnp.zeros(x.shape, jnp.float32) if shared[0] is None else gated_shared_expert(*shared, normed)
    return x, normed, cache, weights, experts, shared_out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _dense_layer(config: Any, graphdef: Any, state: Any, x: jax.Array, cache: Any, start: jax.Array) -> Any:
    """A whole layer with a dense MLP (Qwen2-MoE's ``mlp_only_layers``), all resident."""
    q_pos, cos, sin = _positions(config, x, start)
    return nnx.merge(graphdef, state)(x, cos, sin, q_pos, cache, start)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _guess(config: Any, graphdef: Any, state: Any, normed: jax.Array) -> jax.Array:
    return top_k_routing(nnx.merge(graphdef, state)(normed), config.experts_per_token, config.normalize_routing)[1]


@functools.partial(jax.jit, static_argnums=0)
def _expert(graphdef: Any, state: Any, normed: jax.Array, gate: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(normed).astype(jnp.float32) * gate[..., None]


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdefs: Any, states: Any, tokens: jax.Array) -> jax.Array:
    return nnx.merge(graphdefs[0], states[0])(tokens)


@functools.partial(jax.jit, static_argnums=0)
def _head(graphdefs: Any, states: Any, x: jax.Array) -> jax.Array:
    x = nnx.merge(graphdefs[1], states[1])(x)
    if graphdefs[2] is None:
        return tied_logits(x, nnx.merge(graphdefs[0], states[0]).embedding.get_value())
    return nnx.merge(graphdefs[2], states[2])(x)


class OffloadedGenerator:
    """Greedy decoding of a mixture of experts (Mixtral, Qwen2-MoE) whose routed experts sit in an ``ExpertStore``.

    Args:
        model: the model: its structure, and its resident weights unless ``params`` is
            given (it may then be abstract, from ``nnx.eval_shape``).
        store: the experts.
        cache_size: experts kept per layer in the fast tier (0: none).
        prefetch: guess each next layer's experts with its router and load them ahead.
        params: the resident weights, in the layout of the model's state (its experts,
            if any, are not read).
    """

    def __init__(self, model: LlamaForCausalLM, store: ExpertStore, *, cache_size: int, prefetch: bool = True,
                 params: Any = None) -> None:
        cfg = model.config
        if not cfg.num_experts:
            raise ValueError(f"OffloadedGenerator needs a mixture of experts; {cfg.architecture!r} has none")
        missing = [(i, j) for i in range(cfg.num_layers) if cfg.sparse(i) for j in range(cfg.num_experts)
                   if (i, j) not in store]
        if missing:
            raise ValueError(f"the store lacks {len(missing)} experts, e.g. (layer, expert) {missing[:4]}")
        raw = _raw(nnx.state(model) if params is None else params)
        self.config, self.prefetch = cfg, prefetch
        self.cache = ExpertCache(store, cache_size, cfg.num_layers, prefetch_threads=1 if prefetch else 0)
        # Per layer, graph definitions and states: of the norms, attention and the mixture
        # without its routed experts (router, shared expert) in a sparse layer, of the
        # whole layer in a dense one.
        self._fronts = []
        for i, layer in enumerate(model.layers):
            layer_raw = raw["layers"][i]
            if not cfg.sparse(i):
                self._fronts.append((nnx.graphdef(layer), layer_raw))
                continue
            modules = [layer.input_norm, layer.attn, layer.post_attn_norm, layer.mlp.router,
                       layer.mlp.shared_expert, layer.mlp.shared_expert_gate]
            states = [layer_raw[p] for p in ("input_norm", "attn", "post_attn_norm")]
            states += [layer_raw["mlp"].get(p) for p in ("router", "shared_expert", "shared_expert_gate")]
            self._fronts.append((tuple(None if m is None else nnx.graphdef(m) for m in modules), tuple(states)))
        self._expert_graphdefs = [nnx.graphdef(layer.mlp.experts[0]) if cfg.sparse(i) else None
                                  for i, layer in enumerate(model.layers)]
        self._ends = ((nnx.graphdef(model.embed), nnx.graphdef(model.final_norm),
                       None if model.lm_head is None else nnx.graphdef(model.lm_head)),
                      (raw["embed"], raw["final_norm"], None if model.lm_head is None else raw["lm_head"]))
        self.dtype = model.dtype

    def generate(self, prompt: Any, max_new_tokens: int,
                 on_token: Callable[[int], None] | None = None) -> np.ndarray:
        """Greedy continuation of one prompt ``[T]`` by ``max_new_tokens`` tokens.

        Raises:
            ValueError: an empty or out-of-vocabulary prompt, or more tokens than the
                context holds.
        """
        cfg = self.config
        tokens = np.asarray(prompt)
        if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"prompt must be a non-empty [T] array of token ids, got shape {tokens.shape} "
                             f"dtype {tokens.dtype}")
        require_positive_int("max_new_tokens", max_new_tokens)
        if tokens.size + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt of {tokens.size} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                             f"model's context of {cfg.max_position_embeddings} tokens")
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        shape = (1, tokens.size + max_new_tokens, cfg.num_kv_heads, cfg.head_dim)
        caches = [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(cfg.num_layers)]
        chunk, start, new = tokens.astype(np.int32), 0, []
        for _ in range(max_new_tokens):
            x = _embed(*self._ends, jnp.asarray(chunk[None]))
            guessed = None
            for i, (graphdefs, states) in enumerate(self._fronts):
                if not cfg.sparse(i):
                    x, caches[i] = _dense_layer(cfg, graphdefs, states, x, caches[i], jnp.int32(start))
                    guessed = None
                    continue
                x, normed, caches[i], weights, experts, shared = _front(cfg, graphdefs, states, x, caches[i],
                                                                        jnp.int32(start))
                weights, experts = np.asarray(weights)[0], np.asarray(experts)[0]  # [t, k]
                next_guess = None
                if self.prefetch:
                    # First this layer's missing experts (each load then overlaps the compute
                    # of the ones before it), then the guess for the next layer behind them.
                    self.cache.prefetch(i, np.unique(experts), guess=False)
                    if i + 1 < cfg.num_layers and cfg.sparse(i + 1):
                        nxt_graphdef, nxt_states = self._fronts[i + 1]
                        next_guess = np.asarray(_guess(cfg, nxt_graphdef[3], nxt_states[3], normed[:, -1]))[0]
                        self.cache.prefetch(i + 1, next_guess)
                if guessed is not None:
                    self.cache.stats.guesses += len(guessed)
                    self.cache.stats.guessed_right += len(set(guessed.tolist()) & set(experts[-1].tolist()))
                x = x + (self._experts(i, normed, weights, experts) + shared).astype(x.dtype)
                self.cache.finish(i)
                guessed = next_guess
            token = int(np.argmax(np.asarray(_head(*self._ends, x[:, -1:]))[0, -1]))
            new.append(token)
            if on_token is not None:
                on_token(token)
            start += chunk.size
            chunk = np.asarray([token], np.int32)
        return np.asarray(new, np.int32)

    def _experts(self, layer: int, normed: jax.Array, weights: np.ndarray, experts: np.ndarray) -> jax.Array:
        """Sum of the picked experts' outputs, each weighted per token (zero where another
        expert was picked), in increasing expert order as the full model sums them."""
        gates = np.zeros((experts.shape[0], self.config.num_experts), np.float32)
        np.put_along_axis(gates, experts, weights, axis=1)
        total = None
        for e in sorted(set(experts.reshape(-1).tolist())):
            term = _expert(self._expert_graphdefs[layer], self.cache.get(layer, e), normed,
                           jnp.asarray(gates[None, :, e]))
            total = term if total is None else total + term
        return total

    def close(self) -> None:
        """Stop the reader thread."""
        self.cache.close()


__all__ = ["TIERS", "CacheStats", "ExpertCache", "ExpertStore", "OffloadedGenerator"]
