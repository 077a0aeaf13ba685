"""The resumable distillation loop: a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.finetune import losses
from jaxquant.finetune.distillation import DistillConfig, distill
from jaxquant.finetune.pv import VStep
from jaxquant.models import LlamaForCausalLM, ModelConfig, functional
from jaxquant.qarray import flatten_by_path

CFG = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
                  vocab_size=64, max_position_embeddings=64)
SETTINGS = DistillConfig(steps=5, batch_size=4, seqlen=32, p_lr=1e-3, v_lr=1e-2, mu_dtype="float32",
                         v_step=VStep(update_fraction=0.1, beam_size=2), eval_every=2, save_every=2)


@pytest.fixture(scope="module")
def problem():
    apply_fn, teacher = functional(LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)))
    qparams = jq.quantize(teacher, None, jq.RTN(bits=2, group_size=16))
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, size=4096).astype(np.int32)

    def loss_fn(p, t, x):
        return losses.distillation_loss(apply_fn, apply_fn, t)(p, x)

    held_out = tokens[:128].reshape(4, 32)
    evaluate = jax.jit(lambda q: loss_fn(jq.dequantize(q), teacher, held_out))  # one program, not one per op

    def eval_fn(q):
        return float(evaluate(q))

    return qparams, teacher, tokens, loss_fn, eval_fn


def _codes(tree):
    return {p: np.asarray(leaf.codes) for p, leaf in flatten_by_path(tree)[0] if jq.is_quantized(leaf)}


@pytest.mark.slow
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(problem, tmp_path):
    qparams, teacher, tokens, loss_fn, eval_fn = problem
    whole = distill(qparams, teacher, tokens, SETTINGS, loss_fn, eval_fn=eval_fn)
    assert len(whole.losses) == 5 and [h["step"] for h in whole.history] == [0, 2, 4, 5]
    assert any((a != b).any() for a, b in zip(_codes(whole.params).values(), _codes(qparams).values()))

    def stop_after_three(done, _params):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(qparams, teacher, tokens, SETTINGS, loss_fn, eval_fn=eval_fn, out_dir=tmp_path,
                on_step=stop_after_three)
    assert (tmp_path / "resume").is_dir()  # the checkpoint of step 2
    resumed = distill(qparams, teacher, tokens, SETTINGS, loss_fn, eval_fn=eval_fn, out_dir=tmp_path, resume=True)
    assert len(resumed.losses) == 3  # steps 3 to 5
    np.testing.assert_allclose(resumed.losses, whole.losses[2:], rtol=1e-6)
    for path, codes in _codes(whole.params).items():
        np.testing.assert_array_equal(_codes(resumed.params)[path], codes, err_msg=path)
    assert [h["step"] for h in resumed.history] == [0, 2, 4, 5]
    assert not (tmp_path / "resume").exists()  # removed at the end unless keep_resume


def test_the_caller_keeps_its_parameters_unless_it_donates_them(problem):
    qparams, teacher, tokens, loss_fn, _ = problem
    before = jax.tree.map(np.asarray, qparams)
    distill(qparams, teacher, tokens, DistillConfig(steps=1, batch_size=4, seqlen=32), loss_fn)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, qparams), before)


def test_the_package_name_is_the_function():
    from jaxquant import finetune  # noqa: PLC0415

    assert finetune.distill is distill and finetune.DistillConfig is DistillConfig


def test_bad_settings_name_the_field(problem, tmp_path):
    for kwargs, field in ((dict(steps=0), "steps"), (dict(seqlen=1), "seqlen"), (dict(v_beta1=1.0), "v_beta1"),
                          (dict(batch_size=6, micro_batches=4), "micro_batches"), (dict(mu_dtype="int8"), "mu_dtype"),
                          (dict(eval_every=-1), "eval_every"), (dict(p_lr=-1.0), "p_lr")):
        with pytest.raises(ValueError, match=field):
            DistillConfig(**kwargs)
    qparams, teacher, tokens, loss_fn, _ = problem
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        distill(qparams, teacher, tokens, SETTINGS, loss_fn, out_dir=tmp_path, resume=True)
