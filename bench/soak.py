"""Soak test of the delivery guarantees (SPEC §4–§6), bounded, loopback only.

N messages over S sessions are posted to two `python -m bridge run` processes sharing a
private redis-server (append-only, its own socket), with a share of duplicate deliveries
(the same msgId again, a fresh header timestamp), while bridge processes are SIGKILLed at
random and restarted, and Redis is shut down cleanly and started again on its data. The
fake platform sends through the app API, deduplicating by message_id as the real one does,
so a piece sent twice under one id shows once — and an answer produced twice under two
entry ids shows twice. Webhooks refused (503, or nothing listening) are retried, as the
platform does, until accepted.

Every answer is two sentences tagged `[s<session>#<seq>.<sentence>]`; the report counts:
sent (distinct messages accepted), duplicate deliveries, distinct replies (messages with
an answer shown), lost (accepted, never answered), duplicated (a sentence shown twice),
out of order (a sentence shown before one of an earlier message of its session, or before
an earlier sentence of its own answer), busy, cut off (answers cut by a kill, with their
notice), dead-lettered, and turns asked again (no piece was journalled before the kill).

    python bench/soak.py                     # the recorded run: 5000 messages, 60 sessions
    python bench/soak.py --quick             # a small, fast run (the smoke test uses it)
    python bench/soak.py --record bench/RESULTS.md   # append a dated entry
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shlex
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.messages import MESSAGES
from tests.fakes import yach as fake_yach
from tests.fakes.yach import FakeYach
from tests.harness import bridge_env, group_message, openai_env
from tests.procs import BridgeProcess, PacedOpenAI, RedisServer, post_webhook

_TAG = re.compile(r"\[s(\d+)#(\d+)\.(\d)\]")
SENTENCES = 2


@dataclass
class Plan:
    messages: int
    sessions: int
    duplicates: float
    kills: int
    redis_restarts: int
    post_seconds: float  # postings are spread over this long; chaos happens meanwhile
    max_seconds: float  # the whole run, waiting for answers included, stops by then
    claim_idle_s: float
    seed: int


@dataclass
class Report:
    sent: int = 0
    duplicate_deliveries: int = 0
    refused_deliveries: int = 0  # webhooks answered 503 or not at all, then retried
    distinct_replies: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    busy: int = 0
    cut_off: int = 0
    dead_lettered: int = 0
    asked_again: int = 0
    kills: int = 0
    redis_restarts: int = 0
    seconds: float = 0.0
    drained_exit_codes: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.lost, self.duplicated, self.out_of_order, self.busy) == (0, 0, 0, 0)


class SoakYach(FakeYach):
    """The fake platform, but any token it issued stays valid until it expires (as the
    real `gettoken` hands every process the same cached token): with the base fake, two
    processes refreshing in turn would invalidate each other's token on every send."""

    def _token_ok(self, request: web.Request) -> bool:
        token = request.query.get("access_token", "")
        issued = token.removeprefix("app-token-")
        return issued.isdigit() and 1 <= int(issued) <= self.tokens_issued


def answer_for(body: dict[str, Any]) -> str:
    tag = str(body["messages"][-1]["content"]).strip()
    return " ".join(
        f"[{tag}.{n}] This is sentence {n} of the answer, long enough to be a piece."
        for n in range(1, SENTENCES + 1)
    )


class Soak:
    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan = plan
        self.work = work
        self.rng = random.Random(plan.seed)
        self.report = Report()
        self.redis = RedisServer(work / "redis")
        self.yach = SoakYach()
        self.upstream = PacedOpenAI(answer=answer_for, delay_s=0.002)
        self.bridges: list[BridgeProcess] = []
        self.accepted: set[tuple[int, int]] = set()
        self.started = 0.0
        self.bot_id = f"soak-{uuid.uuid4().hex[:8]}"

    # Setup

    def env(self) -> dict[str, str]:
        return bridge_env(
            self.redis.url, self.bot_id, self.yach, **openai_env(self.upstream.base_url),
            BRIDGE_LANG="en",
            BRIDGE_REPLY_MODE="stream",
            BRIDGE_FLUSH_MIN_CHARS="40",
            BRIDGE_YACH_APP_KEY=fake_yach.APP_KEY,
            BRIDGE_YACH_APP_SECRET=fake_yach.APP_SECRET,
            BRIDGE_SESSION_QUEUE_MAX="100000",  # never "busy": a busy answer hides a loss
            BRIDGE_CLAIM_IDLE_S=str(self.plan.claim_idle_s),
            BRIDGE_DRAIN_TIMEOUT_S="10",
            BRIDGE_WORKERS="32",
        )  # fmt: skip

    async def run(self) -> Report:
        self.started = time.monotonic()
        self.redis.start()
        await self.yach.start()
        await self.upstream.start()
        try:
            env = self.env()
            self.bridges = [BridgeProcess(env, self.work / f"bridge-{name}.log") for name in "ab"]
            await asyncio.gather(*(bridge.start() for bridge in self.bridges))
            async with aiohttp.ClientSession() as http:
                chaos = asyncio.create_task(self.chaos())
                await self.post_all(http)
                await chaos
                await self.wait_for_answers()
            await self.stop_bridges()
        finally:
            for bridge in self.bridges:
                bridge.close()
            await self.upstream.close()
            await self.yach.close()
            self.redis.close()
        self.report.seconds = round(time.monotonic() - self.started, 1)
        self.tally()
        return self.report

    def left(self) -> float:
        return self.plan.max_seconds - (time.monotonic() - self.started)

    # Posting, as the platform does: each sender in order; a refused delivery is retried

    async def post_all(self, http: aiohttp.ClientSession) -> None:
        plan = self.plan
        per_session = [plan.messages // plan.sessions] * plan.sessions
        for s in range(plan.messages % plan.sessions):
            per_session[s] += 1
        gap = plan.post_seconds / max(per_session)
        await asyncio.gather(
            *(self.post_session(http, s, count, gap) for s, count in enumerate(per_session))
        )

    async def post_session(
        self, http: aiohttp.ClientSession, session: int, count: int, gap: float
    ) -> None:
        rng = random.Random(self.plan.seed * 1000 + session)
        await asyncio.sleep(rng.uniform(0, gap))
        ids = [f"soak-{session}-{seq}-{uuid.uuid4().hex[:6]}" for seq in range(count)]
        for seq in range(count):
            await self.deliver(http, session, seq, ids[seq])
            self.accepted.add((session, seq))
            if rng.random() < self.plan.duplicates:  # the platform delivers one again
                again = rng.randint(max(0, seq - 3), seq)
                await self.deliver(http, session, again, ids[again])
                self.report.duplicate_deliveries += 1
            await asyncio.sleep(rng.uniform(0.5, 1.5) * gap)

    async def deliver(
        self, http: aiohttp.ClientSession, session: int, seq: int, msg_id: str
    ) -> None:
        message = group_message(f"s{session}#{seq}", msg_id=msg_id, sender=f"user{session}")
        for attempt in range(10_000):
            bridge = self.bridges[(session + seq + attempt) % len(self.bridges)]
            status = await post_webhook(http, bridge.url, message) if bridge.port else 0
            if status == 200:
                return
            self.report.refused_deliveries += 1
            if self.left() < 0:
                raise TimeoutError("the platform gave up retrying: out of time")
            await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))

    # Chaos: SIGKILLs of bridge processes, a clean Redis restart, at random times

    async def chaos(self) -> None:
        plan = self.plan
        events = ["kill"] * plan.kills + ["redis"] * plan.redis_restarts
        self.rng.shuffle(events)
        window = plan.post_seconds
        times = sorted(self.rng.uniform(0.1 * window, 0.9 * window) for _ in events)
        began = time.monotonic()
        for at, event in zip(times, events, strict=True):
            await asyncio.sleep(max(0.0, at - (time.monotonic() - began)))
            if event == "kill":
                await self.kill_one()
            else:
                await self.restart_redis()

    async def kill_one(self) -> None:
        bridge = self.rng.choice(self.bridges)
        print(f"[{self.elapsed()}] SIGKILL bridge pid {bridge.pid}", flush=True)
        bridge.kill()
        bridge.port = 0
        self.report.kills += 1
        await asyncio.sleep(self.rng.uniform(0.5, 1.5))
        await bridge.start()
        print(f"[{self.elapsed()}] bridge restarted, pid {bridge.pid}", flush=True)

    async def restart_redis(self) -> None:
        print(f"[{self.elapsed()}] Redis SHUTDOWN", flush=True)
        self.redis.shutdown()
        self.report.redis_restarts += 1
        await asyncio.sleep(1.0)
        self.redis.start()
        print(f"[{self.elapsed()}] Redis started again on its data", flush=True)

    # The end

    async def wait_for_answers(self) -> None:
        """Until every accepted message has its whole answer (or a cut-off notice), or no
        progress for a while, or out of time."""
        last, last_change = -1, time.monotonic()
        while self.left() > 0:
            done = self.finished()
            if done >= len(self.accepted):
                break
            if done != last:
                last, last_change = done, time.monotonic()
                print(f"[{self.elapsed()}] {done}/{len(self.accepted)} answered", flush=True)
            elif time.monotonic() - last_change > max(30.0, 10 * self.plan.claim_idle_s):
                print(f"[{self.elapsed()}] no progress: giving up waiting", flush=True)
                break
            await asyncio.sleep(1.0)
        await asyncio.sleep(2 * self.plan.claim_idle_s + 1)  # a late duplicate would show

    def finished(self) -> int:
        answered: dict[tuple[int, int], set[int]] = defaultdict(set)
        for shown in self.yach.shown:
            for s, q, n in _TAG.findall(shown.text):
                answered[(int(s), int(q))].add(int(n))
        cut = sum(shown.text == MESSAGES["en"]["cut_off"] for shown in self.yach.shown)
        whole = sum(len(sentences) == SENTENCES for sentences in answered.values())
        return min(whole + cut, len(answered))

    async def stop_bridges(self) -> None:
        for bridge in self.bridges:
            bridge.signal(15)
        for bridge in self.bridges:
            self.report.drained_exit_codes.append(await bridge.wait(30))

    def tally(self) -> None:
        en = MESSAGES["en"]
        report = self.report
        report.sent = len(self.accepted)
        seen: Counter[tuple[int, int, int]] = Counter()
        last: dict[int, tuple[int, int]] = {}
        for shown in self.yach.shown:
            text = shown.text
            report.busy += text == en["busy"]
            report.cut_off += text == en["cut_off"]
            report.dead_lettered += text == en["dead_letter"]
            for s, q, n in _TAG.findall(text):
                key = (int(s), int(q), int(n))
                seen[key] += 1
                if key[1:] < last.get(key[0], (-1, 0)):
                    report.out_of_order += 1
                last[key[0]] = max(last.get(key[0], (-1, 0)), key[1:])
        answered = {(s, q) for s, q, _ in seen}
        report.distinct_replies = len(answered)
        report.lost = len(self.accepted - answered)
        report.duplicated = sum(count - 1 for count in seen.values() if count > 1)
        asked = Counter(
            str(body["messages"][-1]["content"]).strip() for body in self.upstream.bodies
        )
        report.asked_again = sum(count - 1 for count in asked.values())

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:6.1f}s"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with_cpu = Path("/proc/cpuinfo")
    if with_cpu.exists():
        for line in with_cpu.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    return (
        f"{platform.machine()}, nproc {os.cpu_count()}, {cpu}; Python {platform.python_version()}"
    )


def record(path: Path, plan: Plan, report: Report, command: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    verdict = "lost = duplicated = out of order = busy = 0: met" if report.ok else "FAILED"
    lines = [
        "",
        f"## Delivery soak — {stamp}",
        "",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- plan: {plan.messages} messages over {plan.sessions} sessions, "
        f"{plan.duplicates:.0%} duplicate deliveries, {plan.kills} SIGKILLs of bridge "
        f"processes, {plan.redis_restarts} clean Redis restart(s) on its data; two bridge "
        f"processes, app-API sends, stream mode, BRIDGE_CLAIM_IDLE_S={plan.claim_idle_s:g}, "
        f"seed {plan.seed}",
        f"- result: {verdict}; {report.seconds:g} s",
        "",
        "| sent | duplicate deliveries | refused deliveries (retried) | distinct replies "
        "| lost | duplicated | out of order | busy | cut off | dead-lettered | asked again "
        "| kills | Redis restarts | exit codes after SIGTERM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {report.sent} | {report.duplicate_deliveries} | {report.refused_deliveries} "
        f"| {report.distinct_replies} | {report.lost} | {report.duplicated} "
        f"| {report.out_of_order} | {report.busy} | {report.cut_off} | {report.dead_lettered} "
        f"| {report.asked_again} | {report.kills} | {report.redis_restarts} "
        f"| {', '.join(map(str, report.drained_exit_codes))} |",
        "",
        "Cut off: answers a kill interrupted after pieces had gone out, finished from the "
        "journal with the cut-off notice (the upstream not asked again); asked again: turns "
        "killed before any piece was journalled, run afresh (nothing had shown). Refused "
        "deliveries: webhooks answered 503 (Redis down) or not at all (a killed process), "
        "retried as the platform does.",
        "",
    ]
    with path.open("a") as out:
        out.write("\n".join(lines))


def parse_args(argv: list[str] | None) -> tuple[Plan, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and fast (smoke test)")
    parser.add_argument("--messages", type=int)
    parser.add_argument("--sessions", type=int)
    parser.add_argument("--duplicates", type=float, default=0.10)
    parser.add_argument("--kills", type=int)
    parser.add_argument("--redis-restarts", type=int, default=1)
    parser.add_argument("--post-seconds", type=float)
    parser.add_argument("--max-seconds", type=float)
    parser.add_argument("--claim-idle-s", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--record", type=Path, help="append a dated entry to this file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    quick = args.quick
    plan = Plan(
        messages=args.messages or (150 if quick else 5000),
        sessions=args.sessions or (10 if quick else 60),
        duplicates=args.duplicates,
        kills=args.kills if args.kills is not None else (1 if quick else 3),
        redis_restarts=args.redis_restarts,
        post_seconds=args.post_seconds or (6.0 if quick else 60.0),
        max_seconds=args.max_seconds or (90.0 if quick else 840.0),
        claim_idle_s=args.claim_idle_s,
        seed=args.seed,
    )
    return plan, args


def main(argv: list[str] | None = None) -> int:
    plan, args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chatbridge-soak-") as tmp:
        report = asyncio.run(Soak(plan, Path(tmp)).run())
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}))
    else:
        for name, value in asdict(report).items():
            print(f"{name:>28}: {value}")
        print(f"{'ok':>28}: {report.ok}")
    if args.record:
        command = "python bench/soak.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        record(args.record, plan, report, command.strip())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
