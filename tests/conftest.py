"""Shared fixtures: where the corpora are, small deterministic settings, and no network.

Nothing in the test suite may touch the network (README): `network_guard` makes it so. In this
process any connection or name lookup other than loopback raises `NetworkBlocked` and fails
the test, even where the code under test swallows the error. Subprocesses (the CLI, the bench
scripts) inherit an environment whose HTTP(S) proxy is a closed loopback port and in which the
Hugging Face libraries are offline, so a download there fails at once, on this machine.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """$BARDLM_DATA_DIR (set by .ci/run), else ../shared/data beside the checkout."""
    return Path(os.environ.get("BARDLM_DATA_DIR") or REPO.parent / "shared" / "data")


def corpus(name: str) -> Path:
    path = data_dir() / name
    if not path.is_file():
        pytest.skip(f"{path} not found: set BARDLM_DATA_DIR to a folder holding {name} "
                    f"({HOW_TO_GET.get(name, 'see README, Tests')})")
    return path


# Where each corpus the tests read comes from (nothing in the suite downloads it).
HOW_TO_GET = {
    "tiny_shakespeare.txt": "the copy shipped with bardlm: gunzip -c src/bardlm/data/"
                            "tiny_shakespeare.txt.gz > $BARDLM_DATA_DIR/tiny_shakespeare.txt",
    "shakespeare_complete.txt": "Project Gutenberg #100, https://www.gutenberg.org/cache/epub/100/pg100.txt; "
                                "`bardlm train --data shakespeare` downloads it once",
}


class NetworkBlocked(OSError):
    """A test reached for a host that is not this machine."""


def is_loopback(host: object) -> bool:
    """True for this machine: localhost, 127.0.0.0/8, ::1, the unspecified address (0.0.0.0)."""
    if host is None:
        return True
    host = (host.decode() if isinstance(host, bytes) else str(host)).strip("[]").split("%")[0]
    if host.lower() in ("", "localhost", "ip6-localhost", "ip6-loopback"):
        return True
    if host.lower() in own_names():
        return True  # this machine's own name and addresses (a server on 0.0.0.0 lists them)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name other than localhost: its lookup is the network
    return ip.is_loopback or ip.is_unspecified


_OWN: set[str] = set()


def own_names() -> set[str]:
    """This machine's host name, fully qualified name and the addresses they resolve to (read
    once, before any guard is installed: /etc/hosts or the resolver's answer for ourselves)."""
    if not _OWN:
        names = {socket.gethostname(), socket.getfqdn()}
        for name in list(names):
            try:
                names |= {info[4][0] for info in socket.getaddrinfo(name, None)}
            except OSError:
                pass
        _OWN.update(n.lower() for n in names if n)
    return _OWN


own_names()  # at import: the guard's own lookups must not go through the guard


# The environment of every subprocess a test starts (see the module docstring).
OFFLINE_ENV = {
    "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": "localhost,127.0.0.1,::1,0.0.0.0", "NO_PROXY": "localhost,127.0.0.1,::1,0.0.0.0",
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
}


@pytest.fixture(autouse=True)
def network_guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Blocks non-loopback connections and lookups; yields the list of hosts tried (a test of
    the guard itself empties it), and fails the test if any was tried."""
    tried: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(host: object) -> None:
        if not is_loopback(host):
            tried.append(str(host))
            raise NetworkBlocked(f"tests must not touch the network: tried to reach {host}")

    def connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            check(address[0])
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        if self.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            check(address[0])
        return real_connect_ex(self, address)

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
        check(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    yield tried
    if tried:
        pytest.fail(f"this test tried to reach the network ({', '.join(tried)}); "
                    "tests must stay on this machine", pytrace=False)


@pytest.fixture
def tiny_text() -> str:
    return corpus("tiny_shakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
