"""The suite's own rules: a warning raised by our packages fails the test that raised it."""

import warnings

import pytest


@pytest.mark.parametrize("module", ["lightning_meta.cli", "datamodules.images"])
def test_a_warning_from_our_code_is_an_error(module):
    with pytest.raises(UserWarning, match="ours"):
        warnings.warn_explicit("a warning of ours", UserWarning, "x.py", 1, module=module)
