"""The one constructor-validation helper and its message format."""

from __future__ import annotations

import pytest

from lightning_fed.validation import need


def test_need_passes_or_names_key_value_and_what_is_allowed():
    need("Thing", True, "ratio", 2.0, "in [0, 1)")
    with pytest.raises(ValueError, match=r"^Thing: ratio=2\.0 is not allowed; ratio must be in \[0, 1\)$"):
        need("Thing", False, "ratio", 2.0, "in [0, 1)")
    with pytest.raises(ValueError, match=r"scheme='int3' is not allowed"):
        need("QuantizationAware", False, "scheme", "int3", "one of ('int8',)")
