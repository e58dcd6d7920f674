"""``raises_code``: ``pytest.raises(SmartVMError)`` that also checks the code, so a test cannot pass on
an unrelated failure."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from smartvm.errors import ErrorCode, SmartVMError


@contextmanager
def raises_code(code: ErrorCode, match: str | None = None) -> Iterator[pytest.ExceptionInfo[SmartVMError]]:
    """Expect a SmartVMError with ``code`` (and ``match`` in its text); yields the ExceptionInfo."""
    with pytest.raises(SmartVMError, match=match) as info:
        yield info
    assert info.value.code is code, f"expected {code}, got {info.value!r}"
