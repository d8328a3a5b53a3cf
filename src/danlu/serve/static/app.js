// danlu serve's page: plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);

// fetch + JSON; a 4xx/5xx answer becomes an Error carrying the server's {"error": "..."} message
async function call(url, options) {
  const response = await fetch(url, options);
  let body;
  try {
    body = await response.json();
  } catch (e) {
    body = { error: `HTTP ${response.status} ${response.statusText}` };
  }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function upload(url, fields) {
  const form = new FormData();
  for (const [name, file] of fields) form.append(name, file, file.name);
  return call(url, { method: "POST", body: form });
}

function ms(x) {
  return x < 10 ? x.toFixed(2) : x.toFixed(1);
}

// a drop zone: click to choose, or drop a file; shows the image and calls onFile(file)
function dropZone(name, onFile) {
  const zone = $(`drop-${name}`), input = $(`file-${name}`), preview = $(`preview-${name}`);
  const take = (file) => {
    if (!file) return;
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.onload = () => {  // small images (digits) are shown as crisp pixels, photos smoothly
      preview.style.imageRendering = preview.naturalWidth < zone.clientWidth / 2 ? "pixelated" : "auto";
    };
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    zone.classList.add("filled");
    onFile(file);
  };
  input.addEventListener("change", () => take(input.files[0]));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    take(e.dataTransfer.files[0]);
  });
}

// labelled bars: rows of [label, value in 0..1, text]
function bars(list, rows) {
  list.replaceChildren(...rows.map(([label, value, text]) => {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.max(0, Math.min(1, value)) * 100}%`;
    track.append(fill);
    const num = document.createElement("span");
    num.className = "num";
    num.textContent = text;
    li.append(name, track, num);
    return li;
  }));
}

async function classify(file) {
  $("label").textContent = "…";
  $("error-classify").textContent = "";
  $("time").textContent = "";
  const started = performance.now();
  try {
    const r = await upload("/v1/classify?top=5", [["file", file]]);
    const top = r.images[0].top;
    $("label").textContent = top[0].class;
    bars($("bars"), top.map((t) => [t.class, t.prob, `${(100 * t.prob).toFixed(1)}%`]));
    const t = r.timings_ms;
    $("time").textContent = `recognised in ${ms(t.model)} ms (model), ${ms(t.total)} ms on the server ` +
      `(decode ${ms(t.decode)}, queue ${ms(t.queue)}), ${ms(performance.now() - started)} ms round trip`;
  } catch (e) {
    $("label").textContent = "";
    $("bars").replaceChildren();
    $("error-classify").textContent = e.message;
  }
}

const pair = { a: null, b: null };

async function verify() {
  if (!pair.a || !pair.b) {
    $("verdict").textContent = pair.a || pair.b ? "… and the other face" : "";
    return;
  }
  $("error-verify").textContent = "";
  $("verdict").textContent = "…";
  try {
    const r = await upload("/v1/faces/verify", [["a", pair.a], ["b", pair.b]]);
    $("verdict").textContent = r.same ? "same person" : "different people";
    $("similarity").textContent = `similarity ${r.similarity.toFixed(3)} (threshold ${r.threshold.toFixed(3)}), ` +
      `${ms(r.timings_ms.total)} ms`;
  } catch (e) {
    $("verdict").textContent = "";
    $("error-verify").textContent = e.message;
  }
}

async function identify(file) {
  $("error-identify").textContent = "";
  $("identity").textContent = "…";
  try {
    const r = await upload("/v1/faces/identify?top=5", [["file", file]]);
    const found = r.images[0];
    $("identity").textContent = found.name;
    bars($("matches"), found.matches.map((m) => [m.name, m.similarity, m.similarity.toFixed(3)]));
    $("identify-time").textContent = `threshold ${r.threshold.toFixed(3)}, ${ms(r.timings_ms.total)} ms`;
  } catch (e) {
    $("identity").textContent = "";
    $("matches").replaceChildren();
    $("error-identify").textContent = e.message;
  }
}

function show(view) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.view === view);
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${view}`;
}

async function start() {
  dropZone("classify", classify);
  try {
    const m = await call("/v1/model");
    const acc = m.recipe.test_accuracy == null ? "" : `, test accuracy ${(100 * m.recipe.test_accuracy).toFixed(1)}%`;
    const what = m.classes.length ? `${m.classes.length} classes` : "face embeddings";
    $("model").textContent = `${m.model}: ${what}, ${m.input_shape.join("×")} input, ` +
      `${m.device}, ${m.precision}${acc}`;
    if (m.face) {
      $("tabs").hidden = false;
      if (!m.classes.length) {  // an imported face network: nothing to classify into, faces only
        document.querySelector('#tabs button[data-view="classify"]').hidden = true;
        show("faces");
      }
      for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.view));
      dropZone("a", (f) => { pair.a = f; verify(); });
      dropZone("b", (f) => { pair.b = f; verify(); });
      dropZone("identify", identify);
      if (!m.faces.gallery) $("identify-time").textContent = "no gallery: start danlu serve with --gallery G.sqlite";
    }
  } catch (e) {
    $("model").textContent = `cannot read the model: ${e.message}`;
  }
}

start();
