import builtins

import pytest

from pcbench import _deps


@pytest.fixture
def fresh_cache():
    _deps.require_open3d.cache_clear()
    yield
    _deps.require_open3d.cache_clear()


def _block_open3d(monkeypatch, exc):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "open3d":
            raise exc
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_libusb_explains_the_fix(monkeypatch, fresh_cache):
    _block_open3d(monkeypatch, OSError("libusb-1.0.so.0: cannot open shared object file: No such file"))
    with pytest.raises(ImportError, match=r"apt-get install libusb-1.0-0"):
        _deps.require_open3d()


def test_missing_package_explains_the_fix(monkeypatch, fresh_cache):
    _block_open3d(monkeypatch, ImportError("No module named 'open3d'"))
    with pytest.raises(ImportError, match="pip install open3d"):
        _deps.require_open3d()


def test_open3d_imports_here(fresh_cache):
    o3d = _deps.require_open3d()
    assert hasattr(o3d, "geometry")
