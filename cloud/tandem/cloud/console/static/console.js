// tandem fleet console: vanilla JavaScript, no build step, no dependencies.
// Reads come from the console's views (/console/api/...), actions go to the fleet service's
// REST API, and a server-sent event stream tells the page what changed so it refreshes live.
"use strict";

const READ = "/console/api";
const ACT = "/api/v1";
const METRICS = ["error_rate", "p95_latency_ratio", "fallback_rate", "shadow_agreement", "failed_device_pct", "estimated_accuracy", "acceptance_rate", "escalation_rate", "tokens_per_s_ratio"];
const STATES = ["succeeded", "failed", "rolled_back", "installing", "assigned"];

// --- tiny DOM helper (text only: data from the API never becomes HTML) ---------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
function fill(el, ...kids) {
  el.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined && k !== false));
}
const svgNS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

// --- formatting ----------------------------------------------------------------------------
const fmt = {
  pct: (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%"),
  ms: (v) => (v === null || v === undefined ? "–" : v.toFixed(v < 10 ? 2 : 1) + " ms"),
  num: (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(d)),
  bytes: (v) => {
    if (v === null || v === undefined) return "–";
    const u = ["B", "KiB", "MiB", "GiB"]; let i = 0; let x = v;
    while (x >= 1024 && i < u.length - 1) { x /= 1024; i++; }
    return (i ? x.toFixed(1) : x) + " " + u[i];
  },
  time: (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–"),
  ago: (t) => {
    if (!t) return "–";
    const d = Math.max(0, Date.now() / 1000 - t);
    if (d < 60) return Math.round(d) + " s ago";
    if (d < 3600) return Math.round(d / 60) + " min ago";
    return Math.round(d / 3600) + " h ago";
  },
};
function gateValue(metric, v) {
  if (v === null || v === undefined) return "–";
  if (metric === "p95_latency_ratio" || metric === "tokens_per_s_ratio") return "×" + v.toFixed(2);
  if (metric === "failed_device_pct") return v.toFixed(1) + "%";
  return fmt.pct(v);
}
const HIGHER_IS_BETTER = new Set(["shadow_agreement", "estimated_accuracy", "acceptance_rate", "tokens_per_s_ratio"]);
// A gate's confidence bounds, on what it compares (the value, its difference to the baseline
// for a relative gate, the AUC rank statistic for latency); its reason says which.
function gateInterval(g) {
  if (g.low === null || g.low === undefined || g.high === null || g.high === undefined) return "–";
  return `[${Number(g.low.toPrecision(3))}, ${Number(g.high.toPrecision(3))}]`;
}
function badge(text, cls) { return h("span", { class: "badge " + (cls || text) }, text); }

// --- token and API -------------------------------------------------------------------------
const auth = {
  get token() { return sessionStorage.getItem("tandem-token") || ""; },
  set token(v) { if (v) sessionStorage.setItem("tandem-token", v); else sessionStorage.removeItem("tandem-token"); },
};
(function bootstrapToken() {
  const url = new URL(location.href);
  const t = url.searchParams.get("token");
  if (t) {
    auth.token = t;
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
})();

class Unauthorized extends Error {}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (auth.token) headers.Authorization = "Bearer " + auth.token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (res.status === 401) { showLogin("The token was refused."); throw new Unauthorized(); }
  let data = null;
  const text = await res.text();
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { detail: text }; }
  if (!res.ok) {
    let msg = data && (data.detail || data.error || data.message);
    if (Array.isArray(msg)) msg = msg.map((d) => (d.loc ? d.loc.join(".") + ": " : "") + d.msg).join("; ");
    throw new Error(`${res.status}: ${msg || res.statusText}`);
  }
  return data;
}

function toast(msg, bad) {
  const t = document.getElementById("toast");
  t.textContent = msg; t.className = "toast" + (bad ? " bad" : ""); t.hidden = false;
  clearTimeout(toast.timer); toast.timer = setTimeout(() => { t.hidden = true; }, 5000);
}

function showLogin(message) {
  document.getElementById("login").hidden = false;
  document.getElementById("view").hidden = true;
  document.getElementById("login-error").textContent = message || "";
  stream.close();
}
function hideLogin() {
  document.getElementById("login").hidden = true;
  document.getElementById("view").hidden = false;
  document.getElementById("logout").hidden = !auth.token;
}

// --- live updates (server-sent events) -----------------------------------------------------
const stream = {
  source: null,
  open() {
    if (this.source) return;
    const q = auth.token ? "?token=" + encodeURIComponent(auth.token) : "";
    const es = new EventSource(READ + "/stream" + q);
    this.source = es;
    const live = document.getElementById("live");
    let connects = 0;
    es.addEventListener("hello", () => {
      live.textContent = "live"; live.className = "live on";
      // After a reconnect, something may have changed while the stream was away.
      if (connects++) window.dispatchEvent(new CustomEvent("tandem-change", { detail: ["fleet", "rollouts", "telemetry", "events"] }));
    });
    es.addEventListener("change", (ev) => {
      const what = JSON.parse(ev.data).what || [];
      window.dispatchEvent(new CustomEvent("tandem-change", { detail: what }));
    });
    es.onerror = () => { live.textContent = "reconnecting"; live.className = "live off"; };
  },
  close() { if (this.source) { this.source.close(); this.source = null; } },
};

// A view registers what changes it cares about; refreshes are coalesced.
let current = null;
window.addEventListener("tandem-change", (ev) => {
  if (!current || !current.refresh) return;
  if (!ev.detail.some((w) => current.watch.includes(w))) return;
  if (current.pending) return;
  current.pending = setTimeout(async () => {
    const view = current; if (!view) return;
    view.pending = null;
    try { await view.refresh(); } catch (e) { if (!(e instanceof Unauthorized)) console.warn(e); }
  }, 300);
});

// --- pages ---------------------------------------------------------------------------------
const main = () => document.getElementById("view");
function mount(view) {
  if (current && current.pending) clearTimeout(current.pending);
  current = view;
}

async function fleetPage(params) {
  const filters = { tags: params.getAll("tag"), online: params.get("online") || "" };
  const root = h("div", { id: "fleet-page" });
  main().replaceChildren(root);
  const view = { watch: ["fleet", "telemetry"], refresh: draw };
  mount(view);
  async function draw() {
    const q = new URLSearchParams();
    filters.tags.forEach((t) => q.append("tag", t));
    if (filters.online) q.set("online", filters.online);
    const data = await api("GET", `${READ}/fleet?${q}`);
    if (current !== view) return;
    const versions = Object.entries(data.versions).map(([m, vs]) =>
      h("div", {}, h("b", {}, m + ": "),
        Object.entries(vs).sort((a, b) => +a[0] - +b[0]).map(([v, n]) => h("span", { class: "tag" }, `v${v} × ${n}`))));
    const tagSelect = h("select", { id: "tag-filter", onchange: (e) => {
      filters.tags = e.target.value ? [e.target.value] : []; go(); } },
      h("option", { value: "" }, "any tag"),
      Object.entries(data.tags).flatMap(([k, vs]) => vs.map((v) =>
        h("option", { value: `${k}=${v}`, selected: filters.tags.includes(`${k}=${v}`) }, `${k}=${v}`))));
    const onlineSelect = h("select", { id: "online-filter", onchange: (e) => { filters.online = e.target.value; go(); } },
      h("option", { value: "" }, "online and offline"),
      h("option", { value: "true", selected: filters.online === "true" }, "online only"),
      h("option", { value: "false", selected: filters.online === "false" }, "offline only"));
    function go() {
      const q2 = new URLSearchParams();
      filters.tags.forEach((t) => q2.append("tag", t));
      if (filters.online) q2.set("online", filters.online);
      location.hash = "#/fleet" + (q2.toString() ? "?" + q2 : "");
    }
    const rows = data.devices.map((d) => {
      const lt = d.last_telemetry;
      return h("tr", { "data-device": d.device_id },
        h("td", { class: "mono" }, d.device_id),
        h("td", {}, badge(d.online ? "online" : "offline")),
        h("td", {}, d.hardware || "–"),
        h("td", {}, d.runtimes.join(", ") || "–"),
        h("td", {}, Object.entries(d.tags).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`))),
        h("td", {}, Object.entries(d.active_versions).map(([m, v]) => h("span", { class: "tag" }, `${m} v${v}`))),
        h("td", { class: "num" }, lt ? `${lt.model} v${lt.version}` : "–"),
        h("td", { class: "num" }, lt ? fmt.ms(lt.p95_latency_ms) : "–"),
        h("td", { class: "num" }, lt ? fmt.pct(lt.fallback_rate) : "–"),
        h("td", {}, d.agent_version || "–"),
        h("td", {}, fmt.ago(d.last_seen)));
    });
    fill(root, 
      h("div", { class: "head" }, h("h1", {}, "Fleet"), h("span", { class: "spacer" }), tagSelect, onlineSelect),
      h("div", { class: "row" },
        h("div", { class: "card" }, h("h3", {}, "Devices"), h("div", { class: "stat", id: "device-count" }, data.total)),
        h("div", { class: "card" }, h("h3", {}, "Online"), h("div", { class: "stat", id: "online-count" }, data.online,
          h("small", {}, ` / ${data.total}`))),
        h("div", { class: "card" }, h("h3", {}, "Active versions"), versions.length ? versions : h("span", { class: "muted" }, "none yet"))),
      h("div", { class: "card" },
        h("table", { id: "devices" },
          h("thead", {}, h("tr", {}, ["device", "presence", "hardware", "runtimes", "tags", "active versions",
            "last telemetry", "p95", "fallback", "agent", "last seen"].map((c) => h("th", {}, c)))),
          h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 11, class: "muted" }, "No devices match."))))));
  }
  await draw();
}

async function modelsPage() {
  const view = { watch: [], refresh: null };
  mount(view);
  const models = await api("GET", `${READ}/models`);
  const rows = models.map((m) => h("tr", {},
    h("td", {}, h("a", { href: "#/models/" + encodeURIComponent(m.name) }, m.name)),
    h("td", {}, m.task || "–"),
    h("td", {}, m.versions.map((v) => h("span", { class: "tag" }, "v" + v)))));
  main().replaceChildren(h("div", { id: "models-page" }, h("div", { class: "head" }, h("h1", {}, "Models")),
    h("div", { class: "card" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "model"), h("th", {}, "task"), h("th", {}, "versions"))),
      h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 3, class: "muted" }, "No models imported yet.")))))));
}

async function modelPage(name) {
  const root = h("div", { id: "model-page" });
  main().replaceChildren(root);
  const view = { watch: ["fleet"], refresh: draw };
  mount(view);
  async function draw() {
    const m = await api("GET", `${READ}/models/${encodeURIComponent(name)}`);
    if (current !== view) return;
    const cards = m.versions.slice().reverse().map((v) => h("div", { class: "card version", "data-version": v.version },
      h("div", { class: "head" }, h("h2", {}, `${m.name} v${v.version}`),
        h("span", { class: "muted" }, "accuracy ", h("b", { class: "accuracy" }, v.accuracy === null ? "–" : fmt.pct(v.accuracy))),
        h("span", { class: "muted" }, `running on ${v.devices} device${v.devices === 1 ? "" : "s"}`),
        h("span", { class: "spacer" }),
        h("a", { class: "button", href: `#/rollouts/new?model=${encodeURIComponent(m.name)}&version=${v.version}` }, "Roll out…")),
      h("table", {},
        h("thead", {}, h("tr", {}, ["variant", "runtime", "hardware", "accuracy", "model size", "download size", "latency (batch 1)"]
          .map((c, i) => h("th", { class: i > 2 ? "num" : "" }, c)))),
        h("tbody", {}, v.variants.map((a) => h("tr", {},
          h("td", { class: "mono" }, a.variant), h("td", {}, a.runtime), h("td", {}, a.hardware),
          h("td", { class: "num" }, a.accuracy === null ? "–" : fmt.pct(a.accuracy)),
          h("td", { class: "num" }, fmt.bytes(a.size_bytes)),
          h("td", { class: "num" }, fmt.bytes(a.stored_bytes)),
          h("td", { class: "num" }, fmt.ms(a.latency_ms_batch1)))))),
      Object.keys(v.metrics).length ? h("details", {}, h("summary", { class: "muted" }, "build report metrics"),
        h("table", {}, h("tbody", {}, Object.entries(v.metrics).map(([k, x]) =>
          h("tr", {}, h("td", { class: "mono" }, k), h("td", { class: "num" }, typeof x === "number" ? +x.toFixed(5) : String(x))))))) : null));
    fill(root, h("div", { class: "head" }, h("h1", {}, `Model ${m.name}`), h("span", { class: "muted" }, m.task)), ...cards);
  }
  await draw();
}

async function rolloutsPage() {
  const root = h("div", { id: "rollouts-page" });
  main().replaceChildren(root);
  const view = { watch: ["rollouts", "events"], refresh: draw };
  mount(view);
  async function draw() {
    const list = await api("GET", `${READ}/rollouts`);
    if (current !== view) return;
    const rows = list.map((r) => h("tr", { "data-rollout": r.rollout_id },
      h("td", {}, h("a", { class: "mono", href: "#/rollouts/" + r.rollout_id }, r.rollout_id)),
      h("td", {}, `${r.model} v${r.version}`),
      h("td", {}, r.baseline_version === null ? "–" : "v" + r.baseline_version),
      h("td", {}, badge(r.status)),
      h("td", {}, `${r.stage_index + 1} / ${r.stages.length} (${r.stages[r.stage_index].percent}%)`),
      h("td", {}, Object.entries(r.selector).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`))),
      h("td", {}, r.created_by), h("td", {}, fmt.ago(r.created_at))));
    fill(root, 
      h("div", { class: "head" }, h("h1", {}, "Rollouts"), h("span", { class: "spacer" }),
        h("a", { class: "button", id: "new-rollout", href: "#/rollouts/new" }, "New rollout")),
      h("div", { class: "card" }, h("table", { id: "rollouts" },
        h("thead", {}, h("tr", {}, ["rollout", "version", "baseline", "status", "stage", "targets", "by", "created"].map((c) => h("th", {}, c)))),
        h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No rollouts yet."))))));
  }
  await draw();
}

async function newRolloutPage(params) {
  mount({ watch: [], refresh: null });
  const models = await api("GET", `${READ}/models`);
  const modelSel = h("select", { name: "model", id: "f-model", required: true },
    models.map((m) => h("option", { value: m.name, selected: m.name === params.get("model") }, m.name)));
  const versionSel = h("select", { name: "version", id: "f-version", required: true });
  const baselineSel = h("select", { name: "baseline", id: "f-baseline" });
  function fillVersions() {
    const m = models.find((x) => x.name === modelSel.value);
    const vs = m ? m.versions.slice().sort((a, b) => b - a) : [];
    versionSel.replaceChildren(...vs.map((v) => h("option", { value: v, selected: String(v) === params.get("version") }, "v" + v)));
    baselineSel.replaceChildren(h("option", { value: "" }, "previous version"), ...vs.map((v) => h("option", { value: v }, "v" + v)));
  }
  modelSel.addEventListener("change", fillVersions);
  fillVersions();
  const stages = h("div", { id: "f-stages" });
  function stageRow(pct, soak) {
    const row = h("div", { class: "line stage-row" },
      h("label", {}, "percent", h("input", { name: "percent", type: "number", min: "0.1", max: "100", step: "any", value: pct, required: true })),
      h("label", {}, "min soak (s)", h("input", { name: "soak", type: "number", min: "0", step: "any", value: soak, required: true })),
      h("button", { type: "button", class: "secondary", onclick: () => row.remove() }, "remove"));
    stages.append(row);
  }
  [[10, 60], [50, 60], [100, 0]].forEach(([p, so]) => stageRow(p, so));
  const gates = h("div", { id: "f-gates" });
  function gateRow(metric, threshold, minSamples) {
    const row = h("div", { class: "line gate-row" },
      h("label", {}, "metric", h("select", { name: "metric" }, METRICS.map((m) => h("option", { value: m, selected: m === metric }, m)))),
      h("label", {}, "threshold", h("input", { name: "threshold", type: "number", min: "0", step: "any", value: threshold, required: true })),
      h("label", {}, "min samples", h("input", { name: "min_samples", type: "number", min: "0", step: "1", value: minSamples })),
      h("button", { type: "button", class: "secondary", onclick: () => row.remove() }, "remove"));
    gates.append(row);
  }
  gateRow("error_rate", 0.02, 50); gateRow("p95_latency_ratio", 1.5, 50); gateRow("shadow_agreement", 0.9, 20); gateRow("failed_device_pct", 20, 1);
  const err = h("p", { class: "error", id: "f-error", role: "alert" });
  const form = h("form", { id: "rollout-form", class: "card", onsubmit: submit },
    h("div", { class: "line" },
      h("label", {}, "model", modelSel), h("label", {}, "version", versionSel), h("label", {}, "baseline", baselineSel),
      h("label", {}, "targeting tags (key=value, comma separated)", h("input", { name: "tags", id: "f-tags", size: 36, placeholder: "region=eu, tier=beta" })),
      h("label", {}, "on gate failure", h("select", { name: "on_gate_failure", id: "f-on-fail" }, h("option", { value: "abort" }, "abort and roll back"), h("option", { value: "pause" }, "pause"))),
      h("label", {}, "device timeout (s)", h("input", { name: "timeout", id: "f-timeout", type: "number", min: "1", step: "any", value: 600 }))),
    h("fieldset", {}, h("legend", {}, "Stages (percent of targeted devices, increasing)"), stages,
      h("button", { type: "button", class: "secondary", id: "add-stage", onclick: () => stageRow(100, 0) }, "add stage")),
    h("fieldset", {}, h("legend", {}, "Gates (checked at every stage; new version against baseline)"), gates,
      h("button", { type: "button", class: "secondary", id: "add-gate", onclick: () => gateRow("fallback_rate", 0.3, 50) }, "add gate")),
    h("div", { class: "line" }, h("button", { type: "submit", id: "create-rollout" }, "Create rollout"), err));
  main().replaceChildren(h("div", { id: "new-rollout-page" }, h("div", { class: "head" }, h("h1", {}, "New rollout")), form));

  async function submit(ev) {
    ev.preventDefault();
    err.textContent = "";
    const selector = {};
    for (const part of form.querySelector("#f-tags").value.split(",").map((x) => x.trim()).filter(Boolean)) {
      const i = part.indexOf("=");
      if (i <= 0) { err.textContent = `targeting tag "${part}" must be key=value`; return; }
      selector[part.slice(0, i).trim()] = part.slice(i + 1).trim();
    }
    const gateList = [...gates.querySelectorAll(".gate-row")].map((r) => ({
      metric: r.querySelector("[name=metric]").value,
      threshold: parseFloat(r.querySelector("[name=threshold]").value),
      min_samples: parseInt(r.querySelector("[name=min_samples]").value || "1", 10),
    }));
    const body = {
      model: modelSel.value,
      version: parseInt(versionSel.value, 10),
      selector,
      stages: [...stages.querySelectorAll(".stage-row")].map((r) => ({
        percent: parseFloat(r.querySelector("[name=percent]").value),
        min_soak_s: parseFloat(r.querySelector("[name=soak]").value),
        gates: gateList,
      })),
      on_gate_failure: form.querySelector("#f-on-fail").value,
      device_timeout_s: parseFloat(form.querySelector("#f-timeout").value),
    };
    if (baselineSel.value) body.baseline_version = parseInt(baselineSel.value, 10);
    try {
      const r = await api("POST", `${ACT}/rollouts`, body);
      toast(`Rollout ${r.rollout_id} created`);
      location.hash = "#/rollouts/" + r.rollout_id;
    } catch (e) {
      if (!(e instanceof Unauthorized)) err.textContent = e.message;
    }
  }
}

function stageBar(st) {
  const total = Math.max(st.cohort_target, st.assigned, 1);
  const parts = STATES.filter((k) => st.states[k]).map((k) =>
    h("span", { class: k, style: `width:${(100 * st.states[k]) / total}%`, title: `${st.states[k]} ${k}` }));
  return h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": total,
    "aria-valuenow": st.states.succeeded || 0 }, parts);
}

function chart(title, key, data, format, opts) {
  const W = 420, H = 190, L = 46, R = 10, T = 12, B = 24;
  const pts = (list) => list.filter((p) => p[key] !== null && p[key] !== undefined).map((p) => [p.t, p[key]]);
  const a = pts(data.new), b = pts(data.baseline);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  const all = a.concat(b);
  const limit = opts && opts.limit;
  if (!all.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no telemetry yet"));
    return h("div", { class: "card chart", "data-chart": key }, h("h3", {}, title), svg);
  }
  const ts = all.map((p) => p[0]).concat([data.started_at]);
  let t0 = Math.min(...ts), t1 = Math.max(...ts) + data.window_s;
  if (t1 - t0 < 1) t1 = t0 + 1;
  let y0 = opts && opts.zero === false ? Math.min(...all.map((p) => p[1])) : 0;
  let y1 = Math.max(...all.map((p) => p[1]), limit || 0);
  if (opts && opts.max !== undefined) y1 = Math.max(y1, opts.max);
  if (y1 - y0 < 1e-9) { y1 = y0 + 1; }
  const pad = (y1 - y0) * 0.08; y1 += pad; if (opts && opts.zero === false) y0 = Math.max(0, y0 - pad);
  const X = (t) => L + ((t + data.window_s / 2 - t0) / (t1 - t0)) * (W - L - R);
  const Y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  svg.append(s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  for (let i = 0; i <= 3; i++) {
    const v = y0 + ((y1 - y0) * i) / 3;
    svg.append(s("line", { x1: L, y1: Y(v), x2: W - R, y2: Y(v), class: "axis" }));
    svg.append(s("text", { x: L - 4, y: Y(v) + 3, "text-anchor": "end" }, format(v)));
  }
  svg.append(s("text", { x: L, y: H - 8 }, fmt.time(t0)));
  svg.append(s("text", { x: W - R, y: H - 8, "text-anchor": "end" }, fmt.time(t1)));
  const xs = X(data.started_at - data.window_s / 2);
  if (xs >= L && xs <= W - R) {
    svg.append(s("line", { x1: xs, y1: T, x2: xs, y2: H - B, class: "start" }));
    svg.append(s("text", { x: xs + 3, y: T + 8 }, "rollout"));
  }
  if (limit !== undefined && limit !== null) svg.append(s("line", { x1: L, y1: Y(limit), x2: W - R, y2: Y(limit), class: "limit" }));
  const path = (p) => p.map((q, i) => (i ? "L" : "M") + X(q[0]).toFixed(1) + "," + Y(q[1]).toFixed(1)).join(" ");
  if (b.length) { svg.append(s("path", { d: path(b), class: "base" })); b.forEach((q) => svg.append(s("circle", { cx: X(q[0]), cy: Y(q[1]), r: 2.5, class: "dot-base" }))); }
  if (a.length) { svg.append(s("path", { d: path(a), class: "new" })); a.forEach((q) => svg.append(s("circle", { cx: X(q[0]), cy: Y(q[1]), r: 3, class: "dot-new" }))); }
  const lastNew = a.length ? format(a[a.length - 1][1]) : "–";
  const lastBase = b.length ? format(b[b.length - 1][1]) : "–";
  return h("div", { class: "card chart", "data-chart": key, "data-points": a.length + b.length },
    h("h3", {}, title),
    svg,
    h("div", { class: "legend" },
      h("span", {}, h("i", { style: "background:var(--accent)" }), `v${data.version} (new): ${lastNew}`),
      data.baseline_version !== null ? h("span", {}, h("i", { style: "background:var(--base)" }), `v${data.baseline_version} (baseline): ${lastBase}`) : null,
      limit !== undefined && limit !== null ? h("span", {}, h("i", { style: "background:var(--bad)" }), `gate ${format(limit)}`) : null));
}

async function rolloutPage(id) {
  const root = h("div", { id: "rollout-page", "data-rollout": id });
  main().replaceChildren(root);
  const view = { watch: ["rollouts", "events", "telemetry", "fleet"], refresh: draw };
  mount(view);
  async function act(cmd) {
    if (cmd === "abort" && !window.confirm(`Abort rollout ${id}? Every device it touched goes back to its baseline version.`)) return;
    try {
      const r = await api("POST", `${ACT}/rollouts/${encodeURIComponent(id)}/${cmd}`);
      toast(`${cmd}: rollout is ${r.status || (r.rollout && r.rollout.status) || "updated"}`);
      await draw();
    } catch (e) { if (!(e instanceof Unauthorized)) toast(e.message, true); }
  }
  async function draw() {
    const [d, series] = await Promise.all([
      api("GET", `${READ}/rollouts/${encodeURIComponent(id)}`),
      api("GET", `${READ}/rollouts/${encodeURIComponent(id)}/series`),
    ]);
    if (current !== view) return;
    const r = d.rollout;
    const done = r.status === "completed" || r.status === "aborted";
    const buttons = h("div", { class: "actions" },
      h("button", { id: "act-pause", class: "secondary", disabled: r.status !== "running", onclick: () => act("pause") }, "Pause"), " ",
      h("button", { id: "act-resume", class: "secondary", disabled: r.status !== "paused", onclick: () => act("resume") }, "Resume"), " ",
      h("button", { id: "act-promote", class: "secondary", disabled: done, onclick: () => act("promote") }, "Promote"), " ",
      h("button", { id: "act-abort", class: "danger", disabled: done, onclick: () => act("abort") }, "Abort"));
    const stages = d.stages.map((st) => h("div", { class: "stage", "data-stage": st.index, "data-phase": st.phase },
      h("div", {}, h("div", { class: "name" }, `Stage ${st.index + 1} · ${st.percent}%`),
        h("div", { class: "muted" }, `soak ${st.min_soak_s}s` + (st.soak_left_s !== null && st.phase === "running" ? ` · ${Math.ceil(st.soak_left_s)}s left` : ""))),
      stageBar(st),
      h("div", {}, badge(st.phase === "done" ? "done" : st.phase, st.phase === "done" ? "completed" : st.phase), " ",
        h("span", { class: "muted stage-count" }, `${st.states.succeeded}/${st.cohort_target} healthy` +
          (st.states.failed ? `, ${st.states.failed} failed` : "") + (st.states.rolled_back ? `, ${st.states.rolled_back} rolled back` : "") +
          (st.states.installing + st.states.assigned ? `, ${st.states.installing + st.states.assigned} in flight` : "")))));
    const gateDefs = (d.stages[r.stage_index] || { gates: [] }).gates;
    const gateRows = (d.gates.length ? d.gates : gateDefs.map((g) => ({ ...g, value: null, passed: null, samples: 0, baseline: null })))
      .map((g) => h("tr", { "data-gate": g.metric },
        h("td", { class: "mono" }, g.metric),
        h("td", { class: "num" }, gateValue(g.metric, g.value)),
        h("td", { class: "num interval" }, gateInterval(g)),
        h("td", { class: "num" }, (HIGHER_IS_BETTER.has(g.metric) ? "≥ " : "≤ ") + gateValue(g.metric, g.threshold)),
        h("td", { class: "num" }, g.metric === "p95_latency_ratio" ? fmt.ms(g.baseline) : g.metric === "tokens_per_s_ratio" ? (g.baseline == null ? "-" : g.baseline.toFixed(1) + " tok/s") : gateValue(g.metric, g.baseline)),
        h("td", { class: "num" }, g.samples),
        h("td", {}, g.passed === true ? badge("pass") : g.passed === false ? badge("fail") : badge("waiting")),
        h("td", { class: "why muted" }, g.reason || "")));
    const limits = {};
    for (const g of gateDefs) limits[g.metric] = g.threshold;
    const devices = d.assignments.map((a) => h("tr", { "data-device": a.device_id },
      h("td", { class: "mono" }, a.device_id), h("td", { class: "num" }, a.stage_index + 1), h("td", {}, badge(a.state)),
      h("td", { class: "mono" }, a.variant), h("td", {}, a.previous_version === null ? "–" : "v" + a.previous_version),
      h("td", {}, a.reason || ""), h("td", {}, fmt.time(a.updated_at))));
    const events = d.events.map((e) => h("tr", { "data-kind": e.kind },
      h("td", {}, fmt.time(e.at)), h("td", {}, e.kind), h("td", { class: "mono" }, e.actor),
      h("td", { class: "num" }, e.stage_index === null ? "" : e.stage_index + 1), h("td", { class: "mono" }, e.device_id || ""),
      h("td", { class: "mono" }, Object.keys(e.detail).length ? JSON.stringify(e.detail).slice(0, 140) : "")));
    fill(root, 
      h("div", { class: "head" },
        h("h1", {}, `Rollout ${r.model} v${r.version}`),
        badge(r.status), h("span", { class: "mono muted" }, r.rollout_id),
        h("span", { class: "muted" }, r.baseline_version === null ? "no baseline" : `baseline v${r.baseline_version}`),
        h("span", { class: "muted" }, `${d.targeted_devices} targeted`),
        Object.entries(r.selector).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`)),
        h("span", { class: "spacer" }), buttons),
      r.paused_reason ? h("p", { class: r.status === "aborted" ? "error" : "muted", id: "reason" }, r.paused_reason) : null,
      h("div", { class: "card", id: "stages" }, h("h3", {}, "Stages"), stages,
        h("div", { class: "legend" }, STATES.map((k) => h("span", {}, h("i", { class: k, style: `background:var(--${{ succeeded: "ok", failed: "bad", rolled_back: "gray", installing: "flight", assigned: "flight" }[k]})` }), k)))),
      h("div", { class: "charts" },
        chart("p95 local latency", "p95_latency_ms", series, (v) => v.toFixed(v < 10 ? 2 : 1) + " ms", { zero: true }),
        chart("fallback rate", "fallback_rate", series, (v) => (100 * v).toFixed(0) + "%", { limit: limits.fallback_rate }),
        chart("shadow agreement", "agreement", series, (v) => (100 * v).toFixed(0) + "%", { zero: false, max: 1, limit: limits.shadow_agreement })),
      h("div", { class: "row" },
        h("div", { class: "card" }, h("h3", {}, `Gates, stage ${r.stage_index + 1}`),
          h("table", { id: "gates" }, h("thead", {}, h("tr", {}, ["metric", "value", "interval", "threshold", "baseline", "samples", "", "why"].map((c, i) => h("th", { class: i && i < 6 ? "num" : "" }, c)))),
            h("tbody", {}, gateRows.length ? gateRows : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No gates on this stage."))))),
        h("div", { class: "card" }, h("h3", {}, "Devices"), h("div", { class: "scroll" },
          h("table", { id: "assignments" }, h("thead", {}, h("tr", {}, ["device", "stage", "state", "variant", "from", "reason", "updated"].map((c) => h("th", {}, c)))),
            h("tbody", {}, devices.length ? devices : h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No device assigned yet."))))))),
      h("div", { class: "card" }, h("h3", {}, "Event history"), h("div", { class: "scroll" },
        h("table", { id: "events" }, h("thead", {}, h("tr", {}, ["time", "event", "by", "stage", "device", "detail"].map((c) => h("th", {}, c)))),
          h("tbody", {}, events)))));
  }
  await draw();
}

// --- router --------------------------------------------------------------------------------
async function route() {
  const raw = location.hash.replace(/^#/, "") || "/fleet";
  const [path, query] = raw.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === parts[0]));
  try {
    if (parts[0] === "models" && parts[1]) await modelPage(parts[1]);
    else if (parts[0] === "models") await modelsPage();
    else if (parts[0] === "rollouts" && parts[1] === "new") await newRolloutPage(params);
    else if (parts[0] === "rollouts" && parts[1]) await rolloutPage(parts[1]);
    else if (parts[0] === "rollouts") await rolloutsPage();
    else await fleetPage(params);
    hideLogin();
    stream.open();
  } catch (e) {
    if (e instanceof Unauthorized) return;
    main().replaceChildren(h("div", { class: "card" }, h("h2", {}, "Something went wrong"), h("p", { class: "error" }, e.message)));
  }
}

document.getElementById("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  auth.token = document.getElementById("token").value.trim();
  document.getElementById("token").value = "";
  hideLogin();
  route();
});
document.getElementById("logout").addEventListener("click", () => { auth.token = ""; stream.close(); showLogin(""); });
window.addEventListener("hashchange", route);
route();
