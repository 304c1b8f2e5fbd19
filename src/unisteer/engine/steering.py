"""Attaching updates to a model: one `Steering` object, used as a context manager or as a handle.

    with Steering(model, update, multiplier=4.0):
        model.generate(...)

    handle = Steering(model, [u1, u2], multiplier=[2.0, torch.tensor([0., 1., -1.])]).attach()
    ...
    handle.remove()

How positions stay right with a KV cache and padding: a pre-hook on the decoder stack reads the call's 2-D
attention mask (which covers cached and new tokens) and the cache length, and gives every new token its
absolute index among the row's real tokens. Left padding, right padding and incremental decoding all map to
the same indices, so "generated only" or "from position k" select the same tokens whether the sequence is
processed at once or token by token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, UnisteerError
from .architecture import model_structure
from .hf_compat import bound_arguments, call_positions
from .updates import Positions, Update, check_compatible

Multiplier = float | int | torch.Tensor


@dataclass
class _CallState:
    """What the current forward call tells us about token positions."""

    token_index: torch.Tensor | None = None  # [batch, new_tokens] absolute index among real tokens
    past_length: int | None = 0
    batch: int = 0
    new_tokens: int = 0
    problem: str = ""  # why token_index is None, when it is


class Steering:
    """Applies one or more updates with multipliers at chosen positions.

    Updates at the same layer and insertion point are applied in the order given. `multiplier` is one value
    for all updates or one per update; each value is a float or a per-row tensor of shape [batch].
    """

    def __init__(
        self,
        model: nn.Module,
        updates: Update | Sequence[Update],
        multiplier: Multiplier | Sequence[Multiplier] = 1.0,
        positions: Positions | str | None = None,
    ):
        self.model = model
        self.updates: list[Update] = [updates] if isinstance(updates, Update) else list(updates)
        if not self.updates:
            raise ConfigError("Steering needs at least one update")
        self.structure = model_structure(model)
        for update in self.updates:
            check_compatible(update.spec, model, source=f"update {update.spec.name or update.spec.form!r}")
        self._positions_override = Positions.parse(positions) if isinstance(positions, str) else positions
        self.multipliers: list[Multiplier] = []
        self.set_multiplier(multiplier)
        self._prompt_lengths: torch.Tensor | None = None
        self._explicit_prompt_lengths = False
        self._state = _CallState()
        self._captured_inputs: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- configuration -------------------------------------------------------------------------------------
    def set_multiplier(self, multiplier: Multiplier | Sequence[Multiplier]) -> None:
        if isinstance(multiplier, (list, tuple)):
            if len(multiplier) != len(self.updates):
                raise ConfigError(
                    f"multiplier: got {len(multiplier)} values for {len(self.updates)} updates"
                )
            values = list(multiplier)
        else:
            values = [multiplier] * len(self.updates)
        for value in values:
            if isinstance(value, torch.Tensor):
                if value.dim() != 1:
                    raise ConfigError(f"multiplier: a tensor multiplier must be 1-D [batch], got {tuple(value.shape)}")
                if not torch.isfinite(value).all():
                    raise ConfigError("multiplier: contains NaN or inf")
            elif not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
                raise ConfigError(f"multiplier: expected a finite number or a 1-D tensor, got {value!r}")
        self.multipliers = values

    def set_prompt_lengths(self, lengths: torch.Tensor | Sequence[int] | None) -> None:
        """Fix each row's prompt length (real tokens) for the 'prompt'/'generated' positions; None = auto."""
        if lengths is None:
            self._prompt_lengths, self._explicit_prompt_lengths = None, False
            return
        self._prompt_lengths = torch.as_tensor(lengths, dtype=torch.long)
        self._explicit_prompt_lengths = True

    def reset_prompt_lengths(self) -> None:
        """Forget auto-captured prompt lengths (before a new use_cache=False generation)."""
        if not self._explicit_prompt_lengths:
            self._prompt_lengths = None

    def positions_for(self, update: Update) -> Positions:
        return self._positions_override or Positions.parse(update.spec.positions)

    # -- attach / remove -----------------------------------------------------------------------------------
    def attach(self) -> Steering:
        if self._handles:
            raise UnisteerError("this Steering is already attached; call remove() first")
        stack_owner = _stack_owner(self.model, self.structure.layers_path)
        self._handles.append(stack_owner.register_forward_pre_hook(self._on_stack_call, with_kwargs=True))
        for (layer, insertion), members in self._groups().items():
            down_proj = self.structure.down_proj(layer)
            if insertion == "down_proj":
                self._handles.append(down_proj.register_forward_hook(self._make_down_proj_hook(members)))
            else:
                if any(self.updates[i].needs_input for i in members):
                    self._handles.append(down_proj.register_forward_pre_hook(self._make_capture_hook(layer)))
                layer_module = self.structure.layer(layer)
                self._handles.append(layer_module.register_forward_hook(self._make_block_hook(layer, members)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured_inputs.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Steering:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _groups(self) -> dict[tuple[int, str], list[int]]:
        groups: dict[tuple[int, str], list[int]] = {}
        for i, update in enumerate(self.updates):
            groups.setdefault((update.layer, update.insertion), []).append(i)
        return groups

    # -- hooks ---------------------------------------------------------------------------------------------
    def _on_stack_call(self, module, args, kwargs):
        call = call_positions(bound_arguments(module, args, kwargs))
        token_index = real_counts = None
        if call.past_length is not None:
            past, device = call.past_length, self._device_of(args, kwargs)
            if call.attention_mask is not None:
                real_index = call.attention_mask.long().cumsum(-1) - 1
                token_index = real_index[:, past:]
                real_counts = call.attention_mask.long().sum(-1)
            else:
                token_index = torch.arange(past, past + call.new_tokens, device=device).expand(call.batch, -1)
                real_counts = torch.full((call.batch,), past + call.new_tokens, device=device)
        # A call with an empty cache starts a new sequence, so its real tokens are the prompt. Calls that run
        # without a cache (use_cache=False generation) re-send the growing sequence from position 0; they
        # keep the prompt lengths of the first such call instead of treating generated tokens as prompt.
        starts_sequence = call.past_length == 0 and (call.uses_cache or kwargs.get("use_cache") is not False
                                                     or self._prompt_lengths is None)
        if starts_sequence and not self._explicit_prompt_lengths:
            self._prompt_lengths = real_counts
        self._state = _CallState(token_index=token_index, past_length=call.past_length, batch=call.batch,
                                 new_tokens=call.new_tokens, problem=call.problem)

    @staticmethod
    def _device_of(args, kwargs) -> torch.device:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value.device
        return torch.device("cpu")

    def _make_capture_hook(self, layer: int):
        def capture(module, args):
            self._captured_inputs[layer] = args[0]

        return capture

    def _make_block_hook(self, layer: int, members: list[int]):
        def block_hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            a = self._captured_inputs.pop(layer, None)
            hidden = self._apply_group(members, hidden, a)
            if isinstance(output, tuple):
                return (hidden, *output[1:])
            return hidden

        return block_hook

    def _make_down_proj_hook(self, members: list[int]):
        def down_proj_hook(module, args, output):
            return self._apply_group(members, output, args[0])

        return down_proj_hook

    def _apply_group(self, members: list[int], hidden: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
        # Some blocks (OPT) run the MLP on flattened [batch*seq, features] rows.
        shape = (self._state.batch, self._state.new_tokens, -1)
        if a is not None and a.dim() == 2:
            a = a.view(shape)
        if hidden.dim() == 2:
            return self._apply_group(members, hidden.view(shape), a).reshape(hidden.shape)
        for i in members:
            multiplier = self.multipliers[i]
            if not isinstance(multiplier, torch.Tensor) and multiplier == 0:
                continue  # m = 0 is the plain model, exactly
            update = self.updates[i]
            m = self._multiplier_tensor(multiplier, hidden)
            mask = self._position_mask(self.positions_for(update), hidden)
            hidden = update.apply(hidden, a, m, mask)
        return hidden

    def _multiplier_tensor(self, multiplier: Multiplier, hidden: torch.Tensor) -> torch.Tensor:
        if isinstance(multiplier, torch.Tensor):
            if multiplier.shape[0] != hidden.shape[0]:
                raise ConfigError(
                    f"multiplier: per-row tensor has {multiplier.shape[0]} values but the batch has "
                    f"{hidden.shape[0]} rows"
                )
            return multiplier.to(hidden.device).view(-1, 1, 1)
        return torch.tensor(float(multiplier), device=hidden.device)

    def _position_mask(self, positions: Positions, hidden: torch.Tensor) -> torch.Tensor | None:
        if positions.kind == "all":
            return None
        index = self._state.token_index
        if index is None:
            raise UnisteerError(
                f"positions={positions}: cannot locate the tokens of this forward call: "
                f"{self._state.problem or 'no 2-D attention mask covering cached and new tokens'}. "
                "Pass a 2-D attention_mask (past + new tokens) or use positions='all'"
            )
        if index.shape[1] != hidden.shape[1]:
            raise UnisteerError("positions: hidden states and input tokens disagree in length")
        if positions.kind == "from":
            keep = index >= positions.start
        else:
            if self._prompt_lengths is None:
                raise UnisteerError(f"positions={positions}: prompt lengths unknown; call set_prompt_lengths")
            lengths = self._prompt_lengths.to(index.device).view(-1, 1)
            if lengths.shape[0] != index.shape[0]:
                raise UnisteerError(
                    f"positions={positions}: {lengths.shape[0]} prompt lengths for a batch of {index.shape[0]}"
                )
            keep = index < lengths if positions.kind == "prompt" else index >= lengths
        return keep.unsqueeze(-1).to(hidden.device)


def _stack_owner(model: nn.Module, layers_path: str) -> nn.Module:
    parent = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    return model.get_submodule(parent)
