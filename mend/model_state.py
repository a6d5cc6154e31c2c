"""The one component that writes a served model's edits, and the one that rolls them back.

Invariant: every edited layer is its pristine weight plus the gated least-squares memory of the
active edits (`mend.aggregation`), each edit's keys and values computed on the base model:

    y = x W₀ + Σ_j c_j(x) [|c_j(x)| ≥ τ c_j(u_j)] d_j,      c(x) = x (A₀ + Σ UₑᵀUₑ)⁻¹ Uᵀ

The weights themselves are never written: the state is each layer's memory buffers (P, U, c(u),
D; `mend.aggregation.memory_names`). A change of the active set removes and adds edits' rows with
one Woodbury step per layer (a new factorisation from all active rows when it changes more rows
than the layer is wide): O(fan_in² k) for P plus one pass over the active rows for their shares,
with the new rows appended in place. An empty active set is the base model itself, exactly. The
memory is a deterministic function of the sequence of changes (`propose`): replaying the
journal's revisions in order gives the same tensors bit for bit. The same active set reached by
another sequence (other order, a rollback) holds the same rows (in the order they came) and the
same P and shares up to float64 rounding, at most a float32 rounding step apart.

Readers (generation, scoring, metrics) hold the shared side of a readers-writer lock; a change
holds the exclusive side for its whole duration, so no reader sees a half-applied edit.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mend.aggregation import (MEMORY, KeyValues, LayerMemory, alone_shares, attach_memory, empty_memory, memories, memory_names,
                              select_rows)
from mend.editing import all_finite
from mend.errors import ConfigError, NoEditorError, UnstableEditError
from mend.targets import EditTarget


def edited_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's weights (`state_dict`) and of its non-empty edit memories: everything an
    edit can change, to compare or hash (an empty memory is the base model's, so it is left out)."""
    return {k: v.detach().clone() for k, v in {**model.state_dict(), **memories(model)}.items()}


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
    """A proposed active set and its per-layer memories; nothing is written until `commit`."""

    active: dict[int, KeyValues]  # seq -> the edit's keys and values, in seq order
    memories: dict[str, LayerMemory]


class EditableModel:
    def __init__(self, model: torch.nn.Module, targets: list[EditTarget], base_systems: dict[str, torch.Tensor] | None,
                 gate: float | dict[str, float] = 0.0, keep: float = 0.0, compensate: float = 0.0):
        """`base_systems`: A₀ per target (`MendEditor.base_system`); None without an editor, when
        no edit can be active. `gate` (τ, one or per module: `EditorConfig.gates`), `keep` and
        `compensate` (γ): the editor's (`EditorConfig`)."""
        if memories(model):
            raise ConfigError("this model already holds edits (its directory has an edit_memory.safetensors): serve its "
                              "base model with the journal that made them (paths.base_model=BASE paths.journal=DIR/journal)")
        self.model = model
        self.targets = {t.param_name: t for t in targets}
        self.keep = keep
        self.compensate = compensate
        attach_memory(model, targets, gate)
        modules = dict(model.named_modules())
        self._modules = {name: modules[t.name] for name, t in self.targets.items()}
        self._names = {name: memory_names(t.name) for name, t in self.targets.items()}
        device = {name: m.weight.device for name, m in self._modules.items()}
        # the overrides that make `functional_call` compute on the base model: every memory empty
        self.pristine = {n: x for name, t in self.targets.items()
                         for n, x in zip(self._names[name], empty_memory(t.fan_in, t.fan_out, device[name]))}
        self._systems = {name: a.detach().double().to(device[name]) for name, a in (base_systems or {}).items()}
        self._base = {name: LayerMemory.fresh(a, a.new_zeros(0, a.shape[0]), a.new_zeros(0, self.targets[name].fan_out))
                      for name, a in self._systems.items()}
        self._a0inv32 = {name: m.dense.float() for name, m in self._base.items()}  # A₀⁻¹ for `alone_shares`
        self.active: dict[int, KeyValues] = {}
        self.memories = dict(self._base)
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
        """The active set without `remove` and with `add`, and its memories; nothing is written."""
        if add and not self._base:
            raise NoEditorError("no editor is loaded, so edits cannot be combined: start with the editor that made them")
        gone = {s: self.active[s] for s in sorted(remove)}
        new = {s: add[s] for s in sorted(add)}
        active = dict(sorted({**{s: kv for s, kv in self.active.items() if s not in remove}, **add}.items()))
        memories = {}
        for name, base in self._base.items():
            device = base.dense.device
            rows = sum(kv[name][0].shape[0] for kv in [*gone.values(), *new.values()])
            if not active:
                memories[name] = base
            elif rows >= self.targets[name].fan_in:  # cheaper to factorise A afresh
                memories[name] = LayerMemory.fresh(self._systems[name], *self._rows(active, name, device))
            else:
                mem = self.memories[name]
                if gone:
                    mem = mem.removed(set(gone))
                if new:
                    mem = mem.added(*self._rows(new, name, device))
                memories[name] = mem
        # P's dense part is an earlier P, symmetric positive definite, so its largest entries are on its
        # diagonal: a finite diagonal (looked at only where the dense part is new: a fold or a fresh
        # factorisation), finite corrections and finite shares (which every non-finite Woodbury factor
        # reaches: M⁻¹ and t = U P Uₖᵀ enter every share, the new corrections and Bᵀ Uᵀ) mean a finite
        # memory. One test for all layers; the layer is looked up only when it fails.
        checked = {name: torch.cat([m.own, m.pending[0].sum(0), *([m.dense.diagonal()] if m.dense is not self.memories[name].dense else [])])
                   for name, m in memories.items()}
        if not all_finite({"all": torch.cat(list(checked.values()))}):
            name = next(n for n, c in checked.items() if not all_finite({n: c}))
            raise UnstableEditError(f"the combined update of {name} is not finite; nothing was changed")
        return Change(active, memories)

    def weights(self, change: Change) -> dict[str, torch.Tensor]:
        """The memory buffers of `change` (what `commit` writes) as `functional_call` overrides."""
        out = {}
        for name, mem in change.memories.items():
            names = self._names[name]
            out.update(zip(names, mem.buffers(self.compensate) if change.active else (self.pristine[n].clone() for n in names)))
        return out

    @torch.no_grad()
    def commit(self, change: Change, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write `change` (and its `weights`, when already computed). Caller holds `lock.write()`."""
        weights = weights or self.weights(change)
        for name, module in self._modules.items():
            for attr, full in zip(MEMORY, self._names[name]):
                setattr(module, attr, weights[full])
        self.active, self.memories = change.active, change.memories

    def live(self) -> dict[str, torch.Tensor]:
        """The edited layers' weights and memory buffers as they are now."""
        out = {}
        for name, module in self._modules.items():
            out[name] = module.weight.detach()
            out.update(zip(self._names[name], (getattr(module, attr) for attr in MEMORY)))
        return out

    def digest(self) -> str:
        """sha256 of the edited layers' weights and memories as they are now (everything else is the base model's)."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.live().items()):
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode())
            h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def replay(self, steps) -> None:
        """Propose each (remove, add) of `steps` in order, writing the memories once at the end: the
        same tensors as committing every step; nothing changes when a step fails. Caller holds `lock.write()`."""
        change, start = None, (self.active, self.memories)
        try:
            for remove, add in steps:
                change = self.propose(remove, add)
                self.active, self.memories = change.active, change.memories
        except BaseException:
            self.active, self.memories = start
            raise
        if change is not None:
            self.commit(change)

    def _rows(self, edits: dict[int, KeyValues], name: str, device) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], torch.Tensor]:
        """The kept rows (`select_rows`) of `edits` for one layer, stacked in order, on `device`, each
        row's edit and its `alone_shares` (from A₀⁻¹, the base memory's P, in float32)."""
        picked = {s: select_rows(*kv[name], self.keep) for s, kv in edits.items()}
        owners = tuple(s for s, (u, _) in picked.items() for _ in range(u.shape[0]))
        keys = torch.cat([u for u, _ in picked.values()]).to(device)
        # the alone shares only scale rows when γ > 0; without it they are never read (no pass over A₀⁻¹)
        alone = alone_shares(keys, owners, self._a0inv32[name]) if self.compensate else keys.new_ones(len(owners), dtype=torch.float64)
        return keys, torch.cat([d for _, d in picked.values()]).to(device), owners, alone
