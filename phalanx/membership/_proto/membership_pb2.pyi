from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RejectReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECT_REASON_UNSPECIFIED: _ClassVar[RejectReason]
    REJECT_REASON_BAD_AUTH: _ClassVar[RejectReason]
    REJECT_REASON_VERSION_MISMATCH: _ClassVar[RejectReason]
    REJECT_REASON_DUPLICATE_ID: _ClassVar[RejectReason]
    REJECT_REASON_STALE_EPOCH: _ClassVar[RejectReason]
    REJECT_REASON_UNREACHABLE_ADDRESS: _ClassVar[RejectReason]
    REJECT_REASON_MALFORMED: _ClassVar[RejectReason]
    REJECT_REASON_NOT_MEMBER: _ClassVar[RejectReason]
    REJECT_REASON_EVICTED: _ClassVar[RejectReason]
    REJECT_REASON_STALE_INCARNATION: _ClassVar[RejectReason]
    REJECT_REASON_GROUP_FULL: _ClassVar[RejectReason]
    REJECT_REASON_SHUTTING_DOWN: _ClassVar[RejectReason]

class ViewCause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VIEW_CAUSE_UNSPECIFIED: _ClassVar[ViewCause]
    VIEW_CAUSE_SNAPSHOT: _ClassVar[ViewCause]
    VIEW_CAUSE_JOIN: _ClassVar[ViewCause]
    VIEW_CAUSE_LEAVE: _ClassVar[ViewCause]
    VIEW_CAUSE_FAILURE: _ClassVar[ViewCause]
    VIEW_CAUSE_RECOVERY: _ClassVar[ViewCause]

class CommitOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMIT_OUTCOME_UNSPECIFIED: _ClassVar[CommitOutcome]
    COMMIT_OUTCOME_ALL_OK: _ClassVar[CommitOutcome]
    COMMIT_OUTCOME_MEMBER_FAILED: _ClassVar[CommitOutcome]
    COMMIT_OUTCOME_VIEW_CHANGED: _ClassVar[CommitOutcome]
    COMMIT_OUTCOME_TIMEOUT: _ClassVar[CommitOutcome]
    COMMIT_OUTCOME_UNKNOWN: _ClassVar[CommitOutcome]
REJECT_REASON_UNSPECIFIED: RejectReason
REJECT_REASON_BAD_AUTH: RejectReason
REJECT_REASON_VERSION_MISMATCH: RejectReason
REJECT_REASON_DUPLICATE_ID: RejectReason
REJECT_REASON_STALE_EPOCH: RejectReason
REJECT_REASON_UNREACHABLE_ADDRESS: RejectReason
REJECT_REASON_MALFORMED: RejectReason
REJECT_REASON_NOT_MEMBER: RejectReason
REJECT_REASON_EVICTED: RejectReason
REJECT_REASON_STALE_INCARNATION: RejectReason
REJECT_REASON_GROUP_FULL: RejectReason
REJECT_REASON_SHUTTING_DOWN: RejectReason
VIEW_CAUSE_UNSPECIFIED: ViewCause
VIEW_CAUSE_SNAPSHOT: ViewCause
VIEW_CAUSE_JOIN: ViewCause
VIEW_CAUSE_LEAVE: ViewCause
VIEW_CAUSE_FAILURE: ViewCause
VIEW_CAUSE_RECOVERY: ViewCause
COMMIT_OUTCOME_UNSPECIFIED: CommitOutcome
COMMIT_OUTCOME_ALL_OK: CommitOutcome
COMMIT_OUTCOME_MEMBER_FAILED: CommitOutcome
COMMIT_OUTCOME_VIEW_CHANGED: CommitOutcome
COMMIT_OUTCOME_TIMEOUT: CommitOutcome
COMMIT_OUTCOME_UNKNOWN: CommitOutcome

class Header(_message.Message):
    __slots__ = ("protocol_version", "sender_id", "incarnation", "epoch", "timestamp_ms", "nonce", "mac")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    sender_id: str
    incarnation: int
    epoch: int
    timestamp_ms: int
    nonce: bytes
    mac: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., sender_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., epoch: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., mac: _Optional[bytes] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("id", "addresses", "incarnation", "zone")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    id: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    incarnation: int
    zone: str
    def __init__(self, id: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., incarnation: _Optional[int] = ..., zone: _Optional[str] = ...) -> None: ...

class View(_message.Message):
    __slots__ = ("epoch", "members")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, epoch: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("epoch", "step", "committed")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    step: int
    committed: bool
    def __init__(self, epoch: _Optional[int] = ..., step: _Optional[int] = ..., committed: _Optional[bool] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("heartbeat_interval_ms", "heartbeat_timeout_ms")
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    def __init__(self, heartbeat_interval_ms: _Optional[int] = ..., heartbeat_timeout_ms: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("header", "member", "known_view", "last_decision")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    KNOWN_VIEW_FIELD_NUMBER: _ClassVar[int]
    LAST_DECISION_FIELD_NUMBER: _ClassVar[int]
    header: Header
    member: Member
    known_view: View
    last_decision: Decision
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., member: _Optional[_Union[Member, _Mapping]] = ..., known_view: _Optional[_Union[View, _Mapping]] = ..., last_decision: _Optional[_Union[Decision, _Mapping]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("header", "view", "admitted", "timing", "coordinator_run")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_RUN_FIELD_NUMBER: _ClassVar[int]
    header: Header
    view: View
    admitted: bool
    timing: Timing
    coordinator_run: str
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., view: _Optional[_Union[View, _Mapping]] = ..., admitted: _Optional[bool] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., coordinator_run: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("header", "reason")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    header: Header
    reason: str
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("header", "view")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    header: Header
    view: View
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., view: _Optional[_Union[View, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("header",)
    HEADER_FIELD_NUMBER: _ClassVar[int]
    header: Header
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("header", "epoch", "coordinator_run", "timing")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_RUN_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    header: Header
    epoch: int
    coordinator_run: str
    timing: Timing
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., epoch: _Optional[int] = ..., coordinator_run: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("header",)
    HEADER_FIELD_NUMBER: _ClassVar[int]
    header: Header
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("header", "view", "cause", "removed_ids", "removed_causes", "evicted")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    REMOVED_IDS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_CAUSES_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    header: Header
    view: View
    cause: ViewCause
    removed_ids: _containers.RepeatedScalarFieldContainer[str]
    removed_causes: _containers.RepeatedScalarFieldContainer[str]
    evicted: bool
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., view: _Optional[_Union[View, _Mapping]] = ..., cause: _Optional[_Union[ViewCause, str]] = ..., removed_ids: _Optional[_Iterable[str]] = ..., removed_causes: _Optional[_Iterable[str]] = ..., evicted: _Optional[bool] = ...) -> None: ...

class ReportFailureRequest(_message.Message):
    __slots__ = ("header", "suspect_ids", "reason")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    header: Header
    suspect_ids: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., suspect_ids: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportFailureResponse(_message.Message):
    __slots__ = ("header", "suspected_ids")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SUSPECTED_IDS_FIELD_NUMBER: _ClassVar[int]
    header: Header
    suspected_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., suspected_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("header", "step", "ok", "last_decision")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    LAST_DECISION_FIELD_NUMBER: _ClassVar[int]
    header: Header
    step: int
    ok: bool
    last_decision: Decision
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., step: _Optional[int] = ..., ok: _Optional[bool] = ..., last_decision: _Optional[_Union[Decision, _Mapping]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("header", "epoch", "step", "committed", "outcome")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    header: Header
    epoch: int
    step: int
    committed: bool
    outcome: CommitOutcome
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., committed: _Optional[bool] = ..., outcome: _Optional[_Union[CommitOutcome, str]] = ...) -> None: ...

class StateEntry(_message.Message):
    __slots__ = ("name", "nbytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    nbytes: int
    sha256: bytes
    def __init__(self, name: _Optional[str] = ..., nbytes: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class StateManifestRequest(_message.Message):
    __slots__ = ("header", "step")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    header: Header
    step: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., step: _Optional[int] = ...) -> None: ...

class StateManifestResponse(_message.Message):
    __slots__ = ("header", "step", "epoch", "entries", "data_address", "transfer_token", "state_hash")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    header: Header
    step: int
    epoch: int
    entries: _containers.RepeatedCompositeFieldContainer[StateEntry]
    data_address: str
    transfer_token: bytes
    state_hash: bytes
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[StateEntry, _Mapping]]] = ..., data_address: _Optional[str] = ..., transfer_token: _Optional[bytes] = ..., state_hash: _Optional[bytes] = ...) -> None: ...
