"""Teacher-forced completion log-likelihoods, scoring only the rows that matter.

The lm-head is the single largest matmul of a small model (SmolLM2: 49152×576). Completion scoring needs
logits only at the completion's positions, so the final hidden states of those positions are gathered into
a dense [n, d] matrix first and multiplied once — a strided slice into the lm-head (as `logits_to_keep`
does) is many times slower in bf16 on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import final_logit_softcap, model_structure
from .devices import is_offloaded


def stack_owner(model: nn.Module) -> nn.Module:
    """The module that runs embeddings → decoder layers → final norm (e.g. `model.model`)."""
    path = model_structure(model).layers_path
    return model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model


def position_ids_from_mask(attention_mask: torch.Tensor, past_length: int = 0) -> torch.Tensor:
    """Positions that skip padding (as generate() computes them), for the last `T - past` columns."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, past_length:]


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
    """Final-norm hidden states [batch, seq, d] without running the lm-head."""
    if attention_mask is not None and "position_ids" not in kwargs:
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    output = stack_owner(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def logits_for_rows(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """lm-head logits for a dense [n, d] matrix of final hidden states."""
    head = model.get_output_embeddings()
    if is_offloaded(head):  # its dispatch hook loads the weights for the call
        logits = head(rows)
    else:
        logits = F.linear(rows.to(head.weight.device), head.weight, getattr(head, "bias", None))
    cap = final_logit_softcap(model)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class CompletionScores:
    """Per-row negative log-likelihood of the labelled tokens (sum), and how many tokens were labelled."""

    nll_sum: torch.Tensor  # [batch] float32
    n_tokens: torch.Tensor  # [batch] long

    @property
    def nll_mean(self) -> torch.Tensor:
        return self.nll_sum / self.n_tokens.clamp(min=1)


def token_nll_from_hidden(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [batch, seq] of `labels` (-100 = ignored, NLL 0 there) given final hidden states.

    Position t predicts token t+1, so the NLL of token t+1 is stored at column t+1 (aligned with labels).
    """
    labels = labels.to(hidden.device)
    targets = labels[:, 1:]
    selected = targets != -100
    rows = hidden[:, :-1][selected]  # dense [n, d]
    logits = logits_for_rows(model, rows).float()  # on the lm-head's device
    nll = F.cross_entropy(logits, targets[selected].to(logits.device), reduction="none")
    out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    out[:, 1:][selected] = nll.to(hidden.device)
    return out


def completion_nll_from_hidden(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> CompletionScores:
    """NLL of `labels` (-100 = ignored) given final hidden states of the same sequences.

    Position t predicts token t+1, so hidden[:, :-1] is scored against labels[:, 1:].
    """
    token_nll = token_nll_from_hidden(model, hidden, labels)
    return CompletionScores(nll_sum=token_nll.sum(-1), n_tokens=(labels[:, 1:] != -100).sum(-1))


def completion_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> CompletionScores:
    """Teacher-forced completion NLL of a padded batch (whatever steering is attached applies)."""
    return completion_nll_from_hidden(model, final_hidden(model, input_ids, attention_mask), labels)
