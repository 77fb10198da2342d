"""Serving comparison: packserve (packed and padded prefill) vs `transformers serve
--continuous-batching` vs a static-batching server (bench/static_server.py), same model, same
prompts, same machine; plus packserve's engine driven directly (no HTTP) at the same load.

For every model and every max-concurrency level, each system runs the same requests through
bench/serve.py's load generator with its own freshly started server (one server at a time, on
a loopback port). Systems are interleaved per level and the whole sweep is repeated in
round-robin order (the system order rotates), so machine drift hits every system alike. CPU
used by other processes during each run is measured (/proc/stat minus our own processes) and
recorded with the load average.

Writes bench/results/serve_compare.json (config, machine, aggregates, verdicts and each run's
summary), serve_compare.md and serve_compare_*.png; the per-request records the plots are made
from go to bench/results/raw/serve_compare.requests.json, which git ignores.

    .venv/bin/python -m bench.compare_servers                 # the full comparison
    .venv/bin/python -m bench.compare_servers --sizes tiny --levels 1,4 --prompt-scale 0.25
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import serve  # the load generator
from packserve.server.launcher import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SYSTEMS = ("packserve-packed", "packserve-padded", "packserve-thread", "transformers-cb", "static")
ENGINE = "packserve-engine"  # engine-only, no HTTP, stepped in a worker thread like the server
ENGINE_MAIN = "packserve-engine-main"  # the same, stepped in the main thread
DEFAULT_PROMPTS = {1: 4, 4: 8, 16: 24, 64: 64}
HZ = os.sysconf("SC_CLK_TCK")


# -- CPU accounting --------------------------------------------------------------------------


def _busy_jiffies() -> int:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def _proc_jiffies(pid: int) -> int:
    """utime + stime of a process and its waited-for children; 0 once it is gone."""
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(x) for x in parts[11:15])


def _tree_jiffies(pid: int) -> int:
    """A process and its live descendants (uvicorn or a CLI may fork)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += _proc_jiffies(p)
        try:
            for t in Path(f"/proc/{p}/task").iterdir():
                children = (t / "children").read_text().split()
                todo += [int(c) for c in children]
        except OSError:
            pass
    return total


class CpuMeter:
    """Cores used by processes other than ours between start() and stop()."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = [os.getpid(), *pids]

    def start(self) -> None:
        self.t0, self.busy0 = time.monotonic(), _busy_jiffies()
        self.own0 = sum(_tree_jiffies(p) for p in self.pids)

    def stop(self) -> dict[str, float]:
        dt = time.monotonic() - self.t0
        busy = (_busy_jiffies() - self.busy0) / HZ / dt
        own = (sum(_tree_jiffies(p) for p in self.pids) - self.own0) / HZ / dt
        return {
            "all_cores": round(busy, 3),
            "ours": round(own, 3),
            "others": round(max(0.0, busy - own), 3),
        }


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 60.0) -> dict[str, Any]:
    """Wait (up to max_wait_s) until the 1-minute load average is below max_load."""
    start = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        waited = time.monotonic() - start
        if load < max_load or waited >= max_wait_s:
            return {"loadavg_1m": load, "waited_s": round(waited), "quiet": load < max_load}
        print(
            f"  load average {load:.2f} >= {max_load}; waiting ({waited:.0f}s so far)", flush=True
        )
        time.sleep(poll_s)


def others_cpu(seconds: float = 5.0) -> float:
    meter = CpuMeter([])
    meter.start()
    time.sleep(seconds)
    return meter.stop()["others"]


# -- servers ---------------------------------------------------------------------------------


def packserve_flags(system: str, model_dir: str, name: str) -> list[str]:
    """`packserve serve` flags of a packserve system (the launcher adds host and port)."""
    flags = ["--model", model_dir, "--served-model-name", name, "--max-queued-requests", "1024"]
    extra = {
        "packserve-padded": ["--prefill-mode", "padded"],
        "packserve-thread": ["--no-engine-process"],  # the engine loop in a thread
    }
    return flags + extra.get(system, [])


def baseline_command(system: str, model_dir: str, port: int, args) -> list[str]:
    if system == "transformers-cb":
        return [
            str(BIN / "transformers"),
            "serve",
            model_dir,
            "--continuous-batching",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--cb-num-blocks",
            str(args.cb_num_blocks),
            "--cb-block-size",
            str(args.cb_block_size),
            "--cb-max-batch-tokens",
            str(args.cb_max_batch_tokens),
        ]
    if system == "static":
        return [
            sys.executable,
            "-m",
            "bench.static_server",
            "--model",
            model_dir,
            "--port",
            str(port),
            "--batch-size",
            str(args.static_batch_size),
            "--batch-wait-ms",
            str(args.static_wait_ms),
        ]
    raise ValueError(system)


def target_for(system: str, model_dir: str, name: str, base_url: str) -> serve.Target:
    if system == "transformers-cb":
        # transformers serve rejects `ignore_eos` (422: unexpected field) and ignores
        # stream_options (usage always comes in its last chunk). Its own `generation_config`
        # extension field with eos_token_id=-1 turns EOS off per request, like ignore_eos.
        return serve.Target(
            base_url,
            model_dir,
            ignore_eos=False,
            include_usage=False,
            extra_body={"generation_config": json.dumps({"eos_token_id": -1})},
        )
    return serve.Target(base_url, name)


def _timeouts(target: serve.Target, seconds: float) -> serve.Target:
    """A static server sends nothing until its batch is done: allow that long between bytes."""
    return dataclasses.replace(target, request_timeout=seconds, read_timeout=seconds)


def _log_path(log_dir: Path, system: str) -> Path:
    """A fresh log file in the scratch folder for one server start."""
    fd, name = tempfile.mkstemp(prefix=f"{system}-", suffix=".log", dir=log_dir)
    os.close(fd)
    return Path(name)


class Server:
    """One system's server on a free loopback port, in a session of its own: packserve
    through packserve.server.launcher (ready when /ready answers 200), the baselines as
    plain child processes (ready when /health does)."""

    def __init__(self, system: str, model_dir: str, name: str, args, log_dir: Path) -> None:
        self.system, self.model_dir, self.name = system, model_dir, name
        self.request_timeout = args.request_timeout
        self.log = _log_path(log_dir, system)
        self.packserve: ServerProcess | None = None
        if system.startswith("packserve"):
            flags = packserve_flags(system, model_dir, name)
            self.packserve = ServerProcess(flags, log_path=self.log, cwd=ROOT, new_session=True)
            self.packserve.spawn()
            return
        self.port = free_port()
        cmd = baseline_command(system, model_dir, self.port, args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env
            )

    @property
    def url(self) -> str:
        # packserve's port can change while it starts (the launcher retries a port clash)
        return self.packserve.url if self.packserve else f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        proc = self.packserve.proc if self.packserve else self.proc
        assert proc is not None
        return proc.pid

    @property
    def target(self) -> serve.Target:
        base = target_for(self.system, self.model_dir, self.name, self.url)
        return _timeouts(base, self.request_timeout)

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds until ready; raises (and stops the server) if it exits or times out."""
        start = time.monotonic()
        if self.packserve is not None:
            self.packserve.wait_ready(timeout)
            return time.monotonic() - start
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.system} exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.system} not ready after {timeout}s; see {self.log}")

    def stop(self) -> None:
        if self.packserve is not None:
            self.packserve.stop()  # SIGTERM, SIGKILL after 30 s
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group we started, by its id
                self.proc.wait(timeout=10)


# -- engine only -----------------------------------------------------------------------------


def engine_child(model_dir: str, prompts_file: str, level: int, where: str) -> None:
    """Drive packserve's Engine directly with at most `level` requests in flight (the same
    closed loop as the HTTP client), and print one JSON summary line. where="worker" steps
    the engine in a second thread, as the server's engine loop does; "main" in the main one."""
    from packserve.engine import Engine, EngineConfig
    from packserve.scheduler import SamplingParams

    prompts = [serve.Prompt(**p) for p in json.loads(Path(prompts_file).read_text())]
    engine = Engine(EngineConfig(model=model_dir))
    warm = ["warm up", "a second warm-up prompt"]
    if where == "main":
        engine.generate(warm, SamplingParams(max_tokens=4))
    else:
        thread = threading.Thread(target=engine.generate, args=(warm, SamplingParams(max_tokens=4)))
        thread.start()
        thread.join()
    todo = list(range(len(prompts)))[::-1]
    added: dict[str, tuple[int, float]] = {}
    ttft: dict[int, float] = {}
    tokens: dict[int, int] = {}
    lat: dict[int, float] = {}

    def loop() -> None:
        while todo or engine.has_unfinished:
            while todo and len(added) < level:
                i = todo.pop()
                params = SamplingParams(
                    max_tokens=prompts[i].max_tokens, temperature=0, ignore_eos=True
                )
                added[engine.add_request(prompts[i].text, params)] = (i, time.perf_counter())
            for d in engine.step():
                i, t0 = added[d.request_id]
                now = time.perf_counter()
                tokens[i] = tokens.get(i, 0) + len(d.token_ids)
                ttft.setdefault(i, now - t0)
                if d.finish_reason:
                    lat[i] = now - t0
                    del added[d.request_id]

    start = time.perf_counter()
    if where == "main":
        loop()
    else:
        thread = threading.Thread(target=loop, name="engine")
        thread.start()
        thread.join()
    duration = time.perf_counter() - start
    out = sum(tokens.values())
    ok = sum(tokens.get(i, 0) == p.max_tokens for i, p in enumerate(prompts))
    print(
        json.dumps(
            {
                "summary": {
                    "num_requests": len(prompts),
                    "completed": ok,
                    "failed": len(prompts) - ok,
                    "duration_s": duration,
                    "output_tokens": out,
                    "output_throughput": out / duration,
                    "request_throughput": ok / duration,
                    "total_token_throughput": (out + sum(p.prompt_len for p in prompts)) / duration,
                    "ttft_ms": serve._stats(list(ttft.values())),
                    "e2el_ms": serve._stats(list(lat.values())),
                }
            }
        )
    )


def run_engine(
    model_dir: str, prompts: list[serve.Prompt], level: int, tmp: Path, where: str
) -> dict:
    f = tmp / f"prompts-{level}.json"
    f.write_text(json.dumps([asdict(p) for p in prompts]))
    cmd = [sys.executable, "-m", "bench.compare_servers", "--engine-child", model_dir, str(f)]
    cmd += [str(level), where]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    meter = CpuMeter([proc.pid])
    meter.start()
    try:
        stdout, _ = proc.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    cpu = meter.stop()  # includes model loading; indicative only
    if proc.returncode != 0:
        raise RuntimeError(f"engine-only run failed ({proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["cpu"] = cpu
    return result


# -- one run ---------------------------------------------------------------------------------


def run_one(
    system: str, model_dir: str, name: str, prompts, tokenizer, level: int, args, tmp: Path
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "system": system,
        "level": level,
        "num_prompts": len(prompts),
        "loadavg_start": os.getloadavg(),
    }
    t0 = time.monotonic()
    if system in (ENGINE, ENGINE_MAIN):
        where = "main" if system == ENGINE_MAIN else "worker"
        entry.update(run_engine(model_dir, prompts, level, tmp, where))
    else:
        server = Server(system, model_dir, name, args, tmp)
        try:
            entry["startup_s"] = round(server.wait_ready(), 1)
            serve.warmup(server.target, 2)
            meter = CpuMeter([server.pid])
            meter.start()
            run = serve.run_benchmark(
                server.target,
                prompts,
                tokenizer,
                max_concurrency=level,
                seed=args.seed,
                slo_ttft_ms=args.slo_ttft_ms,
                slo_tpot_ms=args.slo_tpot_ms,
                progress=not args.no_progress,
                desc=f"{system} c={level}",
                run_timeout=args.run_timeout,
            )
            entry["cpu"] = meter.stop()
            entry["summary"] = run["summary"]
            entry["requests"] = [
                {
                    k: r[k]
                    for k in (
                        "ok",
                        "ttft",
                        "tpot",
                        "latency",
                        "output_tokens",
                        "max_tokens",
                        "prompt_len",
                        "error",
                    )
                }
                | {"itls": r["itls"] if args.keep_itls else []}
                for r in run["requests"]
            ]
            entry["itl_samples"] = _sample([x for r in run["requests"] for x in r["itls"]])
        finally:
            server.stop()
    entry["loadavg_end"] = os.getloadavg()
    entry["wall_s"] = round(time.monotonic() - t0, 1)
    return entry


def _sample(values: list[float], n: int = 4000) -> list[float]:
    """An even subsample of ITLs for the CDF plots and the ITL percentiles."""
    if len(values) <= n:
        return values
    return [values[i] for i in np.linspace(0, len(values) - 1, n).astype(int)]


# -- aggregation and report ------------------------------------------------------------------

RAW_KEYS = ("requests", "itl_samples")  # per-request data: the raw file, not the summary
RUN_SUMMARY_KEYS = (
    "num_requests",
    "completed",
    "failed",
    "errors",
    "duration_s",
    "output_tokens",
    "output_throughput",
    "request_throughput",
    "goodput",
)


def run_summary(entry: dict[str, Any]) -> dict[str, Any]:
    """One run as the committed JSON keeps it: how it ran (load, CPU, startup, wall time), its
    counts and throughput. Latency percentiles are kept per (model, system, level), over the
    pooled requests of all rounds, in `aggregate`."""
    out = {k: v for k, v in entry.items() if k not in RAW_KEYS}
    if "summary" in entry:
        out["summary"] = {k: entry["summary"][k] for k in RUN_SUMMARY_KEYS if k in entry["summary"]}
    return out


def run_records(entry: dict[str, Any]) -> dict[str, Any]:
    """One run's per-request records and ITL samples, with the keys that name the run."""
    keys = ("model", "system", "level", "round", *RAW_KEYS)
    return {k: entry[k] for k in keys if k in entry}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (model, system, level): tokens/s over all rounds (sum of tokens / sum of time),
    per-round values, and latency percentiles of the pooled requests."""
    out: dict[str, Any] = {}
    for r in runs:
        if "summary" not in r:
            continue
        key = f"{r['model']}|{r['system']}|{r['level']}"
        out.setdefault(key, []).append(r)
    agg = {}
    for key, rs in out.items():
        model, system, level = key.split("|")
        s = [r["summary"] for r in rs]
        dur = sum(x["duration_s"] for x in s)
        reqs = [q for r in rs for q in r.get("requests", []) if q["ok"]]
        a = {
            "model": model,
            "system": system,
            "level": int(level),
            "rounds": len(rs),
            "output_throughput": sum(x["output_tokens"] for x in s) / dur,
            "output_throughput_rounds": [round(x["output_throughput"], 1) for x in s],
            "request_throughput": sum(x["completed"] for x in s) / dur,
            "num_requests": sum(x["num_requests"] for x in s),
            "failed": sum(x["failed"] for x in s),
            "others_cpu_cores": [r.get("cpu", {}).get("others") for r in rs],
        }
        if reqs:
            a["ttft_ms"] = serve._stats([q["ttft"] for q in reqs if q["ttft"] is not None])
            a["tpot_ms"] = serve._stats([q["tpot"] for q in reqs if q["tpot"] is not None])
            a["e2el_ms"] = serve._stats([q["latency"] for q in reqs if q["latency"] is not None])
            itls = [x for r in rs for x in r.get("itl_samples", [])]
            a["itl_ms"] = serve._stats(itls)
            a["goodput"] = sum(x["goodput"] for x in s) / len(s)
        else:
            a["ttft_ms"] = s[0].get("ttft_ms")
            a["e2el_ms"] = s[0].get("e2el_ms")
        agg[key] = a
    return agg


def verdicts(agg: dict[str, Any], model: str, levels: list[int]) -> list[dict[str, Any]]:
    def get(system: str, level: int) -> dict[str, Any] | None:
        return agg.get(f"{model}|{system}|{level}")

    rows = []
    for level in (c for c in levels if c >= 16):
        ours = get("packserve-packed", level)
        if ours is None:
            continue
        for other, factor in (("transformers-cb", 2.0), ("static", 3.0)):
            them = get(other, level)
            if them is None:
                continue
            if not them["output_throughput"]:
                rows.append(
                    {
                        "target": f"output tok/s >= {factor:g}x {other} at c={level}",
                        "value": f"{other} produced no complete output",
                        "met": None,
                    }
                )
                continue
            ratio = ours["output_throughput"] / them["output_throughput"]
            rows.append(
                {
                    "target": f"output tok/s >= {factor:g}x {other} at c={level}",
                    "value": f"{ratio:.2f}x",
                    "met": ratio >= factor,
                }
            )
    for level in levels:
        ours = get("packserve-packed", level)
        if ours is None:
            continue
        others = {o: get(o, level) for o in ("transformers-cb", "static")}
        p99 = ours["ttft_ms"]["p99"]
        vals = {o: a["ttft_ms"]["p99"] for o, a in others.items() if a}
        if vals:
            rows.append(
                {
                    "target": f"TTFT p99 below both at c={level}",
                    "value": f"{p99:.0f} ms vs "
                    + ", ".join(f"{o} {v:.0f} ms" for o, v in vals.items()),
                    "met": all(p99 < v for v in vals.values()),
                }
            )
    for level in (c for c in levels if c >= 16):
        for system in ("packserve-packed", "packserve-thread"):
            ours, eng = get(system, level), get(ENGINE, level)
            if ours and eng and eng["output_throughput"]:
                ratio = ours["output_throughput"] / eng["output_throughput"]
                rows.append(
                    {
                        "target": f"{system}: HTTP >= 0.95x engine-only tok/s at c={level}",
                        "value": f"{ratio:.2f} ({ours['output_throughput']:.0f} / "
                        f"{eng['output_throughput']:.0f})",
                        "met": ratio >= 0.95,
                    }
                )
    return rows


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    agg, cfg = result["aggregate"], result["config"]
    lines = [
        "# Serving comparison",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; torch "
        f"{result['machine']['torch']}, transformers {result['machine']['transformers']}; "
        f"{result['machine']['date']}. Total wall time {result['wall_s'] / 60:.1f} min.",
        f"Load average before: {result['quiet_check']}. Workload: lognormal prompt lengths "
        f"(median {cfg['prompt_median']}, sigma {cfg['prompt_sigma']}, clipped "
        f"{cfg['prompt_min']}..{cfg['prompt_max']} tokens), max_tokens uniform "
        f"{cfg['out_min']}..{cfg['out_max']}, greedy, streamed /v1/completions, EOS off; "
        f"{cfg['rounds']} rounds, system order rotated per level and round. Static server: "
        f"batch {cfg['static_batch_size']}, wait {cfg['static_wait_ms']} ms. transformers "
        f"serve: --cb-num-blocks {cfg['cb_num_blocks']} --cb-block-size "
        f"{cfg['cb_block_size']} --cb-max-batch-tokens {cfg['cb_max_batch_tokens']}.",
        "",
    ]
    for model in cfg["sizes"]:
        lines += [
            f"## Model `{model}`",
            "",
            "| system | c | prompts | failed | out tok/s (per round) | req/s | TTFT p50 | "
            "TTFT p99 | TPOT p50 | ITL p50 | E2E p50 | E2E p99 | others' CPU |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for level in cfg["levels"]:
            for system in (*SYSTEMS, ENGINE, ENGINE_MAIN):
                a = agg.get(f"{model}|{system}|{level}")
                if not a:
                    continue

                def g(k: str, q: str, a: dict[str, Any] = a) -> float | None:
                    return (a.get(k) or {}).get(q)

                per_round = ", ".join(map(str, a["output_throughput_rounds"]))
                lines.append(
                    f"| {system} | {level} | {a['num_requests']} | {a['failed']} | "
                    f"**{a['output_throughput']:.1f}** ({per_round}) | "
                    f"{a['request_throughput']:.2f} | {fmt(g('ttft_ms', 'p50'))} | "
                    f"{fmt(g('ttft_ms', 'p99'))} | {fmt(g('tpot_ms', 'p50'), 1)} | "
                    f"{fmt(g('itl_ms', 'p50'), 1)} | {fmt(g('e2el_ms', 'p50'))} | "
                    f"{fmt(g('e2el_ms', 'p99'))} | "
                    f"{', '.join(fmt(c, 2) for c in a['others_cpu_cores'])} |"
                )
        lines += [
            "",
            "Latencies in ms. out tok/s: all rounds' output tokens / all rounds' time."
            " others' CPU: cores busy with processes other than this benchmark during each"
            " round's run.",
            "",
            "| target | value | met |",
            "|---|---|---|",
        ]
        for v in result["verdicts"].get(model, []):
            met = {True: "yes", False: "**no**", None: "n/a"}[v["met"]]
            lines.append(f"| {v['target']} | {v['value']} | {met} |")
        lines.append("")
    if result.get("decode"):
        d = result["decode"]
        lines += [
            "## Decode step (bench/decode.py)",
            "",
            "| model | batch | linear layers | packserve tok/s | DynamicCache tok/s | speedup "
            "| identical |",
            "|---|---:|---|---:|---:|---:|---|",
            f"| {d['model']} | {d['batch']} | oneDNN (served) | "
            f"{d['packserve_tokens_per_s']:.0f} | "
            f"{d['transformers_dynamic_cache_tokens_per_s']:.0f} | {d['speedup']:.2f}x | "
            f"{d['sequences_identical']} |",
            f"| {d['model']} | {d['batch']} | torch (as transformers) | "
            f"{d['packserve_torch_linear_tokens_per_s']:.0f} | "
            f"{d['transformers_dynamic_cache_tokens_per_s']:.0f} | "
            f"{d['speedup_torch_linear']:.2f}x | {d['sequences_identical_torch_linear']} |",
            "",
            f"Target >= 1.5x: {'met' if d['speedup'] >= 1.5 else '**not met**'}. "
            f"Load average {d['machine']['loadavg_start']} -> {d['machine']['loadavg_end']}.",
            "",
        ]
    return "\n".join(lines)


def plots(result: dict[str, Any], records: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """The sweep plots from the aggregates and the CDF plots from the per-request records
    (`run_records` of every run)."""
    files = []
    agg = result["aggregate"]
    for model in result["config"]["sizes"]:
        series: dict[str, dict[int, dict[str, Any]]] = {}
        for a in agg.values():
            if a["model"] == model:
                series.setdefault(a["system"], {})[a["level"]] = a
        if not series:
            continue
        path = out_dir / f"serve_compare_{model}_sweep.png"
        serve.plot_sweep(series, path, f"{model} model: output tokens/s and TTFT vs concurrency")
        files.append(path.name)
        for level in result["config"]["levels"]:
            runs = {}
            for system in SYSTEMS:
                rs = [
                    r
                    for r in records
                    if r["model"] == model
                    and r["system"] == system
                    and r["level"] == level
                    and "requests" in r
                ]
                if rs:
                    runs[system] = {
                        "requests": [q for r in rs for q in r["requests"]],
                        "itl_samples": [x for r in rs for x in r["itl_samples"]],
                    }
            if runs:
                path = out_dir / f"serve_compare_{model}_c{level}_cdf.png"
                serve.plot_cdfs(runs, path, f"{model} model, max concurrency {level}")
                files.append(path.name)
    return files


def git_state() -> dict[str, Any]:
    """The commit measured, and which engine files differed from it (others edit them)."""

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30)
        return r.stdout.strip()

    dirty = git("status", "--porcelain", "--", "packserve")
    return {"head": git("rev-parse", "HEAD"), "engine_files_modified": dirty.splitlines()}


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--engine-child":
        engine_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="bench,tiny")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--levels", default="1,4,16,64")
    p.add_argument("--engine-levels", default="16,64", help="levels for engine-only runs")
    p.add_argument(
        "--engine-main-thread",
        action="store_true",
        help="also run engine-only with the engine stepped in the main thread",
    )
    p.add_argument("--prompts", default=None, help="per level, e.g. 1:8,4:16,16:48,64:128")
    p.add_argument("--prompt-scale", type=float, default=1.0, help="multiplies --prompts")
    p.add_argument("--tiny-prompt-scale", type=float, default=1.0, help="extra, tiny model")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-median", type=float, default=100)
    p.add_argument("--prompt-sigma", type=float, default=1.0)
    p.add_argument("--prompt-min", type=int, default=8)
    p.add_argument("--prompt-max", type=int, default=1000)
    p.add_argument("--out-min", type=int, default=16)
    p.add_argument("--out-max", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--static-batch-size", type=int, default=16)
    p.add_argument("--static-wait-ms", type=float, default=50.0)
    p.add_argument("--cb-num-blocks", type=int, default=1024)
    p.add_argument("--cb-block-size", type=int, default=32)
    p.add_argument("--cb-max-batch-tokens", type=int, default=2048)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--request-timeout", type=float, default=1200.0)
    p.add_argument("--run-timeout", type=float, default=2400.0)
    p.add_argument("--max-load", type=float, default=1.5, help="wait for this load avg first")
    p.add_argument("--max-wait-min", type=float, default=40.0)
    p.add_argument(
        "--decode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run bench.decode --size bench --batch 32",
    )
    p.add_argument("--keep-itls", action="store_true", help="every ITL in the per-request records")
    p.add_argument("--out", default="bench/results/serve_compare")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()

    from packserve.models.model_maker import default_model_dir
    from packserve.models.smollm2 import default_model_dir as smollm2_dir

    sizes = args.sizes.split(",")
    levels = [int(x) for x in args.levels.split(",")]
    systems = args.systems.split(",")
    engine_levels = {int(x) for x in args.engine_levels.split(",") if x}
    counts = dict(DEFAULT_PROMPTS)
    if args.prompts:
        counts.update({int(k): int(v) for k, v in (x.split(":") for x in args.prompts.split(","))})
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="serve_compare_"))
    print(f"server logs and scratch files: {tmp}", flush=True)

    wall0 = time.monotonic()
    quiet = wait_for_quiet(args.max_load, args.max_wait_min * 60)
    quiet["others_cpu_cores_5s"] = others_cpu()
    print(f"start: {quiet}", flush=True)
    runs: list[dict[str, Any]] = []
    prompt_counts: dict[str, dict[int, int]] = {}
    for size in sizes:
        model_dir = str(smollm2_dir() if size == "smollm2" else default_model_dir(size))
        tokenizer = serve.load_tokenizer(model_dir)
        scale = args.prompt_scale * (args.tiny_prompt_scale if size == "tiny" else 1.0)
        workloads = {
            c: serve.synthetic_prompts(
                tokenizer,
                max(2, round(counts.get(c, 2 * c) * scale)),
                args.seed + c,
                args.prompt_median,
                args.prompt_sigma,
                args.prompt_min,
                args.prompt_max,
                args.out_min,
                args.out_max,
            )
            for c in levels
        }
        prompt_counts[size] = {c: len(w) for c, w in workloads.items()}
        for rnd in range(args.rounds):
            for li, level in enumerate(levels):
                extra = [ENGINE] + ([ENGINE_MAIN] if args.engine_main_thread else [])
                order = list(systems) + (extra if level in engine_levels else [])
                shift = (rnd + li) % len(order)
                order = order[shift:] + order[:shift]
                for system in order:
                    print(
                        f"[{size} round {rnd + 1}/{args.rounds} c={level}] {system} "
                        f"({len(workloads[level])} prompts, load {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
                    try:
                        entry = run_one(
                            system, model_dir, size, workloads[level], tokenizer, level, args, tmp
                        )
                    except Exception as exc:  # a broken system is reported, not fatal
                        entry = {"system": system, "level": level, "error": repr(exc)}
                        print(f"  FAILED: {exc!r}", flush=True)
                    entry.update(model=size, round=rnd)
                    runs.append(entry)
                    if "summary" in entry:
                        s = entry["summary"]
                        print(
                            f"  {s['output_throughput']:.1f} out tok/s, "
                            f"{s['completed']}/{s['num_requests']} ok, TTFT p99 "
                            f"{fmt(s['ttft_ms']['p99'])} ms, {entry['wall_s']}s wall, "
                            f"others' CPU {entry.get('cpu', {}).get('others')}",
                            flush=True,
                        )
                        if s.get("errors"):
                            print(f"  errors: {s['errors']}", flush=True)

    decode = None
    if args.decode:
        print("decode step: bench.decode --size bench --batch 32", flush=True)
        dec_dir = out.parent / "serve_decode"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.decode",
                "--size",
                "bench",
                "--batch",
                "32",
                "--out",
                str(dec_dir),
            ],
            cwd=ROOT,
            check=False,
            stdout=subprocess.DEVNULL,
            timeout=1800,
        )
        f = dec_dir / "decode_bench.json"
        decode = json.loads(f.read_text()) if f.exists() else None

    import torch
    import transformers

    from bench.prefill import cpu_model

    agg = aggregate(runs)
    result = {
        "config": {
            **vars(args),
            "sizes": sizes,
            "levels": levels,
            "systems": systems,
            "prompt_counts": prompt_counts,
        },
        "machine": {
            "cpu": cpu_model(),
            "arch": platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "git": git_state(),
        "quiet_check": quiet,
        "wall_s": time.monotonic() - wall0,
        "aggregate": agg,
        "verdicts": {m: verdicts(agg, m, levels) for m in sizes},
        "decode": decode,
        "runs": [run_summary(r) for r in runs],
    }
    records = [run_records(r) for r in runs if "requests" in r]
    result["plots"] = plots(result, records, out.parent)
    raw = out.parent / "raw" / f"{out.name}.requests.json"  # .gitignore: bench/results/raw/
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"runs": records}) + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out}.json, {out}.md, {len(result['plots'])} plots and {raw}")


if __name__ == "__main__":
    main()
