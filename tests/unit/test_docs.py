"""The operator documentation against the code: every metric, label value and log event the
guides name exists as they name it, and the README's test command is the one CI runs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bridge.access import acl_rules
from bridge.events import ErrorKind
from bridge.metrics import IM_SEND_OUTCOMES, TURN_OUTCOMES, WEBHOOK_STATUSES, Metrics
from bridge.store import Keys

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "deploy" / "README.md"
DOCS = (
    REPO / "README.md",
    GUIDE,
    REPO / "docs" / "delivery.md",
    REPO / "deploy" / "chatbridge.env.example",
    REPO / "deploy" / "chatbridge@.service",
)
CODE = (REPO / "bridge", REPO / "adapters")
LOG_LEVELS = frozenset({"debug", "info", "warning", "error", "exception", "critical"})
TICKED = re.compile(r"`([^`]+)`")
# The events an operator watches for (SPEC §6 and §9): the guide's table must list them.
KEY_EVENTS = (
    "turn_done",
    "turn_stopped",
    "upstream_failed",
    "dead_lettered",
    "drained",
    "redis_connected",
    "redis_unavailable",
    "listening",
)


def _table(path: Path, first_header: str) -> list[list[str]]:
    """The body rows of the markdown table whose first header cell is `first_header`."""
    rows: list[list[str]] = []
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            inside = True
        elif inside and line.startswith("|"):
            if not set(cells[0]) <= {"-", ":"}:
                rows.append(cells)
        elif inside:
            break
    assert rows, f"no table headed {first_header!r} in {path.name}"
    return rows


# Metrics


def _families() -> dict[str, tuple[str, set[str]]]:
    """Every family of a bot's registry → (type, label names), as Prometheus reads them."""
    metrics = Metrics("bot", "1.0")
    metrics.turns.labels(upstream="openai", outcome="completed").inc()
    metrics.upstream_errors.labels(upstream="openai", kind="timeout").inc()
    families = {}
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        labels = {name for sample in family.samples for name in sample.labels} - {"le"}
        families[family.name] = (family.type, labels)
    return families


def _documented_metrics() -> dict[str, tuple[str, set[str], str]]:
    """The guide's metric table: family name → (type, label names, meaning)."""
    documented = {}
    for name_cell, kind, meaning in _table(GUIDE, "metric"):
        match = re.fullmatch(r"`(chatbridge_\w+?)(?:\{([\w,]*)\})?`", name_cell)
        assert match, name_cell
        name = match[1].removesuffix("_total") if kind == "counter" else match[1]
        labels = set(filter(None, (match[2] or "").split(",")))
        documented[name] = (kind, labels, meaning)
    return documented


def test_the_guide_names_every_metric_with_its_type_and_labels() -> None:
    documented = _documented_metrics()
    families = _families()
    assert set(documented) == set(families)
    for name, (kind, labels, _) in documented.items():
        assert families[name] == (kind, labels), name


def test_the_guide_lists_every_value_of_each_label() -> None:
    """A dashboard built from the guide misses no series: `kind="not_found"` was missing."""
    meanings = {name: meaning for name, (_, _, meaning) in _documented_metrics().items()}
    values = {
        "chatbridge_webhook_requests": set(WEBHOOK_STATUSES),
        "chatbridge_turns": set(TURN_OUTCOMES),
        "chatbridge_upstream_errors": {kind.value for kind in ErrorKind},
        "chatbridge_im_sends": set(IM_SEND_OUTCOMES),
    }
    for name, expected in values.items():
        listed = set(TICKED.findall(meanings[name]))
        assert expected <= listed, f"{name}: not listed {sorted(expected - listed)}"


def test_every_metric_a_doc_names_exists() -> None:
    families = _families()
    for path in DOCS:
        for name in re.findall(r"\bchatbridge_[a-z_]+", path.read_text(encoding="utf-8")):
            base = name.removesuffix("_total")
            assert base in families or name in families, f"{path.name}: {name}"


# Log events


def _logged() -> dict[str, set[str]]:
    """Every event the code logs → the fields its calls pass (bound context aside)."""
    events: dict[str, set[str]] = {}
    for root in CODE:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if _is_log_call(node):
                    assert isinstance(node, ast.Call) and isinstance(node.args[0], ast.Constant)
                    fields = events.setdefault(str(node.args[0].value), set())
                    fields.update(k.arg for k in node.keywords if k.arg)
    return events


def _is_log_call(node: ast.AST) -> bool:
    """`log.info("event", …)`, or `level("event", …)` with the level chosen just before."""
    if not isinstance(node, ast.Call) or not node.args:
        return False
    first = node.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return False
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr in LOG_LEVELS and isinstance(func.value, ast.Name)
    return isinstance(func, ast.Name) and func.id == "level"


def _documented_events() -> list[tuple[set[str], set[str]]]:
    """The guide's log-event table: (the events of a row, the fields it names)."""
    rows = []
    for cells in _table(GUIDE, "event"):
        events, fields = set(TICKED.findall(cells[0])), set(TICKED.findall(cells[2]))
        rows.append((events, fields))
    return rows


def test_every_log_event_the_guide_lists_is_logged_with_its_fields() -> None:
    logged = _logged()
    for events, fields in _documented_events():
        for event in events:
            assert event in logged, f"{event} is not logged anywhere"
        passed = set().union(*(logged[event] for event in events))
        assert fields <= passed, f"{sorted(events)}: no field {sorted(fields - passed)}"


def test_the_guide_lists_the_events_operators_watch() -> None:
    listed = set().union(*(events for events, _ in _documented_events()))
    missing = [event for event in KEY_EVENTS if event not in listed]
    assert not missing, missing


def test_every_event_a_doc_names_is_logged() -> None:
    """`event=name` anywhere in the docs: an event renamed in the code leaves it stale."""
    logged = _logged()
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for event in re.findall(r"event=([a-z_]+)", text):
            assert event in logged, f"{path.name}: event={event}"


# Commands


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.DOTALL)
    tests = next(block for block in blocks if "pytest" in block)
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci


def test_the_guide_grants_a_redis_user_what_check_verifies() -> None:
    """The ACL the guide tells to set is what `check` and the start verify (`acl_rules`):
    a command the bridge starts to send is missing from neither."""
    guide = GUIDE.read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```sh\n(.*?)\n```", guide, re.DOTALL) if "SETUSER" in b)
    command = " ".join(block.replace("\\\n", " ").replace("'", "").splitlines()[0].split())
    assert command.endswith(acl_rules(Keys("support"))), command
