"""pcbench._malloc: the one allocator constant, in-process mallopt, and what gets recorded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pcbench import _malloc


def test_one_constant_shared_by_the_benchmarks_and_the_preparers() -> None:
    import benchmarks.harness
    import data_prep.common

    assert benchmarks.harness.TUNED_MALLOC is _malloc.TUNED_MALLOC
    assert "4294967296" not in open(data_prep.common.__file__).read()  # no second copy of the values


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_mallopt_applies_and_is_recorded() -> None:
    code = ("from pcbench import _malloc; assert _malloc.malloc_setting() == 'default'; "
            "assert _malloc.apply_mallopt(); print(_malloc.malloc_setting())")
    env = {k: v for k, v in os.environ.items() if k not in _malloc.TUNED_MALLOC}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "mallopt"
    env.update(_malloc.TUNED_MALLOC)
    out = subprocess.run([sys.executable, "-c", "from pcbench import _malloc; print(_malloc.malloc_setting())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "env"
