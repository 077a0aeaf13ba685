"""Block-sequential quantization of a whole model, with block fine-tuning and crash-safe resume.

For each block ``i`` in order, with ``X`` the block's current inputs (the outputs of the
already-quantized blocks before it, on the calibration samples):

1. ``Y = block_fp(X)``: the full-precision block's outputs, the fine-tuning target;
2. ``XᵀX`` of every selected linear layer of the block, from a forward pass on ``X``
   (``jaxquant.calibrate``: batches sharded over the local devices, sums all-reduced);
3. each layer quantized with its recipe (per-pattern recipes allowed) and a key derived
   from the run's key and the layer's path (``jaxquant.quantize.leaf_key``, as
   ``jaxquant.quantize`` does), its relative output error ``‖(W − Ŵ)Xᵀ‖² / ‖WXᵀ‖²``
   logged;
4. optionally ``finetune_block``: the block's continuous parameters tuned to map ``X``
   to ``Y`` (codes frozen);
5. ``X ← block_q(X)``: the inputs of the next block.

Only one block's activations exist at a time (``X``, ``Y`` and the next ``X``, on the
host as float32 numpy arrays, or memory-mapped files in the run directory with
``offload=True``). With an ``out_dir``, each finished block is committed atomically
(``jaxquant.pipeline.rundir``): its quantized parameters (an orbax checkpoint through
``jaxquant.io.save``), the next block's inputs, and a progress record written last. Every
random choice derives from the run's key and the block or layer it serves, so a run
killed at any moment and restarted with the same settings ends with exactly the codes of
an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxquant import io as jq_io
from jaxquant.atomic_files import atomic_write_json
from jaxquant.calibrate import calibrate
from jaxquant.embeddings import EMBEDDING_BITS, store_embeddings
from jaxquant.finetune.block import BlockFinetuneConfig, finetune_block, relative_error
from jaxquant.pipeline import rundir as rd
from jaxquant.pipeline.blocks import BlockwiseModel, as_blockwise
from jaxquant.qarray import flatten_by_path, replace_by_path, tree_bits
from jaxquant.quantize import leaf_key, leaf_layout, quantize_weight
from jaxquant.recipes import check_divisible
from jaxquant.recipes_named import recipe_spec_to_data
from jaxquant.select import Selector, resolve_recipes
from jaxquant.stats import LayerStats, damped
from jaxquant.validate import require_positive_int

_FINETUNE_TAG = 0x66745F62  # folded into the key for fine-tuning, apart from layer keys
# A layer calibrated on fewer tokens than this (an expert the router seldom picked) is
# quantized against statistics damped up to it (``stats.damped``), with a warning.
MIN_CALIBRATION_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    """What ``quantize_model`` returns.

    Attributes:
        params: the model's parameter tree with every selected layer quantized (for a
            Llama model an ``nnx.State``: ``nnx.update(model, result.params)`` or
            ``jaxquant.models.functional(model)[0](result.params, tokens)``).
        summary: bits per weight (honest: codes + codebooks + scales), sizes, seconds,
            mean errors.
        layers: one record per quantized layer (as in ``layers.jsonl``).
        blocks: one record per block (output errors before/after fine-tuning, seconds).
    """

    params: Any
    summary: dict[str, Any]
    layers: list[dict[str, Any]]
    blocks: list[dict[str, Any]]


# ----------------------------------------------------------------------------- trees


def assemble(blockwise: BlockwiseModel, blocks: list[Any]) -> Any:
    """The full parameter tree with block ``i``'s subtree taken from ``blocks[i]``."""
    new: dict[str, Any] = {}
    for i, block in enumerate(blocks):
        prefix = blockwise.block_prefix(i)
        for rel, leaf in flatten_by_path(block)[0]:
            new[f"{prefix}/{rel}"] = leaf
    return replace_by_path(blockwise.params, new)


# ----------------------------------------------------------------------------- checks


def _check_tokens(tokens: Any, blockwise: Any, finetune: BlockFinetuneConfig | None) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.size == 0:
        raise ValueError(
            f"calib_tokens must be a non-empty [nsamples, seqlen] integer array, got shape {arr.shape} dtype {arr.dtype}"
        )
    vocab = getattr(blockwise, "vocab_size", None)
    if vocab is not None and (arr.min() < 0 or arr.max() >= vocab):
        raise ValueError(f"calib_tokens holds ids in [{arr.min()}, {arr.max()}], outside the vocabulary [0, {vocab})")
    if finetune is not None and arr.shape[0] < 2:
        raise ValueError(f"block fine-tuning needs at least 2 calibration samples (one held out), got {arr.shape[0]}")
    return arr.astype(np.int32)


def _check_key(key: Any) -> jax.Array:
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
        return key
    if isinstance(key, jax.Array | np.ndarray) and key.dtype == np.uint32 and key.shape == (2,):
        return jnp.asarray(key)
    raise TypeError(f"key must be a PRNG key (jax.random.key(seed)), got {type(key).__name__} {getattr(key, 'shape', '')}")


def _key_data(key: jax.Array) -> list[int]:
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return [int(v) for v in np.asarray(data).ravel()]


def _assign_blocks(plan: dict[str, Any], blockwise: BlockwiseModel) -> list[dict[str, tuple[str, Any]]]:
    """``plan`` split per block: ``[{path inside block: (full path, recipe)}]``, in tree order."""
    prefixes = [blockwise.block_prefix(i) + "/" for i in range(blockwise.num_blocks)]
    per_block: list[dict[str, tuple[str, Any]]] = [{} for _ in prefixes]
    outside = []
    for path, recipe in plan.items():
        i = next((j for j, pre in enumerate(prefixes) if path.startswith(pre)), None)
        if i is None:
            outside.append(path)
        else:
            per_block[i][path[len(prefixes[i]):]] = (path, recipe)
    if outside:
        raise ValueError(
            f"selected layers {outside} lie outside the model's blocks ({prefixes[0]}..); quantize_model "
            "quantizes block layers only — narrow `where` or the recipe patterns"
        )
    return per_block


def _check_groups(params: Any, plan: dict[str, Any]) -> None:
    """Every planned leaf divides into its recipe's groups (checked before any work)."""
    shapes = {p: tuple(leaf.shape) for p, leaf in flatten_by_path(params)[0] if p in plan}
    for path, recipe in plan.items():
        shape = shapes[path]
        if len(shape) != 2:
            raise ValueError(f"the leaf at {path} has shape {shape}; only 2-D weights can be quantized")
        d_out, d_in = shape if leaf_layout(path) == "out_in" else shape[::-1]
        check_divisible(recipe, d_out, d_in, path)


def _describe_where(where: Selector | None) -> Any:
    if where is None or isinstance(where, str):
        return where
    if callable(where):
        return f"{getattr(where, '__module__', '?')}.{getattr(where, '__qualname__', repr(where))}"
    return [_describe_where(w) for w in where]


def _fingerprint(params: Any) -> str:
    h = hashlib.sha256()
    for path, leaf in flatten_by_path(params)[0]:
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{path}|{arr.dtype.name}|{arr.shape}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _recipe_data(recipe: Any) -> Any:
    try:
        return recipe_spec_to_data(recipe)
    except (StopIteration, TypeError, AttributeError):
        return repr(recipe)


def run_config(
    blockwise: BlockwiseModel,
    tokens: np.ndarray,
    recipe: Any,
    where: Selector | None,
    key: jax.Array,
    finetune: BlockFinetuneConfig | None,
    batch_size: int,
    embed_bits: int | None = None,
) -> dict[str, Any]:
    """Everything that determines a run's result (its hash names the run)."""
    # ``embed_bits`` enters only when set, so runs made before it existed still resume.
    return {**({} if embed_bits is None else {"embed_bits": embed_bits}),
        "format": rd.FORMAT_VERSION,
        "model": {"type": type(blockwise).__name__, "num_blocks": blockwise.num_blocks,
                  "dtype": jnp.dtype(blockwise.dtype).name, "fingerprint": _fingerprint(blockwise.params)},
        "calibration": {"shape": list(tokens.shape), "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()},
        "recipe": _recipe_data(recipe),
        "where": _describe_where(where),
        "key": _key_data(key),
        "finetune": None if finetune is None else dataclasses.asdict(finetune),
        "batch_size": batch_size,
    }


# ----------------------------------------------------------------------------- compute


@functools.partial(jax.jit, static_argnums=0)
def _apply(fn: Any, params: Any, x: jax.Array) -> jax.Array:
    return fn(params, x).astype(jnp.float32)


@jax.jit
def _layer_error(w_out_in: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
    hp = jax.lax.Precision.HIGHEST
    w = w_out_in.astype(jnp.float32)
    d = w - w_hat.astype(jnp.float32)
    num = jnp.sum(jnp.matmul(d, h, precision=hp) * d)
    den = jnp.sum(jnp.matmul(w, h, precision=hp) * w)
    return num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)


def _rel_error(leaf: Any, q: Any, stats: LayerStats, path: str) -> float:
    w = jnp.asarray(leaf)
    w_out_in = w if leaf_layout(path) == "out_in" else w.T
    return float(_layer_error(w_out_in, q.decode_out_in(jnp.float32), stats.mean().astype(jnp.float32)))


class _Devices:
    """Places parameters (replicated) and batches (sharded on the leading axis when it divides)."""

    def __init__(self) -> None:
        devices = jax.local_devices()
        mesh = Mesh(np.asarray(devices), ("data",))
        self.n = len(devices)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.sharded = NamedSharding(mesh, PartitionSpec("data"))

    def params(self, tree: Any) -> Any:
        return jax.device_put(tree, self.replicated)

    def batch(self, x: np.ndarray) -> jax.Array:
        return jax.device_put(x, self.sharded if x.shape[0] % self.n == 0 else self.replicated)


def _map_blocks(fn: Any, params: Any, x: np.ndarray, out: np.ndarray, batch_size: int, devs: _Devices) -> np.ndarray:
    """``out[s] = fn(params, x[s])`` batch by batch; the last batch is padded to one shape."""
    n = x.shape[0]
    for s in range(0, n, batch_size):
        xb = np.asarray(x[s : s + batch_size], np.float32)
        m = xb.shape[0]
        if m < batch_size:  # pad with copies so every batch reuses one compilation
            xb = np.concatenate([xb, np.repeat(xb[:1], batch_size - m, axis=0)])
        out[s : s + m] = np.asarray(_apply(fn, params, devs.batch(xb)))[:m]
    return out


def _batches(x: np.ndarray, batch_size: int) -> Any:
    for s in range(0, x.shape[0], batch_size):
        yield np.asarray(x[s : s + batch_size], np.float32)


# ----------------------------------------------------------------------------- main


def quantize_model(
    model: Any,
    calib_tokens: Any,
    recipe: Any,
    *,
    key: jax.Array,
    finetune: BlockFinetuneConfig | bool | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    where: Selector | None = None,
    batch_size: int = 8,
    offload: bool = False,
    embed_bits: int | None = None,
    log: bool | None = None,
) -> QuantizeResult:
    """Quantize a model block by block on the inputs of its already-quantized blocks.

    Args:
        model: a ``jaxquant.models.LlamaForCausalLM`` or any ``BlockwiseModel``
            (``jaxquant.pipeline.blocks``). It is not modified.
        calib_tokens: ``[nsamples, seqlen]`` integer calibration windows
            (``jaxquant.data.calibration_windows``).
        recipe: one recipe for every selected layer, or ``[(pattern, recipe)]`` /
            ``{pattern: recipe}`` matched against full paths such as
            ``layers/3/mlp/down_proj/kernel`` (first match wins; every pattern must match).
        key: PRNG key; each layer's key is derived from it and the layer's path.
        finetune: ``BlockFinetuneConfig`` (or ``True`` for the defaults) to fine-tune
            each block after quantizing it; ``None``/``False``: no fine-tuning.
        out_dir: directory for the crash-safe state, ``layers.jsonl``, the final
            checkpoint (``params/``, via ``jaxquant.io.save``) and ``summary.json``.
        resume: continue the run found in ``out_dir`` (started fresh if there is none);
            its settings must equal this call's.
        progress: progress bars (blocks with ETA; layers with the current error).
        where: selector of candidate layers (default: linear kernels of the blocks).
        batch_size: calibration samples per forward pass (a multiple of the device count
            shards every batch).
        offload: keep activations in memory-mapped files in ``out_dir`` instead of RAM.
        embed_bits: store the token embeddings and output head at 32, 16 or 8 bits
            (``jaxquant.store_embeddings``) once every block is done; ``None`` leaves
            them as the model has them. The blocks are calibrated on the model's own
            embeddings either way.
        log: print one line per finished block, and where a run resumes; default:
            as ``progress`` (the command line logs even without bars).

    Returns:
        A ``QuantizeResult``: the quantized parameter tree, summary and logs.

    Raises:
        ValueError: bad tokens, a recipe pattern that matches nothing, groups that do
            not divide a layer, an ``out_dir`` holding something else or a different
            run, a resume whose settings differ. Nothing is written in these cases.
        TypeError: a model that is neither supported nor a ``BlockwiseModel``; a bad key.
    """
    t_start = time.perf_counter()
    blockwise = as_blockwise(model)
    if finetune is True:
        finetune = BlockFinetuneConfig()
    elif finetune is False:
        finetune = None
    if finetune is not None and not isinstance(finetune, BlockFinetuneConfig):
        raise TypeError(f"finetune must be a BlockFinetuneConfig, True, False or None, got {type(finetune).__name__}")
    require_positive_int("batch_size", batch_size)
    if offload and out_dir is None:
        raise ValueError("offload=True keeps activations in files under out_dir; pass out_dir")
    if embed_bits is not None and embed_bits not in EMBEDDING_BITS:
        raise ValueError(f"embed_bits={embed_bits!r} must be None or one of {EMBEDDING_BITS}")
    tokens = _check_tokens(calib_tokens, blockwise, finetune)
    key = _check_key(key)
    plan = resolve_recipes(blockwise.params, recipe, where)
    per_block = _assign_blocks(plan, blockwise)
    _check_groups(blockwise.params, plan)

    run: rd.RunDir | None = None
    saved = None
    if out_dir is not None:
        run = rd.RunDir(out_dir, run_config(blockwise, tokens, recipe, where, key, finetune, batch_size, embed_bits))
        saved = run.open(resume)
    log = progress if log is None else log
    if run is not None and saved is not None and saved.get("complete"):
        return _load_complete(run, saved, log)

    devs = _Devices()
    n_blocks = blockwise.num_blocks
    start = int(saved["blocks_done"]) if saved else 0
    layers: list[dict[str, Any]] = list(saved["layers"]) if saved else []
    blocks: list[dict[str, Any]] = list(saved["blocks"]) if saved else []
    qblocks: list[Any] = []
    x = None
    if start:
        assert run is not None
        qblocks = _committed_blocks(run, start)
        if len(qblocks) < start:  # a damaged block: redo it and everything after it
            start, layers, blocks = len(qblocks), [r for r in layers if r["block"] < len(qblocks)], blocks[: len(qblocks)]
        else:
            x = _committed_inputs(run, saved["inputs"], offload)
        if x is None:
            x = _inputs_after(blockwise, qblocks, tokens, batch_size, devs)
            rd.atomic_save_npy(run.inputs_file(start), x)
            saved = {**saved, "blocks_done": start, "inputs": os.path.basename(run.inputs_file(start)),
                     "layers": layers, "blocks": blocks}
            run.commit(saved)
            if offload:
                x = np.load(run.inputs_file(start), mmap_mode="r")
    else:
        x = _embed(blockwise, tokens, batch_size, devs)
    if run is not None:
        run.clean_state(os.path.join(run.state, saved["inputs"]) if saved else None, start)
        run.write_layers(layers)
    if log and start:
        print(f"jaxquant: resuming the run in {run.path} from block {start + 1}/{n_blocks} ({start} done)", flush=True)

    from tqdm.auto import tqdm  # noqa: PLC0415

    bar = tqdm(total=n_blocks, initial=start, desc="blocks", unit="block", disable=not progress)
    try:
        for i in range(start, n_blocks):
            x, qblock, layer_recs, block_rec = _quantize_block(
                blockwise, i, x, per_block[i], key, finetune, batch_size, devs, run, offload, progress, log, bar
            )
            qblocks.append(qblock)
            layers += layer_recs
            blocks.append(block_rec)
            if run is not None:
                jq_io.save(run.block_dir(i), qblock, overwrite=True)
                next_file = run.inputs_file(i + 1)
                if not offload:
                    rd.atomic_save_npy(next_file, x)
                run.commit({"blocks_done": i + 1, "inputs": os.path.basename(next_file), "layers": layers,
                            "blocks": blocks, "complete": False})
                run.clean_state(next_file, i + 1)
                if offload:
                    x = np.load(next_file, mmap_mode="r")
            bar.update(1)
            after = block_rec["rel_error_finetuned"]
            bar.set_postfix_str(f"block {i + 1} err {block_rec['rel_error']:.4g}"
                                + ("" if after is None else f" -> {after:.4g}"))
    finally:
        bar.close()

    params = assemble(blockwise, qblocks)
    if embed_bits is not None:
        params = store_embeddings(params, embed_bits)
    summary = _summary(params, layers, blocks, time.perf_counter() - t_start)
    if run is not None:
        jq_io.save(run.file(rd.PARAMS_DIR), params, overwrite=True)
        atomic_write_json(run.file(rd.SUMMARY_FILE), summary)
        run.commit({"blocks_done": n_blocks, "inputs": None, "layers": layers, "blocks": blocks, "complete": True})
        run.remove_block_state()
    return QuantizeResult(params=params, summary=summary, layers=layers, blocks=blocks)


def _committed_blocks(run: rd.RunDir, blocks_done: int) -> list[Any]:
    """The committed blocks' checkpoints, up to the first damaged one (which is reported)."""
    qblocks = []
    for i in range(blocks_done):
        try:
            qblocks.append(jq_io.load(run.block_dir(i)))
        except (ValueError, OSError, RuntimeError) as e:  # jq_io.CheckpointError, or orbax's own errors
            print(f"jaxquant: the checkpoint of block {i + 1} ({run.block_dir(i)}) is damaged ({e}); "
                  f"redoing the run from block {i + 1}", flush=True)
            break
    return qblocks


def _committed_inputs(run: rd.RunDir, name: str, offload: bool) -> np.ndarray | None:
    """The committed inputs of the next block, or ``None`` (reported) when damaged."""
    path = os.path.join(run.state, name)
    try:
        return np.load(path, mmap_mode="r" if offload else None)
    except (OSError, ValueError, EOFError) as e:
        print(f"jaxquant: {path} is damaged ({e}); recomputing it from the committed blocks", flush=True)
        return None


def _inputs_after(blockwise: BlockwiseModel, qblocks: list[Any], tokens: np.ndarray, batch_size: int,
                  devs: _Devices) -> np.ndarray:
    """The inputs of block ``len(qblocks)``: the calibration tokens through the quantized blocks."""
    x = _embed(blockwise, tokens, batch_size, devs)
    for i, qblock in enumerate(qblocks):
        x = _map_blocks(blockwise.block_fn(i), devs.params(qblock), x, np.empty(x.shape, np.float32), batch_size, devs)
    return x


def _embed(blockwise: BlockwiseModel, tokens: np.ndarray, batch_size: int, devs: _Devices) -> np.ndarray:
    embed = jax.jit(lambda p, t: blockwise.embed(p, t).astype(jnp.float32))
    params = devs.params(blockwise.params)
    parts = [np.asarray(embed(params, devs.batch(tokens[s : s + batch_size])))
             for s in range(0, tokens.shape[0], batch_size)]
    return np.concatenate(parts)


def _alloc(run: rd.RunDir | None, name: str, like: np.ndarray, offload: bool) -> np.ndarray:
    if offload and run is not None:
        return np.lib.format.open_memmap(os.path.join(run.state, name), mode="w+", dtype=np.float32, shape=like.shape)
    return np.empty(like.shape, np.float32)


def _quantize_block(
    blockwise: BlockwiseModel,
    i: int,
    x: np.ndarray,
    todo: dict[str, tuple[str, Any]],
    key: jax.Array,
    finetune: BlockFinetuneConfig | None,
    batch_size: int,
    devs: _Devices,
    run: rd.RunDir | None,
    offload: bool,
    progress: bool,
    log: bool,
    bar: Any,
) -> tuple[np.ndarray, Any, list[dict[str, Any]], dict[str, Any]]:
    """One block: targets, statistics, layers, fine-tuning, next inputs."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    t0 = time.perf_counter()
    fn = blockwise.block_fn(i)
    fp = blockwise.block_params(blockwise.params, i)
    fp_dev = devs.params(fp)
    targets = _map_blocks(fn, fp_dev, x, _alloc(run, ".targets.npy", x, offload), batch_size, devs)

    wanted = set(todo)
    stats = calibrate(fn, fp_dev, _batches(x, batch_size), where=lambda p, leaf: p in wanted)
    tokens = {rel: int(s.count) for rel, s in stats.items()}
    # Only layers that saw part of the block's tokens (experts) are floored: a dense layer
    # sees every calibration token, and its statistics are what the user asked for.
    floor = min(MIN_CALIBRATION_TOKENS, math.prod(x.shape[:2]))
    sparse = [rel for rel, n in tokens.items() if n < floor]
    if sparse:
        seen = ", ".join(f"{todo[rel][0]} {tokens[rel]}" for rel in sparse)
        warnings.warn(f"block {i + 1}: {len(sparse)} layers saw fewer than {floor} calibration tokens "
                      f"({seen}); they are quantized against damped statistics (more calibration windows would "
                      "give them more)", stacklevel=2)
        stats.update({rel: damped(stats[rel], floor) for rel in sparse})
    fp_leaves = dict(flatten_by_path(fp)[0])

    recs: list[dict[str, Any]] = []
    new: dict[str, Any] = {}
    layer_bar = tqdm(total=len(todo), desc=f"block {i + 1}/{blockwise.num_blocks}", unit="layer", leave=False, disable=not progress)
    try:
        for rel, (path, recipe) in todo.items():
            t1 = time.perf_counter()
            layer_bar.set_postfix_str(path)
            q = quantize_weight(fp_leaves[rel], stats[rel], recipe, leaf_key(key, path), layout=leaf_layout(path),
                                path=path)
            q = jax.device_get(q)
            err = _rel_error(fp_leaves[rel], q, stats[rel], path)
            new[rel] = q
            recs.append({"block": i, "name": path, "method": recipe.name, "scheme": q.scheme,
                         "bits": q.bits_per_weight, "calibration_tokens": tokens[rel], "rel_error": err,
                         "rel_error_finetuned": None,
                         "seconds": time.perf_counter() - t1})
            layer_bar.update(1)
            layer_bar.set_postfix_str(f"{path} err {err:.4g}")
    finally:
        layer_bar.close()

    qblock = replace_by_path(fp, new)
    block_err = relative_error(fn, qblock, x, targets, batch_size=batch_size)
    block_rec: dict[str, Any] = {"block": i, "rel_error": block_err, "rel_error_finetuned": None, "finetune": None}
    if finetune is not None:
        ft_key = jax.random.fold_in(jax.random.fold_in(key, _FINETUNE_TAG), i)

        def on_epoch(epoch: int, err: float) -> None:
            bar.set_postfix_str(f"block {i + 1} fine-tune epoch {epoch} held-out err {err:.4g}")

        qblock, report = finetune_block(fn, qblock, x, targets, finetune, key=ft_key, on_epoch=on_epoch)
        qblock = jax.device_get(qblock)
        tuned = dict(flatten_by_path(qblock)[0])
        for rec, rel in zip(recs, todo, strict=True):
            rec["rel_error_finetuned"] = _rel_error(fp_leaves[rel], tuned[rel], stats[rel], rec["name"])
        block_rec["rel_error_finetuned"] = relative_error(fn, qblock, x, targets, batch_size=batch_size)
        block_rec["finetune"] = dataclasses.asdict(report)

    if offload and run is not None:
        path = os.path.join(run.state, ".next.npy")
        out = _map_blocks(fn, devs.params(qblock), x, _alloc(run, ".next.npy", x, True), batch_size, devs)
        out.flush()
        del out
        os.replace(path, run.inputs_file(i + 1))
        x_next = np.load(run.inputs_file(i + 1), mmap_mode="r")
    else:
        x_next = _map_blocks(fn, devs.params(qblock), x, np.empty(x.shape, np.float32), batch_size, devs)
    block_rec["seconds"] = time.perf_counter() - t0
    if log:
        after = block_rec["rel_error_finetuned"]
        tqdm.write(f"block {i + 1}/{blockwise.num_blocks}: {len(recs)} layers, output error {block_err:.4g}"
                   + ("" if after is None else f" -> {after:.4g} after fine-tuning")
                   + f", {block_rec['seconds']:.1f} s")
    return x_next, qblock, recs, block_rec


def _summary(params: Any, layers: list[dict[str, Any]], blocks: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    bits = tree_bits(params)
    errs = [r["rel_error"] for r in layers]
    tuned = [r["rel_error_finetuned"] for r in layers if r["rel_error_finetuned"] is not None]
    return {
        "bits_per_weight": bits["bits_per_weight"],
        "quantized_weights": bits["quantized_weights"],
        "total_bytes": bits["total_bytes"],
        "embedding_params": bits["embedding_params"],
        "embedding_bits_per_weight": bits["embedding_bits"] / bits["embedding_params"] if bits["embedding_params"] else None,
        "other_params": bits["other_params"],
        "layers": len(layers),
        "blocks": len(blocks),
        "mean_layer_rel_error": float(np.mean(errs)) if errs else None,
        "mean_layer_rel_error_finetuned": float(np.mean(tuned)) if tuned else None,
        "block_rel_errors": [b["rel_error"] for b in blocks],
        "block_rel_errors_finetuned": [b["rel_error_finetuned"] for b in blocks],
        "quantize_seconds": float(sum(b["seconds"] for b in blocks)),
        "wall_seconds_last_attempt": seconds,
    }


def _load_complete(run: rd.RunDir, saved: dict[str, Any], log: bool) -> QuantizeResult:
    params = jq_io.load(run.file(rd.PARAMS_DIR))
    with open(run.file(rd.SUMMARY_FILE), encoding="utf-8") as f:
        summary = json.load(f)
    if log:
        print(f"jaxquant: the run in {run.path} is already complete; loaded its result")
    return QuantizeResult(params=params, summary=summary, layers=list(saved["layers"]), blocks=list(saved["blocks"]))


__all__ = ["QuantizeResult", "assemble", "quantize_model", "run_config"]
