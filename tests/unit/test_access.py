"""The commands `check` and the start verify a Redis user may run: every one of the scripts'."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from bridge.access import _Refused, missing_permissions, needed_commands
from bridge.store import Keys

CODE = Path(__file__).resolve().parents[2] / "bridge"


def test_every_command_of_the_scripts_is_verified() -> None:
    """Redis checks each `redis.call` of a script against the user's ACL as it runs it: a
    command a script starts to call must be verified too, or a user missing it passes."""
    called = {
        match.upper()
        for path in CODE.glob("*.py")
        for match in re.findall(r"redis\.p?call\(\s*'([A-Za-z]+)'", path.read_text())
    }
    assert len(called) > 30  # the scripts were found
    verified = {call[0] for call in needed_commands("k", "c")}
    assert called <= verified, sorted(called - verified)


async def test_a_redis_without_transactions_is_sent_none_of_the_calls() -> None:
    """The calls are checked by queueing them in a transaction; a server (a proxy) that
    refuses MULTI with a plain error would have run them for real (a SET, an XADD, a PUBLISH
    on the bot's channel): none may be sent, and the answer says why."""
    received: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while command := await _read_command(reader):
            received.append(command[0].upper())
            if command[0].upper() in ("EXEC", "MULTI"):
                writer.write(f"-ERR unknown command '{command[0]}'\r\n".encode())
            else:
                writer.write(b"+OK\r\n")  # the connection's own set-up (CLIENT SETINFO)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}")
    try:
        missing = await missing_permissions(client, Keys("bot-1"))
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert missing == ["cannot open a transaction (unknown command 'MULTI'), which the bridge uses"]
    assert set(received) - {"HELLO", "CLIENT"} == {"EXEC", "MULTI"}, received  # (set-up)


async def _read_command(reader: asyncio.StreamReader) -> list[str]:
    """One command in RESP (an array of bulk strings); empty once the client has gone."""
    header = await reader.readline()
    if not header.startswith(b"*"):
        return []
    words = []
    for _ in range(int(header[1:])):
        length = int((await reader.readline())[1:])
        words.append((await reader.readexactly(length + 2))[:-2].decode())
    return words


@pytest.mark.parametrize(("said", "kind"), [
    ("NOPERM this user has no permissions to run the 'xadd' command", "commands"),  # 6.2, 7.0
    ("NOPERM this user has no permissions to access one of the keys used as arguments", "keys"),
    ("NOPERM this user has no permissions to access one of the channels used as arguments",
     "channels"),
    ("NOPERM User keys-ro has no permissions to run the 'xadd' command", "commands"),  # 7.2
    ("NOPERM User u has no permissions to run the 'publish' command", "commands"),
    ("NOPERM No permissions to access a key", "keys"),
    ("NOPERM No permissions to access a channel", "channels"),
])  # fmt: skip
def test_each_redis_version_s_refusal_is_read_as_its_kind(said: str, kind: str) -> None:
    """Redis 7.2 and Valkey word refusals otherwise than 6.2 and 7.0 ("a key", not "the
    keys"), and name the user in a command's: read wrong, a key pattern missing was told as
    twenty commands to grant, which would change nothing."""
    refused = _Refused()
    refused.add("XADD", said)
    assert getattr(refused, kind) == ["XADD"]
