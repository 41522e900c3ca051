"""Weight residency: the tiers, their byte budgets, pins, eviction and statistics."""

from stream_run.cache.errors import BudgetError
from stream_run.cache.tiers import CacheConfig, Tier, TierStats, WeightCache

__all__ = ["BudgetError", "CacheConfig", "Tier", "TierStats", "WeightCache"]
