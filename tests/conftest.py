"""Shared test fixtures. Every test runs with the network cut off: any socket connect or DNS lookup fails."""

from __future__ import annotations

import socket

import pytest


class NetworkAccessError(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise NetworkAccessError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


@pytest.fixture
def medrwr_home(tmp_path, monkeypatch):
    """An empty, private data directory."""
    home = tmp_path / "home"
    monkeypatch.setenv("MEDRWR_EDGE_HOME", str(home))
    return home
