// convserve explainer page. Plain JavaScript, no build step, no network beyond this service.
// Every number drawn here comes from the served model: v1/model (architecture, geometry),
// v1/kernels (weights), v1/feature-maps (activations), v1/explain (input as seen, CAM, residual block).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = {
    seq: 0,
    model: null,
    kernels: null, // {info, weights, bias}
    analysis: null, // {explain, maps: {name: {...}}, input, size}
    slide: { channel: 0, stride: 1, result: null, shown: 0, timer: null, playing: true },
    rf: { layer: null, channel: 0, row: 0, col: 0 },
    classIndex: null,
    givenUrl: null,
  };
  let modelLoaded;
  const modelReady = new Promise((resolve) => {
    modelLoaded = resolve;
  });
  const TOKEN_KEY = "convserve-token";
  const authMeta = document.querySelector('meta[name="convserve-auth"]');
  const authRequired = authMeta && authMeta.content === "bearer";

  // --- HTTP ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function url(path) {
    return new URL(path, document.baseURI).toString();
  }

  async function api(path, { method = "GET", body = null, contentType = null, as = "json" } = {}) {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    if (contentType) headers["Content-Type"] = contentType;
    let resp;
    try {
      resp = await fetch(url(path), { method, body, headers });
    } catch (e) {
      throw new ApiError(0, "network", "the service did not answer (" + e.message + ")");
    }
    if (!resp.ok) {
      let code = "http_" + resp.status;
      let message = resp.statusText || "request failed";
      const text = await resp.text();
      try {
        const err = JSON.parse(text).error;
        if (err) {
          code = err.code;
          message = err.message;
        }
      } catch (_) {
        if (text) message = text.slice(0, 300);
      }
      if (resp.status === 401) askForToken("The service refused the token: " + message);
      throw new ApiError(resp.status, code, message);
    }
    if (as === "blob") return resp.blob();
    if (as === "arraybuffer") return resp.arrayBuffer();
    return resp.json();
  }

  function f32(obj) {
    const bin = atob(obj.data);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Float32Array(bytes.buffer);
  }

  // --- small helpers ------------------------------------------------------------------------

  const fmt = (v, d = 3) => (Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(2) : v.toFixed(d));
  const shapeText = (shape) => shape.join(" \u00d7 ");

  function setError(message) {
    const el = $("error");
    if (message) {
      el.textContent = message;
      el.hidden = false;
    } else {
      el.textContent = "";
      el.hidden = true;
    }
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  function minMax(values, offset, n) {
    let lo = Infinity;
    let hi = -Infinity;
    for (let i = offset; i < offset + n; i++) {
      const v = values[i];
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    return [lo, hi];
  }

  const scratch = document.createElement("canvas");

  function toDataUrl(w, h, paint) {
    scratch.width = w;
    scratch.height = h;
    const ctx = scratch.getContext("2d");
    const img = ctx.createImageData(w, h);
    paint(img.data);
    ctx.putImageData(img, 0, 0);
    return scratch.toDataURL("image/png");
  }

  // One channel [h, w] at `offset` as grey, scaled to [lo, hi] (its own range by default).
  function greyUrl(values, offset, h, w, range = null) {
    const [lo, hi] = range || minMax(values, offset, h * w);
    const span = hi - lo || 1;
    return toDataUrl(w, h, (px) => {
      for (let i = 0; i < h * w; i++) {
        const g = Math.round(((values[offset + i] - lo) / span) * 255);
        px[4 * i] = px[4 * i + 1] = px[4 * i + 2] = g;
        px[4 * i + 3] = 255;
      }
    });
  }

  // Blue (negative) - white (0) - red (positive), symmetric around 0 with |v| <= m.
  function divergingUrl(values, offset, h, w, m) {
    const s = m || 1;
    return toDataUrl(w, h, (px) => {
      for (let i = 0; i < h * w; i++) {
        const t = Math.max(-1, Math.min(1, values[offset + i] / s));
        const k = Math.round(255 * (1 - Math.abs(t)));
        px[4 * i] = t >= 0 ? 255 : k;
        px[4 * i + 1] = k;
        px[4 * i + 2] = t >= 0 ? k : 255;
        px[4 * i + 3] = 255;
      }
    });
  }

  // The preprocessed input back to 0..255 RGB (undo the normalisation).
  function inputRgb(input, mean, std, size) {
    const n = size * size;
    const rgb = new Uint8ClampedArray(3 * n);
    for (let c = 0; c < 3; c++) {
      for (let i = 0; i < n; i++) rgb[c * n + i] = Math.round((input[c * n + i] * std[c] + mean[c]) * 255);
    }
    return rgb;
  }

  function rgbUrl(rgb, size) {
    const n = size * size;
    return toDataUrl(size, size, (px) => {
      for (let i = 0; i < n; i++) {
        px[4 * i] = rgb[i];
        px[4 * i + 1] = rgb[n + i];
        px[4 * i + 2] = rgb[2 * n + i];
        px[4 * i + 3] = 255;
      }
    });
  }

  // erf to ~1e-7 (Numerical Recipes' erfc), for the exact GELU the served first layer applies.
  function erf(x) {
    const z = Math.abs(x);
    const t = 1 / (1 + 0.5 * z);
    const r =
      t *
      Math.exp(
        -z * z -
          1.26551223 +
          t *
            (1.00002368 +
              t *
                (0.37409196 +
                  t *
                    (0.09678418 +
                      t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
      );
    return x >= 0 ? 1 - r : r - 1;
  }
  const ACTIVATIONS = {
    identity: (z) => z,
    relu: (z) => Math.max(0, z),
    gelu: (z) => 0.5 * z * (1 + erf(z / Math.SQRT2)),
    gelu_tanh: (z) => 0.5 * z * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (z + 0.044715 * z * z * z))),
    silu: (z) => z / (1 + Math.exp(-z)),
  };

  function layerInfo(name) {
    return state.model.layers.find((l) => l.name === name);
  }

  // --- auth ---------------------------------------------------------------------------------

  let tokenWaiter = null;

  function askForToken(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("auth").hidden = false;
    $("auth-msg").textContent = message || "";
    $("auth-token").focus();
  }

  function tokenReady() {
    if (!authRequired || sessionStorage.getItem(TOKEN_KEY)) return Promise.resolve();
    askForToken("");
    return new Promise((resolve) => {
      tokenWaiter = resolve;
    });
  }

  $("auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("auth-token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("auth").hidden = true;
    $("auth-msg").textContent = "";
    if (tokenWaiter) {
      const w = tokenWaiter;
      tokenWaiter = null;
      w();
    } else if (!state.model) {
      start();
    }
  });

  // --- 2. architecture ----------------------------------------------------------------------

  function drawArchitecture(model) {
    const arch = $("arch");
    arch.textContent = "";
    const channels = (l) => l.shape[0];
    const area = (l) => (l.shape.length === 3 ? l.shape[1] * l.shape[2] : 1);
    const maxC = Math.max(...model.layers.map(channels));
    const maxA = Math.max(...model.layers.map(area));
    const inputItem = document.createElement("div");
    inputItem.className = "arch-item input";
    inputItem.setAttribute("role", "listitem");
    const s = model.input_size;
    const inBlock = document.createElement("div");
    inBlock.className = "arch-block";
    inBlock.style.width = Math.max(4, Math.round((120 * 3) / maxC)) + "px";
    inBlock.style.height = Math.max(4, Math.round((140 * s * s) / maxA)) + "px";
    inBlock.setAttribute("aria-hidden", "true");
    const inLabel = document.createElement("div");
    inLabel.className = "arch-label";
    inLabel.innerHTML = "<strong>input</strong><br>";
    inLabel.append(shapeText([3, s, s]));
    inputItem.append(inBlock, inLabel);
    arch.append(inputItem);
    for (const l of model.layers) {
      const item = document.createElement("div");
      item.className = "arch-item" + (l.shape.length === 3 ? "" : " vector");
      item.setAttribute("role", "listitem");
      item.dataset.name = l.name;
      item.dataset.shape = l.shape.join("x");
      item.dataset.stride = String(l.stride);
      item.dataset.rf = String(l.receptive_field);
      item.dataset.start = String(l.start);
      const block = document.createElement("div");
      block.className = "arch-block";
      const w = Math.max(4, Math.round((120 * channels(l)) / maxC));
      const h = Math.max(4, Math.round((140 * area(l)) / maxA));
      block.style.width = w + "px";
      block.style.height = h + "px";
      block.dataset.width = String(w);
      block.dataset.height = String(h);
      block.setAttribute("aria-hidden", "true");
      const label = document.createElement("div");
      label.className = "arch-label";
      const name = document.createElement("strong");
      name.textContent = l.name;
      const lines = [
        shapeText(l.shape),
        "stride " + (l.stride ?? "?"),
        "RF " + (l.receptive_field ?? "?") + " px",
        "start " + (l.start ?? "?"),
      ];
      label.append(name);
      for (const line of lines) {
        label.append(document.createElement("br"), line);
      }
      item.append(block, label);
      item.title =
        `${l.name}: ${shapeText(l.shape)}, stride ${l.stride}, receptive field ${l.receptive_field} px, ` +
        `start offset ${l.start}`;
      arch.append(item);
    }
  }

  // --- 3. kernels ---------------------------------------------------------------------------

  async function loadKernels(model) {
    const first = model.layers[0].name;
    const [info, png] = await Promise.all([
      api("v1/kernels?layer=" + encodeURIComponent(first)),
      api("v1/kernels?format=png&layer=" + encodeURIComponent(first), { as: "blob" }),
    ]);
    state.kernels = { info, weights: f32(info.weights), bias: info.bias ? f32(info.bias) : null };
    const img = $("kernels-img");
    img.src = URL.createObjectURL(png);
    const [o, i, kh, kw] = info.shape;
    img.alt = `The ${o} learned ${kh}\u00d7${kw} kernels of ${info.module} (${i} input channels each)`;
    $("kernels-cap").textContent =
      `${o} kernels of ${info.module}, each ${i} \u00d7 ${kh} \u00d7 ${kw}, stride ${info.stride.join("\u00d7")}, ` +
      `padding ${info.padding.map((p) => p.join("/")).join(", ")}` +
      (i === 3 ? "; RGB, mid-grey is 0, each kernel scaled to its largest weight." : "; summed over inputs.");
    const select = $("slide-channel");
    select.textContent = "";
    for (let c = 0; c < o; c++) {
      const opt = document.createElement("option");
      opt.value = String(c);
      opt.textContent = "kernel " + c;
      select.append(opt);
    }
    const act = info.layer_output;
    $("kernel-intro").textContent =
      act === null
        ? `The first layer's kernels. The served ${info.layer} map is more than one activation of this ` +
          `convolution, so the animation shows the convolution alone (it cannot match the served map).`
        : `The first layer's learned kernels, and one of them stepping across your image: each output cell is ` +
          `the sum of the kernel's weights times the pixels under it, plus a bias` +
          (act === "identity" ? "" : `, then ${act.toUpperCase()} (what the served ${info.layer} layer applies)`) +
          `. The numbers come from the served weights and the pixels the model saw.`;
  }

  function slideCompute(channel, stride) {
    const k = state.kernels;
    const a = state.analysis;
    const [outC, inC, kh, kw] = k.info.shape;
    const [[pt, pb], [pl, pr]] = k.info.padding;
    const [dh, dw] = k.info.dilation;
    const size = a.size;
    const n = size * size;
    const ho = Math.floor((size + pt + pb - dh * (kh - 1) - 1) / stride) + 1;
    const wo = Math.floor((size + pl + pr - dw * (kw - 1) - 1) / stride) + 1;
    const group = Math.floor(channel / (outC / k.info.groups));
    const x = a.input;
    const w = k.weights;
    const act = ACTIVATIONS[k.info.layer_output] || ACTIVATIONS.identity;
    const pre = new Float64Array(ho * wo);
    const post = new Float64Array(ho * wo);
    for (let i = 0; i < ho; i++) {
      for (let j = 0; j < wo; j++) {
        let z = k.bias ? k.bias[channel] : 0;
        for (let c = 0; c < inC; c++) {
          const xc = (group * inC + c) * n;
          for (let u = 0; u < kh; u++) {
            const y = i * stride - pt + u * dh;
            if (y < 0 || y >= size) continue;
            for (let v = 0; v < kw; v++) {
              const xx = j * stride - pl + v * dw;
              if (xx < 0 || xx >= size) continue;
              z += w[((channel * inC + c) * kh + u) * kw + v] * x[xc + y * size + xx];
            }
          }
        }
        pre[i * wo + j] = z;
        post[i * wo + j] = act(z);
      }
    }
    const [lo, hi] = minMax(post, 0, post.length);
    return { channel, stride, ho, wo, kh, kw, pt, pl, dh, dw, inC, pre, post, lo, hi };
  }

  function slideReset() {
    const a = state.analysis;
    if (!a || !state.kernels) return;
    const s = state.slide;
    s.result = slideCompute(s.channel, s.stride);
    s.shown = 0;
    const r = s.result;
    const k = state.kernels.info;
    const [[pt, pb], [pl, pr]] = k.padding;
    const keff = r.dh * (r.kh - 1) + 1;
    $("slide-formula").textContent =
      `Output size: floor((${a.size} + ${pt} + ${pb} \u2212 ${keff}) / ${s.stride}) + 1 = ${r.ho} rows, ` +
      `floor((${a.size} + ${pl} + ${pr} \u2212 ${keff}) / ${s.stride}) + 1 = ${r.wo} columns` +
      (k.stride[0] !== s.stride ? ` (the served layer uses stride ${k.stride[0]})` : " (the served stride)");
    const canvas = $("slide-out");
    canvas.width = r.wo;
    canvas.height = r.ho;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#1d2a3a";
    ctx.fillRect(0, 0, r.wo, r.ho);
    $("slide-out-cap").textContent =
      `Output of kernel ${s.channel}: ${r.ho} \u00d7 ${r.wo}, grey from ${fmt(r.lo)} (black) to ${fmt(r.hi)} (white)`;
    canvas.setAttribute("aria-label", `Output map of kernel ${s.channel} at stride ${s.stride}, ${r.ho} by ${r.wo} cells`);
    slideCheck();
    slideShow(0);
    slideTimer();
  }

  function slideCheck() {
    const s = state.slide;
    const r = s.result;
    const k = state.kernels.info;
    const served = state.analysis.maps[k.layer];
    const el = $("slide-check");
    if (!served || k.layer_output === null || s.stride !== k.stride[0]) {
      el.textContent =
        s.stride !== k.stride[0]
          ? `At stride ${s.stride} there is no served map to compare with (the model uses stride ${k.stride[0]}).`
          : "";
      return;
    }
    const [c, h, w] = served.shape;
    if (h !== r.ho || w !== r.wo || s.channel >= c) {
      el.textContent = "The served map has another shape; no comparison.";
      return;
    }
    let worst = 0;
    for (let i = 0; i < h * w; i++) {
      worst = Math.max(worst, Math.abs(served.values[s.channel * h * w + i] - r.post[i]));
    }
    el.textContent =
      `Checked against the served ${k.layer} map of channel ${s.channel} (v1/feature-maps): ` +
      `largest difference ${worst.toExponential(1)}.`;
    el.dataset.maxDiff = String(worst);
  }

  function slideShow(upto) {
    const s = state.slide;
    const r = s.result;
    const total = r.ho * r.wo;
    upto = Math.min(total, upto);
    const ctx = $("slide-out").getContext("2d");
    const span = r.hi - r.lo || 1;
    for (let idx = s.shown; idx < upto; idx++) {
      const g = Math.round(((r.post[idx] - r.lo) / span) * 255);
      ctx.fillStyle = `rgb(${g},${g},${g})`;
      ctx.fillRect(idx % r.wo, Math.floor(idx / r.wo), 1, 1);
    }
    s.shown = upto;
    const cur = Math.max(0, upto - 1);
    const i = Math.floor(cur / r.wo);
    const j = cur % r.wo;
    const size = state.analysis.size;
    const win = $("slide-window");
    const kh = r.dh * (r.kh - 1) + 1;
    const kw = r.dw * (r.kw - 1) + 1;
    win.style.left = ((j * s.stride - r.pl) / size) * 100 + "%";
    win.style.top = ((i * s.stride - r.pt) / size) * 100 + "%";
    win.style.width = (kw / size) * 100 + "%";
    win.style.height = (kh / size) * 100 + "%";
    const act = state.kernels.info.layer_output;
    const products = r.inC * r.kh * r.kw;
    $("slide-cell").textContent =
      `cell (${i}, ${j}): window at input (${i * s.stride - r.pt}, ${j * s.stride - r.pl}); ` +
      `z = sum of ${products} weight \u00d7 pixel products + bias = ${fmt(r.pre[cur], 4)}` +
      (act && act !== "identity" ? `; ${act.toUpperCase()}(z) = ${fmt(r.post[cur], 4)}` : "") +
      `  [${upto}/${total}]`;
  }

  function slideTimer() {
    const s = state.slide;
    if (s.timer) clearInterval(s.timer);
    s.timer = null;
    $("slide-play").textContent = s.playing ? "Pause" : "Play";
    if (!s.playing || !s.result) return;
    const total = s.result.ho * s.result.wo;
    const per = Math.max(1, Math.ceil(total / 400));
    s.timer = setInterval(() => {
      if (s.shown >= total) {
        clearInterval(s.timer);
        s.timer = null;
        s.playing = false;
        $("slide-play").textContent = "Replay";
        return;
      }
      slideShow(s.shown + per);
    }, 25);
  }

  $("slide-channel").addEventListener("change", (e) => {
    state.slide.channel = Number(e.target.value);
    state.slide.playing = !matchMedia("(prefers-reduced-motion: reduce)").matches;
    slideReset();
  });
  for (const radio of document.querySelectorAll('input[name="stride"]')) {
    radio.addEventListener("change", (e) => {
      state.slide.stride = Number(e.target.value);
      state.slide.playing = !matchMedia("(prefers-reduced-motion: reduce)").matches;
      slideReset();
    });
  }
  $("slide-play").addEventListener("click", () => {
    const s = state.slide;
    if (!s.result) return;
    if (s.shown >= s.result.ho * s.result.wo) {
      slideReset();
      s.playing = true;
      slideTimer();
      return;
    }
    s.playing = !s.playing;
    slideTimer();
  });
  $("slide-step").addEventListener("click", () => {
    const s = state.slide;
    if (!s.result) return;
    s.playing = false;
    slideTimer();
    slideShow(s.shown + 1);
  });
  $("slide-all").addEventListener("click", () => {
    const s = state.slide;
    if (!s.result) return;
    s.playing = false;
    slideTimer();
    slideShow(s.result.ho * s.result.wo);
  });

  // --- 4. feature maps ----------------------------------------------------------------------

  function drawStages() {
    const a = state.analysis;
    const root = $("stages");
    root.textContent = "";
    const order = $("sort").value;
    for (const name of a.spatial) {
      const m = a.maps[name];
      const [c, h, w] = m.shape;
      const info = layerInfo(name);
      const box = document.createElement("div");
      box.className = "stage";
      box.dataset.layer = name;
      const title = document.createElement("h3");
      title.textContent =
        `${name}: ${c} channels of ${h} \u00d7 ${w}, stride ${info.stride}, receptive field ${info.receptive_field} px`;
      const tiles = document.createElement("div");
      tiles.className = "tiles";
      tiles.setAttribute("role", "group");
      tiles.setAttribute("aria-label", `${name} channels`);
      const idx = [...Array(c).keys()];
      if (order === "mean") idx.sort((p, q) => m.mean[q] - m.mean[p]);
      if (order === "max") idx.sort((p, q) => m.max[q] - m.max[p]);
      for (const ch of idx) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "tile";
        b.dataset.layer = name;
        b.dataset.channel = String(ch);
        b.setAttribute("aria-pressed", String(state.rf.layer === name && state.rf.channel === ch));
        const img = document.createElement("img");
        img.src = m.urls[ch];
        img.alt = `${name} channel ${ch}: mean ${fmt(m.mean[ch])}, max ${fmt(m.max[ch])}`;
        img.width = 40;
        img.height = 40;
        b.append(img);
        b.addEventListener("click", () => selectMap(name, ch, true));
        tiles.append(b);
      }
      box.append(title, tiles);
      root.append(box);
    }
  }

  $("sort").addEventListener("change", () => {
    if (state.analysis) drawStages();
  });

  // --- 5. receptive field -------------------------------------------------------------------

  function selectMap(name, channel, focus) {
    const a = state.analysis;
    const m = a.maps[name];
    const [, h, w] = m.shape;
    state.rf.layer = name;
    state.rf.channel = channel;
    for (const t of document.querySelectorAll(".tile")) {
      t.setAttribute("aria-pressed", String(t.dataset.layer === name && Number(t.dataset.channel) === channel));
    }
    const img = $("rf-map-img");
    img.src = m.urls[channel];
    img.alt = `${name} channel ${channel}, enlarged: ${h} by ${w} cells`;
    $("rf-map-cap").textContent = `${name}, channel ${channel}: ${h} \u00d7 ${w} cells`;
    const cells = $("rf-cells");
    cells.textContent = "";
    const frag = document.createDocumentFragment();
    for (let i = 0; i < h; i++) {
      for (let j = 0; j < w; j++) {
        const d = document.createElement("div");
        d.className = "cell";
        d.dataset.row = String(i);
        d.dataset.col = String(j);
        d.style.left = (j / w) * 100 + "%";
        d.style.top = (i / h) * 100 + "%";
        d.style.width = 100 / w + "%";
        d.style.height = 100 / h + "%";
        frag.append(d);
      }
    }
    cells.append(frag);
    const grid = $("rf-map");
    grid.setAttribute("aria-label", `${name} channel ${channel}; arrow keys move between cells`);
    grid.dataset.layer = name;
    grid.dataset.rows = String(h);
    grid.dataset.cols = String(w);
    setCell(Math.floor(h / 2), Math.floor(w / 2));
    if (focus) {
      $("rf-view").scrollIntoView({ block: "nearest" });
      grid.focus({ preventScroll: true });
    }
  }

  function setCell(row, col) {
    const a = state.analysis;
    const name = state.rf.layer;
    if (!a || !name) return;
    const m = a.maps[name];
    const [, h, w] = m.shape;
    row = Math.max(0, Math.min(h - 1, row));
    col = Math.max(0, Math.min(w - 1, col));
    state.rf.row = row;
    state.rf.col = col;
    for (const d of document.querySelectorAll("#rf-cells .cell.active")) d.classList.remove("active");
    const cell = document.querySelector(`#rf-cells .cell[data-row="${row}"][data-col="${col}"]`);
    if (cell) cell.classList.add("active");
    const info = layerInfo(name);
    const out = $("rf-outline");
    const value = m.values[state.rf.channel * h * w + row * w + col];
    if (info.stride == null || info.receptive_field == null || info.start == null) {
      out.hidden = true;
      $("rf-text").textContent = `${name} cell (${row}, ${col}) = ${fmt(value)}; this layer's geometry is unknown.`;
      return;
    }
    const size = a.size;
    const y0 = info.start + row * info.stride;
    const x0 = info.start + col * info.stride;
    const y1 = y0 + info.receptive_field - 1;
    const x1 = x0 + info.receptive_field - 1;
    const cy0 = Math.max(0, y0);
    const cx0 = Math.max(0, x0);
    const cy1 = Math.min(size - 1, y1);
    const cx1 = Math.min(size - 1, x1);
    out.hidden = false;
    out.style.left = (cx0 / size) * 100 + "%";
    out.style.top = (cy0 / size) * 100 + "%";
    out.style.width = ((cx1 - cx0 + 1) / size) * 100 + "%";
    out.style.height = ((cy1 - cy0 + 1) / size) * 100 + "%";
    Object.assign(out.dataset, {
      layer: name,
      row: String(row),
      col: String(col),
      x0: String(cx0),
      y0: String(cy0),
      x1: String(cx1),
      y1: String(cy1),
    });
    const clipped = cx0 !== x0 || cy0 !== y0 || cx1 !== x1 || cy1 !== y1;
    $("rf-text").textContent =
      `${name} cell (row ${row}, column ${col}) = ${fmt(value)} sees input rows ${cy0}\u2013${cy1}, ` +
      `columns ${cx0}\u2013${cx1}: its ${info.receptive_field} \u00d7 ${info.receptive_field} px field starts at ` +
      `(${y0}, ${x0}) = start ${info.start} + index \u00d7 stride ${info.stride}` +
      (clipped ? `, clipped to ${cy1 - cy0 + 1} \u00d7 ${cx1 - cx0 + 1} px by the border.` : ".");
  }

  $("rf-cells").addEventListener("mouseover", (e) => {
    const d = e.target.closest(".cell");
    if (d) setCell(Number(d.dataset.row), Number(d.dataset.col));
  });
  $("rf-map").addEventListener("keydown", (e) => {
    const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    if (moves[e.key]) {
      e.preventDefault();
      setCell(state.rf.row + moves[e.key][0], state.rf.col + moves[e.key][1]);
    } else if (e.key === "Home") {
      e.preventDefault();
      setCell(state.rf.row, 0);
    } else if (e.key === "End") {
      e.preventDefault();
      setCell(state.rf.row, 1e9);
    }
  });

  // --- 6. head and CAM ----------------------------------------------------------------------

  function drawBars() {
    const ex = state.analysis.explain;
    const bars = $("bars");
    bars.textContent = "";
    const top = ex.predictions[0];
    $("top1-label").textContent = top.label;
    $("top1-label").dataset.index = String(top.index);
    for (const p of ex.predictions) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.index = String(p.index);
      b.dataset.label = p.label;
      b.setAttribute("aria-pressed", String(p.index === state.classIndex));
      b.setAttribute("aria-label", `${p.label}: ${(100 * p.score).toFixed(1)} percent; show its activation map`);
      const name = document.createElement("span");
      name.textContent = p.label;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = Math.max(0.5, 100 * p.score) + "%";
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = (100 * p.score).toFixed(1) + "%";
      b.append(name, bar, score);
      b.addEventListener("click", () => selectClass(p.index));
      li.append(b);
      bars.append(li);
    }
  }

  function selectClass(index) {
    state.classIndex = index;
    for (const b of document.querySelectorAll("#bars button")) {
      b.setAttribute("aria-pressed", String(Number(b.dataset.index) === index));
    }
    drawCam();
  }

  function drawCam() {
    const a = state.analysis;
    const cam = a.explain.cam;
    const [, h, w] = cam.shape;
    const k = state.classIndex;
    const label = state.model.labels[k];
    const off = k * h * w;
    const [lo, hi] = minMax(a.cam, off, h * w);
    let sum = 0;
    for (let i = 0; i < h * w; i++) sum += a.cam[off + i];
    const size = a.size;
    const scale = Math.max(1, Math.ceil(256 / size));
    const out = size * scale;
    // Cell (i, j) of the last stage is centred on its receptive field: start + i * stride + (rf - 1) / 2.
    // (Geometry unknown: the cells spread evenly over the image.)
    const known = cam.start != null && cam.stride != null && cam.receptive_field != null;
    const step = known ? cam.stride : size / w;
    const centre0 = known ? cam.start + (cam.receptive_field - 1) / 2 : step / 2 - 0.5;
    const sample = (u, n) => Math.max(0, Math.min(n - 1, (u - centre0) / step));
    const rgb = a.rgb;
    const n = size * size;
    const url = toDataUrl(out, out, (px) => {
      for (let py = 0; py < out; py++) {
        const fy = sample((py + 0.5) / scale - 0.5, h);
        const i0 = Math.floor(fy);
        const i1 = Math.min(h - 1, i0 + 1);
        const ty = fy - i0;
        for (let qx = 0; qx < out; qx++) {
          const fx = sample((qx + 0.5) / scale - 0.5, w);
          const j0 = Math.floor(fx);
          const j1 = Math.min(w - 1, j0 + 1);
          const tx = fx - j0;
          const v =
            (1 - ty) * ((1 - tx) * a.cam[off + i0 * w + j0] + tx * a.cam[off + i0 * w + j1]) +
            ty * ((1 - tx) * a.cam[off + i1 * w + j0] + tx * a.cam[off + i1 * w + j1]);
          const t = hi > lo ? (v - lo) / (hi - lo) : 0;
          // "hot" colours, opacity growing with the evidence
          const r = 255 * Math.min(1, 2 * t);
          const g = 255 * Math.max(0, Math.min(1, 2 * t - 0.6));
          const bl = 255 * Math.max(0, 3 * t - 2);
          const alpha = 0.25 + 0.5 * t;
          const p = Math.floor(py / scale) * size + Math.floor(qx / scale);
          const o = 4 * (py * out + qx);
          px[o] = (1 - alpha) * rgb[p] + alpha * r;
          px[o + 1] = (1 - alpha) * rgb[n + p] + alpha * g;
          px[o + 2] = (1 - alpha) * rgb[2 * n + p] + alpha * bl;
          px[o + 3] = 255;
        }
      }
    });
    const img = $("cam-img");
    img.src = url;
    img.dataset.index = String(k);
    img.alt =
      `Class activation map for ${label} over the input: brighter and redder where the ${cam.layer} cells ` +
      `add more to the ${label} score`;
    const logit = a.explain.logits[k];
    $("cam-cap").textContent =
      `CAM of \u201c${label}\u201d from ${cam.layer} (${h} \u00d7 ${w} cells, each drawn at the centre of its ` +
      `${cam.receptive_field} px field, interpolated between): from ${fmt(lo)} to ${fmt(hi)}; ` +
      `mean ${fmt(sum / (h * w), 4)}, the served logit ${fmt(logit, 4)}` +
      (cam.exact ? " (exact: global average pooling + linear head)." : " (not exact for this model).") +
      (a.explain.notes.length ? " " + a.explain.notes.join(" ") : "");
  }

  // --- 7. residual block --------------------------------------------------------------------

  function drawResidual() {
    const r = state.analysis.explain.residual;
    const row = $("res-row");
    row.textContent = "";
    const select = $("res-channel");
    if (!r) {
      $("res-intro").textContent = "This model has no residual block this page can take apart.";
      select.textContent = "";
      return;
    }
    const parts = state.analysis.residual;
    const [c, h, w] = r.shape;
    const strength = [...Array(c).keys()].map((ch) => {
      let s = 0;
      for (let i = 0; i < h * w; i++) s += Math.abs(parts.branch[ch * h * w + i]);
      return s;
    });
    const order = [...Array(c).keys()].sort((p, q) => strength[q] - strength[p]);
    select.textContent = "";
    for (const ch of order) {
      const opt = document.createElement("option");
      opt.value = String(ch);
      opt.textContent = `channel ${ch}`;
      select.append(opt);
    }
    const act = r.activation ? r.activation.toUpperCase() : "the block's activation";
    $("res-intro").textContent =
      `${r.block}: what comes in, what the residual branch (two convolutions) computes, their sum, and the ` +
      `block's output, ${act}(input + branch), for one channel (${h} \u00d7 ${w}); channels listed by how ` +
      `much the branch changes them.` +
      (r.shortcut_is_input ? "" : " The input is added through a projection (the block's shortcut).");
    drawResidualChannel(order[0]);
  }

  function drawResidualChannel(ch) {
    const r = state.analysis.explain.residual;
    const parts = state.analysis.residual;
    const [, h, w] = r.shape;
    const off = ch * h * w;
    $("res-channel").value = String(ch);
    let m = 0;
    for (const key of ["input", "branch", "sum", "output"]) {
      for (let i = 0; i < h * w; i++) m = Math.max(m, Math.abs(parts[key][off + i]));
    }
    const row = $("res-row");
    row.textContent = "";
    const act = r.activation ? r.activation.toUpperCase() : "activation";
    const items = [
      ["input", r.shortcut_is_input ? "input" : "input (through the shortcut)", parts.shortcut],
      ["op", "+"],
      ["branch", "residual branch", parts.branch],
      ["op", "="],
      ["sum", "sum", parts.sum],
      ["op", "\u2192"],
      ["output", `output = ${act}(sum)`, parts.output],
    ];
    for (const [key, text, values] of items) {
      if (key === "op") {
        const op = document.createElement("span");
        op.className = "op";
        op.setAttribute("aria-hidden", "true");
        op.textContent = text;
        row.append(op);
        continue;
      }
      const [lo, hi] = minMax(values, off, h * w);
      const fig = document.createElement("figure");
      fig.dataset.part = key;
      const img = document.createElement("img");
      img.src = divergingUrl(values, off, h, w, m);
      img.alt = `${r.block} channel ${ch}, ${text}: values from ${fmt(lo)} to ${fmt(hi)}`;
      const cap = document.createElement("figcaption");
      cap.textContent = `${text}: ${fmt(lo)} to ${fmt(hi)}`;
      fig.append(img, cap);
      row.append(fig);
    }
    $("res-scale").textContent =
      `One colour scale for all four: blue negative, white 0, red positive, full colour at \u00b1${fmt(m)}.`;
  }

  $("res-channel").addEventListener("change", (e) => drawResidualChannel(Number(e.target.value)));

  // --- one image through everything -----------------------------------------------------------

  async function analyse(blob, name) {
    const seq = ++state.seq;
    setError("");
    document.body.dataset.state = "busy";
    setStatus(`Running the model on ${name}\u2026`);
    const type = blob.type || "application/octet-stream";
    try {
      await tokenReady();
      await modelReady;
      const [ex, fm] = await Promise.all([
        api("v1/explain?top_k=" + Math.min(10, state.model.labels.length), {
          method: "POST",
          body: blob,
          contentType: type,
        }),
        api("v1/feature-maps?include=values", { method: "POST", body: blob, contentType: type }),
      ]);
      if (seq !== state.seq) return; // a newer image was chosen meanwhile
      render(blob, name, ex, fm);
      document.body.dataset.state = "ready";
      document.body.dataset.analysed = String(seq);
      setStatus(`${name}: the model says \u201c${ex.predictions[0].label}\u201d.`);
    } catch (e) {
      if (seq !== state.seq) return;
      document.body.dataset.state = "error";
      setStatus("");
      const status = e.status ? `${e.status} ${e.code}: ` : "";
      setError(`The service refused ${name}: ${status}${e.message}`);
    }
  }

  function render(blob, name, ex, fm) {
    const size = ex.input.shape[1];
    const input = f32(ex.input.values);
    const rgb = inputRgb(input, ex.input.mean, ex.input.std, size);
    const maps = {};
    const spatial = [];
    for (const l of fm.layers) {
      const values = f32(l.values);
      maps[l.name] = { shape: l.shape, values, mean: l.channel_mean, max: l.channel_max };
      if (l.shape.length === 3 && l.shape[1] * l.shape[2] > 1) {
        spatial.push(l.name);
        const [c, h, w] = l.shape;
        maps[l.name].urls = [...Array(c).keys()].map((ch) => greyUrl(values, ch * h * w, h, w));
      }
    }
    const residual = ex.residual
      ? Object.fromEntries(["input", "shortcut", "branch", "sum", "output"].map((k) => [k, f32(ex.residual[k])]))
      : null;
    state.analysis = { explain: ex, maps, spatial, input, rgb, size, cam: f32(ex.cam.values), residual };

    // 1. input
    if (state.givenUrl) URL.revokeObjectURL(state.givenUrl);
    const given = $("given");
    const src = URL.createObjectURL(blob);
    state.givenUrl = src;
    given.onload = () => {
      given.hidden = false;
      $("given-cap").textContent = `As given: ${name}, ${given.naturalWidth} \u00d7 ${given.naturalHeight} px`;
    };
    given.onerror = () => {
      given.hidden = true;
      $("given-cap").textContent = `As given: ${name} (this browser cannot display its format; the model could)`;
    };
    given.alt = `The image as given: ${name}`;
    given.src = src;
    const seenUrl = rgbUrl(rgb, size);
    for (const id of ["seen", "slide-in", "rf-input"]) $(id).src = seenUrl;
    $("seen").alt = `The image as the model sees it: ${size} by ${size} pixels`;
    $("seen-cap").textContent =
      `As the model sees it: ${size} \u00d7 ${size} px (shorter side resized to ${size}, centre crop), ` +
      `drawn pixelated`;

    // 3. sliding kernel: the channel the first layer answered most strongly
    if (state.kernels) {
      const first = maps[state.kernels.info.layer];
      if (first) {
        let best = 0;
        first.max.forEach((v, i) => {
          if (v > first.max[best]) best = i;
        });
        state.slide.channel = best;
        $("slide-channel").value = String(best);
      }
      state.slide.playing = !matchMedia("(prefers-reduced-motion: reduce)").matches;
      slideReset();
    }

    // 4 and 5. feature maps; enlarge the strongest channel of a middle stage
    state.rf.layer = null;
    drawStages();
    const mid = spatial[Math.floor((spatial.length - 1) / 2)];
    if (mid) {
      const m = maps[mid];
      let best = 0;
      m.mean.forEach((v, i) => {
        if (v > m.mean[best]) best = i;
      });
      selectMap(mid, best, false);
    }

    // 6. head
    state.classIndex = ex.predictions[0].index;
    drawBars();
    drawCam();

    // 7. residual block
    drawResidual();
  }

  function pickFile(file) {
    if (file) analyse(file, file.name || "the pasted image");
  }

  $("file").addEventListener("change", (e) => {
    pickFile(e.target.files[0]);
    e.target.value = "";
  });
  const drop = $("drop");
  drop.addEventListener("keydown", (e) => {
    if (e.target === drop && (e.key === "Enter" || e.key === " ")) {
      e.preventDefault();
      $("file").click();
    }
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pickFile(e.dataTransfer.files[0]);
  });
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  document.addEventListener("paste", (e) => {
    for (const item of e.clipboardData ? e.clipboardData.items : []) {
      if (item.kind === "file") {
        e.preventDefault();
        pickFile(item.getAsFile());
        return;
      }
    }
  });
  for (const b of document.querySelectorAll(".sample")) {
    b.addEventListener("click", () => loadSample(b.dataset.src, b.dataset.name));
  }

  async function loadSample(src, name) {
    const resp = await fetch(url(src));
    if (!resp.ok) {
      setError(`Could not load the sample ${name}: ${resp.status}`);
      return;
    }
    await analyse(await resp.blob(), name);
  }

  // --- start --------------------------------------------------------------------------------

  async function start() {
    try {
      await tokenReady();
      const model = await api("v1/model");
      state.model = model;
      const acc = Object.entries(model.accuracy || {})
        .map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(3) : v}`)
        .join(", ");
      $("model-line").textContent =
        `Serving ${model.model} (${model.architecture}), ${model.labels.length} classes, ` +
        `${model.input_size} \u00d7 ${model.input_size} px input on ${model.device}` + (acc ? `; ${acc}` : "");
      drawArchitecture(model);
      await loadKernels(model);
      modelLoaded();
      document.body.dataset.state = "idle";
      if (state.seq === 0) {
        const first = document.querySelector(".sample");
        await loadSample(first.dataset.src, first.dataset.name);
      }
    } catch (e) {
      document.body.dataset.state = "error";
      if (e.status === 401) return; // the token form is showing
      setError(`Could not read the model: ${e.status ? e.status + " " + e.code + ": " : ""}${e.message}`);
    }
  }

  window.convserve = {
    state,
    sliding: () => {
      const r = state.slide.result;
      return r && { channel: r.channel, stride: r.stride, rows: r.ho, cols: r.wo, values: Array.from(r.post) };
    },
  };

  start();
})();
