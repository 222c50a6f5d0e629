"""chatbridge: puts AI agents into IM group chats."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("chatbridge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
