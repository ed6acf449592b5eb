// SpineInpaint reader app: login, blinded case viewer (NiiVue, sagittal), questions, keyboard shortcuts.
// Talks only to the /api endpoints of `spine-ldm study serve`; the token lives in sessionStorage (this tab).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: null, session: null, index: 0, total: 0, caseData: null, values: {}, shownAt: 0,
                nv: null, nvError: null, zoom: 1, landmark: true, busy: false, pendingSave: false };

// ------------------------------------------------------------------ API
async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(opts.json); }
  const r = await fetch(path, { method: opts.method || "GET", headers, body: opts.body, cache: "no-store" });
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
    const err = new Error(detail); err.status = r.status; throw err;
  }
  return opts.raw ? r : r.json();
}

// ------------------------------------------------------------------ viewer (NiiVue)
async function ensureViewer() {
  if (state.nv || state.nvError) return state.nv;
  try {
    const mod = await import("/static/niivue/index.js");
    const nv = new mod.Niivue({
      backColor: [0, 0, 0, 1], crosshairColor: [1, 0.3, 0.3, 0.8], crosshairWidth: 0.4, crosshairWidthUnit: "mm", crosshairGap: 40,
      show3Dcrosshair: false, sagittalNoseLeft: true,
      isOrientCube: false, isColorbar: false, dragAndDropEnabled: false, isRadiologicalConvention: false,
      viewModeHotKey: "F24", clipPlaneHotKey: "F23", cycleClipPlaneHotKey: "F22", loadingText: "loading ...",
      isOrientationTextVisible: true,
    });
    await nv.attachToCanvas($("gl"));
    nv.setSliceType(nv.sliceTypeSagittal);
    nv.onLocationChange = () => updateSliceUi();
    nv.onIntensityChange = (vol) => { $("wl-min").value = round(vol.cal_min); $("wl-max").value = round(vol.cal_max); };
    state.nv = nv;
  } catch (e) {
    state.nvError = e;
    $("viewer-status").textContent = "Viewer unavailable: " + e.message;
  }
  return state.nv;
}

const round = (x) => Math.round(x * 100) / 100;

async function showVolume(url) {
  const nv = await ensureViewer();
  if (!nv) return;
  const buf = await (await api(url, { raw: true })).arrayBuffer();
  while (nv.volumes.length) nv.removeVolume(nv.volumes[0]);
  await nv.loadFromArrayBuffer(buf, "volume.nrrd");
  nv.setSliceType(nv.sliceTypeSagittal);
  resetView();
}

function updateSliceUi() {
  const nv = state.nv;
  if (!nv || !nv.volumes.length) return;
  const vol = nv.volumes[0];
  const dimsRAS = vol.dimsRAS || [3, 1, 1, 1];
  const frac = nv.scene.crosshairPos;
  const nx = dimsRAS[1];
  const s = $("slice");
  s.max = String(Math.max(0, nx - 1));
  s.value = String(Math.round(frac[0] * nx - 0.5));
  const mm = nv.frac2mm(frac);
  const off = Math.abs(mm[0]) < 0.05 ? 0 : mm[0];
  $("slice-mm").textContent = `${off >= 0 ? "+" : ""}${off.toFixed(1)} mm from landmark (R+)`;
  $("viewer-status").textContent = `slice ${Number(s.value) + 1} / ${nx}`;
}

function setLandmarkVisible(on) {
  state.landmark = on;
  $("landmark").checked = on;
  if (state.nv) { state.nv.setCrosshairWidth(on ? 0.4 : 0); state.nv.drawScene(); }
}

function resetView() {
  const nv = state.nv;
  if (!nv || !nv.volumes.length) return;
  const vol = nv.volumes[0];
  vol.cal_min = vol.robust_min !== undefined ? vol.robust_min : vol.cal_min;
  vol.cal_max = vol.robust_max !== undefined ? vol.robust_max : vol.cal_max;
  $("wl-min").value = round(vol.cal_min); $("wl-max").value = round(vol.cal_max);
  state.zoom = 1;
  nv.setPan2Dxyzmm([0, 0, 0, 1]);
  nv.scene.crosshairPos = nv.mm2frac([0, 0, 0]);  // the landmark is at (0, 0, 0) mm in every served volume
  nv.updateGLVolume();
  setLandmarkVisible(state.landmark);
  updateSliceUi();
}

function moveSlice(d) {
  const nv = state.nv;
  if (!nv || !nv.volumes.length) return;
  nv.moveCrosshairInVox(d, 0, 0);
  updateSliceUi();
}

function setSliceIndex(i) {
  const nv = state.nv;
  if (!nv || !nv.volumes.length) return;
  const nx = nv.volumes[0].dimsRAS[1];
  const frac = nv.scene.crosshairPos.slice();
  frac[0] = (Number(i) + 0.5) / nx;
  nv.scene.crosshairPos = frac;
  nv.drawScene();
  updateSliceUi();
}

function zoom(f) {
  const nv = state.nv;
  if (!nv) return;
  state.zoom = Math.min(8, Math.max(0.5, state.zoom * f));
  const p = nv.scene.pan2Dxyzmm;
  nv.setPan2Dxyzmm([p[0], p[1], p[2], state.zoom]);
}

function setWindow() {
  const nv = state.nv;
  if (!nv || !nv.volumes.length) return;
  const lo = Number($("wl-min").value), hi = Number($("wl-max").value);
  if (!(hi > lo)) return;
  nv.volumes[0].cal_min = lo; nv.volumes[0].cal_max = hi;
  nv.updateGLVolume();
}

// ------------------------------------------------------------------ questions
function questionKeys(q) {
  return q.keys || {};
}

function renderQuestions(questions) {
  const form = $("questions");
  form.innerHTML = "";
  for (const q of questions) {
    const div = document.createElement("div");
    div.className = "q"; div.dataset.qid = q.id;
    const t = document.createElement("div");
    t.className = "q-text"; t.textContent = q.text + (q.required ? "" : " (optional)");
    div.appendChild(t);
    const opts = document.createElement("div"); opts.className = "opts";
    if (q.type === "yesno") {
      const keys = questionKeys(q);
      for (const v of ["yes", "no"]) {
        const b = document.createElement("button");
        b.type = "button"; b.className = "opt " + v; b.dataset.qid = q.id; b.dataset.value = v;
        b.id = `q-${q.id}-${v}`;
        b.textContent = v === "yes" ? "Yes" : "No";
        if (keys[v]) { const k = document.createElement("kbd"); k.textContent = keys[v]; b.appendChild(k); }
        b.addEventListener("click", () => setValue(q.id, v));
        opts.appendChild(b);
      }
    } else if (q.type === "scale") {
      for (let v = q.min || 1; v <= (q.max || 5); v++) {
        const b = document.createElement("button");
        b.type = "button"; b.className = "opt"; b.dataset.qid = q.id; b.dataset.value = String(v);
        b.id = `q-${q.id}-${v}`; b.textContent = String(v);
        b.addEventListener("click", () => setValue(q.id, state.values[q.id] === v ? null : v));
        opts.appendChild(b);
      }
    } else {
      const ta = document.createElement("textarea");
      ta.id = `q-${q.id}`; ta.maxLength = q.max_length || 2000;
      ta.addEventListener("input", () => { state.values[q.id] = ta.value; });
      opts.appendChild(ta);
    }
    div.appendChild(opts);
    form.appendChild(div);
  }
}

function setValue(qid, v) {
  if (v === null || v === undefined) delete state.values[qid]; else state.values[qid] = v;
  syncButtons();
}

function syncButtons() {
  for (const b of document.querySelectorAll("button.opt")) {
    const cur = state.values[b.dataset.qid];
    b.setAttribute("aria-pressed", String(cur !== undefined && String(cur) === b.dataset.value));
  }
  for (const q of (state.caseData ? state.caseData.questions : [])) {
    if (q.type === "text") $(`q-${q.id}`).value = state.values[q.id] || "";
  }
}

function missingRequired() {
  return state.caseData.questions.filter((q) => q.required && (state.values[q.id] === undefined || state.values[q.id] === ""));
}

// ------------------------------------------------------------------ navigation
function setProgress(p) {
  state.total = p.total;
  $("progress").textContent = `${Math.min(state.index + 1, p.total)} / ${p.total}  (${p.answered} answered)`;
  $("progress").dataset.answered = String(p.answered);
}

async function openCase(i) {
  if (i >= state.total) return showDone();
  if (i < 0) return;
  state.busy = true;
  document.body.dataset.ready = "0";
  try {
    const c = await api(`/api/case/${i}`);
    state.index = i; state.caseData = c; state.values = Object.assign({}, c.answer || {});
    $("done-view").hidden = true; $("reader-view").hidden = false;
    $("case-number").textContent = `${i + 1} / ${c.total}`;
    $("case-level").textContent = c.level;
    $("case-id").textContent = c.case_id;
    document.body.dataset.caseIndex = String(i);
    renderQuestions(c.questions);
    syncButtons();
    $("message").textContent = c.complete ? "Answered before; changes are saved as a new answer." : "";
    setProgress(await api("/api/session"));
    await showVolume(c.volume_url);
    state.shownAt = performance.now();
  } catch (e) {
    $("message").textContent = "Could not load the case: " + e.message;
  } finally {
    state.busy = false;
    document.body.dataset.ready = "1";
  }
  if (state.pendingSave) {  // Enter pressed while the case was loading: apply it now
    state.pendingSave = false;
    await saveAndNext();
  }
}

async function saveAndNext() {
  if (!state.caseData) return;
  if (state.busy) { state.pendingSave = true; return; }
  const miss = missingRequired();
  if (miss.length) {
    $("message").textContent = "Please answer: " + miss.map((q) => q.text).join(", ");
    return;
  }
  state.busy = true;
  try {
    const seconds = Math.max(0, (performance.now() - state.shownAt) / 1000);
    const r = await api("/api/answer", { method: "POST", json: { case_id: state.caseData.case_id, values: state.values, seconds } });
    setProgress(r);
    state.busy = false;
    await openCase(state.index + 1 < r.total ? state.index + 1 : (r.resume_index < r.total ? r.resume_index : r.total));
  } catch (e) {
    $("message").textContent = "Not saved: " + e.message;
  } finally {
    state.busy = false;
  }
}

async function showDone() {
  const p = await api("/api/session");
  setProgress(p);
  $("reader-view").hidden = true; $("done-view").hidden = false;
  $("done-summary").textContent = `${p.answered} of ${p.total} cases answered.`;
  document.body.dataset.caseIndex = "done";
}

// ------------------------------------------------------------------ keyboard
function onKey(e) {
  if ($("reader-view").hidden || e.ctrlKey || e.metaKey || e.altKey) return;
  const tag = (e.target && e.target.tagName) || "";
  if (tag === "TEXTAREA" || (tag === "INPUT" && e.target.type !== "checkbox" && e.target.type !== "range")) {
    if (e.key === "Escape") e.target.blur();
    return;
  }
  const k = e.key;
  const up = k.length === 1 ? k.toUpperCase() : k;
  let handled = true;
  const qs = state.caseData ? state.caseData.questions : [];
  const yesno = qs.filter((q) => q.type === "yesno");
  const hit = yesno.map((q) => [q, Object.entries(q.keys || {}).find(([, key]) => key.toUpperCase() === up)]).find(([, m]) => m);
  if (hit) setValue(hit[0].id, hit[1][0]);
  else if (/^[1-9]$/.test(k) && qs.some((q) => q.type === "scale")) {
    const q = qs.find((q) => q.type === "scale");
    if (Number(k) >= (q.min || 1) && Number(k) <= (q.max || 5)) setValue(q.id, Number(k));
  }
  else if (k === "Enter") saveAndNext();
  else if (k === "ArrowLeft" || up === "B") { if (!state.busy) openCase(state.index - 1); }
  else if (k === "ArrowRight") { if (!state.busy) openCase(state.index + 1); }
  else if (k === "ArrowUp") moveSlice(1);
  else if (k === "ArrowDown") moveSlice(-1);
  else if (k === "+" || k === "=") zoom(1.25);
  else if (k === "-") zoom(0.8);
  else if (k === "0") resetView();
  else if (up === "L") setLandmarkVisible(!state.landmark);
  else handled = false;
  if (handled) { e.preventDefault(); e.stopPropagation(); }
}

// ------------------------------------------------------------------ login
async function login(token) {
  state.token = token;
  try {
    const s = await api("/api/login", { method: "POST", json: { token } });
    sessionStorage.setItem("spine-ldm-reader-token", token);
    state.session = s;
    $("login-view").hidden = true;
    $("study-name").textContent = s.study;
    $("reader-name").textContent = s.reader;
    $("logout").hidden = false;
    state.total = s.total;
    await openCase(s.resume_index);
  } catch (e) {
    state.token = null;
    sessionStorage.removeItem("spine-ldm-reader-token");
    $("login-error").textContent = e.status === 401 ? "Unknown token." : "Login failed: " + e.message;
  }
}

function init() {
  $("questions").addEventListener("submit", (e) => e.preventDefault());
  $("login-form").addEventListener("submit", (e) => { e.preventDefault(); login($("token").value.trim()); });
  $("logout").addEventListener("click", () => { sessionStorage.removeItem("spine-ldm-reader-token"); location.reload(); });
  $("save").addEventListener("click", saveAndNext);
  $("prev").addEventListener("click", () => openCase(state.index - 1));
  $("next").addEventListener("click", () => openCase(state.index + 1));
  $("review").addEventListener("click", () => openCase(0));
  $("slice").addEventListener("input", (e) => setSliceIndex(e.target.value));
  $("wl-min").addEventListener("change", setWindow);
  $("wl-max").addEventListener("change", setWindow);
  $("zoom-in").addEventListener("click", () => zoom(1.25));
  $("zoom-out").addEventListener("click", () => zoom(0.8));
  $("reset-view").addEventListener("click", resetView);
  $("landmark").addEventListener("change", (e) => setLandmarkVisible(e.target.checked));
  window.addEventListener("keydown", onKey, true);
  const saved = sessionStorage.getItem("spine-ldm-reader-token");
  if (saved) login(saved);
}

init();
