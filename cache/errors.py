"""Errors of the weight cache."""

from __future__ import annotations


class BudgetError(RuntimeError):
    """A unit cannot be made resident within the tier's byte budget."""
