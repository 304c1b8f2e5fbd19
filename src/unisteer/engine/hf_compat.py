"""Every place unisteer depends on transformers internals that are not a stable public API.

transformers renames things between minor releases (5.24 passes the KV cache to the decoder stack as
`cache=` instead of `past_key_values=` and stopped sending `cache_position`). Everything that reads call
arguments of a model's forward, builds or reshapes a KV cache, or reads a cache's layers goes through this
module, so the next rename is one edit here. Nothing else in unisteer imports `transformers.cache_utils`
or names a cache keyword.

The tested range of transformers is stated in README "Installation" and checked by .ci/test_transformers.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import PositionError

# The keyword under which a decoder stack receives its KV cache, newest first.
CACHE_KEYWORDS = ("cache", "past_key_values")


@dataclass(frozen=True)
class CallPositions:
    """What one forward call of the decoder stack says about where its tokens sit.

    past_length: tokens already in the KV cache before this call, or None when it cannot be determined
    (or when the call's signals disagree: `problem` says why).
    """

    batch: int
    new_tokens: int
    past_length: int | None
    attention_mask: torch.Tensor | None  # the 2-D [batch, past + new] mask, when one was passed
    uses_cache: bool
    problem: str = ""


def bound_arguments(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The call's arguments by parameter name, whether passed by position or keyword."""
    names = _positional_names(type(module))
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


@functools.cache
def _positional_names(module_type: type) -> tuple[str, ...]:
    try:
        parameters = inspect.signature(module_type.forward).parameters
    except (TypeError, ValueError):
        return ()
    names = [name for name, p in parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return tuple(names[1:] if names and names[0] == "self" else names)


def call_cache(arguments: Mapping[str, Any]) -> Any:
    """The KV cache object a forward call received, under whichever name this transformers uses."""
    for key in CACHE_KEYWORDS:
        value = arguments.get(key)
        if value is not None:
            return value
    return None


def cache_length(cache: Any) -> int | None:
    """Number of tokens a KV cache holds, or None when this cache type does not say."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)):  # the legacy tuple format: per layer (keys, values)
        if not cache:
            return 0
        first = cache[0]
        if isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor):
            return int(first[0].shape[-2])
    return None


def call_positions(arguments: Mapping[str, Any]) -> CallPositions:
    """Past length of a decoder-stack call from every signal it carries, cross-checked.

    Signals: the cache object (under any name), `cache_position` (older transformers), `position_ids`
    (without padding they start at the past length) and the 2-D attention mask (its length is past + new).
    When two of them disagree, or none is conclusive while a cache is in use, past_length is None.
    """
    tokens = arguments.get("input_ids")
    if tokens is None:
        tokens = arguments.get("inputs_embeds")
    if tokens is None:
        raise PositionError("cannot find input_ids or inputs_embeds in the model call")
    batch, new_tokens = int(tokens.shape[0]), int(tokens.shape[1])
    mask = arguments.get("attention_mask")
    mask_2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    cache = call_cache(arguments)
    uses_cache = cache is not None

    estimates: dict[str, int] = {}
    cache_position = arguments.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() > 0:
        estimates["cache_position"] = int(cache_position.reshape(-1)[0])
    if uses_cache:
        length = cache_length(cache)
        if length is not None:
            estimates[f"{type(cache).__name__}.get_seq_length()"] = length
    else:
        estimates["no cache"] = 0
    if mask_2d is not None:
        estimates["attention mask length - new tokens"] = int(mask_2d.shape[1]) - new_tokens
    else:
        position_ids = arguments.get("position_ids")
        # Without a mask there is no padding, so every row's positions start at the past length.
        if isinstance(position_ids, torch.Tensor) and position_ids.numel() > 0 and mask is None:
            first = position_ids.reshape(-1, position_ids.shape[-1])[:, 0]
            if bool((first == first[0]).all()):
                estimates["position_ids"] = int(first[0])

    values = set(estimates.values())
    if len(values) == 1:
        past = values.pop()
        if past < 0:
            return CallPositions(batch, new_tokens, None, mask_2d, uses_cache,
                                 f"the attention mask ({mask_2d.shape[1]} columns) is shorter than the "
                                 f"{new_tokens} new tokens")
        return CallPositions(batch, new_tokens, past, mask_2d, uses_cache)
    if not values:
        return CallPositions(batch, new_tokens, None, mask_2d, uses_cache,
                             f"the call passes a cache of type {type(cache).__name__} whose length is unknown, "
                             "and no attention mask or position ids")
    listing = ", ".join(f"{k} = {v}" for k, v in estimates.items())
    return CallPositions(batch, new_tokens, None, mask_2d, uses_cache,
                         f"the call's signals disagree on how many tokens are already cached ({listing})")


# -- passing caches to models ------------------------------------------------------------------------------
@functools.cache
def _cache_keyword_of(module_type: type) -> str:
    try:
        parameters = inspect.signature(module_type.forward).parameters
    except (TypeError, ValueError):
        return CACHE_KEYWORDS[-1]
    for key in CACHE_KEYWORDS:
        if key in parameters:
            return key
    return CACHE_KEYWORDS[-1]


def cache_kwargs(module: nn.Module, cache: Any) -> dict[str, Any]:
    """`{name: cache}` with the keyword that `module.forward` takes its KV cache under."""
    return {_cache_keyword_of(type(module)): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (`cache` in newer transformers, `past_key_values` before)."""
    for key in CACHE_KEYWORDS:
        value = getattr(output, key, None) if not isinstance(output, Mapping) else output.get(key)
        if value is not None:
            return value
    raise PositionError("the model returned no KV cache; call it with use_cache=True")


def new_cache(model: nn.Module) -> Any:
    """An empty dynamic KV cache laid out for `model` (sliding-window layers where the config has them)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


# -- reshaping caches (the server's continuous batching) ---------------------------------------------------
def _plain_layer_type() -> type:
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


def cache_is_joinable(cache: Any) -> bool:
    """Whether every layer is a plain growing [batch, heads, seq, dim] store that can be padded and joined.

    Sliding-window and static layers keep positions of their own and cannot.
    """
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    plain = _plain_layer_type()
    return all(type(layer) is plain and getattr(layer, "keys", None) is not None
               and getattr(layer, "is_initialized", True) for layer in layers)


def select_rows(cache: Any, index: torch.Tensor) -> None:
    """Keep only these batch rows of the cache, in this order (rows may repeat)."""
    cache.batch_select_indices(index)


def repeat_rows(cache: Any, times: int) -> None:
    """Repeat every batch row `times` times in place (row i becomes rows i·times … i·times + times − 1)."""
    cache.batch_repeat_interleave(times)


def drop_leading_columns(cache: Any, columns: int) -> None:
    """Remove the first `columns` sequence positions of every layer (padding no remaining row needs)."""
    if columns <= 0:
        return
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, columns:], layer.values[:, :, columns:]


def join_left_padded(cache: Any, other: Any, width: int) -> None:
    """Append `other`'s rows to `cache`, both left-padded with zeros to `width` sequence positions."""
    for old, new in zip(cache.layers, other.layers, strict=True):
        old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)])
        old.values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)])


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[2]
    return tensor if missing == 0 else torch.nn.functional.pad(tensor, [0, 0, missing, 0])


def fill_layers(cache: Any, layers: range, rows: int, width: int, like: torch.Tensor) -> None:
    """Give `layers` of the cache a placeholder of `width` tokens (layers skipped by a partial forward)."""
    placeholder = torch.zeros((rows, 1, width, 1), dtype=like.dtype, device=like.device)
    for layer in layers:
        cache.update(placeholder, placeholder, layer)
