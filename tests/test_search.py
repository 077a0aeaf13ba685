"""Mixed-precision search: budget moves, baselines, the evolutionary search, the level
database, KL fitness, and the ``jaxquant search`` command end to end."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import log_softmax

import jaxquant as jq
from jaxquant.cli import main
from jaxquant.data import ByteTokenizer
from jaxquant.models import LlamaForCausalLM, ModelConfig, functional, load_quantized_dir, save_pretrained
from jaxquant.pipeline import build_level_database
from jaxquant.recipes_named import load_recipe_file, named_recipe
from jaxquant.search import (BitsBudget, DecodedOptions, EvolutionConfig, KLFitness, LevelDatabase, error_sum_greedy,
                             evolve, fit_to_budget, mutate, starting_point, uniform_within)
from jaxquant.select import flatten_with_paths

# Widths 64 and 128 take groups of 32; every RTN level then costs one bit of scales.
CFG = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  vocab_size=256, max_position_embeddings=64)
LEVELS = {"rtn-2-g32": named_recipe("rtn-2-g32"), "rtn-3-g32": named_recipe("rtn-3-g32"),
          "rtn-4-g32": named_recipe("rtn-4-g32")}


def _table(rng: np.random.Generator, layers: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Bits ``[layers, 4]`` of four levels: 2, 3 and 4 bits, and a 2-bit level with a
    fixed 1,500-bit codebook, dearer than 3 bits in small layers only."""
    sizes = rng.choice([512, 4096], size=layers).astype(np.int64)
    bits = np.stack([2.0 * sizes, 3.0 * sizes, 4.0 * sizes, 2.0 * sizes + 1500], axis=1)
    return bits, sizes


# ----------------------------------------------------------------------------- moves


def test_each_layer_orders_levels_by_its_own_bits(rng):
    bits, sizes = _table(rng)
    budget = BitsBudget(bits, sizes, average=3.0, tolerance=0.2)
    small, large = int(np.flatnonzero(sizes == 512)[0]), int(np.flatnonzero(sizes == 4096)[0])
    assert budget.order[small].tolist() == [0, 1, 2, 3]
    assert budget.order[large].tolist() == [0, 3, 1, 2]
    choice = np.zeros(len(sizes), np.int64)
    budget.step(choice, large, +1)
    assert choice[large] == 3
    budget.step(choice, large, +1)
    assert choice[large] == 1


def test_mutations_keep_the_budget_and_change_the_parent(rng):
    bits, sizes = _table(rng, layers=30)
    budget = BitsBudget(bits, sizes, average=2.9, tolerance=0.15)
    parent = starting_point(budget, rng)
    assert budget.is_valid(parent)
    for _ in range(300):
        child = mutate(parent, budget, rng, max_changes=10)
        assert budget.is_valid(child) and not np.array_equal(child, parent)
        assert 1 <= np.count_nonzero(child != parent) <= 10
        parent = child


def test_budget_errors_are_named(rng):
    bits, sizes = _table(rng)
    with pytest.raises(ValueError, match="below the cheapest assignment"):
        BitsBudget(bits, sizes, average=1.5, tolerance=0.1)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        BitsBudget(bits, sizes, average=3.0, tolerance=-1.0)
    # Two levels a whole bit apart in equal layers cannot land within 0.001 of 2.5 bits.
    coarse = BitsBudget(np.array([[2.0, 3.0]] * 3) * 8, np.full(3, 8), average=2.5, tolerance=0.001)
    with pytest.raises(RuntimeError, match="raise the tolerance"):
        mutate(np.array([0, 0, 1]), coarse, rng, attempts=50)


# ----------------------------------------------------------------------------- baselines


def test_error_sum_greedy_fills_the_budget_greedily(rng):
    bits, sizes = _table(rng)
    errors = rng.uniform(0.5, 1.0, size=(len(sizes), 1)) * np.array([1.0, 0.4, 0.1, 0.8])
    budget = BitsBudget(bits, sizes, average=3.0, tolerance=0.5)
    choice = error_sum_greedy(errors, budget)
    spent = budget.spent(choice)
    assert spent <= budget.total
    # No single move that still fits the budget would lower the error sum.
    for i, k in itertools.product(range(len(sizes)), range(4)):
        if errors[i, k] < errors[i, choice[i]]:
            assert spent - bits[i, choice[i]] + bits[i, k] > budget.total
    # With room for everything, every layer takes its least-error level.
    roomy = BitsBudget(bits, sizes, average=4.5, tolerance=4.0)
    assert error_sum_greedy(errors, roomy).tolist() == [2] * len(sizes)
    with pytest.raises(ValueError, match="non-finite"):
        error_sum_greedy(np.where(errors > 0.9, np.nan, errors), budget)


def test_uniform_levels_within_the_budget():
    # Uniform assignments spend 400, 600, 800 and 500 bits of a 600-bit budget.
    budget = BitsBudget(np.array([[200.0, 300.0, 400.0, 250.0]] * 2), np.array([100, 100]), average=3.0,
                        tolerance=0.5)
    assert uniform_within(budget) == [1, 3, 0]
    assert uniform_within(budget, slack=1.0) == [2, 1, 3, 0]


# ----------------------------------------------------------------------------- evolution


def _synthetic_score(rng: np.random.Generator, layers: int):
    """A fitness with a known structure: each layer's error falls with its bits at its own
    rate, plus a small window-dependent term (the noise of a calibration sample)."""
    rates = rng.uniform(0.1, 3.0, size=layers)
    noise = rng.normal(0.0, 0.01, size=64)

    def score(choice: np.ndarray, window_ids) -> float:
        level_bits = np.array([2.0, 3.0, 4.0, 2.0])[choice]
        return float(np.sum(rates * 2.0 ** -level_bits) + noise[list(window_ids)].mean())

    return score


def _problem(rng: np.random.Generator):
    """``(budget, score)``: 16 layers of ``_table`` at 3.0 ± 0.1 bits and their synthetic score."""
    bits, sizes = _table(rng, layers=16)
    return BitsBudget(bits, sizes, average=3.0, tolerance=0.1), _synthetic_score(rng, 16)


def _recorded(score):
    """``(calls, counted)``: ``counted`` scores as ``score`` does and appends each call's window ids to ``calls``."""
    calls = []

    def counted(choice, ids):
        calls.append(list(ids))
        return score(choice, ids)

    return calls, counted


def test_search_improves_on_its_start_and_repeats_for_a_seed(rng):
    budget, score = _problem(rng)
    config = EvolutionConfig(generations=40, offspring=8, survivors=(2, 1), windows=(2, 4), seed=5)
    first = evolve(budget, score, 64, config, progress=False)
    again = evolve(budget, score, 64, config, progress=False)
    assert np.array_equal(first.choice, again.choice)
    assert [h["fitness"] for h in first.history] == [h["fitness"] for h in again.history]
    start = starting_point(budget, np.random.default_rng(0))
    assert score(first.choice, range(64)) < score(start, range(64)) - 0.02
    assert budget.is_valid(first.choice)
    assert len(first.history) == 40 and first.history[-1]["generation"] == 40


def test_on_fixed_windows_the_fitness_never_rises(rng):
    budget, score = _problem(rng)
    calls, counted = _recorded(score)

    config = EvolutionConfig(generations=25, offspring=6, survivors=(2, 1), windows=(2, 5), fresh_windows=False, seed=2)
    result = evolve(budget, counted, 64, config, progress=False)
    fitness = [h["fitness"] for h in result.history]
    assert all(b <= a for a, b in zip(fitness, fitness[1:])) and fitness[-1] < fitness[0]
    assert fitness[-1] == pytest.approx(score(result.choice, calls[-1]))
    # Two window sets in all, nested; the parent is never scored twice on the same set.
    sets = {tuple(c) for c in calls}
    assert len(sets) == 2 and set(min(sets, key=len)) <= set(max(sets, key=len))
    assert len(calls) == config.initial_candidates + 25 * (6 + 2)


def test_given_starts_compete_for_the_first_parent(rng, tmp_path):
    budget, score = _problem(rng)
    # Uniform 4 bits spends too much: fit_to_budget steps random layers down until it is valid.
    fitted = fit_to_budget(np.full(16, 2), budget, np.random.default_rng(0))
    assert budget.is_valid(fitted) and np.any(fitted != 2)
    # The search's own result is a start that beats every random one.
    config = EvolutionConfig(generations=30, offspring=8, survivors=(2, 1), windows=(2, 4), fresh_windows=False,
                             seed=4)
    good = evolve(budget, score, 64, config, progress=False).choice
    short = EvolutionConfig(**{**vars(config), "generations": 3})
    result = evolve(budget, score, 64, short, starts=[fitted, good], state_path=tmp_path / "s.json", progress=False)
    assert result.first_parent["start"] == 1
    assert result.fitness <= result.first_parent["fitness"] == pytest.approx(score(good, sorted(
        np.random.default_rng([4, 1]).choice(64, size=4, replace=False).tolist())))
    plain = evolve(budget, score, 64, short, progress=False)
    assert plain.first_parent["start"] is None and plain.fitness > result.fitness
    # Other starts are another search; invalid ones are named.
    with pytest.raises(ValueError, match="state of a different search"):
        evolve(budget, score, 64, short, starts=[fitted], state_path=tmp_path / "s.json", progress=False)
    with pytest.raises(ValueError, match=r"starts\[0\] spends .* bits per weight, outside"):
        evolve(budget, score, 64, short, starts=[np.full(16, 2)], progress=False)
    with pytest.raises(ValueError, match=r"starts\[1\] must be 16 level indices in 0..3"):
        evolve(budget, score, 64, short, starts=[fitted, np.full(16, 4)], progress=False)


@pytest.mark.parametrize("fresh", [True, False])
def test_a_resumed_search_equals_an_uninterrupted_one(rng, tmp_path, fresh):
    budget, score = _problem(rng)
    config = EvolutionConfig(generations=12, offspring=6, survivors=(2, 1), windows=(1, 3), seed=1,
                             fresh_windows=fresh)
    whole = evolve(budget, score, 64, config, progress=False)
    state = tmp_path / "state.json"
    evolve(budget, score, 64, EvolutionConfig(**{**vars(config), "generations": 5}), state_path=state, progress=False)
    resumed = evolve(budget, score, 64, config, state_path=state, progress=False)
    assert np.array_equal(whole.choice, resumed.choice)
    assert [h["fitness"] for h in whole.history] == [h["fitness"] for h in resumed.history]
    other = EvolutionConfig(**{**vars(config), "offspring": 7})
    with pytest.raises(ValueError, match="state of a different search"):
        evolve(budget, score, 64, other, state_path=state, progress=False)


def test_held_out_windows_leave_a_fixed_window_climb_unchanged_and_choose_its_checkpoint(rng, tmp_path):
    budget, score = _problem(rng)
    calls, counted = _recorded(score)

    config = EvolutionConfig(generations=20, offspring=6, survivors=(2, 1), windows=(2, 5), fresh_windows=False,
                             seed=3)
    plain = evolve(budget, score, 64, config, progress=False)
    held = EvolutionConfig(**{**vars(config), "holdout_windows": 40, "holdout_checkpoints": 4})
    state = tmp_path / "state.json"
    result = evolve(budget, counted, 64, held, state_path=state, progress=False)
    holdout = result.holdout
    assert [h["fitness"] for h in result.history] == [h["fitness"] for h in plain.history]
    # The held-out windows are never scored during the climb, only at its end.
    climb = calls[:-len(holdout["checkpoints"])]
    assert len(holdout["window_ids"]) == 40 and not set(holdout["window_ids"]) & {i for c in climb for i in c}
    assert calls[-len(holdout["checkpoints"]):] == [holdout["window_ids"]] * len(holdout["checkpoints"])
    # Up to 4 checkpoints, the first parent and the last included; the best held out wins.
    generations = [c["generation"] for c in holdout["checkpoints"]]
    assert 2 <= len(generations) <= 4 and generations[0] == 0 and generations == sorted(generations)
    last = max(g for g, (a, b) in enumerate(zip([None] + result.history, result.history), start=1)
               if a is None or b["fitness"] != a["fitness"])
    assert generations[-1] == last
    best = min(holdout["checkpoints"], key=lambda c: c["holdout_fitness"])
    assert holdout["chosen_generation"] == best["generation"]
    assert score(result.choice, holdout["window_ids"]) == pytest.approx(best["holdout_fitness"])
    # A resumed finished search does not score again.
    calls.clear()
    again = evolve(budget, counted, 64, held, state_path=state, progress=False)
    assert calls == [] and np.array_equal(again.choice, result.choice) and again.holdout == holdout


def test_held_out_choice_stops_a_climb_that_fits_its_own_windows(rng):
    budget, true_loss = _problem(rng)
    config = EvolutionConfig(generations=15, offspring=6, survivors=(2, 1), windows=(2, 4), fresh_windows=False,
                             seed=1, holdout_windows=8)
    searched = set(np.random.default_rng([1, 1]).choice(64, size=4, replace=False).tolist())

    def misleading(choice, ids):
        # The climb's own windows reward exactly what the held-out ones punish.
        sign = -1.0 if set(ids) <= searched else 1.0
        return sign * true_loss(choice, range(64))

    result = evolve(budget, misleading, 64, config, progress=False)
    plain = evolve(budget, misleading, 64, EvolutionConfig(**{**vars(config), "holdout_windows": 0}), progress=False)
    assert result.holdout["chosen_generation"] == 0
    assert true_loss(result.choice, range(64)) < true_loss(plain.choice, range(64))


def test_fresh_windows_never_draw_held_out_ones_and_draw_as_before_without_them(rng):
    budget, score = _problem(rng)
    calls, counted = _recorded(score)

    config = EvolutionConfig(generations=6, offspring=4, survivors=(2, 1), windows=(1, 3), seed=2,
                             holdout_windows=50, holdout_checkpoints=3)
    result = evolve(budget, counted, 64, config, progress=False)
    drawn = {i for c in calls[:-len(result.holdout["checkpoints"])] for i in c}
    assert drawn and not drawn & set(result.holdout["window_ids"]) and len(result.holdout["window_ids"]) == 50
    # Without held-out windows the draws are a plain choice over range(num_windows).
    from jaxquant.search.evolution import _Windows
    windows = _Windows(64, EvolutionConfig(seed=2))
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    assert windows.ids(5, a) == sorted(int(i) for i in b.choice(64, size=5, replace=False))
    with pytest.raises(ValueError, match="61 are held out, but num_windows=64"):
        evolve(budget, score, 64, EvolutionConfig(**{**vars(config), "holdout_windows": 61}), progress=False)


@pytest.mark.parametrize("kwargs, said", [
    ({"survivors": (2, 2), "windows": (1, 2)}, "last stage must keep one survivor"),
    ({"survivors": (4, 1), "windows": (1,)}, "one length"),
    ({"offspring": 2, "survivors": (4, 1)}, "must shrink"),
    ({"generations": 0}, "generations=0 must be a positive int"),
    ({"windows": (1, 0), "survivors": (4, 1)}, "windows=0 must be a positive int"),
    ({"holdout_windows": -1}, "holdout_windows must be an int >= 0"),
    ({"holdout_checkpoints": 0}, "holdout_checkpoints=0 must be a positive int"),
])
def test_bad_search_settings_are_named(kwargs, said):
    with pytest.raises(ValueError, match=said):
        EvolutionConfig(**kwargs)


# ----------------------------------------------------------------------------- database and fitness


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def levels(model, tmp_path_factory):
    tokens = np.random.default_rng(0).integers(0, 256, (4, 32)).astype(np.int32)
    path = tmp_path_factory.mktemp("database")
    database, report = build_level_database(model, tokens, LEVELS, path, key=jax.random.key(0), progress=False)
    return path, tokens, database, report


def test_database_holds_every_layer_at_every_level_with_honest_bits(model, levels):
    path, tokens, database, report = levels
    assert database.level_names == tuple(LEVELS) and database.num_layers == 14
    assert [r["reused"] for r in report] == [False] * 3
    _, float_params = functional(model)
    for k, name in enumerate(database.level_names):
        level_tree = jq.io.load(path / "levels" / name / "params")
        assert database.average_bits(database.uniform(k)) == pytest.approx(jq.tree_bits(level_tree)["bits_per_weight"])
        assembled = dict(flatten_with_paths(database.assemble(float_params, database.uniform(name))))
        for p, leaf in flatten_with_paths(level_tree):
            if jq.is_quantized(leaf):
                chex_equal = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(leaf), jax.tree.leaves(assembled[p]))]
                assert all(chex_equal)
    assert database.errors.shape == (14, 3) and np.all(database.errors[:, 0] > database.errors[:, 2])
    # The same options read back from the levels' checkpoints.
    loaded = LevelDatabase.load({name: path / "levels" / name / "params" for name in LEVELS})
    assert loaded.layer_paths == database.layer_paths
    np.testing.assert_array_equal(loaded.bits, database.bits)
    # A second build loads the finished runs instead of quantizing again.
    again, report2 = build_level_database(model, tokens, LEVELS, path, key=jax.random.key(0), progress=False)
    assert [r["reused"] for r in report2] == [True] * 3
    np.testing.assert_array_equal(again.bits, database.bits)


def test_decoded_candidates_equal_dequantized_assemblies(model, levels):
    database = levels[2]
    _, float_params = functional(model)
    choice = np.random.default_rng(1).integers(0, 3, database.num_layers)
    dense = DecodedOptions(database).tree(float_params, choice)
    want = jq.dequantize(database.assemble(float_params, choice))
    for (p, a), (_, b) in zip(flatten_with_paths(dense), flatten_with_paths(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
    with pytest.raises(ValueError, match="outside 0..2"):
        database.average_bits(np.full(database.num_layers, 3))


def _kl_reference(apply_fn, teacher, student, windows) -> float:
    t = log_softmax(np.asarray(apply_fn(teacher, jnp.asarray(windows)), np.float64), axis=-1)
    s = log_softmax(np.asarray(apply_fn(student, jnp.asarray(windows)), np.float64), axis=-1)
    return float(np.mean(np.sum(np.exp(t) * (t - s), axis=-1)))


def test_kl_fitness_matches_a_reference_and_compiles_once(model, levels):
    database = levels[2]
    apply_fn, float_params = functional(model)
    windows = np.random.default_rng(2).integers(0, 256, (5, 16)).astype(np.int32)
    options = DecodedOptions(database)
    fitness = KLFitness(apply_fn, float_params, windows, batch_size=2)
    assert fitness(float_params, [0, 1, 2]) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(3)
    traces_before = fitness.traces
    for _ in range(3):
        choice = rng.integers(0, 3, database.num_layers)
        params = options.tree(float_params, choice)
        got = fitness(params, [4, 0, 3])                 # three windows: one padded batch
        assert got == pytest.approx(_kl_reference(apply_fn, float_params, params, windows[[4, 0, 3]]), rel=1e-4)
    assert fitness.traces - traces_before <= 1 and fitness.traces == 1
    # The 2-bit level is further from the teacher than the 4-bit one.
    far = fitness(options.tree(float_params, database.uniform(0)), range(5))
    near = fitness(options.tree(float_params, database.uniform(2)), range(5))
    assert far > near > 0
    with pytest.raises(ValueError, match="window_ids"):
        fitness(float_params, [5])


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def search_db(tmp_path_factory):
    """One level database for every search of the command's tests."""
    return tmp_path_factory.mktemp("search-db")


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    save_pretrained(model, path, extra_files={"jaxquant_tokenizer.json": ByteTokenizer().note()})
    text = path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 40)
    return path, text


def _search(model_dir, out, database, *extra):
    path, text = model_dir
    return main(["search", str(path), "--budget", "3.5", "--levels", ",".join(LEVELS), "--out", str(out),
                 "--database", str(database), "--calib", str(text), "--nsamples", "4", "--seqlen", "32",
                 "--fitness-windows", "6", "--fitness-seqlen", "16", "--generations", "4", "--offspring", "4",
                 "--survivors", "2,1", "--stage-windows", "1,2", "--initial-candidates", "2", "--tolerance", "0.15",
                 "--eval", str(text), "--eval-windows", "4", "--no-progress", *extra])


def test_search_command_writes_a_recipe_a_model_and_a_summary(model_dir, search_db, tmp_path, capsys):
    assert _search(model_dir, tmp_path / "a", search_db) == 0
    out = capsys.readouterr().out
    assert "searched 4 generations" in out and "error-sum greedy" in out
    summary = json.loads((tmp_path / "a" / "search.json").read_text())
    assert 3.35 <= summary["average_bits"] <= 3.5
    assert len(summary["search"]["history"]) == 4 and summary["database"]["build_seconds"] > 0
    names = [r["name"] for r in summary["perplexity"]["rows"]]
    assert names == ["evopress", "uniform rtn-2-g32", "error-sum greedy"]
    assert summary["search"]["holdout"] == {}  # no held-out windows: the last parent
    assert all(np.isfinite(r["ppl"]) for r in summary["perplexity"]["rows"])
    # The recipe file assigns each layer the level the search chose ...
    pairs = load_recipe_file(tmp_path / "a" / "recipe.json")
    assert len(pairs) == 14
    for pattern, recipe in pairs:
        path = pattern.strip("^$").replace("\\", "")
        assert recipe == LEVELS[summary["assignment"][path]]
    # ... and the assembled model holds exactly the database's arrays.
    _, params = load_quantized_dir(tmp_path / "a" / "model")
    quantized = {p: leaf for p, leaf in flatten_with_paths(params) if jq.is_quantized(leaf)}
    assert sorted(quantized) == sorted(summary["assignment"])
    for p, leaf in quantized.items():
        level_params = dict(flatten_with_paths(jq.io.load(search_db / "levels" / summary["assignment"][p] / "params")))
        for a, b in zip(jax.tree.leaves(leaf), jax.tree.leaves(level_params[p])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The same seed gives the same assignment, from the shared database.
    assert _search(model_dir, tmp_path / "b", search_db) == 0
    again = json.loads((tmp_path / "b" / "search.json").read_text())
    assert again["assignment"] == summary["assignment"]
    assert all(r["reused"] for r in again["levels"])
    # --resume extends the finished search from its saved state.
    assert _search(model_dir, tmp_path / "a", search_db, "--resume", "--generations", "6") == 0
    extended = json.loads((tmp_path / "a" / "search.json").read_text())
    assert [h["fitness"] for h in extended["search"]["history"][:4]] == [h["fitness"] for h in
                                                                         summary["search"]["history"]]
    assert len(extended["search"]["history"]) == 6
    # jaxquant quantize --recipe FILE quantizes each layer with its chosen recipe.
    path, text = model_dir
    assert main(["quantize", str(path), "--recipe", str(tmp_path / "a" / "recipe.json"), "--calib", str(text),
                 "--nsamples", "4", "--seqlen", "32", "--out", str(tmp_path / "q"), "--eval", "none",
                 "--no-progress"]) == 0
    layers = [json.loads(line) for line in (tmp_path / "q" / "layers.jsonl").read_text().splitlines()]
    assert {r["name"]: r["bits"] for r in layers} == pytest.approx(
        {p: float(LEVELS[name].bits) + 1.0 for p, name in summary["assignment"].items()})


def test_level_names_are_plain_file_names(tmp_path):
    assert jq.pipeline.level_dir(tmp_path, "gptq-3-g64-rot").endswith("levels/gptq-3-g64-rot")
    for bad in ("../x", "a/b", ""):
        with pytest.raises(ValueError, match="letters, digits"):
            jq.pipeline.level_dir(tmp_path, bad)


def test_search_command_errors(model_dir, search_db, tmp_path, capsys):
    path, text = model_dir
    assert _search(model_dir, tmp_path / "a", search_db, "--budget", "1.0") == 1
    assert "below the cheapest assignment" in capsys.readouterr().err
    assert main(["search", str(path), "--budget", "3", "--levels", "rtn-2-g32", "--out", str(tmp_path / "b")]) == 1
    assert "at least two levels" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "something").write_text("x")
    assert _search(model_dir, tmp_path / "c", search_db) == 1
    assert "holds no search" in capsys.readouterr().err
    assert _search(model_dir, tmp_path / "d", search_db, "--generations", "1") == 0
    assert _search(model_dir, tmp_path / "d", search_db, "--generations", "1") == 1
    assert "pass --resume" in capsys.readouterr().err


def test_search_command_starts_from_the_heuristics_and_chooses_on_held_out_windows(model_dir, search_db, tmp_path,
                                                                                    capsys):
    assert _search(model_dir, tmp_path / "h", search_db, "--start", "heuristics", "--fixed-windows",
                   "--initial-candidates", "1", "--holdout-windows", "4") == 0
    assert "held-out windows (generation: fitness)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "h" / "search.json").read_text())
    first = summary["search"]["first_parent"]
    assert first["start"] in (None, 0, 1)
    # On fixed windows no generation scores worse than the first parent.
    assert max(h["fitness"] for h in summary["search"]["history"]) <= first["fitness"]
    assert summary["arguments"]["start"] == "heuristics"
    holdout = summary["search"]["holdout"]
    assert len(holdout["window_ids"]) == 4 and holdout["checkpoints"][0]["generation"] == 0
    chosen = next(c for c in holdout["checkpoints"] if c["generation"] == holdout["chosen_generation"])
    assert chosen["holdout_fitness"] == min(c["holdout_fitness"] for c in holdout["checkpoints"])
    assert _search(model_dir, tmp_path / "x", search_db, "--fixed-windows", "--holdout-windows", "5") == 1
    assert "--holdout-windows 5 plus the 2 windows a selection stage draws must not exceed --fitness-windows 6" in \
        capsys.readouterr().err
