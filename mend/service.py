"""The editing service: a served model, its editor, its journal. Everything the gRPC layer calls.

Semantics
- An apply of N records is one revision; each record becomes its own edit with its own keys and
  values (MEND edits token rows independently, so a batch splits exactly into per-edit rows),
  always computed on the base model's weights: an edit does not depend on which other edits are
  active or on their order. The weights are the base weights plus one least-squares update of the
  active set (`mend.model_state`).
- A new edit of a fact an active edit already changed (the same prompt after whitespace
  normalisation, or the same subject and relation) supersedes it: the older edit leaves the active
  set, is shown as superseded, and comes back if the newer one is rolled back. Within one apply a
  later record supersedes an earlier one. So two contradicting edits are never active together.
- Rolling back an edit means "as if it had never been applied": its rows leave the least-squares
  update, and the weights equal those of the same active set reached any other way (up to float64
  rounding). Rolling back everything restores the base weights bit for bit. `rollback_to(r)`
  restores the exact set of edits live at revision r, as a new revision (revisions only grow).
- Every acknowledged apply or rollback is in the journal before the call returns; a restart
  replays the journal's revisions to the same weights, bit for bit, and the same revision.
- A read replica (`leader` given) refuses writes and follows the journal another service writes
  with the same replay (`catch_up`), so at each revision its weights equal the writer's bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mend.aggregation import KeyValues
from mend.batching import encode, logits, tokenize_pairs
from mend.checkpoint import editor_hash, load_editor
from mend.editing import MendMethod
from mend.errors import (ConfigError, DeadlineExceededError, EditNotFoundError, InvalidEditError, MendError, NoEditorError,
                         NotLeaderError, StateConflictError)
from mend.journal import ROLLED_BACK, EditJournal, EditState, JournalEdit
from mend.metrics import LocalityCache, before_and_after, greedy_decode
from mend.model_state import Change, EditableModel
from mend.models import load_model, model_hash
from mend.records import EditRecord, Fact
from mend.targets import resolve_targets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceLimits:
    max_prompt_chars: int = 2000
    max_target_chars: int = 500
    max_edits_per_call: int = 128
    max_extra_prompts: int = 16  # paraphrases, and locality prompts, per edit
    max_new_tokens: int = 64
    locality_tokens: int = 4  # answer length taken from the model for a locality prompt given without one
    n_reference_locality: int = 8  # server-held locality prompts used when an edit brings none
    coalesce_ms: float = 5.0  # how long the writer lets a burst of single edits join one update, at most

    def __post_init__(self) -> None:
        if min(self.max_prompt_chars, self.max_target_chars, self.max_edits_per_call, self.max_new_tokens, self.locality_tokens) < 1:
            raise ConfigError("service limits must all be >= 1")


@dataclass(frozen=True)
class ApplyResult:
    revision: int  # the new revision (a dry run: the current one)
    edits: list[JournalEdit]  # a dry run: not in the journal (no seq, no edit id)
    replayed: bool  # True when a repeated request_id returned the original result


@dataclass
class _Call:
    """One apply call on its way to the writer."""

    records: list[EditRecord]
    keys: list[str]  # per-edit request ids
    request_id: str
    fingerprint: str
    author: str
    metrics: bool
    deadline: float | None
    coalesce: bool  # a single edit (ApplyEdit): may share a revision with others, idempotent by its edit's key
    result: ApplyResult | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class _Update:
    """One prepared update: the calls in it, their edits, and everything computed for them."""

    calls: list[_Call]
    records: list[EditRecord]
    kvs: list[KeyValues]
    facts: dict[int, tuple]  # each new edit's superseding keys, by seq
    states: dict[int, EditState]
    change: Change
    weights: dict[str, torch.Tensor]
    pre: list
    post: list
    following: dict


def _fingerprint(records: list[EditRecord], keys: list[str]) -> str:
    return hashlib.sha256(json.dumps([[r.to_dict() for r in records], keys], sort_keys=True).encode()).hexdigest()


def _clean(metrics) -> dict[str, float | None]:
    """Journal form of EditMetrics: NaN (not measured) as None; {} when the caller skipped metrics."""
    return {k: None if math.isnan(v) else v for k, v in metrics.as_dict().items()} if metrics is not None else {}


class EditService:
    def __init__(self, model, tokenizer, journal: EditJournal, targets, editor=None, locality: list[Fact] = (),
                 limits: ServiceLimits = ServiceLimits(), info: dict | None = None, leader: str | None = None):
        self.model, self.tokenizer, self.journal, self.limits = model, tokenizer, journal, limits
        self.method = MendMethod(editor) if editor is not None else None
        self.locality = list(locality)[: limits.n_reference_locality]
        self.info = dict(info or {})
        bases = {t.param_name: editor.base_system(t.param_name).detach() for t in targets} if editor is not None else None
        self.state = EditableModel(model, targets, bases, *((editor.cfg.gates(targets), editor.cfg.keep, editor.cfg.compensate)
                                                             if editor is not None else ()))
        self._locality_cache = LocalityCache()  # the live weights' predictions on locality prompts, for one revision
        self._queue: list[_Call] = []  # single edits waiting for the writer (coalesced)
        self._queue_lock = threading.Lock()
        self.on_update: Callable[[int, int], None] | None = None  # (calls, edits) of every update written: metrics
        self.leader = leader  # a replica: the leader's address, where writes go; None: this service writes
        self.revision = 0
        self._digest = (-1, "")  # (revision, sha256 of the edited weights at it): GetModelInfo
        self._states: dict[int, EditState] = {}  # live edits: active or superseded
        self._facts: dict[int, tuple] = {}  # the live edits' superseding keys
        started = time.perf_counter()
        self.catch_up()
        log.info("journal %s: revision %d, %d active edits replayed in %.1f s", journal.location, self.revision,
                 len(self.state.active), time.perf_counter() - started)

    def catch_up(self, max_revisions: int | None = None) -> int:
        """Repeat the journal's revisions beyond the served one, in order, as the writer made them: the
        same weights, bit for bit, at each revision. Start-up replays the whole journal so; a replica
        follows its leader so. At most `max_revisions` at a time (readers wait meanwhile); returns how
        many revisions the journal still has beyond the served one."""
        latest = self.journal.revision
        upto = latest if max_revisions is None else min(latest, self.revision + max_revisions)
        if upto <= self.revision:
            return latest - self.revision
        with self.state.lock.write():
            self._replay_to(upto)
        return latest - upto

    def _resync(self) -> None:
        """Before a write (caller holds the write lock): apply what the journal has beyond the served
        revision. Only a write whose commit was reported failed (the database connection dropped
        during COMMIT) but happened, or a writer that held the journal meanwhile, leaves any."""
        if (latest := self.journal.revision) > self.revision:
            log.warning("the journal is at revision %d, the served model at %d: applying the difference", latest, self.revision)
            self._replay_to(latest)

    def _replay_to(self, upto: int) -> None:
        """Apply the journal's revisions up to `upto` (caller holds the write lock)."""
        changes = self.journal.changes(self.revision, upto)
        wanted = {s for _, changed in changes for s, st in changed.items() if st.active}  # each read once
        loaded = {s: kv for s, kv in self.state.active.items() if s in wanted}
        loaded.update(self.journal.load_key_values(sorted(wanted - set(loaded))))

        def steps():
            on = set(self.state.active)
            for _, changed in changes:
                add = {s: loaded[s] for s, st in changed.items() if st.active and s not in on}
                remove = [s for s, st in changed.items() if not st.active and s in on]
                for kv in add.values():
                    self.state.check(kv)
                on = (on - set(remove)) | set(add)
                if add or remove:
                    yield remove, add

        self.state.replay(steps())
        for _, changed in changes:
            self._note_states(changed)
        self._load_facts(self._states)
        self.revision = upto

    def _load_facts(self, seqs) -> None:
        """The superseding keys of these edits, read from the journal where not known yet."""
        missing = {s for s in seqs if s not in self._facts}
        if missing:
            self._facts.update((e.seq, e.record.fact_keys()) for e in self.journal.edits(after_seq=min(missing) - 1, limit=10**9)
                               if e.seq in missing)

    @classmethod
    def open(cls, base_model: str, editor: str | None, journal: str, device: str = "auto", dtype: str = "float32",
             locality: list[Fact] = (), limits: ServiceLimits = ServiceLimits(),
             target_patterns: list[str] | None = None, n_last_blocks: int = 3, leader: str | None = None) -> "EditService":
        """Load everything from disk; `journal` is a directory or a postgresql:// URL (`mend.journal`).
        Without an editor the targets (the layers a journal's edits may touch) come from
        `target_patterns` / `n_last_blocks`, as in `mend.targets.resolve_targets`. `leader`: this
        service is a read replica of the server at that address, following the journal it writes."""
        model, tokenizer = load_model(base_model, device=device, dtype=dtype)
        base_hash = model_hash(base_model)
        edit_net = load_editor(editor, model) if editor else None
        targets = edit_net.targets if edit_net else resolve_targets(model, target_patterns, n_last_blocks)
        info = {"base_model_path": str(Path(base_model).resolve()), "base_model_hash": base_hash,
                "editor_path": str(Path(editor).resolve()) if editor else "", "editor_hash": editor_hash(editor) if editor else "",
                "dtype": dtype, "device": str(next(model.parameters()).device), "model_type": model.config.model_type}
        journal_ = EditJournal(journal, base_hash, writer=leader is None)
        if leader and (others := journal_.editor_hashes() - {info["editor_hash"]}):
            journal_.close()  # a replica with another editor would combine the same rows into other weights
            raise StateConflictError(f"the journal's edits were made with editor {sorted(others)[0][:12]}, not this replica's "
                                     f"{info['editor_hash'][:12] or '(none)'}: start the replica with the leader's editor")
        return cls(model, tokenizer, journal_, targets, edit_net, locality, limits, info, leader)

    def close(self) -> None:
        self.journal.close()

    def warm_up(self) -> None:
        """One generation and one edit computation (not applied), so the first real call is not slow."""
        self.generate("Warm up", 2)
        if self.method is not None:
            with self.state.lock.read():
                self.method.per_edit_key_values(self.model, self.tokenizer, [EditRecord(prompt="Warm up", target_new="now")],
                                                self.state.pristine)

    # ------------------------------------------------------------------ edits

    def _validate(self, records: list[EditRecord], request_id: str) -> None:
        lim = self.limits
        if not records:
            raise InvalidEditError("no edits given: send at least one")
        if len(records) > lim.max_edits_per_call:
            raise InvalidEditError(f"{len(records)} edits in one call; the limit is {lim.max_edits_per_call}: split them into chunks")
        if len(request_id) > 128:
            raise InvalidEditError("request_id is longer than 128 characters")
        for i, r in enumerate(records):
            for label, text, limit in [("prompt", r.prompt, lim.max_prompt_chars), ("target_new", r.target_new, lim.max_target_chars)]:
                if len(text) > limit:
                    raise InvalidEditError(f"edit {i}: {label} is {len(text)} characters; the limit is {limit}")
            for label, extra in [("rephrase prompts", r.rephrase_prompt), ("locality prompts", r.locality_prompt)]:
                if len(extra) > lim.max_extra_prompts:
                    raise InvalidEditError(f"edit {i}: {len(extra)} {label}; the limit is {lim.max_extra_prompts}")
                if any(not p.strip() or len(p) > lim.max_prompt_chars for p in extra):
                    raise InvalidEditError(f"edit {i}: {label} must be non-empty and at most {lim.max_prompt_chars} characters")
            if any(not a.strip() or len(a) > lim.max_target_chars for a in r.locality_ground_truth):
                raise InvalidEditError(f"edit {i}: locality answers must be non-empty and at most {lim.max_target_chars} characters "
                                       "(or give none: the model's own continuations are used)")
            pairs = [(r.prompt, r.target_new)] + [(p, r.target_new) for p in r.rephrase_prompt] + list(zip(r.locality_prompt, r.locality_ground_truth))
            try:  # what the model cannot take fails here, for this edit alone, not inside an update shared with others
                encode(self.tokenizer, [p for p, _ in pairs], [t for _, t in pairs])
            except InvalidEditError as e:
                raise InvalidEditError(f"edit {i}: {e}") from None

    def _measured(self, record: EditRecord) -> EditRecord:
        """The record as measured: server-held locality prompts when it brings none; the model's own
        continuation as the answer of a locality prompt given without one."""
        if not record.locality_prompt:
            facts = self.locality
            return dataclasses.replace(record, locality_prompt=tuple(f.prompt for f in facts),
                                       locality_ground_truth=tuple(f.answer for f in facts))
        if record.locality_ground_truth:
            return record
        p_ids, _ = tokenize_pairs(self.tokenizer, list(record.locality_prompt), ["x"] * len(record.locality_prompt))
        answers = greedy_decode(self.model, self.tokenizer, p_ids, [self.limits.locality_tokens] * len(p_ids))
        texts = tuple(self.tokenizer.decode(a, skip_special_tokens=True).strip() or "." for a in answers)
        return dataclasses.replace(record, locality_ground_truth=texts)

    def apply(self, records: list[EditRecord], request_id: str = "", deadline: float | None = None,
              edit_request_ids: list[str] | None = None, author: str = "anonymous", dry_run: bool = False,
              metrics: bool = True) -> ApplyResult:
        """Apply `records` as one revision, journaled as written by `author`. A repeated `request_id`
        returns the original result. `edit_request_ids` are per-edit keys (a single edit's key is
        `request_id`): an edit whose key is already in the journal is refused. `deadline` is a
        time.monotonic() value: past it, nothing is written and DeadlineExceededError is raised.
        `dry_run`: the same computation and metrics, nothing written (request ids are not looked at).
        `metrics=False` skips measuring the edits (bulk loads): they are journaled without metrics.

        A single edit without per-edit keys (ApplyEdit) is coalesced: the single edits that queue while
        the writer is busy are applied by the next writer as one update, one journal commit and one
        revision, each with its own edit id, metrics and error; a later arrival supersedes an earlier
        edit of the same fact."""
        keys = list(edit_request_ids or ([request_id] if len(records) == 1 else [""] * len(records)))
        self._validate(records, request_id)
        if len(keys) != len(records) or any(len(k) > 128 for k in keys) or len({k for k in keys if k}) != len([k for k in keys if k]):
            raise InvalidEditError("give one distinct request_id (at most 128 characters) per edit, or none")
        call = _Call(records, keys, request_id, _fingerprint(records, keys), author, metrics, deadline,
                     coalesce=edit_request_ids is None and len(records) == 1)
        if dry_run:
            with self.state.lock.write():
                return self._preview(call)
        self._require_leader()
        if call.coalesce:
            with self._queue_lock:
                self._queue.append(call)
        with self.state.lock.write():
            if call.result is None and call.error is None:  # not yet applied by another caller's update
                if call.coalesce:
                    group = self._gather()
                else:
                    group = [call]
                self._apply_group(group)
        if call.error is not None:
            raise call.error
        return call.result

    def _gather(self) -> list["_Call"]:
        """The queued single edits, once a burst of arrivals has joined: while the queue keeps growing,
        wait in 1 ms steps, at most `limits.coalesce_ms` (a lone caller waits 1 ms). Clients that send
        their next edit as soon as a reply comes back arrive within a few ms of each other; without
        the wait the first of them would take the writer alone."""
        end, seen = time.monotonic() + self.limits.coalesce_ms / 1000, -1
        while time.monotonic() < end:
            with self._queue_lock:
                n = len(self._queue)
            if n == seen:
                break
            seen = n
            time.sleep(0.001)
        with self._queue_lock:
            group, self._queue = self._queue, []
        return group

    def _replayed(self, call: "_Call") -> ApplyResult | None:
        """The original result when the call's request_id was applied before; a request_id (or per-edit
        key) already used for something else is refused."""
        rid = call.request_id
        if rid and (found := self.journal.find_request(rid)) is not None:
            revision, stored = found
            if stored != call.fingerprint:
                raise StateConflictError(f"request_id {rid!r} was already used for a different request (revision {revision})")
            return ApplyResult(revision, self.journal.edits(revision=revision), replayed=True)
        if rid and call.coalesce and (found := self.journal.find_edit_request(rid)) is not None:
            edit_id, stored = found
            if stored != call.fingerprint:
                raise StateConflictError(f"request_id {rid!r} was already used for a different request (edit {edit_id})")
            edit = self.journal.get(edit_id)
            return ApplyResult(edit.revision, [edit], replayed=True)
        if done := self.journal.existing_edit_ids(call.keys):
            raise StateConflictError(f"edit request_id(s) already applied: {done}; give a new request_id to apply again")
        return None

    def _apply_group(self, calls: list["_Call"]) -> None:
        """Apply every call that is not a repeat as one revision (caller holds the write lock). Each call
        gets its result or its own error."""
        todo, repeats = [], []
        try:
            self._resync()
            for c in calls:
                try:
                    if (replay := self._replayed(c)) is not None:
                        c.result = replay
                    elif c.request_id and any(c.request_id == t.request_id for t in todo):
                        repeats.append(c)  # a retry queued behind its own first attempt
                    else:
                        self._check_deadline(c.deadline)
                        self._require_editor()
                        todo.append(c)
                except MendError as e:
                    c.error = e
            if todo:
                self._write(todo)
            for c in repeats:
                try:
                    c.result = self._replayed(c)
                    if c.result is None:  # its first attempt failed in this same update
                        raise StateConflictError(f"request_id {c.request_id!r}: an earlier attempt queued in the same update "
                                                 "failed; nothing was applied, retry")
                except MendError as e:
                    c.error = e
        except BaseException as e:  # a failure of the whole update (journal, device): every call waiting on it gets it
            for c in calls:
                if c.result is None and c.error is None:
                    c.error = e
            if not isinstance(e, Exception):
                raise

    def _prepare(self, calls: list["_Call"]) -> "_Update":
        """Keys and values of every edit on the base weights, the proposed change of the active set and
        weights, and the metrics before and after; nothing is written. A call whose update would be
        non-finite gets its error and is left out."""
        kvs = self.method.per_edit_key_values(self.model, self.tokenizer, [r for c in calls for r in c.records], self.state.pristine)
        kept, kept_kvs, i = [], [], 0
        for c in calls:
            mine, i = kvs[i : i + len(c.records)], i + len(c.records)
            try:
                for kv in mine:
                    self.state.check(kv)
            except MendError as e:
                if len(calls) == 1:
                    raise
                c.error = e
                continue
            kept.append(c)
            kept_kvs += mine
        records = [r for c in kept for r in c.records]
        first = self.journal.next_seq()
        new = dict(zip(range(first, first + len(records)), kept_kvs))
        facts = dict(zip(new, (r.fact_keys() for r in records)))
        states, change = self._transition(set(self._states) | set(new), new, facts)
        weights = self.state.weights(change)
        pre, post, following = [None] * len(records), [None] * len(records), {}
        wanted = [i for i, c in enumerate(c for c in kept for _ in c.records) if c.metrics]
        if wanted:
            cache = self._locality_cache if self._locality_cache.revision == self.revision else None
            measured = [self._measured(records[i]) for i in wanted]
            before, after, following = before_and_after(self.model, self.tokenizer, measured, weights, cache)
            for i, b, a in zip(wanted, before, after):
                pre[i], post[i] = b, a
        return _Update(kept, records, kept_kvs, facts, states, change, weights, pre, post, following)

    def _write(self, calls: list["_Call"]) -> None:
        """Journal one update of `calls` as one revision, then make it live."""
        u = self._prepare(calls)
        if not u.calls:
            return
        lone = len(u.calls) == 1 and not u.calls[0].coalesce  # a call of several edits: idempotent by its request_id
        if len(u.calls) == 1:
            self._check_deadline(u.calls[0].deadline)
        revision, edits = self.journal.append_edits(
            u.records, u.kvs, [_clean(m) for m in u.pre], [_clean(m) for m in u.post], self.info.get("editor_hash", ""),
            u.calls[0].request_id if lone else "", u.calls[0].fingerprint if lone else "",
            [k for c in u.calls for k in c.keys], u.states, [c.author for c in u.calls for _ in c.records],
            [None if lone else c.fingerprint for c in u.calls for _ in c.records])
        self._facts.update(u.facts)
        self._commit(u.states, u.change, u.weights)
        self.revision = revision
        self._locality_cache = LocalityCache(revision, u.following)
        i = 0
        for c in u.calls:
            c.result, i = ApplyResult(revision, edits[i : i + len(c.records)], replayed=False), i + len(c.records)
        if self.on_update is not None:
            self.on_update(len(u.calls), len(u.records))

    def _preview(self, call: "_Call") -> ApplyResult:
        """A dry run: what `call` would do now, as edits that are not in the journal."""
        self._require_editor()
        self._check_deadline(call.deadline)
        u = self._prepare([call])
        now, editor = time.time(), self.info.get("editor_hash", "")
        return ApplyResult(self.revision, [JournalEdit(0, "", self.revision, r, _clean(b), _clean(a), False, None, "", editor, k, now, call.author)
                                           for r, b, a, k in zip(u.records, u.pre, u.post, call.keys)], replayed=False)

    def _transition(self, live: set[int], new: dict[int, KeyValues] | None = None,
                    new_facts: dict[int, tuple] | None = None) -> tuple[dict[int, EditState], Change]:
        """For the edits that will be live (applied, not rolled back; `new` ones with their fact keys
        `new_facts`): the state changes (newest first, an edit is superseded by the newest live edit
        sharing a fact key with it) and the proposed weight change. Nothing is written."""
        if new and live == self._states.keys() | new.keys() and min(new) > max(self._states, default=-1):
            # the common ApplyEdit: only newer edits join; when they share no fact key with a live edit or
            # with each other, every other state stays as it is (the loop below, without its O(live) cost)
            keys = [k for s in new for k in new_facts[s]]
            if len(set(keys)) == len(keys) and set(keys).isdisjoint(k for s in self._states for k in self._facts[s]):
                return {s: EditState(True) for s in new}, self.state.propose([], dict(sorted(new.items())))
        facts = {**self._facts, **(new_facts or {})}
        resolved: dict[int, EditState] = {}
        owner: dict[tuple, int] = {}
        for s in sorted(live, reverse=True):
            keys = facts[s]
            by = next((owner[k] for k in keys if k in owner), None)
            resolved[s] = EditState(by is None, by)
            if by is None:
                owner.update(dict.fromkeys(keys, s))
        states = {s: st for s, st in resolved.items() if self._states.get(s) != st}
        states.update({s: ROLLED_BACK for s in self._states if s not in resolved})
        was = set(self.state.active)
        remove = [s for s in was if not resolved.get(s, ROLLED_BACK).active]
        new = new or {}
        stored = self.journal.load_key_values([s for s, st in resolved.items() if st.active and s not in was and s not in new])
        add = {s: new[s] if s in new else stored[s] for s, st in sorted(resolved.items()) if st.active and s not in was}
        return states, self.state.propose(remove, add)

    def _commit(self, states: dict[int, EditState], change: Change, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write a journaled transition into the weights and the in-memory states."""
        self.state.commit(change, weights)
        self._note_states(states)

    def _note_states(self, states: dict[int, EditState]) -> None:
        """Keep the live edits' states (and their fact keys) in memory."""
        for s, st in states.items():
            if st.live:
                self._states[s] = st
            else:
                self._states.pop(s, None)
                self._facts.pop(s, None)

    def _require_leader(self) -> None:
        if self.leader is not None:
            raise NotLeaderError(f"this server is a read replica: send writes to the leader at {self.leader}")

    def _require_editor(self) -> None:
        if self.method is None:
            raise NoEditorError("this server has no editor loaded: start it with an editor checkpoint (`mend train-editor`)")

    @staticmethod
    def _check_deadline(deadline: float | None) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceededError("the deadline passed before the edit could be applied; nothing was changed")

    def rollback_edit(self, edit_id: str, author: str = "anonymous") -> int:
        """Roll back an active or superseded edit; what it superseded comes back."""
        self._require_leader()
        with self.state.lock.write():
            self._resync()
            edit = self.journal.get(edit_id)
            if edit.seq not in self._states:
                raise StateConflictError(f"edit {edit_id} was already rolled back (revision {edit.rolled_back_at})")
            states, change = self._transition(set(self._states) - {edit.seq})
            self.revision = self.journal.append_states("rollback", states, author)
            self._commit(states, change)
            return self.revision

    def rollback_to(self, revision: int, author: str = "anonymous") -> tuple[int, int]:
        """Restore the edits live at `revision` (0 = the base model): (new revision, edits changed)."""
        if revision < 0:
            raise InvalidEditError(f"revision {revision} is negative; 0 is the base model")
        self._require_leader()
        with self.state.lock.write():
            self._resync()
            if revision > self.revision:
                raise EditNotFoundError(f"no revision {revision}: the current revision is {self.revision}")
            live = {s for s, st in self.journal.states(revision).items() if st.live}
            self._load_facts(live)
            states, change = self._transition(live)
            if not states:
                return self.revision, 0
            self.revision = self.journal.append_states("rollback_to", states, author)
            self._commit(states, change)
            return self.revision, len(states)

    @property
    def n_active(self) -> int:
        return len(self.state.active)

    def get(self, edit_id: str) -> JournalEdit:
        return self.journal.get(edit_id)

    def list(self, active_only: bool = False, after_seq: int = 0, limit: int = 1000) -> list[JournalEdit]:
        if not 0 <= after_seq < 2**63:
            raise InvalidEditError(f"after_seq {after_seq} is out of range: give 0 or the last seq of the previous page")
        return self.journal.edits(active_only=active_only, after_seq=after_seq, limit=limit)

    # ------------------------------------------------------------------ reads of the current model

    def generate(self, prompt: str, max_new_tokens: int = 16) -> tuple[str, list[int], int]:
        """(text, token ids, revision) of the greedy continuation, stopped at end-of-text."""
        if not prompt.strip() or len(prompt) > self.limits.max_prompt_chars:
            raise InvalidEditError(f"prompt must be non-empty and at most {self.limits.max_prompt_chars} characters")
        if not 1 <= max_new_tokens <= self.limits.max_new_tokens:
            raise InvalidEditError(f"max_new_tokens must be between 1 and {self.limits.max_new_tokens}")
        p_ids, _ = tokenize_pairs(self.tokenizer, [prompt], ["x"])
        with self.state.lock.read():
            (ids,) = greedy_decode(self.model, self.tokenizer, p_ids, [max_new_tokens])
            revision = self.revision
        eos = self.tokenizer.eos_token_id
        ids = ids[: ids.index(eos)] if eos in ids else ids
        return self.tokenizer.decode(ids, skip_special_tokens=True), ids, revision

    @torch.no_grad()
    def score(self, prompt: str, target: str) -> tuple[list[float], bool, int]:
        """(log-probability of each target token, whether greedy decoding gives the target, revision)."""
        for label, text in [("prompt", prompt), ("target", target)]:
            if not text.strip() or len(text) > self.limits.max_prompt_chars:
                raise InvalidEditError(f"{label} must be non-empty and at most {self.limits.max_prompt_chars} characters")
        batch = encode(self.tokenizer, [prompt], [target]).to(next(self.model.parameters()).device)
        with self.state.lock.read():
            out = logits(self.model, batch)
            revision = self.revision
        mask = batch.target_mask[0]
        logp = torch.log_softmax(out[0], -1)[mask]  # (T_target, V)
        labels = batch.labels[0, 1:][mask]
        token_logp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return token_logp.tolist(), bool((logp.argmax(-1) == labels).all()), revision

    def model_info(self, weights_hash: bool = False) -> dict:
        """What GetModelInfo reports; `weights_hash`: also the sha256 of the edited weights as served
        (cached per revision)."""
        journal_revision = self.journal.revision
        with self.state.lock.read():
            if weights_hash and self._digest[0] != self.revision:
                self._digest = (self.revision, self.state.digest())
            return {"role": "replica" if self.leader else "leader", "leader": self.leader or "", **self.info,
                    "targets": list(self.state.targets), "revision": self.revision, "journal_revision": max(journal_revision, self.revision),
                    "active_edits": len(self.state.active), "editor_loaded": self.method is not None, "weights_hash": self._digest[1] if weights_hash else ""}
