// The pagecube page: polls api/status every few seconds and redraws. No framework, no build step.
// Text from the store (page ids, failure reasons) is only ever set with textContent.
"use strict";
(function () {
  const EVERY_MS = 2000, ENDED_EVERY_MS = 10000;
  const API = new URL("pagecube/api/status", document.baseURI).href;
  // a name for this open page: the build keeps its server up until every open page shows its end
  const TAB = Math.random().toString(36).slice(2, 12);
  const THUMB = new URL("pagecube/thumb", document.baseURI).href;
  const COLOURS = { pending: "#e2e6eb", running: "#4c8bf5", done: "#2fa36b", failed: "#e0524d" };
  const $ = (id) => document.getElementById(id);
  let last = null, lastOk = 0, timer = null, recentKey = "", mapState = null, shownEnd = false;

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "text") node.textContent = v; else if (k === "cls") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }
  const fmtInt = (n) => (n == null ? "–" : Number(n).toLocaleString("en-US"));
  function fmtDuration(s) {
    if (s == null || !isFinite(s)) return "–";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return h ? `${h}h ${String(m).padStart(2, "0")}m` : m ? `${m}m ${String(sec).padStart(2, "0")}s` : `${sec}s`;
  }
  function fmtBytes(b) {
    if (b == null) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
    return `${b.toFixed(b < 10 && i ? 1 : 0)} ${units[i]}`;
  }
  const fmtRate = (r) => (r == null ? "–" : r >= 100 ? r.toFixed(0) : r >= 10 ? r.toFixed(1) : r.toFixed(2));

  function canvasFor(canvas, cssW, cssH) {
    const dpr = window.devicePixelRatio || 1;
    canvas.style.height = cssH + "px";
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return ctx;
  }

  // --- summary -------------------------------------------------------------------------------
  function renderSummary(d) {
    const p = d.pages;
    $("pct").textContent = `${p.percent.toFixed(p.percent >= 99.95 || p.percent === 0 ? 0 : 1)}%`;
    $("n-done").textContent = fmtInt(p.done);
    $("n-failed").textContent = fmtInt(p.failed);
    $("n-pending").textContent = fmtInt(p.pending);
    $("n-total").textContent = fmtInt(p.total);
    $("rate").textContent = fmtRate(d.rate.pages_per_s);
    $("eta").textContent = d.writer.state === "building" ? fmtDuration(d.rate.eta_s) : p.pending ? "–" : "done";
    $("bar-done").style.width = `${(100 * p.done) / Math.max(1, p.total)}%`;
    $("bar-failed").style.width = `${(100 * p.failed) / Math.max(1, p.total)}%`;
    const w = d.writer;
    $("writer").textContent = w.state === "building" ? `Building: ${w.text}.` : `Not building: ${w.text}.`;
    document.body.dataset.done = p.done;
    document.body.dataset.failed = p.failed;
    document.body.dataset.pending = p.pending;
  }

  // --- pages/s chart -------------------------------------------------------------------------
  function renderChart(rate) {
    const canvas = $("chart"), W = canvas.parentElement.clientWidth - 32, H = 190;
    const ctx = canvasFor(canvas, W, H), bucket = rate.bucket_s;
    // from the first busy bucket (at least the last minute): a short build fills the chart too
    const first = rate.history.findIndex((v) => v > 0);
    const from = first < 0 ? rate.history.length - 12 : Math.min(first, rate.history.length - 12);
    const hist = rate.history.slice(Math.max(0, from)), n = hist.length;
    const avgWin = Math.max(1, Math.round(30 / bucket));
    const busy = Math.max(0, hist.findIndex((v) => v > 0));
    const avg = hist.map((_, i) => {
      const lo = Math.max(Math.min(busy, i), i - avgWin + 1), part = hist.slice(lo, i + 1);
      return part.reduce((a, b) => a + b, 0) / part.length;
    });
    const left = 44, right = 8, top = 10, bottom = 24, pw = W - left - right, ph = H - top - bottom;
    const peak = Math.max(1, ...hist);
    const step = niceStep(peak / 4), ymax = Math.ceil(peak / step) * step;
    ctx.clearRect(0, 0, W, H);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7785"; ctx.strokeStyle = "#e6e9ee"; ctx.lineWidth = 1;
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (let v = 0; v <= ymax + 1e-9; v += step) {
      const y = top + ph - (v / ymax) * ph;
      ctx.beginPath(); ctx.moveTo(left, Math.round(y) + 0.5); ctx.lineTo(W - right, Math.round(y) + 0.5); ctx.stroke();
      ctx.fillText(fmtAxis(v, step), left - 6, y);
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    const span = n * bucket, tick = span <= 120 ? 15 : span <= 300 ? 60 : 120;
    for (let t = 0; t <= span; t += tick) {
      const x = left + pw - (t / span) * pw;
      const label = t === 0 ? "now" : tick < 60 ? `-${t} s` : `-${t / 60} min`;
      ctx.fillText(label, Math.min(Math.max(x, left + 14), W - right - 12), H - bottom + 6);
    }
    const bw = pw / n;
    ctx.fillStyle = "rgba(47, 163, 107, 0.28)";
    hist.forEach((v, i) => {
      if (v <= 0) return;
      const h = (v / ymax) * ph;
      ctx.fillRect(left + i * bw + 0.5, top + ph - h, Math.max(1, bw - 1), h);
    });
    ctx.strokeStyle = "#1f8a57"; ctx.lineWidth = 2; ctx.beginPath();
    avg.forEach((v, i) => {
      const x = left + (i + 0.5) * bw, y = top + ph - (v / ymax) * ph;
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
  function fmtAxis(v, step) {
    if (v >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
    if (v >= 1e4) return `${+(v / 1e3).toFixed(1)}k`;
    return Number.isInteger(step) ? String(Math.round(v)) : v.toFixed(step < 0.1 ? 2 : 1);
  }
  function niceStep(raw) {
    const mag = Math.pow(10, Math.floor(Math.log10(Math.max(raw, 1e-6))));
    for (const f of [1, 2, 2.5, 5, 10]) if (raw <= f * mag) return f * mag;
    return 10 * mag;
  }

  // --- chunk map -----------------------------------------------------------------------------
  // One cell per chunk; with more chunks than fit (cells of at least 3 px), each cell stands for
  // k chunks: red if any failed, blue if any runs, otherwise grey to green by the share done.
  function renderMap(chunks) {
    const canvas = $("map"), W = canvas.parentElement.clientWidth, maxH = 220, n = chunks.n;
    let size = Math.min(32, Math.floor(Math.sqrt((W * maxH) / Math.max(1, n)))), k = 1;
    if (size < 3) {
      size = 3;
      k = Math.ceil(n / (Math.floor(W / size) * Math.floor(maxH / size)));
    }
    const cols = Math.max(1, Math.floor(W / size)), cells = Math.ceil(n / k), rows = Math.ceil(cells / cols);
    const ctx = canvasFor(canvas, W, rows * size);
    const gap = size >= 6 ? 1 : 0, map = chunks.map;
    ctx.clearRect(0, 0, W, rows * size);
    for (let c = 0; c < cells; c++) {
      const lo = c * k, hi = Math.min(n, lo + k);
      let done = 0, running = 0, failed = 0;
      for (let j = lo; j < hi; j++) {
        const s = map.charCodeAt(j);
        if (s === 50) done++; else if (s === 49) running++; else if (s === 51) failed++;
      }
      ctx.fillStyle = failed ? COLOURS.failed : running ? COLOURS.running
        : done === hi - lo ? COLOURS.done : done ? mix(COLOURS.pending, COLOURS.done, done / (hi - lo)) : COLOURS.pending;
      ctx.fillRect((c % cols) * size, Math.floor(c / cols) * size, size - gap, size - gap);
    }
    mapState = { size, k, cols, n, per: chunks.pages_per_chunk, map };
    $("map-scale").textContent = k === 1 ? `${fmtInt(n)} chunks of ${chunks.pages_per_chunk} pages, one cell each`
      : `${fmtInt(n)} chunks of ${chunks.pages_per_chunk} pages, ${k} chunks per cell`;
    const c = chunks.counts;
    $("c-done").textContent = fmtInt(c.done);
    $("c-running").textContent = fmtInt(c.running);
    $("c-failed").textContent = fmtInt(c.partly_failed);
    $("c-pending").textContent = fmtInt(c.pending);
  }
  function mix(a, b, t) {
    const pa = [1, 3, 5].map((i) => parseInt(a.slice(i, i + 2), 16)), pb = [1, 3, 5].map((i) => parseInt(b.slice(i, i + 2), 16));
    return `rgb(${pa.map((v, i) => Math.round(v + (pb[i] - v) * (0.25 + 0.75 * t))).join(",")})`;
  }
  const NAMES = { 48: "pending", 49: "running", 50: "done", 51: "partly failed" };
  function mapTip(ev) {
    const tip = $("map-tip");
    if (!mapState) return;
    const r = $("map").getBoundingClientRect(), s = mapState;
    const x = ev.clientX - r.left, y = ev.clientY - r.top;
    const cell = Math.floor(y / s.size) * s.cols + Math.floor(x / s.size);
    const lo = cell * s.k, hi = Math.min(s.n, lo + s.k);
    if (x < 0 || x >= s.cols * s.size || lo >= s.n) { tip.hidden = true; return; }
    let text;
    if (s.k === 1) {
      text = `chunk ${lo}: pages ${fmtInt(lo * s.per)}–${fmtInt((lo + 1) * s.per - 1)}, ${NAMES[s.map.charCodeAt(lo)]}`;
    } else {
      const count = { 48: 0, 49: 0, 50: 0, 51: 0 };
      for (let j = lo; j < hi; j++) count[s.map.charCodeAt(j)]++;
      text = `chunks ${lo}–${hi - 1}: ${count[50]} done, ${count[49]} running, ${count[51]} partly failed, ${count[48]} pending`;
    }
    tip.textContent = text;
    tip.style.left = `${x}px`; tip.style.top = `${y}px`;
    tip.hidden = false;
  }

  // --- failures, workers, thumbnails, model ----------------------------------------------------
  function thumbHref(page, w) { return `${THUMB}?page=${page}&w=${w}`; }
  function renderFailures(f) {
    const body = $("failures");
    body.replaceChildren(...f.reasons.map((r) => el("tr", {},
      el("td", { cls: "reason", text: r.reason }),
      el("td", { cls: "num", text: fmtInt(r.count) }),
      el("td", {}, ...r.pages.map((p) => el("a", { cls: "chip", href: thumbHref(p.page, 800), target: "_blank",
        title: `page @${p.page}`, text: p.id })))),
    ));
    $("no-failures").hidden = f.reasons.length > 0;
    $("no-failures").textContent = f.total ? `${fmtInt(f.total)} pages failed; no reason could be read for them.`
      : "No page has failed.";
    $("fail-note").textContent = f.chunks_read < f.chunks ? `grouped from ${f.chunks_read} of ${f.chunks} chunks with failures` : "";
  }
  function renderWorkers(rows) {
    const note = $("no-workers");
    $("workers").closest("table").hidden = rows == null;
    if (rows == null) {
      $("workers").replaceChildren();
      note.hidden = false;
      note.textContent = "Worker rows come from the build's scheduler: open this page on the build's dashboard (…/pagecube).";
      return;
    }
    note.hidden = rows.length > 0;
    note.textContent = "No worker is connected.";
    $("workers").replaceChildren(...rows.map((w) => el("tr", {},
      el("td", { text: w.name === w.address ? w.address.replace(/^[a-z]+:\/\//, "") : w.name, title: w.address }),
      el("td", { text: w.device || "–" }),
      el("td", { cls: "num", text: fmtRate(w.pages_per_s) }),
      el("td", { cls: "num", text: fmtInt(w.pages) }),
      el("td", { cls: "num", text: fmtInt(w.tasks) }),
      el("td", { cls: "num", text: fmtBytes(w.rss), title: w.memory_limit ? `limit ${fmtBytes(w.memory_limit)}` : "" }),
      el("td", { cls: "num", text: w.cpu == null ? "–" : `${Math.round(w.cpu)}%` }),
      el("td", { cls: "num", text: w.gpu_util == null && w.gpu_memory == null ? "–"
        : `${w.gpu_util == null ? "?" : Math.round(w.gpu_util)}% · ${fmtBytes(w.gpu_memory)}` }),
    )));
  }
  // Thumbnails load one after another: a browser opens only 6 connections to a server, and
  // pictures being drawn must not hold up the status polls behind them.
  const imageQueue = [];
  let imageLoading = false;
  function queueImage(img, src) {
    imageQueue.push([img, src]);
    queueMicrotask(nextImage);  // once the picture is in the page
    return img;
  }
  function nextImage() {
    while (imageQueue.length && !imageQueue[0][0].isConnected) imageQueue.shift();  // replaced meanwhile
    if (imageLoading || !imageQueue.length) return;
    const [img, src] = imageQueue.shift();
    imageLoading = true;
    const done = () => { imageLoading = false; nextImage(); };
    img.addEventListener("load", done, { once: true });
    img.addEventListener("error", done, { once: true });
    img.src = src;
  }
  // Thumbnails cost the server a drawing each: new ones at most every THUMBS_EVERY_MS, and a page
  // already shown keeps its picture.
  const THUMBS_EVERY_MS = 10000;
  let thumbsAt = 0;
  const shownThumbs = new Map();
  function renderThumbs(recent, final) {
    const key = JSON.stringify(recent);
    $("no-thumbs").hidden = recent.length > 0;
    const soon = !final && recentKey && recent.length <= shownThumbs.size && Date.now() - thumbsAt < THUMBS_EVERY_MS;
    if (key === recentKey || soon) return;
    recentKey = key;
    thumbsAt = Date.now();
    const figures = recent.map((p) => shownThumbs.get(p.page) || el("figure", {},
      el("a", { href: thumbHref(p.page, 800), target: "_blank" },
        queueImage(el("img", { alt: `page ${p.id}` }), thumbHref(p.page, 300))),
      el("figcaption", { title: p.id }, el("b", { text: p.id }), ` · @${p.page}`)));
    shownThumbs.clear();
    recent.forEach((p, i) => shownThumbs.set(p.page, figures[i]));
    $("thumbs").replaceChildren(...figures);
  }
  const MODEL_LABELS = {
    model: "model", weights_digest: "weights digest", model_weights_source: "weights from", embedding_dim: "embedding dim",
    embedding_dtype: "embedding dtype", max_panels: "panel cap", chunk_pages: "pages per chunk", codec: "codec",
    config_fingerprint: "config fingerprint", input_digest: "page list digest", inputs: "page list",
    pagecube_version: "pagecube", created: "created",
  };
  let modelKey = "";
  function renderModel(model, store) {
    const key = JSON.stringify(model) + store;
    if (key === modelKey) return;
    modelKey = key;
    const rows = [el("dt", { text: "store" }), el("dd", { text: store })];
    for (const [k, label] of Object.entries(MODEL_LABELS)) {
      if (model[k] == null) continue;
      rows.push(el("dt", { text: label }), el("dd", { text: String(model[k]) }));
    }
    $("model").replaceChildren(...rows);
  }

  // --- the end of a build ---------------------------------------------------------------------
  // The build's scheduler serves this page and goes away with the build: when the build ends it
  // says so (d.ended) and waits a few seconds for this page to show it. Served from the store
  // (status --serve), a store that no build holds says the same through its writer state.
  function endOf(d) {
    const p = d.pages;
    if (d.ended) {
      const finished = d.ended.state !== "stopped" && p.pending === 0;
      return { state: finished ? "finished" : "stopped", reopen: d.ended.reopen,
        reason: d.ended.reason || (finished ? "" : `the build ended with ${fmtInt(p.pending)} pages pending`) };
    }
    if (d.writer.state === "finished") return { state: "finished", reason: "" };
    if (d.writer.state === "stopped") return { state: "stopped", reason: d.writer.text };
    return null;
  }
  function renderEnd(end, d) {
    const box = $("end");
    box.hidden = !end;
    if (!end) return;
    const p = d.pages, failed = p.failed ? `, ${fmtInt(p.failed)} failed` : ", none failed";
    const pending = p.pending ? `, ${fmtInt(p.pending)} pending` : "";
    $("end-state").textContent = end.state.toUpperCase();
    $("end-counts").textContent = `${fmtInt(p.done)} of ${fmtInt(p.total)} pages done${failed}${pending}.`;
    $("end-reason").textContent = end.reason ? `Stopped: ${end.reason}.` : "";
    $("end-reason").hidden = !end.reason;
    const reopen = $("end-reopen");
    reopen.hidden = !end.reopen;
    if (end.reopen) {
      reopen.replaceChildren("This build's server closes with the build. To open this page again: ",
        el("code", { text: end.reopen }));
    }
  }

  // --- polling ---------------------------------------------------------------------------------
  function render(d) {
    $("store").textContent = d.store;
    document.title = d.ready ? `${d.pages.percent.toFixed(0)}% · pagecube` : "pagecube";
    if (!d.ready) {
      document.body.dataset.state = "waiting";
      $("state").textContent = "waiting";
      showBanner(d.message);
      return;
    }
    const end = endOf(d);
    document.body.dataset.state = end ? end.state : d.writer.state;
    $("state").textContent = end ? end.state : d.writer.state;
    $("dask-link").hidden = !d.on_scheduler;
    renderSummary(d);
    renderEnd(end, d);
    // redraw only what changed: an open page should cost the build next to nothing
    if (changed("chart", d.rate.history)) renderChart(d.rate);
    if (changed("map", [d.chunks.map, d.chunks.counts])) renderMap(d.chunks);
    if (changed("failures", d.failures)) renderFailures(d.failures);
    if (changed("workers", d.workers && d.workers.map((w) => [w.name, w.device, fmtRate(w.pages_per_s), w.pages,
      w.tasks, fmtBytes(w.rss), Math.round(w.cpu || 0), w.gpu_util, fmtBytes(w.gpu_memory)]))) renderWorkers(d.workers);
    renderThumbs(d.recent, !!end);
    renderModel(d.model, d.store);
    return end;
  }
  const drawn = {};
  function changed(part, value) {
    const key = JSON.stringify(value);
    if (drawn[part] === key) return false;
    drawn[part] = key;
    return true;
  }
  function showBanner(text) { const b = $("banner"); b.textContent = text || ""; b.hidden = !text; }

  // resolves once every thumbnail asked for so far has loaded (or failed)
  function imagesLoaded() {
    return new Promise((resolve) => {
      const check = () => (imageLoading || imageQueue.length ? setTimeout(check, 100) : resolve());
      check();
    });
  }
  // tell the build's server this page shows its end, thumbnails and all: the build may then go
  async function sayShown() {
    await imagesLoaded();
    shownEnd = true;
    refresh();
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const res = await fetch(`${API}?tab=${TAB}${shownEnd ? "&shown=1" : ""}`, { cache: "no-store" });
      const d = await res.json();
      if (!res.ok) throw new Error(d.error || res.statusText);
      last = d; lastOk = Date.now();
      $("updated").textContent = `updated ${new Date(lastOk).toLocaleTimeString()}`;
      showBanner(d.ready ? "" : d.message);
      render(d);
      if (d.ended && !shownEnd) sayShown();
      else if (!d.ended) shownEnd = false;  // a later build on the same scheduler
      // once this page shows the end, the build's server may close: ask seldom (a remote scheduler stays,
      // and its next build is seen within ENDED_EVERY_MS)
      timer = setTimeout(refresh, d.ended && shownEnd ? ENDED_EVERY_MS : EVERY_MS);
      return d.ready ? { done: d.pages.done, failed: d.pages.failed, pending: d.pages.pending } : null;
    } catch (err) {
      if (last && last.ended) {  // the build ended and its server went with it: the end stays on the page
        $("updated").textContent = `the build's server has closed; final state from ${new Date(lastOk).toLocaleTimeString()}`;
        $("dask-link").hidden = true;
        return null;  // nothing left to poll
      }
      const when = lastOk ? ` Showing the state from ${new Date(lastOk).toLocaleTimeString()}.` : "";
      const store = last && last.store ? last.store : "STORE";
      showBanner(`Lost contact with the server (${err.message}).${when} When a build ends its scheduler goes too; ` +
        `\`pagecube status ${store} --serve\` serves this page from the store.`);
      timer = setTimeout(refresh, EVERY_MS * 2.5);
      return null;
    }
  }
  window.addEventListener("resize", () => { if (last && last.ready) { renderChart(last.rate); renderMap(last.chunks); } });
  $("map").addEventListener("mousemove", mapTip);
  $("map").addEventListener("mouseleave", () => { $("map-tip").hidden = true; });
  window.pagecube = { refresh, last: () => last };
  refresh();
})();
