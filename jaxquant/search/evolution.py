"""(1+λ) evolutionary search over per-layer levels under a bits budget (EvoPress,
Sieberling et al., 2024).

Each generation mutates the parent into λ offspring (``moves.mutate``) and selects in
stages: every stage scores its candidates on a few calibration windows (drawn afresh, as
in the paper, or fixed: ``EvolutionConfig.fresh_windows``) and keeps the best; the parent
joins the last stage, so a generation never loses the best point (elitism). Cheap early
stages weed out most offspring on little data; the last stage decides on more.

With ``holdout_windows``, some calibration windows are never scored during the climb;
at its end the climb's checkpoints (a few of its successive parents, the first included)
are scored on them and the best there is the result. A climb on few tokens fits its own
windows; the held-out choice stops it where held-out fitness stopped improving.

The search is deterministic for a seed (one ``numpy`` generator draws every mutation and
window), and resumable: after each generation its state (parent, fitness, generator
state, history, the parents so far) is written atomically to ``state_path``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxquant.atomic_files import atomic_write_json
from jaxquant.search.moves import BitsBudget, mutate, starting_point
from jaxquant.validate import require_positive_int, require_positive_ints

# score(choice, window_ids) -> fitness (lower is better)
Score = Callable[[np.ndarray, Sequence[int]], float]


@dataclasses.dataclass(frozen=True)
class EvolutionConfig:
    """Settings of the search.

    Attributes:
        generations: generations to run.
        offspring: λ, offspring per generation.
        survivors: candidates kept after each selection stage; the last is 1.
        windows: calibration windows drawn for each stage (same length as ``survivors``).
        initial_candidates: random starting points, of which the best on
            ``initial_windows`` windows becomes the first parent.
        initial_windows: windows to pick the first parent on.
        max_changes: most level steps in one mutation.
        fresh_windows: True (EvoPress): every stage draws its windows afresh each
            generation and the parent is scored again in the last stage. False: every
            stage uses the first windows of one fixed draw (nested sets), the parent keeps
            its score, and fitness values compare across generations: a hill climb on one
            calibration sample, far less noisy when each stage sees few tokens.
        holdout_windows: windows kept out of every selection stage, to choose among
            the climb's checkpoints at its end (0: the last parent is the result). With
            fixed windows they come from the windows the stages never draw, so the climb
            itself is the same as without them.
        holdout_checkpoints: the most checkpoints scored on the held-out windows: that
            many of the climb's distinct parents, evenly spaced, the first and last
            included.
        seed: seed of every random draw.
    """

    generations: int = 100
    offspring: int = 16
    survivors: tuple[int, ...] = (4, 1)
    windows: tuple[int, ...] = (1, 4)
    initial_candidates: int = 8
    initial_windows: int = 4
    max_changes: int = 10
    fresh_windows: bool = True
    holdout_windows: int = 0
    holdout_checkpoints: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive_ints(self, "generations", "offspring", "initial_candidates", "initial_windows", "max_changes",
                              "holdout_checkpoints")
        if not (isinstance(self.holdout_windows, int) and self.holdout_windows >= 0):
            raise ValueError(f"holdout_windows must be an int >= 0, got {self.holdout_windows!r}")
        object.__setattr__(self, "survivors", tuple(self.survivors))
        object.__setattr__(self, "windows", tuple(self.windows))
        if not self.survivors or len(self.survivors) != len(self.windows):
            raise ValueError(f"survivors {self.survivors} and windows {self.windows} must be non-empty and of one "
                             "length (one entry per selection stage)")
        if self.survivors[-1] != 1:
            raise ValueError(f"the last stage must keep one survivor, got survivors={self.survivors}")
        kept = (self.offspring, *self.survivors)
        if any(b > a or b < 1 for a, b in zip(kept, kept[1:])):
            raise ValueError(f"survivors {self.survivors} must shrink from offspring={self.offspring} down to 1")
        for w in self.windows:
            require_positive_int("windows", w)

    @property
    def most_windows(self) -> int:
        """The most windows any selection draws."""
        return max(self.initial_windows, *self.windows)

    def evaluations_per_generation(self) -> int:
        """Window evaluations of one generation (the parent joins the last stage, scored
        again only when the windows are fresh)."""
        counts = (self.offspring, *self.survivors[:-1])
        return sum(n * w for n, w in zip(counts, self.windows)) + (self.windows[-1] if self.fresh_windows else 0)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What ``evolve`` returns.

    Attributes:
        choice: the best assignment (level index per layer).
        fitness: its fitness in the last generation's final stage.
        history: one record per generation: ``generation``, ``fitness``,
            ``average_bits``, ``seconds`` (since the search started), ``window_evaluations``.
        seconds: the search's time, over every session of a resumed run.
        first_parent: the first parent's ``fitness`` and ``start``, its index in
            ``starts`` (None: a random starting point); empty for a state saved before
            this was recorded.
        holdout: with held-out windows, their ``window_ids`` and the scored
            ``checkpoints`` (``generation``: the one whose parent it is, 0 for the first
            parent; ``fitness`` on the climb's windows; ``holdout_fitness``), and the
            ``chosen_generation``; ``choice`` and ``fitness`` are then the chosen
            checkpoint's. Empty without held-out windows.
    """

    choice: np.ndarray
    fitness: float
    history: list[dict[str, Any]]
    seconds: float
    first_parent: dict[str, Any]
    holdout: dict[str, Any] = dataclasses.field(default_factory=dict)


def _fingerprint(budget: BitsBudget, config: EvolutionConfig, starts: list[np.ndarray]) -> str:
    digest = hashlib.sha256(budget.bits.tobytes())
    digest.update(budget.sizes.tobytes())
    for start in starts:
        digest.update(start.tobytes())
    # Not ``generations``: a finished search may be resumed for more generations. The
    # held-out settings only when used, so that states saved before they existed resume.
    unused = {"generations"} | ({"holdout_windows", "holdout_checkpoints"} if not config.holdout_windows else set())
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in unused}
    digest.update(json.dumps([budget.average, budget.tolerance, settings], sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


class _Windows:
    """The window ids of each selection: drawn afresh from the search's generator, or the
    first ``n`` of one fixed draw (nested sets, the same every generation); and the
    held-out ids that no selection draws."""

    def __init__(self, num_windows: int, config: EvolutionConfig) -> None:
        # Generators of their own: the fixed and held-out draws do not depend on the
        # search's state, and the fixed draw not on whether windows are held out.
        self.fixed = None if config.fresh_windows else [
            int(i) for i in np.random.default_rng([config.seed, 1]).choice(num_windows, size=config.most_windows,
                                                                             replace=False)]
        rest = np.setdiff1d(np.arange(num_windows), self.fixed or [])
        self.holdout = sorted(int(i) for i in np.random.default_rng([config.seed, 3]).choice(
            rest, size=config.holdout_windows, replace=False))
        self.pool = np.setdiff1d(np.arange(num_windows), self.holdout)

    def ids(self, n: int, rng: np.random.Generator) -> list[int]:
        if self.fixed is not None:
            return sorted(self.fixed[:n])
        # ``choice`` over the pool picks positions as over ``range(len(pool))``, so without
        # held-out windows the draws are those of earlier versions.
        return sorted(int(i) for i in rng.choice(self.pool, size=n, replace=False))


def _select(candidates: list[np.ndarray], known: list[float | None], n_keep: int, ids: list[int],
            score: Score) -> tuple[list[np.ndarray], list[float]]:
    """The ``n_keep`` best candidates on windows ``ids``, best first (``known``: fitness
    already measured on these windows, or None)."""
    fitness = [score(c, ids) if f is None else f for c, f in zip(candidates, known)]
    best = np.argsort(np.asarray(fitness), kind="stable")[:n_keep]
    return [candidates[i] for i in best], [fitness[i] for i in best]


def evolve(
    budget: BitsBudget,
    score: Score,
    num_windows: int,
    config: EvolutionConfig = EvolutionConfig(),
    *,
    starts: Sequence[np.ndarray] = (),
    state_path: str | os.PathLike | None = None,
    progress: bool = True,
    on_generation: Callable[[dict[str, Any]], None] | None = None,
) -> SearchResult:
    """Search for the assignment of lowest fitness within the bits budget.

    Args:
        budget: bits of every option, the target average and its tolerance.
        score: ``score(choice, window_ids) -> float``, lower is better (e.g. a
            ``KLFitness`` over ``DecodedOptions.tree(base, choice)``).
        num_windows: how many calibration windows ``score`` can be given (ids
            ``0 .. num_windows - 1``).
        config: the search's settings.
        starts: valid assignments that compete for the first parent beside the
            ``config.initial_candidates`` random ones (e.g. the best uniform level and
            the error-sum heuristic's assignment, each ``moves.fit_to_budget``).
        state_path: a JSON file for the search state; an existing one from the same
            search (same bits, budget and settings but ``generations``) is resumed, and
            the search stops at ``config.generations``.
        progress: a progress bar with the best fitness so far.
        on_generation: called with each generation's history record.

    Raises:
        ValueError: a stage wants more windows than there are, a start is not a valid
            assignment, or ``state_path`` holds the state of a different search.
    """
    if config.most_windows + config.holdout_windows > num_windows:
        raise ValueError(f"a selection stage draws {config.most_windows} windows and {config.holdout_windows} are "
                         f"held out, but num_windows={num_windows}")
    starts = [np.asarray(s, np.int64) for s in starts]
    layers, levels = budget.bits.shape
    for i, start in enumerate(starts):
        if start.shape != (layers,) or not np.all((start >= 0) & (start < levels)):
            raise ValueError(f"starts[{i}] must be {layers} level indices in 0..{levels - 1}, got {start.tolist()}")
        if not budget.is_valid(start):
            raise ValueError(f"starts[{i}] spends {budget.average_of(start):.4f} bits per weight, outside "
                             f"{budget.average - budget.tolerance:.4f}..{budget.average} (moves.fit_to_budget fits it)")
    fingerprint = _fingerprint(budget, config, starts)
    state = _read_state(state_path, fingerprint)
    rng = np.random.default_rng(config.seed)
    windows = _Windows(num_windows, config)
    if state is None:
        t0 = time.perf_counter()
        candidates = [starting_point(budget, rng) for _ in range(config.initial_candidates)] + starts
        # On fixed windows the first parent is scored on the last stage's, like every later one.
        first = config.initial_windows if config.fresh_windows else config.windows[-1]
        (parent,), (fitness,) = _select(candidates, [None] * len(candidates), 1, windows.ids(first, rng), score)
        winner = next(i for i, c in enumerate(candidates) if c is parent)
        state = {"fingerprint": fingerprint, "generation": 0, "parent": parent.tolist(), "fitness": fitness,
                 "seconds": time.perf_counter() - t0, "history": [],
                 "parents": [{"generation": 0, "fitness": fitness, "choice": parent.tolist()}],
                 "first_parent": {"fitness": fitness, "start": winner - config.initial_candidates
                                  if winner >= config.initial_candidates else None}}
    else:
        rng.bit_generator.state = state["rng"]
    parent = np.asarray(state["parent"], np.int64)

    from tqdm.auto import tqdm  # noqa: PLC0415

    bar = tqdm(total=config.generations, initial=state["generation"], desc="evolutionary search",
               disable=not progress, unit="gen")
    bar.set_postfix(fitness=f"{state['fitness']:.4g}")
    session_start, seconds_before = time.perf_counter(), state["seconds"]
    while state["generation"] < config.generations:
        candidates = [mutate(parent, budget, rng, config.max_changes) for _ in range(config.offspring)]
        known: list[float | None] = [None] * len(candidates)
        for stage, (n_keep, n_windows) in enumerate(zip(config.survivors, config.windows)):
            if stage == len(config.survivors) - 1:
                # Elitism: the parent joins the last stage, with its score when the windows are fixed.
                candidates = [*candidates, parent]
                known = [None] * (len(candidates) - 1) + [None if config.fresh_windows else state["fitness"]]
            candidates, fitness = _select(candidates, known, n_keep, windows.ids(n_windows, rng), score)
            known = [None] * len(candidates)
        parent = candidates[0]
        record = {"generation": state["generation"] + 1, "fitness": fitness[0],
                  "average_bits": budget.average_of(parent),
                  "seconds": seconds_before + time.perf_counter() - session_start,
                  "window_evaluations": config.evaluations_per_generation()}
        if parent.tolist() != state["parent"] and "parents" in state:
            state["parents"].append({"generation": record["generation"], "fitness": fitness[0],
                                     "choice": parent.tolist()})
        state.update(generation=record["generation"], parent=parent.tolist(), fitness=fitness[0],
                     seconds=record["seconds"], rng=rng.bit_generator.state)
        state["history"].append(record)
        if state_path is not None:
            atomic_write_json(state_path, state)
        if on_generation is not None:
            on_generation(record)
        bar.update(1)
        bar.set_postfix(fitness=f"{fitness[0]:.4g}")
    bar.close()
    result = SearchResult(choice=parent, fitness=float(state["fitness"]), history=list(state["history"]),
                          seconds=float(state["seconds"]), first_parent=dict(state.get("first_parent", {})))
    if not config.holdout_windows:
        return result
    if state.get("holdout", {}).get("generations") != state["generation"]:
        state["holdout"] = _score_checkpoints(state["parents"], windows.holdout, config.holdout_checkpoints, score)
        state["holdout"]["generations"] = state["generation"]
        if state_path is not None:
            atomic_write_json(state_path, state)
    holdout = {k: v for k, v in state["holdout"].items() if k != "generations"}
    chosen = next(p for p in state["parents"] if p["generation"] == holdout["chosen_generation"])
    return dataclasses.replace(result, choice=np.asarray(chosen["choice"], np.int64), fitness=float(chosen["fitness"]),
                               holdout=holdout)


def _score_checkpoints(parents: list[dict[str, Any]], window_ids: list[int], most: int,
                       score: Score) -> dict[str, Any]:
    """Score up to ``most`` of the climb's successive parents (evenly spaced, the first
    and last included) on the held-out windows; the lowest wins (the earliest on a tie)."""
    picks = sorted({int(round(x)) for x in np.linspace(0, len(parents) - 1, min(most, len(parents)))})
    checkpoints = [{"generation": parents[i]["generation"], "fitness": parents[i]["fitness"],
                    "holdout_fitness": score(np.asarray(parents[i]["choice"], np.int64), window_ids)}
                   for i in picks]
    best = min(checkpoints, key=lambda c: c["holdout_fitness"])
    return {"window_ids": window_ids, "checkpoints": checkpoints, "chosen_generation": best["generation"]}


def _read_state(path: str | os.PathLike | None, fingerprint: str) -> dict[str, Any] | None:
    if path is None or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    if state.get("fingerprint") != fingerprint:
        raise ValueError(f"{os.fspath(path)} holds the state of a different search (other levels, budget or "
                         "settings); remove it or choose another path")
    return state


__all__ = ["EvolutionConfig", "Score", "SearchResult", "evolve"]
