"""The suite's promise "nothing touches the network" is enforced (conftest.network_guard)."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request

import pytest
from conftest import NetworkBlocked, is_loopback


@pytest.mark.parametrize("host, local", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", True), (None, True), ("203.0.113.7", False), ("example.com", False),
    ("2001:db8::1", False), ("huggingface.co", False),
])
def test_only_this_machine_counts_as_loopback(host, local) -> None:
    assert is_loopback(host) is local


def test_a_connection_elsewhere_fails_the_test(network_guard) -> None:
    """Refused at once (documentation address, never routed), and recorded, so that code which
    swallows the OSError still fails its test at teardown."""
    with pytest.raises(NetworkBlocked, match="203.0.113.7"):
        socket.create_connection(("203.0.113.7", 80), timeout=1)
    with pytest.raises(NetworkBlocked, match="example.com"):
        socket.getaddrinfo("example.com", 443)
    assert network_guard == ["203.0.113.7", "example.com"]
    with pytest.raises(OSError):  # urllib goes to the closed loopback proxy: refused
        urllib.request.urlopen("https://example.com/", timeout=1)
    network_guard.clear()  # this test meant to try; the others must not


def test_loopback_is_allowed() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def test_subprocesses_download_nothing() -> None:
    """A child process (the CLI, a bench script) gets a closed loopback proxy: an HTTP(S) fetch
    fails at once on this machine, and the Hugging Face libraries are offline."""
    code = ("import os, urllib.request\n"
            "assert os.environ['HF_HUB_OFFLINE'] == '1'\n"
            "try:\n"
            "    urllib.request.urlopen('https://example.com/', timeout=5)\n"
            "except OSError as e:\n"
            "    print('refused', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused") and "Connection refused" in out.stdout
