"""The one component that writes a served model's weights, and the one that rolls them back.

Invariant: every edited weight equals its pristine copy plus the deltas of the active edits,
added one edit at a time in application order:

    W = ((W₀ + ΔW₁) + ΔW₂) + ...        ΔW_k = aₖᵀ bₖ in the weight's layout and dtype

Applying adds the new edits' deltas in that order; rolling back recomputes from W₀ with the
remaining edits. Both go through `_delta`, so the live weights, a rollback and a replay after a
restart are bit-for-bit the same tensors, and rolling back everything gives back W₀ exactly.

Readers (generation, scoring, metrics) hold the shared side of a readers-writer lock; a weight
change holds the exclusive side for its whole duration, so no reader sees a half-applied edit.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from mend.editing import all_finite
from mend.errors import UnstableEditError
from mend.targets import EditTarget

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (writes are not starved)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and self._writers_waiting == 0)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writing and self._readers == 0)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class EditableModel:
    def __init__(self, model: torch.nn.Module, targets: list[EditTarget]):
        self.model = model
        self.targets = {t.param_name: t for t in targets}
        params = dict(model.named_parameters())
        self._params = {name: params[name] for name in self.targets}
        self.pristine = {name: p.detach().clone() for name, p in self._params.items()}
        self.lock = ReadWriteLock()

    def _delta(self, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        param = self._params[name]
        return self.targets[name].to_weight_layout(a.to(param.device).T @ b.to(param.device)).to(param.dtype)

    def check(self, factors: Factors) -> None:
        """Raise ValueError unless `factors` fit this model's targets; UnstableEditError unless finite."""
        for name, (a, b) in factors.items():
            if name not in self.targets:
                raise ValueError(f"factors for {name}, which is not an edit target of this model")
            t = self.targets[name]
            if a.shape[1:] != (t.fan_in,) or b.shape[1:] != (t.fan_out,) or a.shape[0] != b.shape[0]:
                raise ValueError(f"factors for {name} have shapes {tuple(a.shape)}, {tuple(b.shape)}; expected (N, {t.fan_in}), (N, {t.fan_out})")
            if not all_finite({"a": a, "b": b}):
                raise UnstableEditError(
                    f"the editor's update for {name} is not finite: after the edits already applied the model is too far "
                    "from the base model this editor was trained on; roll back some edits (RollbackEdit/RollbackTo) and retry")

    def weights_after(self, edits: list[Factors]) -> dict[str, torch.Tensor]:
        """The weights `add(edits)` would produce, without writing them (for metrics before commit)."""
        out = {name: p.detach() for name, p in self._params.items()}
        for factors in edits:
            for name, (a, b) in factors.items():
                out[name] = out[name] + self._delta(name, a, b)
        return out

    @torch.no_grad()
    def add(self, edits: list[Factors]) -> None:
        """Add each edit's delta, in order. Caller holds `lock.write()`."""
        for factors in edits:
            for name, (a, b) in factors.items():
                self._params[name].add_(self._delta(name, a, b))

    @torch.no_grad()
    def reset(self, edits: list[Factors]) -> None:
        """Pristine weights plus `edits`, in order. Caller holds `lock.write()`."""
        for name, p in self._params.items():
            p.copy_(self.pristine[name])
        self.add(edits)
