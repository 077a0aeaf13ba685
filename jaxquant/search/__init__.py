"""Mixed precision by search: per-layer levels under a global bits budget (EvoPress).

``database`` holds every selected layer quantized at every level with its honest bits;
``moves`` steps between assignments within a budget; ``fitness`` scores a candidate by
its KL divergence to the full-precision model; ``evolution`` runs the (1+λ) search;
``baselines`` builds the assignments a search is compared with. Building a database from
a model (one quantization run per level) is ``jaxquant.pipeline.levels``.

Names are imported on first use (``jaxquant.lazy_exports``).
"""

from typing import TYPE_CHECKING

from jaxquant.lazy_exports import install_lazy_exports

__all__ = install_lazy_exports(__name__)

if TYPE_CHECKING:  # the exports: what type checkers see, and what install_lazy_exports reads
    from jaxquant.search.baselines import error_sum_greedy, uniform_within
    from jaxquant.search.database import DecodedOptions, LevelDatabase, level_errors
    from jaxquant.search.evolution import EvolutionConfig, SearchResult, evolve
    from jaxquant.search.fitness import KLFitness
    from jaxquant.search.moves import BitsBudget, fill_up, fit_to_budget, mutate, starting_point
