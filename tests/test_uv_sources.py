"""tools/uv_sources.py: the Makefile's uv sees the package sources pip is configured with."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("uv_sources", Path(__file__).parents[1] / "tools" / "uv_sources.py")
uv_sources = importlib.util.module_from_spec(spec)
spec.loader.exec_module(uv_sources)


def test_pip_sources_become_uv_options_once_each_in_order():
    listed = "\n".join([
        ":env:.default-timeout='180'",
        ":env:.find-links='/opt/wheels'",
        "global.cert='/etc/ssl/certs/ca-certificates.crt'",
        "global.constraint='/etc/xdg/pip/constraints.txt'",
        "global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'",
        "global.find-links='/opt/wheels'",  # the same folder as PIP_FIND_LINKS: one option
        "install.index-url='https://mirror.example/simple'",
    ])
    assert uv_sources.uv_options(listed) == [
        "--find-links", "/opt/wheels",
        "--constraint", "/etc/xdg/pip/constraints.txt",
        "--extra-index-url", "file:///opt/pypi/simple",
        "--extra-index-url", "file:///opt/pypi-more/simple",
        "--index-url", "https://mirror.example/simple",
    ]


def test_no_configured_sources_leave_uv_on_its_defaults():
    assert uv_sources.uv_options("global.timeout='60'\n") == []
    assert uv_sources.uv_options("") == []
