"""Transitional alias: the fit cache lives in :mod:`latentlab.directions` (one home per concept)."""

from latentlab.directions import cache_key, fitted_direction
from latentlab.directions import clear_cache as clear
from latentlab.directions import describe_fit as describe

__all__ = ["cache_key", "clear", "describe", "fitted_direction"]
