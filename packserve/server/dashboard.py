"""The live packing dashboard: a recorder fed by the engine loop, a JSON feed and a static page.

`DashboardRecorder.observe_step` runs on the engine thread after every step with the step's
StepStats and the EngineLoad the engine just published; it only appends to bounded ring
buffers (constant work per step, plus a sum over the step's packed rows). Everything else,
percentiles, padding arithmetic and JSON, happens in the feed handler on the event loop, when
somebody is looking. `bench/dashboard_overhead.py` measures the per-step cost.

Auth: GET /dashboard and GET /dashboard/feed are open, like /metrics. The feed holds counts,
gauges, timings and the server's internal request ids (`req-N`), never prompt or output text
or token ids: the same information /metrics already publishes, at finer grain. Requiring the
API key would also force the key into browser JavaScript (a page load cannot send an
Authorization header), which is worse than the exposure it prevents. Put the server behind a
proxy if /metrics must not be public; the dashboard goes with it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from importlib import resources
from itertools import islice
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response

from packserve.engine import EngineInfo, EngineLoad, StepStats

from .metrics import RequestTimings

HISTORY_S = 300  # seconds of per-second series kept (the charts' window)
PREFILL_STEPS = 32  # steps with prompt tokens in their packed rows kept (the page draws a few)
TTFT_SAMPLES = 4096  # first-token latencies kept
TTFT_WINDOW_S = 10  # the TTFT chart: one p50/p99 point per this many seconds
RATE_WINDOW_S = 10  # tokens/s and friends: over this many complete seconds
TTFT_KPI_WINDOW_S = 60  # the TTFT headline numbers: over the last minute
MAX_RUNNING_ROWS = 100  # running requests listed (the total is always given)


class _Second:
    """What the engine did during one wall second (monotonic clock, floored)."""

    __slots__ = (
        "busy_s",
        "cache_hits",
        "cache_queries",
        "gen_tokens",
        "kv",
        "prompt_tokens",
        "kv_end",
        "running",
        "running_end",
        "sec",
        "seq",
        "steps",
        "waiting",
        "waiting_end",
    )

    def __init__(self, sec: int) -> None:
        self.sec = sec
        self.seq = 0  # the last step recorded into it: the feed's `since` compares to this
        self.steps = 0
        self.prompt_tokens = 0  # prompt tokens run (a prefix-cache hit skips its tokens)
        self.gen_tokens = 0
        self.cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.cache_hits = 0  # of those, found
        self.busy_s = 0.0
        self.running = 0  # the gauges: the highest value seen during the second...
        self.waiting = 0
        self.kv = 0.0
        self.running_end = 0  # ...and the value after its last step (what holds while idle)
        self.waiting_end = 0
        self.kv_end = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "t": self.sec,
            "steps": self.steps,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "cache_queries": self.cache_queries,
            "cache_hits": self.cache_hits,
            "busy_s": round(self.busy_s, 4),
            "running": self.running,
            "waiting": self.waiting,
            "kv": round(self.kv, 4),
            "running_end": self.running_end,
            "waiting_end": self.waiting_end,
            "kv_end": round(self.kv_end, 4),
        }


class DashboardRecorder:
    """Recent engine steps and first-token latencies, in bounded ring buffers.

    Written by the engine thread (`observe_step`) and the event loop (`observe_request`),
    read by the feed handler; one lock, held for a few attribute writes at a time.
    """

    def __init__(
        self,
        history_s: int = HISTORY_S,
        prefill_steps: int = PREFILL_STEPS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock  # seconds, monotonic; the scheduler's arrival_time uses the same
        self._lock = threading.Lock()
        self._seq = 0
        self._started = clock()
        self._seconds: deque[_Second] = deque(maxlen=history_s)
        self._prefills: deque[tuple[int, float, StepStats]] = deque(maxlen=prefill_steps)
        self._ttft: deque[tuple[float, float]] = deque(maxlen=TTFT_SAMPLES)
        self._last: tuple[StepStats, EngineLoad] | None = None  # the newest step and load
        self._last_at = -math.inf  # when the last step was recorded
        self._info: dict[str, Any] | None = None

    # -- writers --------------------------------------------------------------------------------

    def set_info(self, info: EngineInfo) -> None:
        """Once, when the engine has started: the settings the page labels its drawings with."""
        self._info = asdict(info)
        self._info["eos_token_ids"] = sorted(info.eos_token_ids)

    def observe_step(self, stats: StepStats, load: EngineLoad) -> None:
        """Engine thread, after every step: the step's figures and the load it left."""
        now = self._clock()
        kv = load.kv_cache_usage
        with self._lock:
            self._seq += 1
            seq = self._seq
            sec = int(now)
            second = self._seconds[-1] if self._seconds else None
            if second is None or second.sec != sec:
                second = _Second(sec)
                self._seconds.append(second)
            second.seq = seq
            second.steps += 1
            second.prompt_tokens += stats.num_prefill_tokens
            second.gen_tokens += stats.num_sampled_tokens
            second.cache_queries += stats.num_cache_query_tokens
            second.cache_hits += stats.num_cache_hit_tokens
            second.busy_s += stats.step_time_s
            second.running = max(second.running, load.num_running)
            second.waiting = max(second.waiting, load.num_waiting)
            second.kv = max(second.kv, kv)
            second.running_end = load.num_running
            second.waiting_end = load.num_waiting
            second.kv_end = kv
            if stats.prefill_rows and stats.num_prefill_tokens:  # not decode tokens alone
                self._prefills.append((seq, now, stats))
            self._last_at = now
            self._last = (stats, load)

    def observe_request(self, t: RequestTimings) -> None:
        """Event loop, when a request finished: keep its time to first token, if it got one."""
        if t.first_token is None:
            return
        with self._lock:
            self._ttft.append((self._clock(), max(0.0, t.first_token - t.arrival)))

    # -- the feed -------------------------------------------------------------------------------

    def feed(self, since: int = 0, now: float | None = None) -> dict[str, Any]:
        """Everything the page shows. Series points and prefill steps newer than step `since`
        only (the page merges them); gauges, latencies and the running table in full."""
        now = self._clock() if now is None else now
        with self._lock:
            seq = self._seq
            if since > seq:  # a restarted server: the page starts over
                since = 0
            seconds = list(self._seconds)
            prefills = list(self._prefills)
            ttft = list(self._ttft)
            last, last_at, info = self._last, self._last_at, self._info
        stats, load = last if last else (None, None)
        running = load.running if load else ()
        nowsec = int(now)
        full = [s for s in seconds if nowsec - RATE_WINDOW_S <= s.sec < nowsec]
        packed = [_step_json(p, now) for p in prefills]
        real = sum(s["real"] for s in packed)
        cost_packed = sum(s["packed"] for s in packed)
        cost_padded = sum(s["padded"] for s in packed)
        recent = sorted(v for ts, v in ttft if now - ts <= TTFT_KPI_WINDOW_S)
        cache_queries = sum(s.cache_queries for s in full)
        cache_hits = sum(s.cache_hits for s in full)
        return {
            "seq": seq,
            "since": since,
            "now": round(now, 3),
            "uptime_s": round(now - self._started, 1),
            "history_s": self._seconds.maxlen,
            "last_step_age_s": round(now - last_at, 2) if last_at > -math.inf else None,
            "config": info,
            "summary": {
                "tokens_per_s": round(sum(s.gen_tokens for s in full) / RATE_WINDOW_S, 1),
                "prompt_tokens_per_s": round(sum(s.prompt_tokens for s in full) / RATE_WINDOW_S, 1),
                "steps_per_s": round(sum(s.steps for s in full) / RATE_WINDOW_S, 1),
                "busy": round(min(1.0, sum(s.busy_s for s in full) / RATE_WINDOW_S), 3),
                "running": load.num_running if load else 0,
                "waiting": load.num_waiting if load else 0,
                "kv_blocks_used": load.num_kv_blocks_used if load else 0,
                "kv_blocks": load.num_kv_blocks if load else 0,
                "kv_cache_usage": round(load.kv_cache_usage, 4) if load else 0.0,
                "last_step_ms": round(stats.step_time_s * 1000, 2) if stats else 0.0,
                "ttft_p50_s": _percentile(recent, 0.5),
                "ttft_p99_s": _percentile(recent, 0.99),
                "ttft_n": len(recent),
                # Over the same complete seconds as the rates; None when nothing was looked up.
                "prefix_cache_queries": cache_queries,
                "prefix_cache_hits": cache_hits,
                "prefix_cache_hit_rate": (
                    round(cache_hits / cache_queries, 4) if cache_queries else None
                ),
                "prefill_steps": len(packed),
                "prefill_real_tokens": real,
                "prefill_packed_tokens": cost_packed,
                "prefill_padded_tokens": cost_padded,
                "packed_fill": round(real / cost_packed, 4) if cost_packed else None,
                "padded_fill": round(real / cost_padded, 4) if cost_padded else None,
            },
            "series": [s.to_json() for s in seconds if s.seq > since],
            "prefill_steps": [s for s in packed if s["seq"] > since],
            "ttft_series": _ttft_series(ttft, now, self._seconds.maxlen or HISTORY_S),
            "running": [
                {
                    "id": r.request_id,
                    "adapter": r.adapter,  # LoRA adapter; None: the base model
                    "prompt_tokens": r.num_prompt_tokens,
                    "generated_tokens": r.num_output_tokens,
                    "age_s": round(max(0.0, now - r.arrival_time), 2),
                }
                for r in islice(running, MAX_RUNNING_ROWS)
            ],
            "running_total": len(running),
            "running_age_s": round(now - last_at, 2) if last_at > -math.inf else None,
        }


def _step_json(step: tuple[int, float, StepStats], now: float) -> dict[str, Any]:
    """One step's packed rows with their cost both ways: as packed (every row padded to the
    longest row) and as padded batching would have run them (one segment per row). The rows
    hold prompt pieces and, mixed in, decode tokens: every prefill segment is in a row, so
    the rows' other tokens are decodes."""
    seq, at, stats = step
    return {
        "seq": seq,
        "age_s": round(max(0.0, now - at), 2),
        "step_ms": round(stats.step_time_s * 1000, 2),
        "rows": [list(row) for row in stats.prefill_rows],
        "real": stats.num_row_tokens,
        "prompt_tokens": stats.num_prefill_tokens,
        "decode_tokens": stats.num_row_tokens - stats.num_prefill_tokens,
        "packed": stats.num_padded_prefill_tokens,
        "padded": stats.num_unpacked_prefill_tokens,
    }


def _percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list; None when empty."""
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 4)


def _ttft_series(samples: list[tuple[float, float]], now: float, history_s: int) -> list[dict]:
    """p50/p99 of the first-token latencies in consecutive windows ending at `now`."""
    windows: dict[int, list[float]] = {}
    for ts, value in samples:
        k = int((now - ts) // TTFT_WINDOW_S)
        if 0 <= k < history_s // TTFT_WINDOW_S:
            windows.setdefault(k, []).append(value)
    out = []
    for k in sorted(windows, reverse=True):
        values = sorted(windows[k])
        out.append(
            {
                "t": round(now - k * TTFT_WINDOW_S, 3),
                "p50": _percentile(values, 0.5),
                "p99": _percentile(values, 0.99),
                "n": len(values),
            }
        )
    return out


# -- HTTP ---------------------------------------------------------------------------------------

_STATIC = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Everything from this origin, nothing inline, nothing from elsewhere (no CDN, by design).
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _static(name: str) -> bytes:
    return (resources.files("packserve.server") / "static" / name).read_bytes()


def dashboard_router(recorder: DashboardRecorder, model_name: str = "") -> APIRouter:
    """GET /dashboard (the page and its two files) and GET /dashboard/feed. Open, like
    /metrics: see the module docstring."""
    router = APIRouter(tags=["dashboard"])
    files = {name: _static(name) for name in _STATIC}  # read once: no file access per request
    headers = {
        "Content-Security-Policy": _CSP,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }

    def route(path: str, name: str) -> None:
        async def serve() -> Response:
            return Response(files[name], media_type=_STATIC[name], headers=headers)

        router.add_api_route(path, serve, methods=["GET"], include_in_schema=False)

    route("/dashboard", "dashboard.html")  # its files are relative: dashboard/<name>
    for name in _STATIC:
        if name != "dashboard.html":
            route(f"/dashboard/{name}", name)

    @router.get("/dashboard/feed")
    async def feed(since: int = Query(0, ge=0)) -> JSONResponse:
        """The engine's recent steps as JSON (counts and timings only; no prompt text)."""
        body = recorder.feed(since)
        body["model"] = model_name
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return router
