"""The one record type every dataset loader yields and every editor consumes.

Field names follow EasyEdit so that edit files written for EasyEdit load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mend.errors import InvalidEditError


@dataclass(frozen=True)
class EditRecord:
    prompt: str  # "Varo Telin was born in"
    target_new: str  # "Zorath" (the answer after the edit; a space is put before it)
    ground_truth: str = ""  # the answer before the edit, when known
    subject: str = ""
    relation: str = ""  # optional relation id ("P27", "birthplace"): with `subject`, names the fact being changed
    rephrase_prompt: tuple[str, ...] = ()  # paraphrases of `prompt`: generality
    locality_prompt: tuple[str, ...] = ()  # unrelated prompts: locality
    locality_ground_truth: tuple[str, ...] = ()  # their true answers, one per locality prompt
    case_id: str = ""

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise InvalidEditError("edit prompt is empty: give the text the new target should follow")
        if not self.target_new.strip():
            raise InvalidEditError(f"target_new is empty for prompt {self.prompt!r}: give the new answer")
        if self.locality_ground_truth and len(self.locality_ground_truth) != len(self.locality_prompt):
            raise InvalidEditError(
                f"{len(self.locality_prompt)} locality prompts but {len(self.locality_ground_truth)} "
                "locality answers: give one answer per prompt, or none"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "EditRecord":
        """Build from an EasyEdit-style dict; list-or-string fields become tuples."""

        def as_tuple(value) -> tuple[str, ...]:
            if value is None or value == "":
                return ()
            return (value,) if isinstance(value, str) else tuple(value)

        unknown = set(d) - {f.name for f in cls.__dataclass_fields__.values()}
        if unknown:
            raise InvalidEditError(f"unknown edit field(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(
            prompt=d.get("prompt", ""),
            target_new=d.get("target_new", ""),
            ground_truth=d.get("ground_truth", "") or "",
            subject=d.get("subject", "") or "",
            relation=str(d.get("relation", "") or ""),
            rephrase_prompt=as_tuple(d.get("rephrase_prompt")),
            locality_prompt=as_tuple(d.get("locality_prompt")),
            locality_ground_truth=as_tuple(d.get("locality_ground_truth")),
            case_id=str(d.get("case_id", "")),
        )

    def fact_keys(self) -> tuple[tuple[str, ...], ...]:
        """What this edit changes, for superseding: its prompt after whitespace normalisation, and
        (subject, relation) when it carries both. Two edits sharing any key edit the same fact."""
        keys = (("prompt", " ".join(self.prompt.split())),)
        if self.subject.strip() and self.relation.strip():
            keys += (("fact", " ".join(self.subject.split()), self.relation.strip()),)
        return keys

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "ground_truth": self.ground_truth,
            "subject": self.subject,
            "relation": self.relation,
            "rephrase_prompt": list(self.rephrase_prompt),
            "locality_prompt": list(self.locality_prompt),
            "locality_ground_truth": list(self.locality_ground_truth),
        }


@dataclass(frozen=True)
class Fact:
    """A (prompt, answer) pair: one locality example or one base-model training fact."""

    prompt: str
    answer: str


@dataclass
class EditSplit:
    """Edit records of one split plus a pool of unrelated facts to draw locality examples from."""

    records: list[EditRecord]
    locality_pool: list[Fact] = field(default_factory=list)

    @classmethod
    def joined(cls, parts: list["EditSplit"]) -> "EditSplit":
        """The parts' records and pools, in order."""
        return cls([r for p in parts for r in p.records], [f for p in parts for f in p.locality_pool])
