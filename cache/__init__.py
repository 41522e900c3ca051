"""Weight residency: the tiers, their byte budgets, pins, eviction and statistics."""

from cache.errors import BudgetError
from cache.tiers import CacheConfig, Tier, TierStats, WeightCache

__all__ = ["BudgetError", "CacheConfig", "Tier", "TierStats", "WeightCache"]
