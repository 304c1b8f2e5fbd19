"""Training objectives on completion scores (SPEC §5–§6) and RePS's projecting vector intervention.

Every objective takes the scores of a minibatch's winning and losing sequences *under the intervention*
(`CompletionScores`: summed NLL and token count per row) and returns `LossTerms`.

| objective | loss |
|---|---|
| `split` | λ_p·L_w + λ_n·L_l + γ·ReLU(θ − (L_l − L_w)), L = token-weighted minibatch mean NLL (`hinge: example`: the hinge per pair on its mean token NLLs, then averaged) |
| `sft`   | SPLIT with λ_n = γ = 0 (only the winning side's NLL) |
| `reps`  | −log σ( max(s·(r_l − r_w), 1)/|w| · ℓ_w − ℓ_l/|l| ), mean over examples |
| `dpo`   | −log σ( β·[(ℓ_w − r_w) − (ℓ_l − r_l)] ), mean over examples |

ℓ are summed completion log-probs under the intervention, r those of the unsteered model (reference), |w| and
|l| the lengths that normalise them (completion tokens by default). "winning" is A_p for `add` pairs and A_n
for `sub` pairs, so L_w / L_l are SPEC's L_p / L_n.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..engine.scoring import CompletionScores
from ..engine.updates import Update, VectorUpdate


@dataclass
class LossTerms:
    """A minibatch loss and the terms it was built from (all 0-d tensors; `loss` carries the gradient)."""

    loss: torch.Tensor
    win_nll: torch.Tensor  # token-weighted mean NLL of the winning completions (utility of the target side)
    lose_nll: torch.Tensor  # the same for the losing completions
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def margin(self) -> torch.Tensor:
        """Preference margin L_l − L_w in nats/token (what SPLIT's hinge pushes above θ)."""
        return self.lose_nll - self.win_nll


@dataclass
class ObjectiveInputs:
    """What a minibatch gives every objective: the steered scores of its winning and losing sequences, the
    unsteered (reference) summed log-probs where the objective needs them, and their sequence lengths."""

    win: CompletionScores
    lose: CompletionScores
    ref_win: torch.Tensor | None = None
    ref_lose: torch.Tensor | None = None
    win_sequence_lengths: torch.Tensor | None = None
    lose_sequence_lengths: torch.Tensor | None = None


@dataclass(frozen=True)
class Objective:
    """A registered training objective: its loss on `ObjectiveInputs` given the training config, and whether
    it needs the unsteered model's log-probs (computed once, with the frozen-prefix cache)."""

    name: str
    loss: Callable[[ObjectiveInputs, Any], LossTerms]
    needs_reference: bool = False


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, *, needs_reference: bool = False):
    """Add an objective under `name` (one function here is all a new objective needs)."""
    def register(loss: Callable[[ObjectiveInputs, Any], LossTerms]) -> Callable[[ObjectiveInputs, Any], LossTerms]:
        OBJECTIVES[name] = Objective(name, loss, needs_reference)
        return loss
    return register


def token_mean_nll(scores: CompletionScores) -> torch.Tensor:
    """NLL summed over every completion token of the minibatch divided by their count (token-weighted)."""
    return scores.nll_sum.sum() / scores.n_tokens.sum().clamp(min=1)


def split_loss(win: CompletionScores, lose: CompletionScores, *, lambda_p: float, lambda_n: float,
               gamma: float, theta: float, hinge: str = "batch") -> LossTerms:
    """SPLIT: utility on both sides plus a hinge on the preference margin.

    `hinge="batch"` (the reference) applies it to the minibatch means, so pairs far past θ pay for pairs on
    the wrong side: on yes/no items a lean toward one answer satisfies it for half of them. `"example"`
    applies it to each pair's margin (row i of `win` and `lose` are one pair) and averages.
    """
    win_nll, lose_nll = token_mean_nll(win), token_mean_nll(lose)
    if hinge == "example":
        shortfall = F.relu(theta - (lose.nll_mean - win.nll_mean)).mean()
    else:
        shortfall = F.relu(theta - (lose_nll - win_nll))
    loss = lambda_p * win_nll + lambda_n * lose_nll + gamma * shortfall
    return LossTerms(loss, win_nll.detach(), lose_nll.detach(), {"hinge": shortfall.detach()})


def reps_loss(win: CompletionScores, lose: CompletionScores, ref_win_logp: torch.Tensor,
              ref_lose_logp: torch.Tensor, *, win_length: torch.Tensor, lose_length: torch.Tensor,
              scaler: float = 1.0) -> LossTerms:
    """RePS: a reference-weighted SimPO loss, −log σ(max(s·(r_l − r_w), 1)/|w|·ℓ_w − ℓ_l/|l|)."""
    win_logp, lose_logp = -win.nll_sum, -lose.nll_sum
    weight = torch.clamp(scaler * (ref_lose_logp - ref_win_logp), min=1.0)
    logits = weight / win_length * win_logp - lose_logp / lose_length
    loss = -F.logsigmoid(logits).mean()
    return LossTerms(loss, token_mean_nll(win).detach(), token_mean_nll(lose).detach(),
                     {"reward_accuracy": (logits > 0).float().mean().detach()})


def dpo_loss(win: CompletionScores, lose: CompletionScores, ref_win_logp: torch.Tensor,
             ref_lose_logp: torch.Tensor, *, beta: float) -> LossTerms:
    """DPO / BiPO: −log σ(β·[(ℓ_w − r_w) − (ℓ_l − r_l)]), the unsteered model as reference."""
    logits = beta * ((-win.nll_sum - ref_win_logp) - (-lose.nll_sum - ref_lose_logp))
    loss = -F.logsigmoid(logits).mean()
    return LossTerms(loss, token_mean_nll(win).detach(), token_mean_nll(lose).detach(),
                     {"reward_accuracy": (logits > 0).float().mean().detach()})


@register_objective("split")
def _split(inputs: ObjectiveInputs, config: Any) -> LossTerms:
    return split_loss(inputs.win, inputs.lose, lambda_p=config.lambda_p, lambda_n=config.lambda_n,
                      gamma=config.gamma, theta=config.theta, hinge=config.hinge)


@register_objective("sft")
def _sft(inputs: ObjectiveInputs, config: Any) -> LossTerms:
    return split_loss(inputs.win, inputs.lose, lambda_p=config.lambda_p, lambda_n=0.0, gamma=0.0, theta=config.theta)


@register_objective("dpo", needs_reference=True)
def _dpo(inputs: ObjectiveInputs, config: Any) -> LossTerms:
    return dpo_loss(inputs.win, inputs.lose, inputs.ref_win, inputs.ref_lose, beta=config.beta)


@register_objective("reps", needs_reference=True)
def _reps(inputs: ObjectiveInputs, config: Any) -> LossTerms:
    if config.reps_length == "completion":
        win_length, lose_length = inputs.win.n_tokens.float(), inputs.lose.n_tokens.float()
    else:
        win_length, lose_length = inputs.win_sequence_lengths, inputs.lose_sequence_lengths
    return reps_loss(inputs.win, inputs.lose, inputs.ref_win, inputs.ref_lose, win_length=win_length.clamp(min=1),
                     lose_length=lose_length.clamp(min=1), scaler=config.reps_scaler)


class ProjectingVector(Update):
    """RePS's vector intervention: rows flagged in `project_rows` get h − ReLU(h·v)/‖v‖²·v (the positive
    component along v projected out, at the masked positions) instead of h + m·v.

    Wraps a `VectorUpdate` (whose parameters are the ones trained and saved); set `project_rows` (a bool
    tensor [batch]) before each forward. Dropout is drawn once per forward and used by both branches.
    """

    needs_input = False

    def __init__(self, inner: VectorUpdate):
        super().__init__(inner.spec)
        self.inner = inner
        self.project_rows: torch.Tensor | None = None

    def delta(self, a, like):
        return self.inner.delta(a, like)

    def apply(self, h: torch.Tensor, a: torch.Tensor | None, m: torch.Tensor, mask: torch.Tensor | None):
        v = self.delta(a, h)
        scale = m.to(h.dtype)
        if mask is not None:
            scale = scale * mask.to(h.dtype)
        added = h + scale * v
        if self.project_rows is None or not bool(self.project_rows.any()):
            return added
        coefficient = F.relu((h * v).sum(-1, keepdim=True)) / (v * v).sum().clamp(min=torch.finfo(v.dtype).tiny)
        if mask is not None:
            coefficient = coefficient * mask.to(h.dtype)
        projected = h - coefficient * v
        rows = self.project_rows.to(h.device).view(-1, 1, 1)
        if rows.shape[0] != h.shape[0]:
            raise ValueError(f"project_rows has {rows.shape[0]} entries for a batch of {h.shape[0]} rows")
        return torch.where(rows, projected, added)
