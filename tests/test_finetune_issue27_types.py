"""Fine-tuning through the protocol on the rotated, Kashin and PVQ arrays: block
fine-tuning tunes the continuous part and keeps codes and rotations; the V step re-encodes
toward a target within the trust ratio."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import ops
from jaxquant.finetune import block as fb
from jaxquant.methods import reencoder_for
from tests.array_checks import bounded_v_step_ratio

RECIPES = {
    "pvq_rotated": jq.PVQ(pulses=6),
    "kashin": jq.Kashin(u_bits=1, v_bits=2),
    "gptq_rotated": jq.GPTQ(bits=3, group_size=16, rotate=True),
}


def _problem(seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((32, 64)) / 8).astype(np.float32)
    x = (rng.standard_normal((16, 8, 64)) * np.linspace(0.3, 2.0, 64)).astype(np.float32)
    h = (x.reshape(-1, 64).T @ x.reshape(-1, 64) / 128).astype(np.float32)
    return w, x, h


def _discrete(q):
    return [np.asarray(a) for a in jax.tree.leaves(jq.split(q)[1])]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_block_finetuning_lowers_the_error_and_keeps_codes(name):
    w, x, h = _problem(0)
    q = {"w": jq.quantize_weight(jnp.asarray(w.T), jnp.asarray(h), RECIPES[name], layout="in_out")}
    y = x @ w.T

    def fn(p, x):
        return ops.matmul(x, p["w"])

    before = fb.relative_error(fn, q, x, y)
    config = fb.BlockFinetuneConfig(lr=1e-3, batch_size=4, max_epochs=6, holdout=0.25, patience=3)
    tuned, _ = fb.finetune_block(fn, q, x, y, config, key=jax.random.key(0))
    assert fb.relative_error(fn, tuned, x, y) < before
    for a, b in zip(_discrete(tuned), _discrete(q), strict=True):  # codes, signs: unchanged
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_v_step_reencodes_toward_the_target_within_the_trust_ratio(name):
    w, _, h = _problem(1)
    q = jq.quantize_weight(jnp.asarray(w), jnp.asarray(h), RECIPES[name])
    reencoder = reencoder_for(q)
    n = reencoder.num_groups(q)
    w_hat = np.asarray(q.decode_out_in())
    target = jnp.asarray(0.5 * w_hat)
    distances = reencoder.group_distances(q, target)
    assert distances.shape == (n,)
    np.testing.assert_allclose(float(jnp.sum(distances)), float(np.sum((w_hat - 0.5 * w_hat) ** 2)), rtol=1e-4)
    everything = jnp.arange(n, dtype=jnp.int32)
    free = reencoder.reencode(q, target, everything, beam_size=1, trust_ratio=None, force=False)
    moved = np.asarray(free.decode_out_in())
    assert np.sum((moved - 0.5 * w_hat) ** 2) < np.sum((w_hat - 0.5 * w_hat) ** 2)
    bounded = reencoder.reencode(q, target, everything, beam_size=1, trust_ratio=0.3, force=False)
    ratio = np.linalg.norm(np.asarray(bounded.decode_out_in()) - w_hat) / np.linalg.norm(w_hat)
    assert 0 < ratio <= 0.3 * (1 + 1e-5)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_pv_tuning_step_runs_and_is_bounded(name):
    w, _, h = _problem(2)
    q = jq.quantize_weight(jnp.asarray(w), jnp.asarray(h), RECIPES[name])
    assert 0 < bounded_v_step_ratio(q, 0.5) <= 0.5 * (1 + 1e-5)
