"""Prometheus metrics of one bot (SPEC §9), in a registry of their own.

Each `Metrics` owns its `CollectorRegistry`, so several applications in one process (tests)
never collide, and `/metrics` shows exactly this bot's series. One process serves one bot,
so no metric carries a `bot` label: `chatbridge_info{bot,version} 1` names it.

Every label value comes from a small fixed set, never from a user, a group or a session:

- `webhook_requests_total{status}`: the HTTP status code answered (`200`, `400`, `401`,
  `413`, `503`, …).
- `turns_total{upstream,outcome}`: `upstream` is the configured upstream name; `outcome` is one
  of `TURN_OUTCOMES`.
- `upstream_errors_total{upstream,kind}`: `kind` is a `bridge.events.ErrorKind` value.
- `im_sends_total{outcome}`: one of `IM_SEND_OUTCOMES`.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = [
    "CONTENT_TYPE",
    "FIRST_TOKEN_BUCKETS_S",
    "IM_SEND_OUTCOMES",
    "TURN_BUCKETS_S",
    "TURN_OUTCOMES",
    "WEBHOOK_STATUSES",
    "Metrics",
]

TURN_OUTCOMES = ("completed", "failed", "stopped", "busy", "replayed", "dead")
"""completed: answered in full; failed: ended with a failure notice (upstream error, broken
stream, timeout); stopped: cancelled by `/stop` or `/reset`; busy: refused because the session
queue was full; replayed: a redelivered turn answered from its journal, without asking the
upstream again; dead: dead-lettered after `BRIDGE_MAX_ATTEMPTS` deliveries."""

IM_SEND_OUTCOMES = ("ok", "error", "rate_limited")
"""ok: the IM accepted the message; error: it failed (will be retried or reported);
rate_limited: the platform said to slow down (the message is queued, not dropped)."""

WEBHOOK_STATUSES = ("200", "400", "401", "413", "503")

# Seconds-scale LLM latencies: a first token in well under a second to half a minute, a whole
# turn up to BRIDGE_UPSTREAM_TOTAL_TIMEOUT_S (600 s by default).
FIRST_TOKEN_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0)
TURN_BUCKETS_S = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)

# The classic text format, which every Prometheus version reads; `generate_latest` writes it
# (newer prometheus-client versions name it `1.0.0` for the same bytes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _WithoutCreated(Collector):
    """The registry's families without their `*_created` samples.

    prometheus-client adds a `_created` timestamp series beside every counter and histogram;
    in the classic text format those are separate gauges that double the series count and
    mean nothing to a dashboard. Turning them off with `disable_created_metrics()` would
    change every registry in the process, so they are dropped here, at rendering.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():  # fresh Metric objects on every call
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class Metrics:
    """The metrics of one bot. Attributes are prometheus-client collectors, used as such:

    ``metrics.turns.labels(upstream="openai", outcome="completed").inc()``,
    ``metrics.first_token_seconds.observe(1.7)``, ``metrics.inflight_turns.inc()``.
    """

    def __init__(self, bot: str, version: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.webhook_requests = Counter(
            "chatbridge_webhook_requests",
            "Webhook requests answered, by HTTP status code.",
            ["status"],
            registry=registry,
        )
        self.turns = Counter(
            "chatbridge_turns",
            "Turns finished, by upstream and outcome "
            "(completed, failed, stopped, busy, replayed, dead).",
            ["upstream", "outcome"],
            registry=registry,
        )
        self.first_token_seconds = Histogram(
            "chatbridge_first_token_seconds",
            "Time from the start of a turn to the first answer token from the upstream.",
            buckets=FIRST_TOKEN_BUCKETS_S,
            registry=registry,
        )
        self.turn_seconds = Histogram(
            "chatbridge_turn_seconds",
            "Duration of a turn that ran (not busy or dead), from its start to its last piece "
            "sent.",
            buckets=TURN_BUCKETS_S,
            registry=registry,
        )
        self.inflight_turns = Gauge(
            "chatbridge_inflight_turns",
            "Turns running in this process now.",
            registry=registry,
        )
        self.inbox_pending = Gauge(
            "chatbridge_inbox_pending",
            "Inbound messages stored and not yet acknowledged (waiting or in flight), across "
            "all processes of the bot, as last sampled from Redis.",
            registry=registry,
        )
        self.upstream_errors = Counter(
            "chatbridge_upstream_errors",
            "Upstream failures, by upstream and error kind (after retries).",
            ["upstream", "kind"],
            registry=registry,
        )
        self.im_sends = Counter(
            "chatbridge_im_sends",
            "Messages sent to the IM, by outcome (ok, error, rate_limited).",
            ["outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "chatbridge_dead_letters",
            "Inbound messages dead-lettered after BRIDGE_MAX_ATTEMPTS deliveries.",
            registry=registry,
        )
        self.info = Gauge(
            "chatbridge_info",
            "The bot this process serves and the chatbridge version; always 1.",
            ["bot", "version"],
            registry=registry,
        )
        self.info.labels(bot=bot, version=version).set(1)
        # Series that exist from the start, so rate() and alerts see a 0 before the first event.
        # The children counted per webhook and per send are kept: `labels()` (a lock, the label
        # values checked and joined) costs more than the increment.
        self._webhook_by_status = {
            int(status): self.webhook_requests.labels(status=status) for status in WEBHOOK_STATUSES
        }
        self._sends_by_outcome = {
            outcome: self.im_sends.labels(outcome=outcome) for outcome in IM_SEND_OUTCOMES
        }

    def count_webhook(self, status: int) -> None:
        """One webhook request answered with `status`."""
        child = self._webhook_by_status.get(status)
        if child is None:  # a status outside the usual few (a 404, a 500)
            child = self._webhook_by_status[status] = self.webhook_requests.labels(status=status)
        child.inc()

    def count_send(self, outcome: str) -> None:
        """One send to the IM ended with `outcome`, one of `IM_SEND_OUTCOMES`."""
        self._sends_by_outcome[outcome].inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for `GET /metrics`.

        aiohttp refuses a `content_type=` that carries a charset: answer with
        ``web.Response(body=body, headers={"Content-Type": content_type})``.
        """
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE
