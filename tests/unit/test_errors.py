"""The error hierarchy travels by its own fields: every public error round-trips
through describe()/rebuild() as the same class with the same fields and message, an
unknown class arrives as its nearest known ancestor, and two public error classes may
not share a name."""

from __future__ import annotations

import enum
import inspect
import typing
from typing import Any

import pytest

import phalanx
import phalanx.checkpoint  # every module that defined errors is loaded
import phalanx.comm.schedules
from phalanx import errors
from phalanx.errors import ErrorInfo, PeerFailure, PhalanxError, describe, rebuild


def _public_error_classes() -> list[type[PhalanxError]]:
    return sorted(set(errors._REGISTRY.values()), key=lambda c: c.__name__)


def _sample(param: inspect.Parameter, hint: Any, i: int) -> Any:
    """A distinctive value for one constructor parameter, from its annotation."""
    text = str(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return list(hint)[i % len(list(hint))]
    if "Iterable[int]" in text:
        return (3 + i, 1)
    if hint is int or text in ("int", "int | None"):
        return 40 + i
    if hint is float or text == "float":
        return 1.5 + i
    if hint is str or text == "str":
        return f"{param.name}-{i}"
    if param.name == "key":  # a shard key: does not travel (its default comes back)
        return None
    return f"{param.name}-{i}"


def _instance(cls: type[PhalanxError]) -> PhalanxError:
    params = errors._params(cls)
    if not params:
        return cls(f"a {cls.__name__} happened")
    hints = typing.get_type_hints(cls.__init__)
    kwargs = {p.name: _sample(p, hints.get(p.name), i) for i, p in enumerate(params)}
    return cls(**kwargs)


def _fields(exc: BaseException) -> dict[str, Any]:
    return {
        p.name: getattr(exc, p.name, None)
        for p in errors._params(type(exc))
        if p.name not in ("message", "key")
    }


@pytest.mark.parametrize("cls", _public_error_classes(), ids=lambda c: c.__name__)
def test_every_public_error_round_trips_as_itself(cls: type[PhalanxError]) -> None:
    exc = _instance(cls)
    info = describe(exc)
    assert info.chain[0] == cls.__name__ and info.chain[-1] == "PhalanxError"
    back = rebuild(info)
    assert type(back) is cls
    assert str(back) == str(exc)
    assert _fields(back) == _fields(exc)


def test_every_constructor_parameter_is_an_attribute() -> None:
    """The rule that makes the encoding derivable: a field not kept would be lost."""
    for cls in _public_error_classes():
        exc = _instance(cls)
        for p in errors._params(cls):
            if p.name != "message":
                assert hasattr(exc, p.name), f"{cls.__name__} does not keep {p.name!r}"


def test_an_unknown_class_arrives_as_its_nearest_known_ancestor() -> None:
    exc = PeerFailure(op="all_reduce", seq=7, epoch=3, suspects=[2], reason="timeout")
    info = describe(exc)
    newer = ErrorInfo(("PeerFailureFromTheFuture", *info.chain), info.message, info.fields)
    back = rebuild(newer)
    assert type(back) is PeerFailure and back.suspects == frozenset({2}) and back.seq == 7
    assert str(back) == str(exc)
    assert type(rebuild(ErrorInfo(("Nope",), "x"))) is PhalanxError


def test_builtins_and_foreign_errors() -> None:
    back = rebuild(describe(TimeoutError("no usable view in time")))
    assert type(back) is TimeoutError and str(back) == "no usable view in time"
    bug = rebuild(describe(KeyError("oops")))
    assert type(bug) is PhalanxError and "KeyError" in str(bug)


def test_a_missing_required_field_still_gives_the_class_and_message() -> None:
    back = rebuild(ErrorInfo(("PeerFailure", "CommError", "PhalanxError"), "garbled", ()))
    assert isinstance(back, PeerFailure) and str(back) == "garbled"


def test_two_public_error_classes_may_not_share_a_name() -> None:
    with pytest.raises(TypeError, match="two public error classes named ConfigError"):
        type("ConfigError", (PhalanxError,), {"__module__": "somewhere.else"})


def test_the_package_exports_the_errors_without_lazy_imports() -> None:
    for name in ("ViewChanged", "StepAborted", "StateSyncError", "SnapshotAbandoned",
                 "LayoutError", "CommitUnknown", "Evicted"):  # fmt: skip
        assert getattr(phalanx, name) is getattr(errors, name)
