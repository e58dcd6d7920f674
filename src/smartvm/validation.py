"""The base of smartvm's pydantic models: a bad value is a SmartVMError, never a pydantic error.

Construction (``Model(...)``, ``Model.model_validate(...)``, ``model_validate_json``) and assignment
raise ``SmartVMError(INVALID_CONFIG)`` naming every bad field; being a :class:`InvalidValueError` it
is also a ``ValueError``, so callers may catch either.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ValidationError

from smartvm.errors import ErrorCode, SmartVMError


def describe_validation_error(exc: ValidationError, what: str = "configuration") -> str:
    """One clause per problem, each naming the field path."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or what
        lines.append(f"{where}: {err['msg']}")
    return f"invalid {what}: " + "; ".join(lines)


def invalid_config(exc: ValidationError, what: str) -> SmartVMError:
    """``SmartVMError(INVALID_CONFIG)`` for a pydantic validation error of ``what``."""
    return SmartVMError(ErrorCode.INVALID_CONFIG, describe_validation_error(exc, what))


class Model(BaseModel):
    """A pydantic model whose validation errors are ``SmartVMError(INVALID_CONFIG)`` naming the field."""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise invalid_config(exc, type(self).__name__) from exc

    # like pydantic's RootModel: nested models are still validated by pydantic itself (one error naming
    # the whole field path), not through this __init__
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise invalid_config(exc, cls.__name__) from exc

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, *args: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate_json(json_data, *args, **kwargs)
        except ValidationError as exc:
            raise invalid_config(exc, cls.__name__) from exc

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise invalid_config(exc, type(self).__name__) from exc
