"""The training loop's progress and its stopping rule: what a checkpoint restores besides the
model, optimizer, data position and RNG, and the early-stopping rule that updates it.

Plain dataclasses with no torch or model imports: Ray Tune's trial process applies the same rule
to the reports it forwards (dtrain.ray.tune.LastReportGate) without loading the training stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtrain.schema import Config


@dataclass
class TrainState:
    """The loop's progress, as a checkpoint restores it (besides model, optimizer, data and RNG)."""

    step: int = 0
    consecutive_bad_steps: int = 0
    best_metric: float | None = None  # early stopping's record (EarlyStopping.update)
    best_step: int | None = None
    evals_without_improvement: int = 0
    tokens_seen: int = 0
    stop_reason: str | None = None  # set when the run ended early (a resumed run then trains no further)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when eval.metric has not improved by more than min_delta for `patience` evaluations."""

    patience: int | None
    min_delta: float
    mode: str  # min | max

    @classmethod
    def from_config(cls, cfg: Config) -> "EarlyStopping":
        return cls(cfg.eval.early_stopping.patience, cfg.eval.early_stopping.min_delta, cfg.eval.mode)

    def update(self, state: TrainState, value: float) -> bool:
        """Record the evaluation `value` at state.step; whether the run should stop now."""
        sign = 1.0 if self.mode == "min" else -1.0
        if state.best_metric is None or sign * (state.best_metric - value) > self.min_delta:
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
        else:
            state.evals_without_improvement += 1
        return self.patience is not None and state.evals_without_improvement >= self.patience
