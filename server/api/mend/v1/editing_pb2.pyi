from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EditSpec(_message.Message):
    __slots__ = ("prompt", "target_new", "rephrase_prompts", "locality_prompts", "locality_answers", "subject", "ground_truth", "case_id", "request_id", "relation")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_NEW_FIELD_NUMBER: _ClassVar[int]
    REPHRASE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RELATION_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    target_new: str
    rephrase_prompts: _containers.RepeatedScalarFieldContainer[str]
    locality_prompts: _containers.RepeatedScalarFieldContainer[str]
    locality_answers: _containers.RepeatedScalarFieldContainer[str]
    subject: str
    ground_truth: str
    case_id: str
    request_id: str
    relation: str
    def __init__(self, prompt: _Optional[str] = ..., target_new: _Optional[str] = ..., rephrase_prompts: _Optional[_Iterable[str]] = ..., locality_prompts: _Optional[_Iterable[str]] = ..., locality_answers: _Optional[_Iterable[str]] = ..., subject: _Optional[str] = ..., ground_truth: _Optional[str] = ..., case_id: _Optional[str] = ..., request_id: _Optional[str] = ..., relation: _Optional[str] = ...) -> None: ...

class EditMetrics(_message.Message):
    __slots__ = ("reliability_tf", "reliability_em", "generality_tf", "generality_em", "locality_tf", "locality_em")
    RELIABILITY_TF_FIELD_NUMBER: _ClassVar[int]
    RELIABILITY_EM_FIELD_NUMBER: _ClassVar[int]
    GENERALITY_TF_FIELD_NUMBER: _ClassVar[int]
    GENERALITY_EM_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_TF_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_EM_FIELD_NUMBER: _ClassVar[int]
    reliability_tf: float
    reliability_em: float
    generality_tf: float
    generality_em: float
    locality_tf: float
    locality_em: float
    def __init__(self, reliability_tf: _Optional[float] = ..., reliability_em: _Optional[float] = ..., generality_tf: _Optional[float] = ..., generality_em: _Optional[float] = ..., locality_tf: _Optional[float] = ..., locality_em: _Optional[float] = ...) -> None: ...

class Edit(_message.Message):
    __slots__ = ("edit_id", "seq", "revision", "spec", "before", "after", "active", "rolled_back_at_revision", "request_id", "created_unix", "editor_hash", "superseded_by", "applied_by", "rolled_back_by")
    EDIT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_AT_REVISION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    EDITOR_HASH_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_BY_FIELD_NUMBER: _ClassVar[int]
    APPLIED_BY_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_BY_FIELD_NUMBER: _ClassVar[int]
    edit_id: str
    seq: int
    revision: int
    spec: EditSpec
    before: EditMetrics
    after: EditMetrics
    active: bool
    rolled_back_at_revision: int
    request_id: str
    created_unix: float
    editor_hash: str
    superseded_by: str
    applied_by: str
    rolled_back_by: str
    def __init__(self, edit_id: _Optional[str] = ..., seq: _Optional[int] = ..., revision: _Optional[int] = ..., spec: _Optional[_Union[EditSpec, _Mapping]] = ..., before: _Optional[_Union[EditMetrics, _Mapping]] = ..., after: _Optional[_Union[EditMetrics, _Mapping]] = ..., active: _Optional[bool] = ..., rolled_back_at_revision: _Optional[int] = ..., request_id: _Optional[str] = ..., created_unix: _Optional[float] = ..., editor_hash: _Optional[str] = ..., superseded_by: _Optional[str] = ..., applied_by: _Optional[str] = ..., rolled_back_by: _Optional[str] = ...) -> None: ...

class ApplyEditRequest(_message.Message):
    __slots__ = ("edit", "request_id", "dry_run", "skip_metrics")
    EDIT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    SKIP_METRICS_FIELD_NUMBER: _ClassVar[int]
    edit: EditSpec
    request_id: str
    dry_run: bool
    skip_metrics: bool
    def __init__(self, edit: _Optional[_Union[EditSpec, _Mapping]] = ..., request_id: _Optional[str] = ..., dry_run: _Optional[bool] = ..., skip_metrics: _Optional[bool] = ...) -> None: ...

class ApplyEditResponse(_message.Message):
    __slots__ = ("edit_id", "model_revision", "before", "after", "replayed")
    EDIT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    edit_id: str
    model_revision: int
    before: EditMetrics
    after: EditMetrics
    replayed: bool
    def __init__(self, edit_id: _Optional[str] = ..., model_revision: _Optional[int] = ..., before: _Optional[_Union[EditMetrics, _Mapping]] = ..., after: _Optional[_Union[EditMetrics, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ApplyEditsRequest(_message.Message):
    __slots__ = ("edits", "request_id", "dry_run", "skip_metrics")
    EDITS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    SKIP_METRICS_FIELD_NUMBER: _ClassVar[int]
    edits: _containers.RepeatedCompositeFieldContainer[EditSpec]
    request_id: str
    dry_run: bool
    skip_metrics: bool
    def __init__(self, edits: _Optional[_Iterable[_Union[EditSpec, _Mapping]]] = ..., request_id: _Optional[str] = ..., dry_run: _Optional[bool] = ..., skip_metrics: _Optional[bool] = ...) -> None: ...

class ApplyEditsResponse(_message.Message):
    __slots__ = ("edits", "model_revision", "replayed")
    EDITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    edits: _containers.RepeatedCompositeFieldContainer[Edit]
    model_revision: int
    replayed: bool
    def __init__(self, edits: _Optional[_Iterable[_Union[Edit, _Mapping]]] = ..., model_revision: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class RollbackEditRequest(_message.Message):
    __slots__ = ("edit_id",)
    EDIT_ID_FIELD_NUMBER: _ClassVar[int]
    edit_id: str
    def __init__(self, edit_id: _Optional[str] = ...) -> None: ...

class RollbackEditResponse(_message.Message):
    __slots__ = ("model_revision",)
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    model_revision: int
    def __init__(self, model_revision: _Optional[int] = ...) -> None: ...

class RollbackToRequest(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class RollbackToResponse(_message.Message):
    __slots__ = ("model_revision", "edits_changed")
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    EDITS_CHANGED_FIELD_NUMBER: _ClassVar[int]
    model_revision: int
    edits_changed: int
    def __init__(self, model_revision: _Optional[int] = ..., edits_changed: _Optional[int] = ...) -> None: ...

class ListEditsRequest(_message.Message):
    __slots__ = ("active_only", "after_seq", "page_size")
    ACTIVE_ONLY_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    active_only: bool
    after_seq: int
    page_size: int
    def __init__(self, active_only: _Optional[bool] = ..., after_seq: _Optional[int] = ..., page_size: _Optional[int] = ...) -> None: ...

class ListEditsResponse(_message.Message):
    __slots__ = ("edits", "model_revision")
    EDITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    edits: _containers.RepeatedCompositeFieldContainer[Edit]
    model_revision: int
    def __init__(self, edits: _Optional[_Iterable[_Union[Edit, _Mapping]]] = ..., model_revision: _Optional[int] = ...) -> None: ...

class GetEditRequest(_message.Message):
    __slots__ = ("edit_id",)
    EDIT_ID_FIELD_NUMBER: _ClassVar[int]
    edit_id: str
    def __init__(self, edit_id: _Optional[str] = ...) -> None: ...

class GetEditResponse(_message.Message):
    __slots__ = ("edit",)
    EDIT_FIELD_NUMBER: _ClassVar[int]
    edit: Edit
    def __init__(self, edit: _Optional[_Union[Edit, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "model_revision")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    model_revision: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., model_revision: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("prompt", "target")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    target: str
    def __init__(self, prompt: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("logprob", "probability", "token_logprobs", "greedy_match", "model_revision")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    GREEDY_MATCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    probability: float
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    greedy_match: bool
    model_revision: int
    def __init__(self, logprob: _Optional[float] = ..., probability: _Optional[float] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., greedy_match: _Optional[bool] = ..., model_revision: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("weights_hash",)
    WEIGHTS_HASH_FIELD_NUMBER: _ClassVar[int]
    weights_hash: bool
    def __init__(self, weights_hash: _Optional[bool] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("base_model_path", "base_model_hash", "editor_path", "editor_hash", "target_layers", "dtype", "device", "model_revision", "active_edits", "model_type", "editor_loaded", "role", "leader", "journal_revision", "weights_hash")
    BASE_MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    EDITOR_PATH_FIELD_NUMBER: _ClassVar[int]
    EDITOR_HASH_FIELD_NUMBER: _ClassVar[int]
    TARGET_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_EDITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    EDITOR_LOADED_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    JOURNAL_REVISION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_HASH_FIELD_NUMBER: _ClassVar[int]
    base_model_path: str
    base_model_hash: str
    editor_path: str
    editor_hash: str
    target_layers: _containers.RepeatedScalarFieldContainer[str]
    dtype: str
    device: str
    model_revision: int
    active_edits: int
    model_type: str
    editor_loaded: bool
    role: str
    leader: str
    journal_revision: int
    weights_hash: str
    def __init__(self, base_model_path: _Optional[str] = ..., base_model_hash: _Optional[str] = ..., editor_path: _Optional[str] = ..., editor_hash: _Optional[str] = ..., target_layers: _Optional[_Iterable[str]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., model_revision: _Optional[int] = ..., active_edits: _Optional[int] = ..., model_type: _Optional[str] = ..., editor_loaded: _Optional[bool] = ..., role: _Optional[str] = ..., leader: _Optional[str] = ..., journal_revision: _Optional[int] = ..., weights_hash: _Optional[str] = ...) -> None: ...
