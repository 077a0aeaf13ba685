"""``jaxquant finetune``: runs, writes a loadable quantized model, and resumes."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant import io
from jaxquant.cli import main
from jaxquant.data import BYTE_TOKENIZER_FILE
from jaxquant.models.quantized_dirs import load_quantized_dir
from jaxquant.models import LlamaForCausalLM, ModelConfig, functional, save_pretrained


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pvcli")
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                      max_position_embeddings=64, vocab_size=256)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    teacher = str(root / "teacher")
    save_pretrained(model, teacher)
    with open(os.path.join(teacher, BYTE_TOKENIZER_FILE), "w") as f:
        json.dump({"type": "bytes"}, f)
    _, params = functional(model)
    quant = str(root / "quant")
    os.makedirs(quant)
    for name in ("config.json", BYTE_TOKENIZER_FILE):
        with open(os.path.join(teacher, name)) as src, open(os.path.join(quant, name), "w") as dst:
            dst.write(src.read())
    io.save(os.path.join(quant, "params"), jq.quantize(params, None, jq.RTN(bits=2, group_size=16,
                                                                           param_dtype="float32")))
    return root, teacher, quant


def _args(quant, teacher, out, steps, *extra):
    return ["finetune", quant, "--teacher", teacher, "--out", out, "--steps", str(steps), "--batch-size", "4",
            "--seqlen", "32", "--eval-every", "2", "--eval-windows", "4", "--save-every", "2", "--no-progress",
            "--p-lr", "1e-3", "--v-lr", "1e-3", "--update-fraction", "0.05", *extra]


@pytest.mark.slow
def test_finetune_writes_model_and_resumes(dirs, capsys):
    root, teacher, quant = dirs
    full, part = str(root / "full"), str(root / "part")
    assert main(_args(quant, teacher, full, 4)) == 0
    report = json.load(open(os.path.join(full, "finetune.json")))
    steps = [h["step"] for h in report["history"]]
    assert steps == [0, 2, 4]
    assert all(np.isfinite(h["val_ppl"]) for h in report["history"])
    config, tuned = load_quantized_dir(full)
    assert config.hidden_size == 32
    assert jax.tree.structure(tuned) == jax.tree.structure(load_quantized_dir(quant)[1])
    # Only the model stays: the optimizer state is removed unless kept.
    assert not os.path.exists(os.path.join(full, "resume")) and not os.path.exists(os.path.join(full, "history.json"))
    # 2 steps, then resume to 4: the same parameters as the uninterrupted run.
    assert main(_args(quant, teacher, part, 2, "--keep-resume")) == 0
    assert os.path.isdir(os.path.join(part, "resume"))
    assert main(_args(quant, teacher, part, 4, "--resume")) == 0
    _, resumed = load_quantized_dir(part)
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    said = capsys.readouterr().out
    assert "validation perplexity" in said
    # --no-progress still says how the run goes: a line per tenth of the steps, with the
    # validation perplexity where it was measured.
    assert "step 3/4: kl " in said and "step 4/4: kl " in said
    assert [line.split(":")[0] for line in said.splitlines() if line.startswith("step ")][:4] == [
        "step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert any(line.startswith("step 2/4: kl ") and "validation perplexity" in line for line in said.splitlines())


def test_finetune_flag_defaults_are_the_library_defaults():
    """The command's defaults are DistillConfig's (the one place they are decided)."""
    from jaxquant.cli import build_parser  # noqa: PLC0415
    from jaxquant.cli.finetune import distill_config  # noqa: PLC0415
    from jaxquant.finetune.distillation import DistillConfig  # noqa: PLC0415

    args = build_parser().parse_args(["finetune", "q", "--teacher", "t", "--out", "o"])
    assert distill_config(args) == DistillConfig()


def test_finetune_bad_arguments(dirs, capsys):
    root, teacher, quant = dirs
    assert main(_args(quant, teacher, str(root / "bad"), 0)) == 1
    assert "--steps 0 must be a positive int" in capsys.readouterr().err
    assert main(_args(quant, teacher, str(root / "bad3"), 2, "--buffer-decay", "1.5")) == 1
    assert "--buffer-decay 1.5 must be in [0, 1]" in capsys.readouterr().err
    assert main(_args(quant, teacher, str(root / "bad4"), 2, "--mode", "ste", "--force-update")) == 1
    assert "--force-update True is a PV V step; --mode 'ste'" in capsys.readouterr().err
    assert main(_args(quant, teacher, str(root / "bad5"), 2, "--trust-ratio", "-0.1")) == 1
    assert "--trust-ratio -0.1 must be >= 0" in capsys.readouterr().err
    assert main(_args(quant, teacher, str(root / "bad6"), 2, "--update-fraction", "1.5")) == 1
    assert "--update-fraction 1.5 must be in (0, 1]" in capsys.readouterr().err
    assert main(_args(quant, teacher, str(root / "bad8"), 2, "--v-beta1", "1")) == 1
    assert "--v-beta1 1.0 must be in [0, 1)" in capsys.readouterr().err
    assert main(_args(quant, teacher, str(root / "bad2"), 2, "--resume")) == 1
    assert "no checkpoint" in capsys.readouterr().err
    # One token more than the model's context is refused.
    assert main(_args(quant, teacher, str(root / "bad9"), 2, "--seqlen", "65")) == 1
    assert "--seqlen 65 exceeds the model's context of 64" in capsys.readouterr().err


def test_finetune_force_update_reaches_the_tuner(dirs):
    """A V-step rate far too small to move any code to its nearest grid point: only the
    forced update changes codes, so the flag must reach ``pv_tuning``."""
    root, teacher, quant = dirs
    common = ("--v-lr", "1e-9", "--p-lr", "0", "--buffer-decay", "1", "--trust-ratio", "0.5")
    plain, forced = str(root / "plain"), str(root / "forced")
    assert main(_args(quant, teacher, plain, 2, *common)) == 0
    assert main(_args(quant, teacher, forced, 2, *common, "--force-update")) == 0

    def codes(path):
        leaves = jax.tree.leaves(load_quantized_dir(path)[1], is_leaf=jq.is_quantized)
        return np.concatenate([np.asarray(x.codes).ravel() for x in leaves if jq.is_quantized(x)])

    start = codes(quant)
    assert np.array_equal(codes(plain), start)
    assert np.mean(codes(forced) != start) > 0


@pytest.mark.slow
def test_finetune_v_step_defaults_reach_the_tuner(dirs, monkeypatch):
    """The measured V-step defaults (benchmarks/results/pv_vs_straight_through.md) reach ``pv_tuning``, and
    ``--trust-ratio 0`` turns the bound off rather than passing a zero bound."""
    from jaxquant.finetune import pv  # noqa: PLC0415

    root, teacher, quant = dirs
    seen = []
    real = pv.pv_tuning

    optimizers = []
    full_run = [True]  # the first command runs through; the others stop once the tuner is built

    class Built(Exception):
        pass

    def recording(*args, **kwargs):
        seen.append(args[2])  # the VStep
        optimizers.append(args[:2])
        if not full_run[0]:
            raise Built
        return real(*args, **kwargs)

    monkeypatch.setattr(pv, "pv_tuning", recording)
    base = ["finetune", quant, "--teacher", teacher, "--steps", "1", "--batch-size", "4", "--seqlen", "32",
            "--eval-windows", "2", "--no-progress"]
    assert main([*base, "--out", str(root / "defaults")]) == 0
    full_run[0] = False
    for extra in (["--trust-ratio", "0"], ["--v-beta1", "0.9", "--mu-dtype", "float32"]):
        with pytest.raises(Built):
            main([*base, "--out", str(root / "settings"), *extra, "--debug"])
    assert seen[0] == pv.VStep(mode="pv", update_fraction=0.03, trust_ratio=0.005, beam_size=8, buffer_decay=0.0)
    assert seen[1].trust_ratio is None
    # By default the V optimizer keeps no first moment for the buffers and the P step's is
    # bfloat16 (benchmarks/protocols/lean_v_optimizer.md); the earlier setting stays reachable.
    w = {"w": jnp.zeros((2, 3), jnp.float32)}
    p_opt, v_opt = optimizers[0]
    assert optax.tree_utils.tree_get(p_opt.init(w), "mu")["w"].dtype == jnp.bfloat16
    assert optax.tree_utils.tree_get(v_opt.init(w), "mu") is None
    assert optax.tree_utils.tree_get(optimizers[2][1].init(w), "mu")["w"].dtype == jnp.float32
    settings = json.load(open(os.path.join(root / "defaults", "finetune.json")))["settings"]
    assert settings["v_lr"] == 1e-3
