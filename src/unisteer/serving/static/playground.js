// The steering playground (served by `unisteer serve` at /playground; see unisteer/serving/playground.py).
// Plain browser JavaScript, no dependencies. Every model output and name is written with textContent: nothing
// that comes from the server is ever parsed as HTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "unisteer-playground-key";
  const state = { key: sessionStorage.getItem(KEY_STORE) || "", model: null, updates: [], columns: [],
                  sweeps: new Map(), timer: null };

  function headers(json) {
    const h = {};
    if (state.key) h["Authorization"] = "Bearer " + state.key;
    if (json) h["Content-Type"] = "application/json";
    return h;
  }

  function setStatus(text, error) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(error));
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return `HTTP ${response.status}: ${body.error.message}`;
    } catch (_) { /* not JSON */ }
    return `HTTP ${response.status}`;
  }

  // ------------------------------------------------------------------------------------------ connecting
  async function connect() {
    state.key = $("api-key").value.trim();
    if (state.key) sessionStorage.setItem(KEY_STORE, state.key); else sessionStorage.removeItem(KEY_STORE);
    document.body.dataset.ready = "false";
    let response;
    try {
      response = await fetch("/v1/models", { headers: headers(false) });
    } catch (error) {
      setStatus("Cannot reach the server: " + error, true);
      return;
    }
    if (response.status === 401) {
      setStatus("This server needs an API key: enter it above and press Connect.", true);
      document.body.dataset.ready = "needs-key";
      $("api-key").focus();
      return;
    }
    if (!response.ok) {
      setStatus(await errorText(response), true);
      return;
    }
    const cards = (await response.json()).data || [];
    const base = cards.find((card) => !card.parent) || cards[0];
    state.model = base ? base.id : "";
    state.updates = cards.filter((card) => card.update).map((card) => card.update);
    $("server-model").textContent = "model: " + state.model;
    renderUpdates();
    setStatus(`Connected: ${state.updates.length} update(s) loaded.`);
    document.body.dataset.ready = "true";
    loadSweeps();
    runAll();
  }

  function renderUpdates() {
    const box = $("updates");
    box.replaceChildren();
    if (!state.updates.length) {
      const none = document.createElement("span");
      none.className = "muted";
      none.textContent = "no updates loaded (start the server with --updates DIR)";
      box.append(none);
      return;
    }
    state.updates.forEach((update, i) => {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "checkbox";
      input.value = update.name;
      input.checked = i === 0;
      input.addEventListener("change", () => { loadSweeps(); runSteered(); });
      label.append(input, ` ${update.name} (${update.form}, layer ${update.layer})`);
      box.append(label);
    });
  }

  function selected() {
    return Array.from(document.querySelectorAll("#updates input:checked")).map((input) => input.value);
  }

  // ------------------------------------------------------------------------------------------ columns
  function sliderValue() { return Number($("m-slider").value); }

  function listValues() {
    return $("m-list").value.split(/[\s,;]+/).filter((v) => v !== "").map(Number).filter((v) => Number.isFinite(v));
  }

  function makeColumn(kind, m) {
    const el = document.createElement("article");
    el.className = "column " + kind;
    el.dataset.kind = kind;
    el.dataset.m = kind === "plain" ? "plain" : String(m);
    const title = document.createElement("h2");
    const text = document.createElement("div");
    text.className = "text";
    el.append(title, text);
    const column = { kind, m, el, title, text, controller: null };
    setTitle(column);
    return column;
  }

  function setTitle(column) {
    column.title.textContent = column.kind === "plain" ? "plain model" :
      `m = ${column.m}${column.kind === "slider" ? " (slider)" : ""}`;
  }

  function buildColumns() {
    state.columns.forEach((column) => column.controller && column.controller.abort());
    const columns = [makeColumn("plain", 0), makeColumn("slider", sliderValue())];
    for (const m of listValues()) columns.push(makeColumn("list", m));
    state.columns = columns;
    $("columns").replaceChildren(...columns.map((column) => column.el));
  }

  function requestBody(column) {
    const prompt = $("prompt").value;
    const body = { model: state.model, stream: true, max_tokens: Number($("max-tokens").value) || 48,
                   temperature: Number($("temperature").value) || 0 };
    if ($("chat").checked) body.messages = [{ role: "user", content: prompt }]; else body.prompt = prompt;
    if (column.kind !== "plain") body.steering = selected().map((name) => ({ update: name, multiplier: column.m }));
    return body;
  }

  async function runColumn(column) {
    if (column.controller) column.controller.abort();
    const controller = new AbortController();
    column.controller = controller;
    column.text.textContent = "";
    if (column.kind !== "plain" && !selected().length) {
      column.el.dataset.state = "idle";
      column.text.textContent = "(select an update)";
      return;
    }
    column.el.dataset.state = "streaming";
    const chat = $("chat").checked;
    let text = "";
    try {
      const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
        method: "POST", headers: headers(true), body: JSON.stringify(requestBody(column)), signal: controller.signal });
      if (!response.ok) throw new Error(await errorText(response));
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
            const payload = JSON.parse(line.slice(6));
            if (payload.error) throw new Error(payload.error.message || "generation failed");
            const choice = payload.choices && payload.choices[0];
            const piece = choice ? (chat ? choice.delta && choice.delta.content : choice.text) : null;
            if (piece) {
              text += piece;
              column.text.textContent = text;  // text, never markup
            }
          }
        }
      }
      if (column.controller === controller) column.el.dataset.state = "done";
    } catch (error) {
      if (controller.signal.aborted) return;
      column.el.dataset.state = "error";
      column.text.textContent = String(error.message || error);
    }
  }

  function runAll() {
    if (!state.model) return;
    buildColumns();
    state.columns.forEach(runColumn);
  }

  function runSteered() {
    state.columns.filter((column) => column.kind !== "plain").forEach(runColumn);
  }

  function onSlider(final) {
    const m = sliderValue();
    $("m-value").textContent = String(m);
    drawSweeps();
    const column = state.columns.find((c) => c.kind === "slider");
    if (!column) return;
    column.m = m;
    setTitle(column);
    column.el.dataset.state = "pending";  // the text shown is for the previous m until the new run streams
    if (final && state.model) {
      clearTimeout(state.timer);
      state.timer = setTimeout(() => runColumn(column), 150);
    }
  }

  // ------------------------------------------------------------------------------------------ sweep curves
  async function loadSweeps() {
    const names = selected();
    for (const name of names) {
      if (state.sweeps.has(name)) continue;
      state.sweeps.set(name, null);
      try {
        const response = await fetch(`/v1/updates/${encodeURIComponent(name)}/sweep`, { headers: headers(false) });
        if (response.ok) state.sweeps.set(name, await response.json());
      } catch (_) { /* no curves: nothing to draw */ }
    }
    drawSweeps();
  }

  function drawSweeps() {
    const box = $("sweeps");
    box.replaceChildren();
    for (const name of selected()) {
      const sweep = state.sweeps.get(name);
      if (!sweep) continue;
      for (const quantity of ["preference", "utility"]) {
        const figure = document.createElement("figure");
        const canvas = document.createElement("canvas");
        canvas.width = 380;
        canvas.height = 240;
        canvas.className = "sweep";
        canvas.dataset.update = name;
        canvas.dataset.quantity = quantity;
        canvas.dataset.markedM = String(sliderValue());
        const caption = document.createElement("figcaption");
        caption.textContent = `${name}: ${quantity === "preference" ? "PrefOdds" : "UtilOdds"} vs m ` +
          `(${sweep.split}, ${sweep.variant} log-odds); the line marks m = ${sliderValue()}`;
        figure.append(canvas, caption);
        box.append(figure);
        drawCurve(canvas, sweep[quantity], sliderValue(), quantity === "preference" ? "#1f77b4" : "#2ca02c");
      }
    }
  }

  function drawCurve(canvas, curve, marked, color) {
    const ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height, left = 44, right = 10, top = 10, bottom = 28;
    const points = curve.m.map((m, i) => ({ m, y: curve.mean[i], lo: curve.ci_low[i], hi: curve.ci_high[i] }))
      .filter((p) => Number.isFinite(p.m) && Number.isFinite(p.y)).sort((a, b) => a.m - b.m);
    if (!points.length) return;
    const ys = points.flatMap((p) => [p.y, p.lo, p.hi]).filter(Number.isFinite);
    let x0 = Math.min(...points.map((p) => p.m), marked), x1 = Math.max(...points.map((p) => p.m), marked);
    let y0 = Math.min(...ys), y1 = Math.max(...ys);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { y0 -= 1; y1 += 1; }
    const pad = (y1 - y0) * 0.05;
    y0 -= pad; y1 += pad;
    const X = (m) => left + (m - x0) / (x1 - x0) * (W - left - right);
    const Y = (y) => top + (y1 - y) / (y1 - y0) * (H - top - bottom);
    ctx.clearRect(0, 0, W, H);
    ctx.font = "11px sans-serif";
    ctx.strokeStyle = "#999";
    ctx.strokeRect(left, top, W - left - right, H - top - bottom);
    ctx.fillStyle = "#444";
    ctx.fillText(y1.toFixed(1), 2, top + 10);
    ctx.fillText(y0.toFixed(1), 2, H - bottom);
    ctx.fillText(String(x0), left, H - 10);
    ctx.fillText(String(x1), W - right - 20, H - 10);
    ctx.fillText("m", (W + left) / 2, H - 10);
    if (y0 < 0 && y1 > 0) {
      ctx.strokeStyle = "#ccc";
      ctx.beginPath(); ctx.moveTo(left, Y(0)); ctx.lineTo(W - right, Y(0)); ctx.stroke();
    }
    const band = points.filter((p) => Number.isFinite(p.lo) && Number.isFinite(p.hi));
    if (band.length > 1) {
      ctx.fillStyle = color + "33";
      ctx.beginPath();
      band.forEach((p, i) => (i ? ctx.lineTo(X(p.m), Y(p.hi)) : ctx.moveTo(X(p.m), Y(p.hi))));
      band.slice().reverse().forEach((p) => ctx.lineTo(X(p.m), Y(p.lo)));
      ctx.closePath();
      ctx.fill();
    }
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(X(p.m), Y(p.y)) : ctx.moveTo(X(p.m), Y(p.y))));
    ctx.stroke();
    points.forEach((p) => { ctx.beginPath(); ctx.arc(X(p.m), Y(p.y), 2.5, 0, 2 * Math.PI); ctx.fill(); });
    ctx.strokeStyle = "#d62728";
    ctx.lineWidth = 2;
    ctx.beginPath(); ctx.moveTo(X(marked), top); ctx.lineTo(X(marked), H - bottom); ctx.stroke();
    ctx.fillStyle = "#d62728";
    ctx.fillText(`m = ${marked}`, Math.min(X(marked) + 4, W - right - 44), top + 12);
  }

  // ------------------------------------------------------------------------------------------ wiring
  document.addEventListener("DOMContentLoaded", () => {
    $("api-key").value = state.key;
    $("m-value").textContent = String(sliderValue());
    $("connect").addEventListener("click", connect);
    $("api-key").addEventListener("keydown", (event) => { if (event.key === "Enter") connect(); });
    $("generate").addEventListener("click", runAll);
    $("m-slider").addEventListener("input", () => onSlider(false));
    $("m-slider").addEventListener("change", () => onSlider(true));
    $("m-list").addEventListener("change", runAll);
    connect();
  });
})();
