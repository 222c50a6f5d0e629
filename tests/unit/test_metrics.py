"""bridge.metrics: the names and labels of SPEC §9, read back with Prometheus' own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from bridge.events import ErrorKind
from bridge.metrics import (
    FIRST_TOKEN_BUCKETS_S,
    IM_SEND_OUTCOMES,
    TURN_BUCKETS_S,
    TURN_OUTCOMES,
    Metrics,
)

# SPEC §9: family name (as the parser reports it) → (type, label names of its samples).
EXPECTED = {
    "chatbridge_webhook_requests": ("counter", {"status"}),
    "chatbridge_turns": ("counter", {"upstream", "outcome"}),
    "chatbridge_first_token_seconds": ("histogram", set()),
    "chatbridge_turn_seconds": ("histogram", set()),
    "chatbridge_inflight_turns": ("gauge", set()),
    "chatbridge_inbox_pending": ("gauge", set()),
    "chatbridge_upstream_errors": ("counter", {"upstream", "kind"}),
    "chatbridge_im_sends": ("counter", {"outcome"}),
    "chatbridge_dead_letters": ("counter", set()),
    "chatbridge_info": ("gauge", {"bot", "version"}),
}


def _exercise(metrics: Metrics) -> None:
    metrics.webhook_requests.labels(status="200").inc()
    metrics.turns.labels(upstream="openai", outcome="completed").inc()
    metrics.first_token_seconds.observe(1.5)
    metrics.turn_seconds.observe(12.0)
    metrics.inflight_turns.inc()
    metrics.inbox_pending.set(3)
    metrics.upstream_errors.labels(upstream="openai", kind=ErrorKind.TIMEOUT.value).inc()
    metrics.im_sends.labels(outcome="ok").inc()
    metrics.dead_letters.inc()


def _samples(metrics: Metrics) -> dict[str, list[Sample]]:
    body, _ = metrics.render()
    return {
        family.name: family.samples
        for family in text_string_to_metric_families(body.decode("utf-8"))
    }


def _families(metrics: Metrics) -> dict[str, str]:
    body, _ = metrics.render()
    return {f.name: f.type for f in text_string_to_metric_families(body.decode("utf-8"))}


def test_names_types_and_labels_exactly_as_specified() -> None:
    metrics = Metrics("support", "1.2.3")
    _exercise(metrics)
    families = _families(metrics)
    assert families == {name: kind for name, (kind, _) in EXPECTED.items()}
    for name, samples in _samples(metrics).items():
        labels = EXPECTED[name][1]
        for sample in samples:
            assert set(sample.labels) - {"le"} == labels, sample
            assert "bot" not in sample.labels or name == "chatbridge_info"


def test_sample_names_carry_the_total_suffix_and_nothing_else() -> None:
    metrics = Metrics("support", "1.2.3")
    _exercise(metrics)
    names = {sample.name for samples in _samples(metrics).values() for sample in samples}
    for counter in (
        "webhook_requests",
        "turns",
        "upstream_errors",
        "im_sends",
        "dead_letters",
    ):
        assert f"chatbridge_{counter}_total" in names
    assert {"chatbridge_inflight_turns", "chatbridge_inbox_pending", "chatbridge_info"} <= names
    assert not [name for name in names if name.endswith("_created")]
    assert all(name.startswith("chatbridge_") for name in names)


def test_info_names_the_bot_and_version() -> None:
    (info,) = _samples(Metrics("support", "1.2.3"))["chatbridge_info"]
    assert info.labels == {"bot": "support", "version": "1.2.3"}
    assert info.value == 1


def test_values_round_trip() -> None:
    metrics = Metrics("support", "1.2.3")
    _exercise(metrics)
    samples = _samples(metrics)
    (turn,) = samples["chatbridge_turns"]
    assert (turn.labels, turn.value) == ({"upstream": "openai", "outcome": "completed"}, 1)
    (error,) = samples["chatbridge_upstream_errors"]
    assert error.labels == {"upstream": "openai", "kind": "timeout"}
    (pending,) = samples["chatbridge_inbox_pending"]
    assert pending.value == 3
    count = {s.name: s.value for s in samples["chatbridge_first_token_seconds"]}
    assert count["chatbridge_first_token_seconds_count"] == 1
    assert count["chatbridge_first_token_seconds_sum"] == 1.5


def test_bounded_series_exist_from_the_start() -> None:
    samples = _samples(Metrics("support", "1.2.3"))
    assert {s.labels["outcome"] for s in samples["chatbridge_im_sends"]} == set(IM_SEND_OUTCOMES)
    assert {s.labels["status"] for s in samples["chatbridge_webhook_requests"]} >= {"200", "503"}
    assert all(s.value == 0 for s in samples["chatbridge_im_sends"])
    (dead,) = samples["chatbridge_dead_letters"]
    assert dead.value == 0


def test_histogram_buckets_cover_llm_latencies() -> None:
    samples = _samples(Metrics("support", "1.2.3"))
    for name, buckets in (
        ("chatbridge_first_token_seconds", FIRST_TOKEN_BUCKETS_S),
        ("chatbridge_turn_seconds", TURN_BUCKETS_S),
    ):
        bounds = [s.labels["le"] for s in samples[name] if s.name.endswith("_bucket")]
        assert [float(b) for b in bounds[:-1]] == list(buckets)
        assert bounds[-1] == "+Inf"
    assert FIRST_TOKEN_BUCKETS_S[0] <= 0.5 and FIRST_TOKEN_BUCKETS_S[-1] >= 60
    assert TURN_BUCKETS_S[-1] >= 600  # BRIDGE_UPSTREAM_TOTAL_TIMEOUT_S default


def test_two_instances_in_one_process_do_not_collide() -> None:
    first, second = Metrics("a", "1"), Metrics("b", "1")
    first.dead_letters.inc()
    (dead_a,) = _samples(first)["chatbridge_dead_letters"]
    (dead_b,) = _samples(second)["chatbridge_dead_letters"]
    assert (dead_a.value, dead_b.value) == (1, 0)
    (info_b,) = _samples(second)["chatbridge_info"]
    assert info_b.labels["bot"] == "b"


def test_documented_label_values() -> None:
    assert TURN_OUTCOMES == ("completed", "failed", "stopped", "busy", "replayed", "dead")
    assert IM_SEND_OUTCOMES == ("ok", "error", "rate_limited")
    metrics = Metrics("support", "1")
    for outcome in TURN_OUTCOMES:
        metrics.turns.labels(upstream="replay", outcome=outcome).inc()
    assert len(_samples(metrics)["chatbridge_turns"]) == len(TURN_OUTCOMES)


def test_render_gives_text_format_and_its_content_type() -> None:
    body, content_type = Metrics("support", "1").render()
    assert isinstance(body, bytes)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert "charset=utf-8" in content_type
    assert body.endswith(b"\n")


def test_webhook_statuses_are_counted_also_outside_the_usual_few() -> None:
    metrics = Metrics("bot", "1.0")
    for status in (200, 200, 503, 500):
        metrics.count_webhook(status)
    assert _counts(metrics, "chatbridge_webhook_requests", "status") == {
        "200": 2, "400": 0, "401": 0, "413": 0, "500": 1, "503": 1,
    }  # fmt: skip


def test_sends_are_counted_by_outcome() -> None:
    metrics = Metrics("bot", "1.0")
    for outcome in ("ok", "ok", "rate_limited", "ok"):
        metrics.count_send(outcome)
    assert _counts(metrics, "chatbridge_im_sends", "outcome") == {
        "ok": 3, "error": 0, "rate_limited": 1,
    }  # fmt: skip


def _counts(metrics: Metrics, family_name: str, label: str) -> dict[str, float]:
    """The exposed value of each series of a counter, by the value of its one label."""
    return {
        sample.labels[label]: sample.value
        for family in text_string_to_metric_families(metrics.render()[0].decode())
        if family.name == family_name
        for sample in family.samples
    }
