"""The one component that writes a served model's weights, and the one that rolls them back.

Invariant: every edited weight is its pristine copy plus the least-squares update of the active
edits (`mend.aggregation`), each edit's keys and values computed on the base model:

    W = W₀ + S(active edits),      S = (A₀ + Σ UₑᵀUₑ)⁻¹ Σ UₑᵀDₑ        (in the weight's layout)

A change of the active set removes and adds edits' rows with one Woodbury step per layer (a new
factorisation from all active rows when it changes more rows than the layer is wide), so its
cost does not grow with the number of active edits. An empty active set is W₀ itself, exactly.
The live weights are a deterministic function of the sequence of changes (`propose`): replaying
the journal's revisions in order gives the same tensors bit for bit. The same active set reached
by another sequence (other order, a rollback) gives the same S up to float64 rounding, at most a
float32 rounding step of the weights apart.

Readers (generation, scoring, metrics) hold the shared side of a readers-writer lock; a weight
change holds the exclusive side for its whole duration, so no reader sees a half-applied edit.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mend.aggregation import KeyValues, LayerSolution
from mend.editing import all_finite
from mend.errors import NoEditorError, UnstableEditError
from mend.targets import EditTarget


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


@dataclass(frozen=True)
class Change:
    """A proposed active set and its per-layer solutions; nothing is written until `commit`."""

    active: dict[int, KeyValues]  # seq -> the edit's keys and values, in seq order
    solutions: dict[str, LayerSolution]


class EditableModel:
    def __init__(self, model: torch.nn.Module, targets: list[EditTarget], base_systems: dict[str, torch.Tensor] | None):
        """`base_systems`: A₀ per target (`MendEditor.base_system`); None without an editor, when
        no edit can be active."""
        self.model = model
        self.targets = {t.param_name: t for t in targets}
        params = dict(model.named_parameters())
        self._params = {name: params[name] for name in self.targets}
        self.pristine = {name: p.detach().clone() for name, p in self._params.items()}
        self._systems = {name: a.detach().double().to(self.pristine[name].device) for name, a in (base_systems or {}).items()}
        self._base = {name: LayerSolution.fresh(a, a.new_zeros(0, a.shape[0]), a.new_zeros(0, self.targets[name].fan_out))
                      for name, a in self._systems.items()}
        self.active: dict[int, KeyValues] = {}
        self.solutions = dict(self._base)
        self.lock = ReadWriteLock()

    def check(self, kv: KeyValues) -> None:
        """Raise ValueError unless `kv` fits this model's targets; UnstableEditError unless finite."""
        if set(kv) != set(self.targets):
            raise ValueError(f"keys and values for {sorted(kv)}; this model edits {sorted(self.targets)}")
        for name, (u, d) in kv.items():
            t = self.targets[name]
            if u.shape[1:] != (t.fan_in,) or d.shape[1:] != (t.fan_out,) or u.shape[0] != d.shape[0]:
                raise ValueError(f"keys and values for {name} have shapes {tuple(u.shape)}, {tuple(d.shape)}; "
                                 f"expected (N, {t.fan_in}), (N, {t.fan_out})")
            if not all_finite({"keys": u, "values": d}):
                raise UnstableEditError(f"the editor's keys or values for {name} are not finite: the edit cannot be applied")

    def propose(self, remove: list[int], add: dict[int, KeyValues]) -> Change:
        """The active set without `remove` and with `add`, and its solutions; nothing is written."""
        if add and not self._base:
            raise NoEditorError("no editor is loaded, so edits cannot be combined: start with the editor that made them")
        gone = [self.active[s] for s in sorted(remove)]
        new = [add[s] for s in sorted(add)]
        active = dict(sorted({**{s: kv for s, kv in self.active.items() if s not in remove}, **add}.items()))
        solutions = {}
        for name, base in self._base.items():
            device = base.S.device
            rows = sum(kv[name][0].shape[0] for kv in gone + new)
            if not active:
                solutions[name] = base
            elif rows >= self.targets[name].fan_in:  # cheaper to factorise A afresh
                solutions[name] = LayerSolution.fresh(self._systems[name], *_rows(active.values(), name, device))
            else:
                sol = self.solutions[name]
                if gone:
                    sol = sol.updated(*_rows(gone, name, device), sign=-1)
                if new:
                    sol = sol.updated(*_rows(new, name, device), sign=+1)
                solutions[name] = sol
            if not all_finite({name: solutions[name].S}):
                raise UnstableEditError(f"the combined update of {name} is not finite; nothing was changed")
        return Change(active, solutions)

    def weights(self, change: Change) -> dict[str, torch.Tensor]:
        """{param_name: W₀ + S} for `change` (what `commit` writes), without writing it."""
        out = {}
        for name, sol in change.solutions.items():
            w0 = self.pristine[name]
            # one rounding from float64: the same S up to float64 rounding gives weights at most one step apart
            out[name] = w0.clone() if not change.active else (w0.double() + self.targets[name].to_weight_layout(sol.S)).to(w0.dtype)
        return out

    @torch.no_grad()
    def commit(self, change: Change, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write `change` (and its `weights`, when already computed). Caller holds `lock.write()`."""
        for name, w in (weights or self.weights(change)).items():
            self._params[name].copy_(w)
        self.active, self.solutions = change.active, change.solutions

    def digest(self) -> str:
        """sha256 of the edited weights as they are now (everything else is the base model's)."""
        h = hashlib.sha256()
        for name in sorted(self._params):
            h.update(name.encode())
            h.update(self._params[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def replay(self, steps) -> None:
        """Propose each (remove, add) of `steps` in order, writing the weights once at the end: the
        same tensors as committing every step; nothing changes when a step fails. Caller holds `lock.write()`."""
        change, start = None, (self.active, self.solutions)
        try:
            for remove, add in steps:
                change = self.propose(remove, add)
                self.active, self.solutions = change.active, change.solutions
        except BaseException:
            self.active, self.solutions = start
            raise
        if change is not None:
            self.commit(change)


def _rows(edits, name: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of `edits` for one layer, stacked in order, on `device`."""
    edits = list(edits)
    return torch.cat([kv[name][0] for kv in edits]).to(device), torch.cat([kv[name][1] for kv in edits]).to(device)
