"""Weight residency: the tiers, their byte budgets, pins, eviction, statistics, and the
residency policies."""

from stream_run.cache.errors import BudgetError
from stream_run.cache.policy import POLICIES, CyclicPolicy, LRUPolicy, PassShape, ResidencyPolicy
from stream_run.cache.tiers import CacheConfig, Tier, TierStats, WeightCache

__all__ = ["POLICIES", "BudgetError", "CacheConfig", "CyclicPolicy", "LRUPolicy", "PassShape",
           "ResidencyPolicy", "Tier", "TierStats", "WeightCache"]
