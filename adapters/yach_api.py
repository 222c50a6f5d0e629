"""Yach open-API client, shared by the Yach IM adapter and the yach-agent upstream.

Knows the base URL, the robot signature, the app access token (cached until shortly before
it expires, refreshed once on an invalid-token answer) and what a successful answer is.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import math
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, unquote

import aiohttp

from bridge import jsontext
from bridge.http import (
    UpstreamProtocolError,
    UpstreamRedirectRefused,
    parse_retry_after,
    read_text,
)
from bridge.logging import as_text, clip, clip_value, register_issued_secret

__all__ = ["YachAPI", "YachAPIError", "robot_sign", "signed_robot_url", "verify_sign"]

TOKEN_REFRESH_MARGIN_S = 300.0
DEFAULT_TOKEN_LIFETIME_S = 7200.0
_EPOCH_FLOOR_S = 1e9  # 2001-09-09 as a Unix time; as a lifetime, 31 years
_EPOCH_FLOOR_MS = 1e12
_MIN_TOKEN_LIFETIME_S = 60.0
_RATE_LIMIT_WORDS = ("频率", "频繁", "限流", "frequency", "rate limit", "too many")
_TOKEN_WORDS = ("access_token", "token")
_INVALID_WORDS = ("invalid", "expire", "无效", "过期", "不合法", "失效")
_SHA256_BLOCK_BYTES = 64
_INNER_PAD = bytes(byte ^ 0x36 for byte in range(256))  # RFC 2104's ipad, as a translation
_OUTER_PAD = bytes(byte ^ 0x5C for byte in range(256))


@functools.lru_cache(maxsize=4)
def _keyed_sha256(key: str) -> tuple[hashlib._Hash, hashlib._Hash]:
    """HMAC-SHA256's inner and outer hashes with the key already fed in (RFC 2104), made once
    per key; each signature continues copies of them. `hmac.new` and `hmac.digest` set up
    OpenSSL's HMAC afresh on every call, twice the instructions of a copy, and every
    webhook is signed with the same key."""
    padded = key.encode()
    if len(padded) > _SHA256_BLOCK_BYTES:
        padded = hashlib.sha256(padded).digest()
    padded = padded.ljust(_SHA256_BLOCK_BYTES, b"\0")
    inner, outer = padded.translate(_INNER_PAD), padded.translate(_OUTER_PAD)
    return hashlib.sha256(inner), hashlib.sha256(outer)


def robot_sign(secret: str, timestamp_ms: int | str) -> str:
    """base64(HMAC-SHA256(key=secret, msg=f"{timestamp}\\n{secret}")), as Yach signs robots."""
    keyed_inner, keyed_outer = _keyed_sha256(secret)
    inner, outer = keyed_inner.copy(), keyed_outer.copy()
    inner.update(f"{timestamp_ms}\n{secret}".encode())
    outer.update(inner.digest())
    return base64.b64encode(outer.digest()).decode()


def verify_sign(secret: str, timestamp_ms: str, sign: str) -> bool:
    """Constant-time check of an inbound `sign`, in plain or URL-encoded form (any escapes:
    upper or lower case, `/` escaped or not). Base64 holds no `%`: a sign without one is
    plain, and is compared as it is."""
    expected = robot_sign(secret, timestamp_ms).encode()
    given = unquote(sign) if "%" in sign else sign
    return hmac.compare_digest(expected, given.encode("utf-8", "surrogatepass"))


def signed_robot_url(robot_url: str, secret: str | None, now_ms: int) -> str:
    """The custom robot's send URL with `timestamp` and the URL-encoded `sign` appended."""
    if not secret:
        return robot_url
    separator = "&" if "?" in robot_url else "?"
    sign = quote(robot_sign(secret, now_ms), safe="")
    return f"{robot_url}{separator}timestamp={now_ms}&sign={sign}"


def _lifetime_s(expired_time: object) -> float:
    """The token's lifetime from `expired_time` (seconds); the platform's usual two hours
    when it is missing or not a positive number (a garbled one must not fail every send).

    SPEC gives it in seconds without saying from when: a lifetime (`7200`) or the moment of
    expiry (a Unix time, the field's name suggests it). A value above `_EPOCH_FLOOR_S` (31
    years) is no lifetime but that moment (in milliseconds above `_EPOCH_FLOOR_MS`): the time
    left until it, at least `_MIN_TOKEN_LIFETIME_S` (clocks differ; the invalid-token retry
    covers a token that expired early). Read as a lifetime it kept the token for decades and
    let a send fail at each expiry."""
    try:
        lifetime = float(str(expired_time))
    except (TypeError, ValueError):
        return DEFAULT_TOKEN_LIFETIME_S
    if not math.isfinite(lifetime) or lifetime <= 0:
        return DEFAULT_TOKEN_LIFETIME_S
    if lifetime > _EPOCH_FLOOR_S:
        expires_at_s = lifetime / 1000 if lifetime > _EPOCH_FLOOR_MS else lifetime
        lifetime = max(expires_at_s - time.time(), _MIN_TOKEN_LIFETIME_S)
    return lifetime


class YachAPIError(Exception):
    """A Yach API call that did not succeed."""

    def __init__(
        self,
        reason: str,
        *,
        rate_limited: bool = False,
        invalid_token: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rate_limited = rate_limited
        self.invalid_token = invalid_token
        self.retry_after = retry_after


def check_answer(status: int, payload: Any, headers: Mapping[str, str]) -> Any:
    """The payload of a successful answer; a `YachAPIError` saying why otherwise."""
    if status == 429:
        raise YachAPIError(
            "HTTP 429", rate_limited=True, retry_after=parse_retry_after(headers.get("Retry-After"))
        )
    if not isinstance(payload, dict):
        raise YachAPIError(f"HTTP {status}: not a JSON object")
    # A code written as a string ("200") is the same answer: retried as a failure, it would
    # be sent again until its attempts ran out.
    ok = payload.get("code") in (200, "200") or payload.get("errcode") in (0, "0")
    if status == 200 and ok:
        return payload
    message = as_text(payload.get("msg") or payload.get("errmsg") or payload.get("message") or "")
    lowered = message.lower()
    code = clip_value(payload.get("code", payload.get("errcode")), 100)
    raise YachAPIError(
        f"HTTP {status}, code {code}: {clip(message, 200)}",
        rate_limited=any(word in lowered for word in _RATE_LIMIT_WORDS),
        # HTTP 401 to a call made with the token can only be the token (whatever it says)
        invalid_token=status == 401
        or (any(w in lowered for w in _TOKEN_WORDS) and any(w in lowered for w in _INVALID_WORDS)),
    )


_Credentials = tuple[str, str | None, str | None]
# The clients made by `YachAPI.shared`, per HTTP session: one token cache per app and process.
_SHARED: weakref.WeakKeyDictionary[aiohttp.ClientSession, dict[_Credentials, YachAPI]] = (
    weakref.WeakKeyDictionary()
)


class YachAPI:
    """Calls to `{api_base}` with the app access token."""

    @classmethod
    def shared(
        cls,
        session: aiohttp.ClientSession,
        api_base: str,
        app_key: str | None,
        app_secret: str | None,
    ) -> YachAPI:
        """The one client of these credentials on this HTTP session, made on first use.

        The IM adapter's sends and the yach-agent upstream take the same app token (SPEC §2):
        through one client they share its cache, its single fetch and its refresh, so a
        process asks `/gettoken` once for both, not once for each."""
        clients = _SHARED.setdefault(session, {})
        key = (api_base.rstrip("/"), app_key, app_secret)
        client = clients.get(key)
        if client is None:
            client = clients[key] = cls(session, api_base, app_key, app_secret)
        return client

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api_base: str,
        app_key: str | None,
        app_secret: str | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 15.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.session = session
        self.api_base = api_base.rstrip("/")
        self._app_key = app_key
        self._app_secret = app_secret
        self._clock = clock
        # A host that drops packets fails a call after the connect timeout, not the total:
        # a send is retried (or a token fetch fails) 10 s sooner.
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._token: str | None = None
        self._token_expires_at = 0.0
        # Turns that find the token expired together wait for one fetch, not one each.
        self._token_lock = asyncio.Lock()

    @property
    def has_app_credentials(self) -> bool:
        return bool(self._app_key and self._app_secret)

    async def access_token(self) -> str:
        if self._token is None or self._clock() >= self._token_expires_at:
            async with self._token_lock:
                if self._token is None or self._clock() >= self._token_expires_at:
                    await self._fetch_token()
        assert self._token is not None
        return self._token

    def invalidate_token(self, refused: str) -> None:
        """Forget the token an answer called invalid, unless another call replaced it."""
        if self._token == refused:
            self._token = None

    async def _fetch_token(self) -> None:
        if not self.has_app_credentials:
            raise YachAPIError("BRIDGE_YACH_APP_KEY/BRIDGE_YACH_APP_SECRET are not set")
        params = {"appkey": self._app_key or "", "appsecret": self._app_secret or ""}
        payload = await self.request_json("GET", "/gettoken", params=params, check=False)
        obj = payload.get("obj")
        holder: dict[str, Any] = obj if isinstance(obj, dict) else payload
        token = holder.get("access_token")
        if not token:
            raise YachAPIError(f"gettoken answered without a token: {clip(str(payload), 120)}")
        lifetime = _lifetime_s(holder.get("expired_time"))
        margin = min(TOKEN_REFRESH_MARGIN_S, lifetime / 10)
        # Masked wherever it shows, not only as `access_token=…`: an answer that refuses it
        # may quote it (the yach-agent upstream's errors are logged with their body).
        register_issued_secret("yach-access-token", str(token))
        self._token = str(token)
        self._token_expires_at = self._clock() + lifetime - margin

    async def request_json(
        self,
        method: str,
        path_or_url: str,
        *,
        check: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        url = path_or_url if "://" in path_or_url else self.api_base + path_or_url
        try:
            async with self.session.request(method, url, timeout=self._timeout, **kwargs) as resp:
                status, headers = resp.status, resp.headers
                text = await read_text(resp)  # at most 1 MiB: Yach's answers are a few bytes
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise YachAPIError(f"cannot reach Yach: {type(exc).__name__}") from exc
        except UpstreamRedirectRefused as exc:
            raise YachAPIError(f"cannot reach Yach: {exc.message}") from exc
        except UpstreamProtocolError as exc:
            raise YachAPIError(f"HTTP {status}: {exc}") from exc
        try:
            payload = json.loads(text) if text else {}
        except jsontext.UNREADABLE:
            payload = None
        if not check and status == 200 and isinstance(payload, dict):
            return payload
        result: dict[str, Any] = check_answer(status, payload, headers)
        return result

    async def call_with_token(
        self, method: str, path: str, *, credentials_in: str = "query", **kwargs: Any
    ) -> dict[str, Any]:
        """A call authenticated by the app token (query or JSON body), retried once on an
        invalid-token answer with a fresh token."""
        token = ""
        for fresh in (False, True):
            if fresh:
                self.invalidate_token(token)
            token = await self.access_token()
            call_kwargs = dict(kwargs)
            if credentials_in == "query":
                call_kwargs["params"] = {**kwargs.get("params", {}), "access_token": token}
            else:
                call_kwargs["json"] = {**kwargs.get("json", {}), "access_token": token}
            try:
                return await self.request_json(method, path, **call_kwargs)
            except YachAPIError as exc:
                if fresh or not exc.invalid_token:
                    raise
        raise AssertionError("unreachable")
