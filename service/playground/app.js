// The playground: plain JavaScript against the service's own v1 API (same origin, nothing from elsewhere).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, info: null, z: [], ends: [null, null], nextEnd: 0, samples: [], drawing: null };
const CELL = 28;

// ---- the API -------------------------------------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, body) {
  const headers = { Accept: "application/json" };
  const key = $("key").value.trim();
  if (key) headers["X-API-Key"] = key;
  const init = { method: body === undefined ? "GET" : "POST", headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = data && data.error;
    const where = error && error.field ? ` (${error.field})` : "";
    const text = error && error.message ? error.message : response.statusText;
    const message = `${response.status}${where}: ${text}`;
    showError(message);
    throw new Error(message);
  }
  showError("");
  return data;
}

const modelPath = () => `/v1/models/${encodeURIComponent(state.info.name)}/versions/${encodeURIComponent(state.info.version)}`;
const run = (operation, body) => api(`${modelPath()}/${operation}`, body);
const quietly = (promise) => promise.catch(() => undefined); // the error is on the page already

// ---- pixels ------------------------------------------------------------------------------------------------

function flat(image) {
  return image.flat(Infinity);
}

function paint(canvas, images, cols, pad = 0) {
  // images: uint8 pixel arrays of 28 x 28; drawn at 28 px per cell, then scaled by the canvas's CSS size
  const rows = Math.ceil(images.length / cols);
  canvas.width = cols * CELL + (cols - 1) * pad;
  canvas.height = rows * CELL + (rows - 1) * pad;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#808080";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  images.forEach((pixels, i) => {
    const cell = ctx.createImageData(CELL, CELL);
    pixels.forEach((v, p) => {
      cell.data.set([v, v, v, 255], p * 4);
    });
    ctx.putImageData(cell, (i % cols) * (CELL + pad), Math.floor(i / cols) * (CELL + pad));
  });
  canvas.dataset.drawn = "yes";
}

function sized(canvas, scale) {
  canvas.style.width = `${canvas.width * scale}px`; // the height follows (CSS height: auto), capped by the panel
}

// ---- the model: metadata, metrics, anomaly figures ---------------------------------------------------------

function table(element, rows) {
  element.replaceChildren(
    ...rows.map((cells, i) => {
      const tr = document.createElement("tr");
      cells.forEach((cell) => {
        const td = document.createElement(i === 0 && rows.header ? "th" : "td");
        td.textContent = cell;
        tr.append(td);
      });
      return tr;
    }),
  );
}

const fmt = (v) => (typeof v === "number" && !Number.isInteger(v) ? v.toFixed(4) : String(v));

function showModel(info) {
  const rows = [
    ["name", info.name], ["version", `${info.version} (of ${info.versions.join(", ")})`],
    ["architecture", info.architecture], ["dataset", info.dataset], ["likelihood", info.likelihood],
    ["latent_dim", info.latent_dim], ["providers", info.providers.join(", ")],
    ...Object.entries(info.metrics).map(([k, v]) => [k, fmt(v)]),
  ];
  table($("metadata"), rows);
  if (!info.anomaly) {
    table($("anomaly"), [["this version has no background model: score answers without an anomaly score"]]);
    return;
  }
  const a = info.anomaly;
  const figures = [["set", "-elbo", "-iwae", "anomaly"]];
  figures.header = true;
  const auc = (v) => v.toFixed(3);
  for (const [set, v] of Object.entries(a.auroc)) figures.push([set, auc(v.elbo), auc(v.iwae), auc(v.anomaly)]);
  figures.push(["threshold", `${a.threshold.toFixed(2)} nats`, `${(a.false_positive_rate * 100).toFixed(0)}% of validation images above`, ""]);
  table($("anomaly"), figures);
}

// ---- samples -------------------------------------------------------------------------------------------------

async function sample() {
  const body = { n: 16, seed: Number($("seed").value), temperature: Number($("temperature").value), dtype: "uint8" };
  $("curl").textContent =
    `curl -s ${location.origin}${modelPath()}/sample -H 'Content-Type: application/json' ` +
    `-d '${JSON.stringify({ n: body.n, seed: body.seed, temperature: body.temperature })}' -H 'Accept: image/png' -o grid.png`;
  const result = await run("sample", body);
  state.samples = result.z;
  paint($("grid"), result.samples.map(flat), 4, 0);
  sized($("grid"), 2);
}

function pickSample(event) {
  const canvas = $("grid");
  const scale = canvas.getBoundingClientRect().width / canvas.width;
  const col = Math.floor(event.offsetX / scale / CELL);
  const row = Math.floor(event.offsetY / scale / CELL);
  const z = state.samples[row * 4 + col];
  if (!z) return;
  setSliders(z);
  setEnd(state.nextEnd, { z, label: `sample ${row * 4 + col + 1}` });
}

// ---- sliders -------------------------------------------------------------------------------------------------

function buildSliders(info) {
  const variance = info.unit_variance || [];
  const order = [...Array(info.latent_dim).keys()].sort((a, b) => (variance[b] ?? 0) - (variance[a] ?? 0));
  state.z = new Array(info.latent_dim).fill(0);
  const box = $("sliders");
  box.replaceChildren();
  for (const unit of order) {
    const label = document.createElement("label");
    const active = variance[unit] === undefined || variance[unit] > 0.01;
    label.textContent = `z${unit}` + (variance[unit] === undefined ? "" : ` ${variance[unit].toFixed(2)}`);
    label.className = active ? "" : "inactive";
    const slider = document.createElement("input");
    Object.assign(slider, { type: "range", min: -3, max: 3, step: 0.05, value: 0 });
    slider.dataset.unit = unit;
    const value = document.createElement("output");
    value.textContent = "0.00";
    slider.addEventListener("input", () => {
      state.z[unit] = Number(slider.value);
      value.textContent = state.z[unit].toFixed(2);
      decodeSoon();
    });
    label.htmlFor = slider.id = `unit-${unit}`;
    box.append(label, slider, value);
  }
}

function setSliders(z) {
  state.z = [...z];
  for (const slider of $("sliders").querySelectorAll("input")) {
    const v = state.z[Number(slider.dataset.unit)];
    slider.value = v;
    slider.nextElementSibling.textContent = v.toFixed(2);
  }
  decodeSoon();
}

let decoding = false;
let pending = false;

async function decodeSoon() {
  // one request in flight; the latest slider position is decoded as soon as it returns
  if (decoding) {
    pending = true;
    return;
  }
  decoding = true;
  try {
    const result = await run("decode", { z: [state.z.map((v) => Math.max(-1000, Math.min(1000, v)))], dtype: "uint8" });
    paint($("decoded"), [flat(result.samples[0])], 1);
    sized($("decoded"), 6);
  } catch {
    // shown on the page by api()
  } finally {
    decoding = false;
    if (pending) {
      pending = false;
      decodeSoon();
    }
  }
}

// ---- drawing, uploading, scoring ----------------------------------------------------------------------------

function padPixels() {
  // the 224 x 224 pad down to 28 x 28, values in [0, 1] (white ink on black, like Fashion-MNIST)
  const small = document.createElement("canvas");
  small.width = small.height = CELL;
  const ctx = small.getContext("2d");
  ctx.drawImage($("pad"), 0, 0, CELL, CELL);
  const data = ctx.getImageData(0, 0, CELL, CELL).data;
  const out = [];
  for (let p = 0; p < CELL * CELL; p++) out.push(Math.round(data[p * 4]) / 255);
  return out;
}

function clearPad() {
  const ctx = $("pad").getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, 224, 224);
}

function setupPad() {
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  let down = false;
  const at = (e) => {
    const r = pad.getBoundingClientRect();
    return [((e.clientX - r.left) * pad.width) / r.width, ((e.clientY - r.top) * pad.height) / r.height];
  };
  pad.addEventListener("pointerdown", (e) => {
    down = true;
    pad.setPointerCapture(e.pointerId);
    const [x, y] = at(e);
    ctx.beginPath();
    ctx.moveTo(x, y);
  });
  pad.addEventListener("pointermove", (e) => {
    if (!down) return;
    const [x, y] = at(e);
    Object.assign(ctx, { strokeStyle: "#fff", lineWidth: 18, lineCap: "round", lineJoin: "round" });
    ctx.lineTo(x, y);
    ctx.stroke();
  });
  pad.addEventListener("pointerup", () => {
    down = false;
  });
  clearPad();
}

function upload(file) {
  const image = new Image();
  image.onload = () => {
    const ctx = $("pad").getContext("2d");
    clearPad();
    ctx.filter = `grayscale(1)${$("invert").checked ? " invert(1)" : ""}`;
    ctx.drawImage(image, 0, 0, 224, 224);
    ctx.filter = "none";
    URL.revokeObjectURL(image.src);
  };
  image.onerror = () => showError(`could not read ${file.name} as an image`);
  image.src = URL.createObjectURL(file);
}

async function score() {
  const inputs = [padPixels()];
  const [recon, scored] = await Promise.all([
    run("reconstruct", { inputs, dtype: "uint8" }),
    run("score", { inputs, k: 100, seed: 0 }),
  ]);
  state.drawing = recon.z[0];
  paint($("reconstruction"), [flat(recon.reconstructions[0])], 1);
  sized($("reconstruction"), 8);
  const s = scored.scores[0];
  const rows = [
    ["elbo", `${s.elbo.toFixed(2)} nats`], ["iwae (k=100)", `${s.iwae.toFixed(2)} nats`],
    ["kl", `${s.kl.toFixed(2)} nats`], ["recon_error", s.recon_error.toFixed(4)],
  ];
  if (s.anomaly) {
    rows.push(["anomaly score", `${s.anomaly.score.toFixed(2)} (threshold ${s.anomaly.threshold.toFixed(2)})`]);
    rows.push(["flagged", s.anomaly.is_anomaly ? "yes: unlike the training data" : "no: like the training data"]);
  } else {
    rows.push(["anomaly", "none: this version has no background model"]);
  }
  table($("score-table"), rows);
  const flagged = $("score-table").querySelector("tr:last-child td:last-child");
  if (s.anomaly) flagged.className = `flag ${s.anomaly.is_anomaly ? "yes" : "no"}`;
}

// ---- interpolation -----------------------------------------------------------------------------------------

function setEnd(which, end) {
  state.ends[which] = end;
  state.nextEnd = 1 - which;
  const name = (e) => (e ? e.label : "none");
  $("ends").textContent = `A: ${name(state.ends[0])}, B: ${name(state.ends[1])}`;
}

async function useDrawing(which) {
  const result = await run("encode", { inputs: [padPixels()] });
  setEnd(which, { z: result.mu[0], label: "my image" });
}

async function interpolate() {
  const [a, b] = state.ends;
  if (!a || !b) {
    showError("pick two endpoints first: click two samples, or use your image");
    return;
  }
  const body = { z: [a.z, b.z], steps: Number($("steps").value), method: $("method").value, dtype: "uint8" };
  const result = await run("interpolate", body);
  paint($("strip"), result.images.map(flat), result.images.length, 2);
  sized($("strip"), 3);
}

// ---- start -------------------------------------------------------------------------------------------------

async function selectModel(name) {
  state.info = await api(`/v1/models/${encodeURIComponent(name)}`);
  showModel(state.info);
  buildSliders(state.info);
  setEnd(0, null);
  setEnd(1, null);
  state.nextEnd = 0;
  await Promise.all([sample(), decodeSoon()]);
}

async function start() {
  const listing = await api("/v1/models");
  const select = $("model");
  select.replaceChildren(...listing.models.map((m) => new Option(`${m.name} (v${m.version})`, m.name)));
  if (listing.models.length) await selectModel(listing.models[0].name);
}

function wire() {
  $("settings").addEventListener("submit", (e) => e.preventDefault());
  $("key").value = sessionStorage.getItem("vae-api-key") || "";
  $("key").addEventListener("change", () => {
    sessionStorage.setItem("vae-api-key", $("key").value.trim());
    quietly(state.info ? selectModel(state.info.name) : start());
  });
  $("model").addEventListener("change", () => quietly(selectModel($("model").value)));
  $("seed").addEventListener("change", () => quietly(sample()));
  $("new-seed").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * 2 ** 31);
    quietly(sample());
  });
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  });
  $("temperature").addEventListener("change", () => quietly(sample()));
  $("grid").addEventListener("click", pickSample);
  $("zero").addEventListener("click", () => setSliders(new Array(state.z.length).fill(0)));
  $("clear").addEventListener("click", clearPad);
  $("upload").addEventListener("change", (e) => e.target.files[0] && upload(e.target.files[0]));
  $("score").addEventListener("click", () => quietly(score()));
  $("drawing-a").addEventListener("click", () => quietly(useDrawing(0)));
  $("drawing-b").addEventListener("click", () => quietly(useDrawing(1)));
  $("interpolate").addEventListener("click", () => quietly(interpolate()));
  setupPad();
  quietly(start());
}

wire();
