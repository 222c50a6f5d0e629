"""SSE parsing throughput: bridge/sse.py against httpx-sse on the recorded fixtures.

    python bench/bench_sse.py            # ≥ 50 MB per corpus, best of 3; appends to RESULTS.md
    python bench/bench_sse.py --profile  # the same, plus cProfile's top lines for bridge/sse.py
    python bench/bench_sse.py --quick    # a smoke run of a few hundred KB; records nothing

Each corpus (the two fixtures together, then each alone) is repeated to the size asked for and
cut into reads of 1–4 KiB (seeded), as a socket hands them over. The same reads go to:

- chatbridge: `SSEDecoder.feed(read)` for each read, then `close()`.
- httpx-sse, decoder layer: what `EventSource.iter_sse` runs for each read, minus httpx — an
  incremental UTF-8 decoder (httpx's `TextDecoder` is one), httpx-sse's own `SSELineDecoder`
  and `SSEDecoder`. This is the strict baseline: no HTTP object, no generator per line.
- httpx-sse, as used: `EventSource(httpx.Response(..., content=reads)).iter_sse()`, how a
  client of httpx-sse reads a stream (the body comes from memory: no network on either side).

Both decoders must give the same events (data and type) on every corpus before anything is
timed. Times are the best of `--repeat` runs; a run's MB/s is input bytes / wall time.
"""

from __future__ import annotations

import argparse
import codecs
import cProfile
import gc
import io
import os
import platform
import pstats
import random
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

import httpx
from httpx_sse import EventSource
from httpx_sse._decoders import SSEDecoder as HttpxSSEDecoder
from httpx_sse._decoders import SSELineDecoder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bridge.sse import SSEDecoder  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"
PACKAGED_FIXTURES = ROOT / "bridge" / "recordings"  # the same recordings, shipped
TARGET_RATIO, TARGET_MB_S = 2.0, 50.0

Decoder = Callable[[list[bytes]], int]  # reads in, number of events out


# -- the contenders ---------------------------------------------------------------------------


def chatbridge(reads: list[bytes]) -> int:
    decoder = SSEDecoder()
    count = 0
    for read in reads:
        count += len(decoder.feed(read))
    return count + len(decoder.close())


def httpx_sse_layer(reads: list[bytes]) -> int:
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    lines, decoder = SSELineDecoder(), HttpxSSEDecoder()
    count = 0
    for read in reads:
        for line in lines.decode(text.decode(read)):
            if decoder.decode(line.rstrip("\n")) is not None:
                count += 1
    for line in lines.decode(text.decode(b"", final=True)) + lines.flush():
        if decoder.decode(line.rstrip("\n")) is not None:
            count += 1
    return count


def httpx_sse_as_used(reads: list[bytes]) -> int:
    response = httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=iter(reads))
    return sum(1 for _ in EventSource(response).iter_sse())


CONTENDERS: dict[str, Decoder] = {
    "chatbridge": chatbridge,
    "httpx-sse layer": httpx_sse_layer,
    "httpx-sse as used": httpx_sse_as_used,
}


def events_of(name: str, reads: list[bytes]) -> list[tuple[str, str]]:
    """(event, data) of every event, for the check that all contenders agree."""
    if name == "chatbridge":
        decoder = SSEDecoder()
        events = [e for read in reads for e in decoder.feed(read)] + decoder.close()
        return [(e.event, e.data) for e in events]
    response = httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=iter(reads))
    return [(e.event, e.data) for e in EventSource(response).iter_sse()]


# -- corpora ----------------------------------------------------------------------------------


def fixture_files() -> list[Path]:
    folder = SHARED_FIXTURES if SHARED_FIXTURES.is_dir() else PACKAGED_FIXTURES
    files = sorted(folder.glob("*.sse"))
    if not files:
        raise SystemExit(f"no .sse recordings in {folder}")
    return files


def corpora(files: list[Path]) -> dict[str, bytes]:
    unit = {path.stem: path.read_bytes() for path in files}
    return {"all fixtures": b"".join(unit.values()), **unit}


def cut(data: bytes, seed: int, low: int, high: int) -> list[bytes]:
    rng = random.Random(seed)
    reads, offset = [], 0
    while offset < len(data):
        size = rng.randint(low, high)
        reads.append(data[offset : offset + size])
        offset += size
    return reads


def repeated(unit: bytes, size: int) -> bytes:
    return unit * max(1, -(-size // len(unit)))


# -- measuring --------------------------------------------------------------------------------


def best_of(decoder: Decoder, reads: list[bytes], repeat: int, deadline: float,
            *, collect: bool = True) -> tuple[float, int]:
    best, count = float("inf"), -1
    for attempt in range(repeat):
        if attempt and time.monotonic() > deadline:
            break
        if collect:  # start each run without the last one's garbage
            gc.collect()
        started = time.perf_counter()
        count = decoder(reads)
        best = min(best, time.perf_counter() - started)
    return best, count


def check_agreement(unit: bytes, reads_of: Callable[[bytes], list[bytes]]) -> int:
    reads = reads_of(unit)
    ours = events_of("chatbridge", reads)
    theirs = events_of("httpx-sse", reads)
    if ours != theirs:
        raise SystemExit("chatbridge and httpx-sse disagree on a fixture: not comparable")
    return len(ours)


def profile(reads: list[bytes], lines: int = 12) -> str:
    profiler = cProfile.Profile()
    profiler.runcall(chatbridge, reads)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(lines)
    text = out.getvalue()
    start = text.find("   ncalls")
    return text[start:].rstrip() if start >= 0 else text.rstrip()


# -- reporting --------------------------------------------------------------------------------


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return (f"{platform.machine()}, nproc {os.cpu_count()}"
            f"{', ' + model if model else ''}; Python {platform.python_version()}, "
            f"httpx-sse {_version('httpx-sse')}, httpx {httpx.__version__}")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def table(rows: list[tuple[str, int, int, dict[str, float]]]) -> list[str]:
    names = list(CONTENDERS)
    head = ["corpus", "MB", "events", *[f"{n} MB/s" for n in names],
            "× layer", "× as used"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for corpus, size, events, speed in rows:
        ours = speed["chatbridge"]
        cells = [corpus, f"{size / 1e6:.1f}", str(events), *[f"{speed[n]:.1f}" for n in names],
                 f"{ours / speed['httpx-sse layer']:.2f}",
                 f"{ours / speed['httpx-sse as used']:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def per_stream_verdict(rows: list[tuple[str, int, int, dict[str, float]]]) -> str:
    """The recordings each as a stream of its own (all their bytes over all their time), as
    an upstream sends them: "all fixtures" also hands over from one format to the other
    every 38 KB, which no real stream does."""
    seconds = {name: sum(size / 1e6 / speed[name] for _, size, _, speed in rows)
               for name in CONTENDERS}
    ours = seconds["chatbridge"]
    return (f"each recording as its own stream: {seconds['httpx-sse layer'] / ours:.2f}× the "
            f"layer, {seconds['httpx-sse as used'] / ours:.2f}× as used")


def record(path: Path, lines: list[str]) -> None:
    if not path.exists():
        path.write_text("# Benchmark results\n\n"
                        "Appended by the scripts in `bench/`, one dated entry per run, newest "
                        "last.\nEach entry names the machine and the exact command; numbers "
                        "from different machines are not comparable.\n")
    with path.open("a", encoding="utf-8") as out:
        out.write("\n" + "\n".join(lines) + "\n")


# -- main -------------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 0.3 MB per corpus, one repeat, nothing recorded")
    parser.add_argument("--mb", type=float, default=50.0, help="MB per corpus (default 50)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs (default 3)")
    parser.add_argument("--read-min", type=int, default=1024, help="smallest read in bytes")
    parser.add_argument("--read-max", type=int, default=4096, help="largest read in bytes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=180.0,
                        help="stop repeating once this much time has passed (default 180)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile chatbridge on the first corpus (cProfile, tottime)")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"where to append the entry (default {RESULTS.relative_to(ROOT)}; "
                             "--quick records only when this is given)")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.quick:
        args.mb, args.repeat = 0.3, 1
    results = args.results or (None if args.quick else RESULTS)
    deadline = time.monotonic() + args.budget_s

    def reads_of(data: bytes) -> list[bytes]:
        return cut(data, args.seed, args.read_min, args.read_max)

    rows: list[tuple[str, int, int, dict[str, float]]] = []
    profiled = ""
    for name, unit in corpora(fixture_files()).items():
        check_agreement(unit, reads_of)
        data = repeated(unit, int(args.mb * 1e6))
        reads = reads_of(data)
        speed: dict[str, float] = {}
        counts = set()
        for contender, decoder in CONTENDERS.items():
            # --quick measures nothing: no forced collection, which in a test process would
            # also finalise what other tests left behind and blame it on this one
            seconds, count = best_of(decoder, reads, args.repeat, deadline,
                                     collect=not args.quick)
            speed[contender] = len(data) / 1e6 / seconds
            counts.add(count)
        if len(counts) != 1:
            raise SystemExit(f"{name}: event counts differ between contenders: {counts}")
        rows.append((name, len(data), counts.pop(), speed))
        print(f"{name}: " + ", ".join(f"{k} {v:.1f} MB/s" for k, v in speed.items()), flush=True)
        if args.profile and not profiled:
            profiled = profile(reads)

    lines = table(rows)
    overall = rows[0][3]
    ratio_layer = overall["chatbridge"] / overall["httpx-sse layer"]
    ratio_used = overall["chatbridge"] / overall["httpx-sse as used"]
    speed_met = "met" if overall["chatbridge"] >= TARGET_MB_S else "MISSED"
    ratio_met = "met" if min(ratio_layer, ratio_used) >= TARGET_RATIO else "MISSED"
    verdict = (f"all fixtures: chatbridge {overall['chatbridge']:.1f} MB/s "
               f"(target ≥ {TARGET_MB_S:g}: {speed_met}); {ratio_layer:.2f}× the httpx-sse "
               f"decoder layer, {ratio_used:.2f}× httpx-sse as used "
               f"(target ≥ {TARGET_RATIO:g}× both: {ratio_met})")
    verdict += "; " + per_stream_verdict(rows[1:])
    print("\n".join(["", *lines, "", verdict]))
    if profiled:
        print("\ncProfile of chatbridge, all fixtures (tottime):\n" + profiled)
    if results is not None:
        command = "python " + " ".join([str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]]) \
            if argv is None else "python bench/bench_sse.py " + " ".join(argv)
        entry = [f"## SSE parsing — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
                 "",
                 f"- machine: {machine()}",
                 f"- command: `{command.strip()}`",
                 f"- input: {args.mb:g} MB per corpus, reads of {args.read_min}–{args.read_max} "
                 f"bytes (seed {args.seed}), best of {args.repeat}",
                 f"- result: {verdict}",
                 "", *lines]
        if profiled:
            entry += ["", "cProfile of chatbridge on all fixtures (tottime, top lines):", "",
                      "```", profiled, "```"]
        record(results, entry)
        print(f"\nappended to {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
