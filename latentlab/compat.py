"""Small compatibility shims between pinned library versions (each says which versions and why).

Kept in one place so they are easy to drop when the libraries catch up.
"""

from __future__ import annotations

from typing import Any

_PATCHED = {"kv": False}


def patch_bridge_kv_cache() -> None:
    """transformer-lens 3.9's attention bridges read the KV cache from ``past_key_values`` (or
    ``layer_past``), but transformers >= 5.2x passes it as ``cache``. Without this, cached decoding
    through the bridge silently ignores every earlier token (measured: greedy output differs from
    the cache-free decode from the second new token on). Idempotent."""
    if _PATCHED["kv"]:
        return
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    original = AttentionBridge._update_kv_cache

    def _update_kv_cache(self: Any, k: Any, v: Any, **kwargs: Any) -> Any:
        if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None:
            cache = kwargs.get("cache")
            if cache is not None:
                kwargs["past_key_values"] = cache
        return original(self, k, v, **kwargs)

    AttentionBridge._update_kv_cache = _update_kv_cache  # type: ignore[method-assign]
    _PATCHED["kv"] = True
