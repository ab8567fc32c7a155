"""A program whose extra is not installed says which command installs it."""

from __future__ import annotations

import pytest

from freeze_proxy.extras import require_extra


def test_present_modules_pass() -> None:
    require_extra("freeze-daemon", "daemon", ("json", "aiohttp.web"))


@pytest.mark.parametrize("module", ["no_such_module_xyz", "no_such_pkg_xyz.sub"])
def test_missing_module_exits_with_the_install_command(module: str) -> None:
    with pytest.raises(SystemExit) as info:
        require_extra("freeze-daemon", "daemon", ("json", module))
    assert str(info.value) == (
        f"freeze-daemon: missing {module}; install its dependencies with "
        "pip install 'freeze-proxy[daemon]'"
    )
