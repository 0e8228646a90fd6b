"""NixlWrapper imports NIXL only when built, and names the pip packages when none is installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvbridge.nixl.wrapper import NIXL_PACKAGES, NixlWrapper, load_nixl_api


def test_importing_the_wrapper_and_fake_does_not_import_nixl() -> None:
    code = (
        "import sys, kvbridge.nixl.wrapper, kvbridge.nixl.fake, kvbridge.nixl.transport\n"
        f"loaded = [m for m in sys.modules if m.split('.')[0] in {NIXL_PACKAGES!r}]\n"
        "assert not loaded, loaded\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_missing_nixl_raises_import_error_naming_pip_packages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for package in NIXL_PACKAGES:  # a None entry makes `import` raise ModuleNotFoundError
        monkeypatch.setitem(sys.modules, package, None)
        monkeypatch.setitem(sys.modules, f"{package}._api", None)
    with pytest.raises(ImportError, match="pip install nixl-cu12") as err:
        NixlWrapper("nobody")
    assert "nixl-cu13" in str(err.value)
    assert all(package in str(err.value) for package in NIXL_PACKAGES)
    with pytest.raises(ImportError):
        load_nixl_api()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"num_threads": -1}, "num_threads"), ({"backends": ()}, "backends")],
)
def test_bad_arguments_fail_before_touching_nixl(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, object], key: str
) -> None:
    for package in NIXL_PACKAGES:
        monkeypatch.setitem(sys.modules, f"{package}._api", None)
    with pytest.raises(ValueError, match=key):
        NixlWrapper("x", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="agent_name"):
        NixlWrapper("")
