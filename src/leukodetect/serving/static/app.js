// The lab service's page: plain JavaScript, no framework, no build step, nothing from a CDN.
// Each dropped file is sent in its own request, so results appear one by one and a bad file
// only fails its own card; the server queues requests for its single inference thread.
"use strict";

const state = { results: [], model: null };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function pct(p) { return (100 * p).toFixed(1) + "%"; }
function png(b64) { return "data:image/png;base64," + b64; }

async function loadModel() {
  try {
    const response = await fetch("/v1/model");
    const model = await response.json();
    state.model = model;
    $("intended-use").textContent = model.intended_use;
    $("model-info").textContent =
      `Model: ${model.arch}, ${model.image_size}x${model.image_size} input, threshold ${model.threshold.toFixed(2)}, ` +
      `temperature ${model.temperature.toFixed(2)}, classes ${model.class_names.join(" / ")} (leukodetect ${model.leukodetect_version}).`;
    if (!model.smear_analysis) {
      $("mode-smear").disabled = true;
      $("smear-note").textContent = "(no detector loaded: start serve with --detector-checkpoint from train-detector)";
    }
    if (!model.gradcam) { $("gradcam").checked = false; $("gradcam").disabled = true; }
  } catch (error) {
    $("model-info").textContent = "Could not read the model information: " + error;
  }
}

function mode() { return document.querySelector("input[name=mode]:checked").value; }

async function send(file, card) {
  const smear = mode() === "smear";
  const body = new FormData();
  body.append(smear ? "file" : "files", file, file.name);
  const url = smear ? "/v1/analyze" : `/v1/classify?gradcam=${$("gradcam").checked}`;
  let response, data;
  try {
    response = await fetch(url, { method: "POST", body });
    data = await response.json();
  } catch (error) {
    return showError(card, file.name, `The service did not answer (${error}).`);
  }
  if (!response.ok) return showError(card, file.name, data.error || `HTTP ${response.status}`);
  const result = smear ? { kind: "smear", ...data } : { kind: "cell", ...data.results[0] };
  state.results.push(result);
  (smear ? showSmear : showCell)(card, result);
  updateDownload();
}

function verdict(label, prob) {
  const positive = state.model ? state.model.class_names[1] : "blast";
  return el("p", { class: "verdict " + (label === positive ? "blast" : "normal") },
    `${label}`, prob === undefined || prob === null ? "" : ` (P(blast) ${pct(prob)})`);
}

function showCell(card, r) {
  card.replaceChildren(el("h2", {}, r.filename), verdict(r.label, r.prob_blast),
    el("p", { class: "muted" }, `threshold ${r.threshold.toFixed(2)}`));
  if (r.reason) card.append(el("p", { class: "reason" }, `review: ${r.reason} (guard score ${r.ood_score.toFixed(0)})`));
  if (r.gradcam_png) {
    card.append(el("img", { class: "overlay", src: png(r.gradcam_png), alt: `Grad-CAM overlay of ${r.filename}` }),
      el("p", { class: "muted" }, "Grad-CAM: red = regions that raised the blast score."));
  }
  for (const note of r.notes || []) card.append(el("p", { class: "muted" }, note));
  card.dataset.status = "done";
}

function showSmear(card, r) {
  // Keys as the detection module returns them: counts (or n_blast / n_review / n_normal), cells with
  // label or call, and images as base64 PNGs: overlay_png, gallery_png, cells[].crop_png.
  card.classList.add("smear");
  card.replaceChildren(el("h2", {}, r.filename), verdict(r.verdict ?? "analysed"));
  // "review" carries a reason when some cells are unlike the model's training images; cannot_assess always does.
  if (r.reason) card.append(el("p", { class: "reason" }, `${r.verdict === "review" ? "review" : "cannot assess"}: ${r.reason}`));
  const counts = r.counts ?? (r.n_cells !== undefined ? { cells: r.n_cells, blast: r.n_blast, review: r.n_review, normal: r.n_normal } : null);
  if (counts) {
    const table = el("table", { class: "counts" });
    for (const [name, count] of Object.entries(counts)) table.append(el("tr", {}, el("th", {}, name), el("td", {}, String(count))));
    card.append(table);
  }
  if (r.overlay_png) card.append(el("img", { class: "overlay", src: png(r.overlay_png), alt: `Detections in ${r.filename}` }));
  if (r.gallery_png) card.append(el("img", { class: "overlay gallery-sheet", src: png(r.gallery_png), alt: `Cells found in ${r.filename}` }));
  const cells = (r.cells || []).filter((c) => c.crop_png);
  if (cells.length) {
    const gallery = el("div", { class: "gallery" });
    for (const c of cells) {
      const label = (c.label ?? c.call ?? "") + (c.unlike_training ? " (unlike the training images)" : "");
      gallery.append(el("figure", {}, el("img", { src: png(c.crop_png), alt: label || "cell" }),
        el("figcaption", {}, `${label} ${c.prob_blast != null ? pct(c.prob_blast) : ""}`)));
    }
    card.append(gallery);
  }
  card.dataset.status = "done";
}

function showError(card, name, message) {
  card.replaceChildren(el("h2", {}, name), el("p", { class: "error" }, message));
  card.dataset.status = "error";
  state.results.push({ filename: name, error: message });
  updateDownload();
}

let downloadUrl = null;
function updateDownload() {
  if (downloadUrl) URL.revokeObjectURL(downloadUrl);
  const payload = { model: state.model, results: state.results };
  downloadUrl = URL.createObjectURL(new Blob([JSON.stringify(payload, null, 2)], { type: "application/json" }));
  $("download-json").href = downloadUrl;
  $("download-json").hidden = false;
  $("clear").hidden = false;
}

async function handle(files) {
  // One request at a time from this page: the server runs one image batch at a time anyway.
  const jobs = [...files].map((file) => {
    const card = el("article", { class: "result", "data-status": "pending" }, el("h2", {}, file.name), el("p", { class: "muted" }, "Analysing\u2026"));
    $("results").prepend(card);
    return [file, card];
  });
  for (const [file, card] of jobs) await send(file, card);
}

function setup() {
  const zone = $("drop-zone");
  for (const type of ["dragenter", "dragover"]) zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
  for (const type of ["dragleave", "drop"]) zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.remove("over"); });
  zone.addEventListener("drop", (e) => handle(e.dataTransfer.files));
  $("file-input").addEventListener("change", (e) => { handle(e.target.files); e.target.value = ""; });
  $("clear").addEventListener("click", () => {
    state.results = [];
    $("results").replaceChildren();
    $("download-json").hidden = true;
    $("clear").hidden = true;
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", setup);
