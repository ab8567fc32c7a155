"""freeze-proxy's configuration: flags, the upstream environment names, and durations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from freeze_proxy.__main__ import parse_args
from freeze_proxy.addresses import parse_listen
from freeze_proxy.durations import parse_duration

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("1.5", 1.5), ("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("500us", 0.0005)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "-1s", "1d", "fast", "1 s s", "nan"])
def test_bad_durations_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\. 0, 250ms"):
        parse_duration(text)


def test_defaults_follow_the_pod_environment() -> None:
    s = parse_args([], env={"HOST_IP": "10.0.0.7", "USER_CONTAINER": "app"})
    assert s.daemon_url == "http://10.0.0.7:9696"
    assert s.containers == ["app"]
    assert s.grace == 0.25
    assert s.listen == "0.0.0.0:9999" and s.health_listen == "0.0.0.0:9998"
    assert s.token_file == "/var/run/projected/token"
    assert s.freeze


def test_grace_from_the_environment_and_flags_win() -> None:
    assert parse_args([], env={"FREEZE_GRACE": "0"}).grace == 0
    assert parse_args(["--grace", "2s"], env={"FREEZE_GRACE": "0"}).grace == 2
    s = parse_args(["--container", "a", "--container", "b"], env={"USER_CONTAINER": "x"})
    assert s.containers == ["a", "b"]


def test_invalid_grace_in_the_environment_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args([], env={"FREEZE_GRACE": "soon"})
    assert "invalid duration 'soon'" in capsys.readouterr().err


def test_the_proxy_needs_only_the_standard_library_and_never_loads_openssl() -> None:
    """Without uvloop (the image), the running proxy imports no third-party module and no ssl:
    its RSS is the footprint target (README, "Performance")."""
    probe = (
        "import sys\n"
        "sys.modules['uvloop'] = None\n"  # as in the image: not installed
        "before = set(sys.modules)\n"
        "import freeze_proxy.__main__, freeze_proxy.app\n"
        "import asyncio, freeze_proxy.relay, freeze_proxy.daemon_client\n"
        "new = {n.split('.')[0] for n in set(sys.modules) - before}\n"
        "print(sorted(new - set(sys.stdlib_module_names) - {'freeze_proxy'}))\n"
        "print(sys.modules.get('ssl', 'absent'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    assert out == ["[]", "None"], out


@pytest.mark.parametrize("flag", ["--listen", "--health-listen"])
@pytest.mark.parametrize("value", ["9999", "0.0.0.0:http", "0.0.0.0:0", "0.0.0.0:70000"])
def test_a_bad_listen_address_is_refused_at_start_naming_the_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args([flag, value], env={})
    assert f"{flag} {value!r}: expected HOST:PORT" in capsys.readouterr().err


def test_listen_addresses_of_every_form_are_read() -> None:
    assert parse_listen("0.0.0.0:9999") == ("0.0.0.0", 9999)
    assert parse_listen("[::]:9998") == ("::", 9998)
    assert parse_listen(":8080") == ("0.0.0.0", 8080)
