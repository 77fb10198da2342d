// packserve live packing dashboard: polls dashboard/feed once a second and draws it.
// Plain browser JavaScript, no build step, no libraries; charts are drawn on <canvas> by hand.
"use strict";

(() => {
  const POLL_MS = 1000;
  const TIMEOUT_MS = 5000;
  const SHOWN_STEPS = 8; // prefill steps drawn
  const KEPT_STEPS = 32;
  const BOX_MAX_H = 120; // px: a step's tallest box; rows get thinner to fit
  const ROW_H = 10;
  const MAX_TABLE_ROWS = 50;
  const COLORS = 8; // .seg-0 .. .seg-7
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const C = {
    blue: color("--c0"),
    green: color("--c1"),
    amber: color("--c2"),
    violet: color("--c3"),
    coral: color("--c5"),
    grid: color("--grid"),
    faint: color("--faint"),
    muted: color("--muted"),
  };

  const state = {
    since: 0,
    seconds: new Map(), // monotonic second -> series point
    steps: [], // prefill steps, oldest first; each with `at` (server monotonic time)
    feed: null,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // -- formatting -------------------------------------------------------------------------------

  const int = (n) => Math.round(n).toLocaleString("en-US");
  const rate = (n) => (n >= 100 ? int(n) : n.toFixed(1));
  const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(x >= 0.995 ? 0 : 1)}%`);

  function seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 10) return `${s.toFixed(2)} s`;
    return `${s.toFixed(1)} s`;
  }

  function age(s) {
    if (s < 60) return `${s.toFixed(1)} s`;
    const m = Math.floor(s / 60);
    return `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  }

  function ago(s) {
    if (s < 1) return "just now";
    if (s < 60) return `${Math.round(s)} s ago`;
    return `${Math.floor(s / 60)} min ago`;
  }

  // -- the feed ---------------------------------------------------------------------------------

  async function poll() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    try {
      const response = await fetch(`dashboard/feed?since=${state.since}`, {
        cache: "no-store",
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      merge(await response.json());
      render();
    } catch (err) {
      setStatus("down", "disconnected, retrying");
    } finally {
      clearTimeout(timer);
      setTimeout(poll, POLL_MS);
    }
  }

  function merge(feed) {
    if (feed.seq < state.since) {
      // the server restarted: its step numbers began again
      state.seconds.clear();
      state.steps = [];
    }
    for (const point of feed.series) state.seconds.set(point.t, point);
    const oldest = Math.floor(feed.now) - feed.history_s - 1;
    for (const t of state.seconds.keys()) if (t < oldest) state.seconds.delete(t);
    for (const step of feed.prefill_steps) {
      step.at = feed.now - step.age_s;
      state.steps.push(step);
    }
    if (state.steps.length > KEPT_STEPS) state.steps.splice(0, state.steps.length - KEPT_STEPS);
    state.since = feed.seq;
    state.feed = feed;
  }

  function setStatus(kind, text) {
    $("status").dataset.state = kind;
    $("status-text").textContent = text;
  }

  // -- rendering --------------------------------------------------------------------------------

  function render() {
    const feed = state.feed;
    const cfg = feed.config || {};
    const parts = [feed.model || "model loading"];
    if (cfg.prefill_mode) parts.push(`${cfg.prefill_mode} prefill`);
    if (cfg.row_capacity) parts.push(`row capacity ${int(cfg.row_capacity)} tokens`);
    parts.push(`up ${age(feed.uptime_s)}`);
    $("meta").textContent = parts.join(" · ");
    const idle = feed.last_step_age_s;
    if (idle !== null && idle < 2) setStatus("live", `live · ${rate(feed.summary.steps_per_s)} steps/s`);
    else setStatus("idle", idle === null ? "live · no steps yet" : "live · engine idle");
    renderKpis(feed);
    renderBins(feed);
    renderCharts();
    renderRunning(feed);
  }

  function renderKpis(feed) {
    const s = feed.summary;
    const cfg = feed.config || {};
    $("kpi-tps").textContent = rate(s.tokens_per_s);
    $("kpi-ptps").textContent = rate(s.prompt_tokens_per_s);
    $("kpi-running").textContent = int(s.running);
    $("kpi-maxseqs").textContent = cfg.max_num_seqs ? int(cfg.max_num_seqs) : "–";
    $("kpi-waiting").textContent = int(s.waiting);
    $("kpi-busy").textContent = pct(s.busy);
    withUnit($("kpi-kv"), pct(s.kv_cache_usage));
    $("kpi-kvblocks").textContent = `${int(s.kv_blocks_used)} / ${int(s.kv_blocks)}`;
    renderCache(s, cfg);
    withUnit($("kpi-ttft-p50"), seconds(s.ttft_p50_s));
    withUnit($("kpi-ttft-p99"), seconds(s.ttft_p99_s));
    $("kpi-ttft-n").textContent = int(s.ttft_n);
    withUnit($("kpi-fill"), pct(s.packed_fill));
    $("kpi-padfill").textContent = pct(s.padded_fill);
    const saved = s.prefill_padded_tokens
      ? 1 - s.prefill_packed_tokens / s.prefill_padded_tokens
      : null;
    $("kpi-saved").textContent = saved === null ? "no prefill yet" : verdict(saved);
  }

  // Prefix cache: hits over lookups (prompt tokens) in the rate window; off when disabled.
  function renderCache(s, cfg) {
    if (cfg.prefix_caching === false) {
      $("kpi-cache").textContent = "off";
      $("kpi-cache-sub").textContent = "prefix caching disabled";
      return;
    }
    withUnit($("kpi-cache"), pct(s.prefix_cache_hit_rate));
    $("kpi-cache-sub").textContent = s.prefix_cache_queries
      ? `${int(s.prefix_cache_hits)} / ${int(s.prefix_cache_queries)} prompt tok`
      : "no prompts in the last 10 s";
  }

  // Rows padded to the longest row can cost more than one segment per row: say so.
  const verdict = (saved) => (saved >= 0 ? `saves ${pct(saved)}` : `costs +${pct(-saved)}`);

  function savings(packed, padded) {
    const saved = 1 - packed / padded;
    return el("div", saved >= 0 ? "saves" : "costs", `packing ${verdict(saved)}`);
  }

  // "229 ms" -> 229 with a small "ms"; the number stays the element's first text.
  function withUnit(target, text) {
    const m = /^([-–\d.,]+)\s*(.*)$/.exec(text);
    target.replaceChildren(m ? m[1] : text);
    if (m && m[2]) target.append(el("small", "unit", m[2]));
  }

  // Prefill bins: each step twice, as it ran (packed rows, each padded to the longest row) and
  // as padded batching would have run it (one segment per row, padded to the longest). A
  // segment is a prompt piece (a whole prompt, a chunk, what follows a prefix-cache hit) or a
  // decode token mixed into the rows.
  // Both use the step's token scale and row height, so their areas compare directly.
  function renderBins(feed) {
    const box = $("bins");
    const shown = state.steps.slice(-SHOWN_STEPS).reverse();
    const heads = $("bins-head").children;
    heads[1].firstChild.textContent =
      (feed.config || {}).prefill_mode === "padded" ? "as ran, padded mode " : "packed, first-fit decreasing ";
    box.replaceChildren();
    if (!shown.length) {
      box.append(el("div", "empty", "waiting for the first prefill step…"));
      return;
    }
    // One token scale for every step drawn: the longest row among them fills the column.
    const scale = Math.max(1, ...shown.map((s) => Math.max(...s.rows.map(sumOf))));
    for (const step of shown) box.append(renderStep(step, feed.now, scale));
  }

  const sumOf = (row) => row.reduce((a, b) => a + b, 0);

  function renderStep(step, now, scale) {
    const prompts = [];
    step.rows.forEach((row) => row.forEach((n) => prompts.push({ n, c: prompts.length % COLORS })));
    const packedRows = [];
    let k = 0;
    for (const row of step.rows) packedRows.push(row.map(() => prompts[k++]));
    const paddedRows = [...prompts].sort((a, b) => b.n - a.n).map((p) => [p]);
    const packedLen = Math.max(...step.rows.map(sumOf));
    const paddedLen = paddedRows.length ? paddedRows[0][0].n : 0;
    const n = Math.max(packedRows.length, paddedRows.length);
    const rowH = Math.max(2, Math.min(ROW_H, Math.floor(BOX_MAX_H / n) - 1));

    const wrap = el("div", "bins-grid step");
    wrap.dataset.seq = step.seq;
    const info = el("div", "step-info");
    info.append(el("div", "step-id", `step ${int(step.seq)}`));
    const decodes = step.decode_tokens || 0;
    const pieces = prompts.length - decodes;
    const what = [`${pieces} prompt${pieces === 1 ? "" : "s"}`];
    if (decodes) what.push(`${int(decodes)} decode`);
    info.append(el("div", "", what.join(" + ")));
    info.append(el("div", "", `${int(step.real)} tok · ${step.step_ms.toFixed(1)} ms`));
    info.append(el("div", "", ago(now - step.at)));
    if (step.padded !== step.packed) info.append(savings(step.packed, step.padded));
    wrap.append(info);
    wrap.append(binBox(packedRows, packedLen, scale, rowH, step.real, "packed"));
    wrap.append(binBox(paddedRows, paddedLen, scale, rowH, step.real, "padded"));
    return wrap;
  }

  function binBox(rows, rowLen, scale, rowH, real, kind) {
    const box = el("div", `bin-box ${kind}`);
    const fit = Math.max(1, Math.floor(BOX_MAX_H / (rowH + 1)));
    for (const row of rows.slice(0, fit)) {
      const r = el("div", rowH < 5 ? "bin-row thin" : "bin-row");
      r.style.height = `${rowH}px`;
      r.style.width = `${(100 * rowLen) / scale}%`;
      let used = 0;
      for (const p of row) {
        const seg = el("div", `seg seg-${p.c}`);
        seg.style.width = `${(100 * p.n) / rowLen}%`;
        seg.title = p.n === 1 ? "1 token" : `${p.n} tokens`;
        r.append(seg);
        used += p.n;
      }
      if (used < rowLen) {
        const pad = el("div", "pad");
        pad.style.width = `${(100 * (rowLen - used)) / rowLen}%`;
        pad.title = `padding: ${rowLen - used} tokens`;
        r.append(pad);
      }
      box.append(r);
    }
    if (rows.length > fit) box.append(el("div", "more-rows", `+ ${rows.length - fit} more rows`));
    const computed = rows.length * rowLen;
    const fill = computed ? real / computed : 1;
    const caption = el("div", "bin-caption");
    caption.append(`${rows.length} row${rows.length === 1 ? "" : "s"} × ${int(rowLen)} = `);
    caption.append(el("b", "", `${int(computed)} tok`));
    caption.append(" · fill ");
    caption.append(el("span", fill >= 0.9 ? "fill-good" : fill < 0.6 ? "fill-bad" : "", pct(fill)));
    box.append(caption);
    return box;
  }

  // -- charts -----------------------------------------------------------------------------------

  // One point per complete second of the window, relative to now (x <= 0). Rates are 0 in
  // seconds without steps; gauges keep their last value (an idle engine does not step).
  function seriesOf(feed) {
    const nowSec = Math.floor(feed.now);
    const first = Math.max(nowSec - feed.history_s, Math.ceil(feed.now - feed.uptime_s));
    const out = { gen: [], prompt: [], running: [], waiting: [], kv: [] };
    let last = null;
    for (const [t, p] of state.seconds) if (t < first && (!last || t > last.t)) last = p;
    for (let t = first; t < nowSec; t++) {
      const p = state.seconds.get(t);
      const x = t + 1 - feed.now;
      out.gen.push([x, p ? p.gen_tokens : 0]);
      out.prompt.push([x, p ? p.prompt_tokens : 0]);
      out.running.push([x, p ? p.running : last ? last.running_end : 0]);
      out.waiting.push([x, p ? p.waiting : last ? last.waiting_end : 0]);
      out.kv.push([x, 100 * (p ? p.kv : last ? last.kv_end : 0)]);
      if (p) last = p;
    }
    return out;
  }

  function renderCharts() {
    const feed = state.feed;
    if (!feed) return;
    const s = seriesOf(feed);
    // The window grows with uptime, a minute at a time, up to the history kept.
    const span = Math.min(feed.history_s, Math.max(60, 60 * Math.ceil(feed.uptime_s / 60)));
    const ttft = feed.ttft_series.map((p) => ({ x: p.t - feed.now, p50: p.p50, p99: p.p99 }));
    const sum = feed.summary;
    chart($("chart-queue"), $("legend-queue"), span, [
      { name: "waiting", color: C.amber, points: s.waiting, now: int(sum.waiting), fill: true },
      { name: "running", color: C.blue, points: s.running, now: int(sum.running) },
    ], { integer: true });
    chart($("chart-kv"), $("legend-kv"), span, [
      { name: "KV blocks used", color: C.violet, points: s.kv, now: pct(sum.kv_cache_usage), fill: true },
    ], { yMax: 100, unit: "%" });
    chart($("chart-tps"), $("legend-tps"), span, [
      { name: "prompt", color: C.blue, points: s.prompt, now: rate(sum.prompt_tokens_per_s), fill: true, alpha: 0.5 },
      { name: "generated", color: C.green, points: s.gen, now: rate(sum.tokens_per_s) },
    ], {});
    chart($("chart-ttft"), $("legend-ttft"), span, [
      { name: "p50", color: C.green, points: ttft.map((p) => [p.x, p.p50]), now: seconds(sum.ttft_p50_s), dots: true },
      { name: "p99", color: C.coral, points: ttft.map((p) => [p.x, p.p99]), now: seconds(sum.ttft_p99_s), dots: true },
    ], { format: seconds });
  }

  // A round step (1, 1.5, 2, 2.5 ... x 10^k) whose `n` steps reach v; whole if `integer`.
  function niceTop(v, n, integer) {
    let step = v > 0 ? v / n : 1;
    const mag = 10 ** Math.floor(Math.log10(step));
    step = [1, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10].map((m) => m * mag).find((s) => s >= step);
    if (integer) step = Math.max(1, Math.ceil(step));
    return step * n;
  }

  function legend(box, series) {
    box.replaceChildren();
    for (const s of series) {
      const key = el("span", "key");
      const sw = el("i", "line-swatch");
      sw.style.background = s.color;
      key.append(sw, `${s.name} `, el("b", "", s.now));
      box.append(key);
    }
  }

  function chart(canvas, legendBox, span, series, opts) {
    legend(legendBox, series);
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const pad = { l: 52, r: 10, t: 8, b: 22 };
    const pw = w - pad.l - pad.r;
    const ph = h - pad.t - pad.b;
    let top = 0;
    for (const s of series) for (const [, y] of s.points) if (y !== null && y > top) top = y;
    const yMax = opts.yMax || niceTop(top * 1.08, 4, opts.integer);
    const X = (x) => pad.l + ((x + span) / span) * pw;
    const Y = (y) => pad.t + ph - (Math.min(y, yMax) / yMax) * ph;
    const fmt = opts.format || ((v) => (opts.integer ? int(v) : v >= 100 ? int(v) : String(+v.toFixed(2))));

    ctx.font = "11px system-ui, -apple-system, 'Segoe UI', Roboto, Arial, sans-serif";
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4;
      const y = Math.round(Y(v)) + 0.5;
      ctx.strokeStyle = C.grid;
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(w - pad.r, y);
      ctx.stroke();
      ctx.fillStyle = C.muted;
      ctx.fillText(`${fmt(v)}${opts.unit || ""}`, pad.l - 8, y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const tick = span <= 60 ? 10 : span <= 180 ? 30 : 60;
    for (let t = -span; t <= 0; t += tick) {
      const x = Math.round(X(t)) + 0.5;
      ctx.strokeStyle = C.grid;
      ctx.beginPath();
      ctx.moveTo(x, pad.t);
      ctx.lineTo(x, pad.t + ph);
      ctx.stroke();
      ctx.fillStyle = C.muted;
      ctx.textAlign = t === 0 ? "right" : t === -span ? "left" : "center";
      const label = t === 0 ? "now" : t % 60 === 0 ? `${t / 60}m` : `${t}s`;
      ctx.fillText(label, x, pad.t + ph + 6);
    }

    let drawn = 0;
    for (const s of series) {
      const pts = s.points.filter(([x, y]) => y !== null && x >= -span && x <= 0);
      if (!pts.length) continue;
      drawn += pts.length;
      if (s.fill && pts.length > 1) {
        ctx.beginPath();
        ctx.moveTo(X(pts[0][0]), Y(0));
        for (const [x, y] of pts) ctx.lineTo(X(x), Y(y));
        ctx.lineTo(X(pts[pts.length - 1][0]), Y(0));
        ctx.closePath();
        ctx.globalAlpha = 0.16 * (s.alpha || 1);
        ctx.fillStyle = s.color;
        ctx.fill();
        ctx.globalAlpha = 1;
      }
      ctx.strokeStyle = s.color;
      ctx.globalAlpha = s.alpha ? Math.max(0.6, s.alpha) : 1;
      ctx.lineWidth = 1.6;
      ctx.lineJoin = "round";
      ctx.beginPath();
      pts.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
      ctx.stroke();
      ctx.globalAlpha = 1;
      if (s.dots) {
        ctx.fillStyle = s.color;
        for (const [x, y] of pts) {
          ctx.beginPath();
          ctx.arc(X(x), Y(y), 2.6, 0, 2 * Math.PI);
          ctx.fill();
        }
      }
    }
    if (!drawn) {
      ctx.fillStyle = C.faint;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.font = "12px system-ui, -apple-system, 'Segoe UI', Roboto, Arial, sans-serif";
      ctx.fillText("no data yet", pad.l + pw / 2, pad.t + ph / 2);
    }
    canvas.dataset.points = String(drawn); // what was drawn, for people and tests alike
  }

  // -- running requests -------------------------------------------------------------------------

  function renderRunning(feed) {
    const body = $("running-body");
    const rows = [...feed.running].sort((a, b) => b.age_s - a.age_s).slice(0, MAX_TABLE_ROWS);
    body.replaceChildren();
    $("running-note").textContent = feed.running_total
      ? `${int(feed.running_total)} in the decode batch`
      : "";
    if (!rows.length) {
      const tr = el("tr", "none");
      const td = el("td", "", "no requests running");
      td.colSpan = 6;
      tr.append(td);
      body.append(tr);
      return;
    }
    const longest = Math.max(...rows.map((r) => r.prompt_tokens + r.generated_tokens), 1);
    for (const r of rows) {
      const tr = el("tr", "req");
      tr.append(el("td", "id", r.id));
      tr.append(el("td", "adapter", r.adapter ?? "base")); // the LoRA adapter it runs with
      tr.append(el("td", "num", int(r.prompt_tokens)));
      tr.append(el("td", "num", int(r.generated_tokens)));
      tr.append(el("td", "num", age(r.age_s)));
      const bar = el("div", "mini");
      const p = el("div", "p");
      p.style.width = `${(100 * r.prompt_tokens) / longest}%`;
      const g = el("div", "g");
      g.style.width = `${(100 * r.generated_tokens) / longest}%`;
      bar.title = `${r.prompt_tokens} prompt + ${r.generated_tokens} generated tokens`;
      bar.append(p, g);
      const td = el("td", "bar-col");
      td.append(bar);
      tr.append(td);
      body.append(tr);
    }
    const hidden = feed.running_total - rows.length;
    if (hidden > 0) {
      const tr = el("tr", "more");
      const td = el("td", "", `+ ${int(hidden)} more`);
      td.colSpan = 6;
      tr.append(td);
      body.append(tr);
    }
  }

  window.addEventListener("resize", () => renderCharts());
  poll();
})();
