"""Upstream adapters: one module per agent API, each with `create(settings, http, kv)`."""

from __future__ import annotations

import importlib
from typing import Protocol

from bridge.config import Settings
from bridge.http import UpstreamHTTP
from bridge.interfaces import KeyValue, Upstream

__all__ = ["create_upstream"]


class _Factory(Protocol):
    def __call__(self, settings: Settings, http: UpstreamHTTP, kv: KeyValue) -> Upstream: ...


def create_upstream(settings: Settings, http: UpstreamHTTP, kv: KeyValue) -> Upstream:
    """The adapter named by `BRIDGE_UPSTREAM`; modules are imported only when chosen."""
    name = settings.upstream or "replay"
    module = importlib.import_module(f"adapters.upstream.{name.replace('-', '_')}")
    factory: _Factory = module.create
    return factory(settings, http, kv)
