"""What the Redis user may do: every command the bridge sends, checked against its ACL.

A Redis user limited by an ACL (`ACL SETUSER`) may be refused a command, a key or a Pub/Sub
channel; Redis answers NOPERM. That is no outage: trying again never helps. `check` and the
start of `run` ask Redis up front, and say what to grant."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoPermissionError, RedisError, ResponseError

from bridge.store import Keys, redis_failure, refused_credentials

__all__ = [
    "AccessDenied",
    "Refusals",
    "acl_rules",
    "missing_permissions",
    "needed_commands",
    "refused",
    "require_permissions",
]

log = structlog.get_logger(__name__)

# The commands whose second word names a subcommand (ACL rules name it `+xgroup|create`).
_CONTAINERS = frozenset({"SCRIPT", "XGROUP", "XINFO"})
_NO_SHA = "0" * 40


def needed_commands(key: str, channel: str) -> list[tuple[str, ...]]:
    """One call of every command the bridge sends — directly, or from its Lua scripts (Redis
    checks each `redis.call` of a script against the ACL as it runs it) — on `key` or
    `channel`. Arguments only need the right count: the calls are never run."""
    k, c = key, channel
    return [
        ("PING",), ("INFO", "server"), ("TIME",),
        ("GET", k), ("MGET", k), ("SET", k, "1"), ("DEL", k), ("EXISTS", k), ("INCR", k),
        ("EXPIRE", k, "1"), ("PEXPIRE", k, "1"), ("PTTL", k),
        ("HGET", k, "f"), ("HGETALL", k), ("HEXISTS", k, "f"), ("HSET", k, "f", "1"),
        ("HSETNX", k, "f", "1"), ("HINCRBY", k, "f", "1"),
        ("RPUSH", k, "1"), ("LRANGE", k, "0", "-1"), ("LINDEX", k, "0"), ("LPOS", k, "1"),
        ("LINSERT", k, "BEFORE", "1", "1"), ("LREM", k, "1", "1"), ("LTRIM", k, "0", "-1"),
        ("SADD", k, "1"), ("SREM", k, "1"), ("SMEMBERS", k),
        ("ZADD", k, "1", "1"), ("ZCARD", k), ("ZRANGE", k, "0", "0"), ("ZREM", k, "1"),
        ("ZRANGEBYSCORE", k, "0", "1"), ("ZREMRANGEBYSCORE", k, "0", "1"),
        ("XADD", k, "*", "f", "1"), ("XLEN", k), ("XRANGE", k, "-", "+"), ("XDEL", k, "0-1"),
        ("XREADGROUP", "GROUP", "g", "c", "STREAMS", k, ">"), ("XACK", k, "g", "0-1"),
        ("XPENDING", k, "g"), ("XCLAIM", k, "g", "c", "0", "0-1"),
        ("XAUTOCLAIM", k, "g", "c", "0", "0"), ("XGROUP", "CREATE", k, "g", "0"),
        ("XGROUP", "DELCONSUMER", k, "g", "c"), ("XINFO", "GROUPS", k),
        ("XINFO", "CONSUMERS", k, "g"),
        ("SCRIPT", "LOAD", "return 1"), ("SCRIPT", "EXISTS", _NO_SHA),
        ("EVALSHA", _NO_SHA, "1", k),
        ("PUBLISH", c, "1"), ("SUBSCRIBE", c), ("UNSUBSCRIBE", c),
    ]  # fmt: skip


def acl_rules(keys: Keys) -> str:
    """The least a dedicated Redis user of the bot needs (`ACL SETUSER <user> on >… RULES`):
    its keys, its channel, and the commands of `needed_commands` (those of transactions too)."""
    pattern = _glob(keys.prefix) + "*"
    names = dict.fromkeys(_name(call) for call in needed_commands("k", "c"))
    grants = " ".join(_grant(name) for name in ("MULTI", "EXEC", *names))
    return f"resetkeys ~{pattern} resetchannels &{pattern} -@all {grants}"


def _name(call: tuple[str, ...]) -> str:
    return " ".join(call[:2]) if call[0] in _CONTAINERS else call[0]


def _grant(name: str) -> str:
    return "+" + name.lower().replace(" ", "|")


def _glob(text: str) -> str:
    """`text` matched literally by an ACL pattern (a bot id may hold `*`, `?`, `[`)."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


class AccessDenied(Exception):
    """Redis refuses the bridge's user (its credentials, or what its ACL lets it do)."""


@dataclass
class _Refused:
    """What the user was refused, by kind: commands, keys, channels."""

    commands: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)

    def add(self, name: str, said: str) -> None:
        # Redis 6.2/7.0: "… to run the 'xadd' command" / "… access one of the keys used as
        # arguments" / "… one of the channels …"; 7.2 and Valkey: "User u has no permissions
        # to run the 'xadd' command" / "No permissions to access a key" / "… a channel"
        # (the user's name in the first: a user called `keys-ro` is no key refusal).
        if "to run the" in said:
            self.commands.append(name)
        elif "channel" in said:
            self.channels.append(name)
        elif "key" in said:
            self.keys.append(name)
        else:
            self.commands.append(name)

    def lines(self, keys: Keys, keyed: int, *, unchecked: str = "") -> list[str]:
        pattern = _glob(keys.prefix) + "*"
        lines = []
        if self.commands:
            grants = " ".join(_grant(name) for name in self.commands)
            lines.append(f"may not run {', '.join(self.commands)}{unchecked}: grant {grants}")
        if self.keys:
            which = "" if len(self.keys) == keyed else f" with {', '.join(self.keys)}"
            lines.append(f"may not use the keys {keys.prefix}*{which}: grant ~{pattern}")
        if self.channels:
            lines.append(
                f"may not use the channel {keys.control} ({', '.join(self.channels)}): "
                f"grant &{pattern} (Redis 7 gives a new user no channel)"
            )
        return lines


async def missing_permissions(redis: aioredis.Redis, keys: Keys) -> list[str]:
    """What the bridge needs that this user may not do (its ACL), one line per kind of thing
    to grant; empty when nothing is refused.

    The calls are queued in a transaction that is never run: Redis checks each against the
    user's ACL as it queues it (NOPERM for one refused) and runs none, on Redis 6.2 as on 7,
    whatever the user may do. (`ACL DRYRUN`, Redis 7 only, is an admin command: the bridge's
    own user should not have it.) The connection is closed after, dropping the transaction."""
    calls = needed_commands(keys.probe, keys.control)
    connection: AbstractConnection = await redis.connection_pool.get_connection()
    refused = _Refused()
    try:
        # EXEC outside a transaction answers an error, or NOPERM: nothing runs either way.
        await connection.send_packed_command(connection.pack_commands([("EXEC",), ("MULTI",)]))
        said = await _said(connection)
        if said is not None:
            refused.add("EXEC", said)
        # Any error opening the transaction, NOPERM or not (a proxy without transactions):
        # outside one the calls would run, so none is sent.
        try:
            await connection.read_response()
        except ResponseError as exc:
            if not _is_noperm(exc):
                return [f"cannot open a transaction ({exc}), which the bridge uses"]
            refused.add("MULTI", str(exc))
            return refused.lines(keys, 0, unchecked=" (so nothing else was checked)")
        await connection.send_packed_command(connection.pack_commands(calls))
        for call in calls:
            said = await _said(connection)
            if said is not None:
                refused.add(_name(call), said)
    finally:
        await connection.disconnect()
        await redis.connection_pool.release(connection)
    keyed = sum(1 for call in calls if keys.probe in call)
    return refused.lines(keys, keyed)


async def _said(connection: AbstractConnection) -> str | None:
    """What Redis answered the next call with when it refused it (NOPERM), else None."""
    try:
        await connection.read_response()
    except ResponseError as exc:
        # An error answer other than NOPERM is an answer all the same: allowed (EXEC
        # outside a transaction). EXEC refused is said as EXECABORT, "because of: NOPERM".
        if _is_noperm(exc):
            return str(exc)
    return None


def _is_noperm(exc: ResponseError) -> bool:
    return isinstance(exc, NoPermissionError) or "NOPERM" in str(exc)


async def require_permissions(redis: aioredis.Redis, keys: Keys) -> None:
    """Refuse to start when the user may not do what the bridge does, or is refused itself."""
    try:
        missing = await missing_permissions(redis, keys)
    except RedisError as exc:
        if not refused(exc):
            raise  # out of reach: no refusal, the start goes on and its loops keep trying
        raise AccessDenied(redis_failure(exc)) from exc
    if missing:
        raise AccessDenied("; ".join(f"the Redis user {line}" for line in missing))


def refused(exc: BaseException) -> bool:
    """Whether Redis refused the user (its ACL or its credentials): no outage."""
    return isinstance(exc, NoPermissionError) or refused_credentials(exc)


class Refusals:
    """Redis refusing the bridge while it runs (the user's ACL or password changed under
    it): logged once per kind, at error. Each loop still retries with its backoff (a fix
    takes effect without a restart), but a refusal is no outage: a warning per try, as
    for a Redis out of reach, only buried what to grant."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def note(self, exc: BaseException, where: str) -> bool:
        """Whether `exc` is such a refusal (logged the first time its kind is seen);
        `where`: what met it (a worker loop, a turn, the webhook)."""
        if not refused(exc):
            return False
        said = str(exc)
        if said not in self._seen:
            self._seen.add(said)
            log.error("redis_refused", reason=redis_failure(exc), where=where)
        return True
