/* The dataset image viewer: browse a dataset's images per site, show one with a window/level
 * and a slice slider, ask a checkpoint for its prediction, and compare the sites. For a
 * segmentation dataset, the ground-truth mask (filled) and a checkpoint's predicted mask
 * (outlined) are drawn over the slice in each class's colour, with the prediction's Dice.
 *
 * Everything comes from the viewer API with the page's session cookie (same origin). Text
 * from the data (site and class names, paths, messages) is only ever set as textContent.
 */
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("viewer-config").textContent);
  const byId = (id) => document.getElementById(id);
  const PALETTE = [
    "#1d3557", "#e63946", "#2a9d8f", "#f4a261", "#6a4c93",
    "#8ab17d", "#457b9d", "#b5838d", "#264653", "#e9c46a",
  ];
  const SLIDER_DELAY_MS = 40;
  const THUMBNAIL_SIZE = 96;

  const state = {
    site: "",
    label: "",
    page: 1,
    index: null,
    details: null,
    plane: "axial",
    slice: null,
    preset: config.defaultPreset,
    window: null, // explicit window width and level replace the preset when set
    level: null,
    checkpoint: "",
  };
  let latestRender = 0; // only the newest render may replace the picture
  let pictureUrl = null;
  let sliderTimer = null;
  let statistics = null;
  // Segmentation: the masks of the slice on screen, as decoded pictures, and their opacity.
  const overlayState = { truth: null, prediction: null, opacity: 0.45 };
  let latestOverlay = 0;

  // --- Small helpers -------------------------------------------------------------------

  function element(tag, properties, children) {
    const node = Object.assign(document.createElement(tag), properties || {});
    for (const child of children || []) node.append(child);
    return node;
  }

  function query(parameters) {
    const search = new URLSearchParams();
    for (const [name, value] of Object.entries(parameters)) {
      if (value !== null && value !== undefined && value !== "") search.set(name, value);
    }
    const text = search.toString();
    return text ? `?${text}` : "";
  }

  function imageUrl(index, suffix) {
    return `${config.imagesUrl}${index}${suffix}`;
  }

  async function failure(response) {
    const body = await response.json().catch(() => ({}));
    return new Error(body.detail || `${response.status} ${response.statusText}`);
  }

  async function getJSON(url) {
    const response = await fetch(url, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    if (!response.ok) throw await failure(response);
    return response.json();
  }

  function number(value) {
    return Number(Number(value).toPrecision(4)).toString();
  }

  function percent(fraction) {
    return `${(100 * fraction).toFixed(1)}%`;
  }

  function showError(message) {
    const box = byId("image-error");
    box.textContent = message;
    box.hidden = false;
  }

  function hideError() {
    byId("image-error").hidden = true;
  }

  // --- Browser: one page of images -----------------------------------------------------

  function thumbnail(image) {
    const picture = element("img", {
      alt: `Image ${image.index}`,
      loading: "lazy",
      src: imageUrl(image.index, ".png") + query({ size: THUMBNAIL_SIZE }),
    });
    const captions = [`#${image.index}`, image.class_name, image.site].map(
      (text) => element("span", { className: "caption", textContent: text }),
    );
    const button = element("button", {
      type: "button",
      title: `${image.path}\n${image.site} · ${image.label}: ${image.class_name}`,
    }, [picture, ...captions]);
    button.dataset.index = String(image.index);
    button.setAttribute("aria-current", String(image.index === state.index));
    button.addEventListener("click", () => selectImage(image.index));
    return element("li", {}, [button]);
  }

  async function loadPage() {
    const list = byId("image-list");
    list.replaceChildren(element("li", { className: "placeholder", textContent: "Loading…" }));
    try {
      const page = await getJSON(config.imagesUrl + query({
        site: state.site,
        label: state.label,
        page: state.page,
        page_size: config.pageSize,
      }));
      list.replaceChildren(...page.results.map(thumbnail));
      if (!page.results.length) {
        list.append(element("li", { className: "placeholder", textContent: "No images here." }));
      }
      const pages = Math.max(1, Math.ceil(page.count / config.pageSize));
      byId("page-status").textContent = `${state.page} / ${pages} (${page.count})`;
      byId("previous-page").disabled = !page.previous;
      byId("next-page").disabled = !page.next;
      if (state.index === null && page.results.length) selectImage(page.results[0].index);
    } catch (error) {
      list.replaceChildren(element("li", { className: "error", textContent: error.message }));
    }
  }

  function changeFilter(key, value) {
    state[key] = value;
    state.page = 1;
    loadPage();
  }

  // --- The selected image --------------------------------------------------------------

  function isVolume() {
    return Boolean(state.details) && state.details.shape.length === 3;
  }

  function showDetails(details) {
    const shape = details.shape.join(" × ") +
      (details.channels > 1 ? ` × ${details.channels} channels` : "");
    const intensity = details.intensity;
    const rows = [
      ["Image", `#${details.index} · ${details.path}`],
      ["Site", details.site],
      ["Label", `${details.label}: ${details.class_name}`],
      ["Shape", shape],
      ["Spacing", `${details.spacing.map(number).join(" × ")} mm`],
      ["Slices", String(details.num_slices)],
      ["Intensity", `${number(intensity.min)} to ${number(intensity.max)} ` +
        `(1st–99th percentile ${number(intensity.p1)} to ${number(intensity.p99)})`],
    ];
    byId("image-details").replaceChildren(...rows.flatMap(([term, value]) => [
      element("dt", { textContent: term }),
      element("dd", { textContent: value }),
    ]));
  }

  function updateSliceLabel() {
    const count = state.details.slices_per_plane[state.plane];
    byId("slice-value").textContent = `${state.slice + 1} / ${count}`;
  }

  function setUpSlices() {
    byId("slice-controls").hidden = !isVolume();
    for (const button of document.querySelectorAll("[data-plane]")) {
      button.classList.toggle("active", button.dataset.plane === state.plane);
    }
    if (!isVolume()) {
      state.slice = null;
      return;
    }
    const count = state.details.slices_per_plane[state.plane];
    const slider = byId("slice-slider");
    state.slice = Math.floor(count / 2);
    slider.max = String(count - 1);
    slider.value = String(state.slice);
    updateSliceLabel();
  }

  function markPreset() {
    for (const button of document.querySelectorAll("[data-preset]")) {
      button.classList.toggle(
        "active", state.window === null && button.dataset.preset === state.preset,
      );
    }
  }

  async function renderImage() {
    if (state.index === null || !state.details) return;
    const request = ++latestRender;
    const parameters = isVolume() ? { plane: state.plane, slice: state.slice } : {};
    if (state.window !== null) {
      Object.assign(parameters, { window: state.window, level: state.level });
    } else {
      parameters.preset = state.preset;
    }
    const picture = byId("main-image");
    picture.classList.add("loading");
    try {
      const response = await fetch(imageUrl(state.index, ".png") + query(parameters), {
        credentials: "same-origin",
      });
      if (!response.ok) throw await failure(response);
      const blob = await response.blob();
      if (request !== latestRender) return;
      if (pictureUrl) URL.revokeObjectURL(pictureUrl);
      pictureUrl = URL.createObjectURL(blob);
      picture.src = pictureUrl;
      picture.alt = `Image ${state.index}` +
        (isVolume() ? `, ${state.plane} slice ${state.slice + 1}` : "");
      picture.hidden = false;
      byId("image-placeholder").hidden = true;
      if (state.window === null) {
        // Show what the preset came to, so that manual changes start from there.
        byId("window-width").value = response.headers.get("X-Window-Width") || "";
        byId("window-level").value = response.headers.get("X-Window-Level") || "";
      }
      hideError();
      if (config.segmentation) loadOverlay();
    } catch (error) {
      if (request === latestRender) showError(error.message);
    } finally {
      if (request === latestRender) picture.classList.remove("loading");
    }
  }

  // --- Mask overlays (segmentation) ----------------------------------------------------

  function decodePicture(dataUrl) {
    if (!dataUrl) return Promise.resolve(null);
    return new Promise((resolve, reject) => {
      const picture = new Image();
      picture.onload = () => resolve(picture);
      picture.onerror = () => reject(new Error("A mask could not be decoded."));
      picture.src = dataUrl;
    });
  }

  // The prediction's outline: its pixels that touch a pixel of another class (or the edge),
  // in a lighter shade of their class's colour.
  function outlineOf(picture) {
    const scratch = element("canvas", { width: picture.width, height: picture.height });
    const context = scratch.getContext("2d");
    context.drawImage(picture, 0, 0);
    const pixels = context.getImageData(0, 0, picture.width, picture.height);
    const data = pixels.data;
    const width = picture.width;
    const height = picture.height;
    const colourAt = (x, y) => {
      if (x < 0 || y < 0 || x >= width || y >= height) return -1;
      const i = 4 * (y * width + x);
      return data[i + 3] === 0 ? 0 : (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
    };
    const outline = context.createImageData(width, height);
    for (let y = 0; y < height; y += 1) {
      for (let x = 0; x < width; x += 1) {
        const own = colourAt(x, y);
        if (own === 0) continue;
        if ([colourAt(x - 1, y), colourAt(x + 1, y), colourAt(x, y - 1), colourAt(x, y + 1)]
          .some((other) => other !== own)) {
          // Lighter than the class's fill, so that it shows over the ground truth.
          const i = 4 * (y * width + x);
          for (let c = 0; c < 3; c += 1) outline.data[i + c] = (data[i + c] + 255) >> 1;
          outline.data[i + 3] = 255;
        }
      }
    }
    context.putImageData(outline, 0, 0);
    return scratch;
  }

  function drawOverlay() {
    const canvas = byId("overlay-canvas");
    if (!canvas) return;
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, canvas.width, canvas.height);
    const layers = [
      [byId("show-truth").checked, overlayState.truth, overlayState.opacity],
      // The outline is thin: drawn stronger than the fill so that it stays visible.
      [byId("show-prediction").checked, overlayState.prediction,
        Math.min(1, overlayState.opacity + 0.4)],
    ];
    context.imageSmoothingEnabled = false;
    for (const [shown, picture, alpha] of layers) {
      if (!shown || !picture) continue;
      // Fitted into the box as the slice is (object-fit: contain), so the masks lie on it.
      const scale = Math.min(canvas.width / picture.width, canvas.height / picture.height);
      const width = picture.width * scale;
      const height = picture.height * scale;
      context.globalAlpha = alpha;
      context.drawImage(picture, (canvas.width - width) / 2, (canvas.height - height) / 2,
        width, height);
    }
    context.globalAlpha = 1;
    canvas.dataset.drawn = String(Boolean(overlayState.truth || overlayState.prediction));
  }

  function showDice(answer) {
    const box = byId("prediction-result");
    if (!answer.checkpoint) {
      box.replaceChildren();
      return;
    }
    const names = new Map(answer.classes.map((entry) => [entry.value, entry.name]));
    const perClass = (answer.dice_per_class || [])
      .map((value, position) => `${names.get(position + 1) || `class ${position + 1}`} ` +
        (typeof value === "number" ? value.toFixed(3) : "–"));
    const summary = typeof answer.dice === "number"
      ? `Dice ${answer.dice.toFixed(3)} on this image` : "No Dice: no class in either mask";
    box.replaceChildren(element("p", {
      className: "prediction-summary", id: "overlay-dice",
      textContent: summary + (perClass.length ? ` (${perClass.join(", ")})` : "") +
        (typeof answer.hd95 === "number" ? ` · HD95 ${answer.hd95.toFixed(2)} mm` : ""),
    }));
  }

  async function loadOverlay() {
    if (!config.segmentation || state.index === null || !state.details) return;
    const request = ++latestOverlay;
    const index = state.index;
    const parameters = Object.assign({ checkpoint: state.checkpoint },
      isVolume() ? { plane: state.plane, slice: state.slice } : {});
    if (state.checkpoint) {
      byId("prediction-result").replaceChildren(
        element("p", { className: "note", textContent: "Predicting…" }));
    }
    try {
      const answer = await getJSON(imageUrl(index, "/overlay/") + query(parameters));
      const [truth, prediction] = await Promise.all([
        decodePicture(answer.ground_truth), decodePicture(answer.prediction)]);
      if (request !== latestOverlay) return;
      overlayState.truth = truth;
      overlayState.prediction = prediction ? outlineOf(prediction) : null;
      drawOverlay();
      showDice(answer);
    } catch (error) {
      if (request === latestOverlay) {
        byId("prediction-result").replaceChildren(
          element("p", { className: "error", textContent: error.message }));
      }
    }
  }

  async function selectImage(index) {
    state.index = index;
    for (const button of document.querySelectorAll("#image-list button")) {
      button.setAttribute("aria-current", String(Number(button.dataset.index) === index));
    }
    hideError();
    try {
      const details = await getJSON(imageUrl(index, "/"));
      if (state.index !== index) return;
      state.details = details;
      state.plane = "axial";
      showDetails(details);
      setUpSlices();
      renderImage(); // a segmentation dataset's masks follow each rendered slice
      if (!config.segmentation) loadPrediction();
    } catch (error) {
      showError(error.message);
    }
  }

  // --- Prediction ----------------------------------------------------------------------

  function probabilityRow(entry, predicted) {
    const fill = element("span");
    fill.style.width = percent(entry.probability);
    return element("li", { className: entry.label === predicted ? "predicted" : "" }, [
      element("span", { textContent: `${entry.label}: ${entry.name}` }),
      element("span", { className: "bar" }, [fill]),
      element("span", { textContent: percent(entry.probability) }),
    ]);
  }

  async function loadPrediction() {
    const box = byId("prediction-result");
    state.checkpoint = byId("checkpoint-select").value;
    if (config.segmentation) {
      loadOverlay(); // a mask, not a class: drawn over the slice with its Dice
      return;
    }
    if (!state.checkpoint || state.index === null) {
      box.replaceChildren();
      return;
    }
    const index = state.index;
    const checkpoint = state.checkpoint;
    box.replaceChildren(element("p", { className: "note", textContent: "Predicting…" }));
    try {
      const answer = await getJSON(imageUrl(index, "/prediction/") + query({ checkpoint }));
      if (index !== state.index || checkpoint !== state.checkpoint) return;
      const verdict = answer.correct ? "✓ correct" : "✗ wrong";
      const summary = element("p", {
        className: `prediction-summary ${answer.correct ? "correct" : "wrong"}`,
        textContent: `Predicted ${answer.predicted_class_name} ` +
          `(${percent(answer.probability)}); true class ${answer.true_class_name}: ${verdict}`,
      });
      const rows = answer.probabilities.map((entry) => probabilityRow(entry, answer.predicted_label));
      box.replaceChildren(summary, element("ul", { className: "probabilities" }, rows));
    } catch (error) {
      if (index === state.index) {
        box.replaceChildren(element("p", { className: "error", textContent: error.message }));
      }
    }
  }

  // --- Statistics ----------------------------------------------------------------------

  function siteColour(position) {
    return PALETTE[position % PALETTE.length];
  }

  function showFlags(result) {
    const list = byId("statistics-flags");
    if (!result.flags.length) {
      list.replaceChildren(element("li", {
        className: "overall",
        textContent: result.sites.length > 1
          ? "No site stands out from the others."
          : "Only one site: nothing to compare.",
      }));
      return;
    }
    list.replaceChildren(...result.flags.map((flag) => element("li", {
      className: flag.site === null ? "overall" : "",
      textContent: flag.message,
    })));
  }

  function table(id, headings, rows) {
    const head = element("thead", {}, [
      element("tr", {}, headings.map((text) => element("th", { textContent: text }))),
    ]);
    byId(id).replaceChildren(head, element("tbody", {}, rows));
  }

  function row(site, cells) {
    const tr = element("tr", { className: site.flagged ? "flagged" : "" }, [
      element("td", { textContent: site.site }),
    ]);
    for (const [text, isNumber] of cells) {
      tr.append(element("td", { className: isNumber ? "number" : "", textContent: text }));
    }
    return tr;
  }

  function showClassTable(result) {
    const rows = result.sites.map((site) => row(site, [
      ...site.class_counts.map((entry) => [String(entry.count), true]),
      [String(site.num_samples), true],
    ]));
    const totals = result.class_names.map((_, label) => result.sites.reduce(
      (sum, site) => sum + site.class_counts[label].count, 0,
    ));
    const all = totals.reduce((sum, count) => sum + count, 0);
    rows.push(row({ site: "All sites", flagged: false }, [
      ...totals.map((count) => [String(count), true]),
      [String(all), true],
    ]));
    table("class-table", ["Site", ...result.class_names, "Total"], rows);
  }

  function showGeometry(result) {
    const grid = (values) => values.map(number).join(" × ");
    const rows = result.sites.map((site) => {
      const read = site.num_unreadable
        ? `${site.num_sampled} (${site.num_unreadable} unreadable: ${site.first_error})`
        : String(site.num_sampled);
      return row(site, [
        [read, !site.num_unreadable],
        [`${number(site.mean)} ± ${number(site.std)}`, true],
        [site.shapes.map((entry) => `${grid(entry.shape)} (${entry.count})`).join(", "), false],
        [site.spacings.map((entry) => `${grid(entry.spacing)} (${entry.count})`).join(", "), false],
      ]);
    });
    table("geometry-table", ["Site", "Images read", "Mean ± std", "Size", "Spacing (mm)"], rows);
  }

  function drawHistograms(result) {
    const canvas = byId("histogram");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 560;
    const height = Math.round((width * 260) / 560);
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const context = canvas.getContext("2d");
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, width, height);

    const margin = { left: 48, right: 12, top: 12, bottom: 34 };
    const plotWidth = width - margin.left - margin.right;
    const plotHeight = height - margin.top - margin.bottom;
    const bottom = margin.top + plotHeight;
    const { low, high } = result.histogram;
    const peak = Math.max(1e-9, ...result.sites.flatMap((site) => site.histogram));

    context.strokeStyle = "#8b949e";
    context.lineWidth = 1;
    context.beginPath();
    context.moveTo(margin.left, margin.top);
    context.lineTo(margin.left, bottom);
    context.lineTo(margin.left + plotWidth, bottom);
    context.stroke();

    context.fillStyle = "#586069";
    context.font = "11px system-ui, sans-serif";
    for (const fraction of [0, 0.25, 0.5, 0.75, 1]) {
      const x = margin.left + fraction * plotWidth;
      // The end labels lean inwards so that they stay on the canvas.
      context.textAlign = fraction === 0 ? "left" : fraction === 1 ? "right" : "center";
      context.fillText(number(low + fraction * (high - low)), x, bottom + 14);
      context.beginPath();
      context.moveTo(x, bottom);
      context.lineTo(x, bottom + 4);
      context.stroke();
    }
    context.textAlign = "center";
    context.fillText("Intensity (dataset-wide 1st to 99th percentile)", margin.left + plotWidth / 2,
      bottom + 28);
    context.textAlign = "right";
    context.fillText(percent(peak), margin.left - 4, margin.top + 8);
    context.fillText("0", margin.left - 4, bottom);

    result.sites.forEach((site, position) => {
      const bins = site.histogram.length;
      context.strokeStyle = siteColour(position);
      context.lineWidth = site.flagged ? 2.5 : 1.5;
      context.beginPath();
      site.histogram.forEach((value, bin) => {
        const left = margin.left + (bin / bins) * plotWidth;
        const right = margin.left + ((bin + 1) / bins) * plotWidth;
        const y = bottom - (value / peak) * plotHeight;
        if (bin === 0) context.moveTo(left, y);
        else context.lineTo(left, y);
        context.lineTo(right, y);
      });
      context.stroke();
    });

    byId("histogram-legend").replaceChildren(...result.sites.map((site, position) => {
      const swatch = element("span", { className: "swatch" });
      swatch.style.background = siteColour(position);
      const outside = site.below_range + site.above_range > 0.01
        ? ` (${percent(site.below_range)} below, ${percent(site.above_range)} above)`
        : "";
      return element("li", { className: site.flagged ? "flagged" : "" }, [
        swatch,
        `${site.site}${site.flagged ? " ⚠" : ""}${outside}`,
      ]);
    }));
    byId("histogram-note").textContent = "Each line is the fraction of a site's sampled pixels " +
      "per bin; pixels outside the shared range are counted in brackets.";
  }

  async function loadStatistics() {
    const status = byId("statistics-status");
    try {
      statistics = await getJSON(config.statisticsUrl);
      status.textContent = `Intensities, sizes and spacings from up to ${statistics.sample_limit} ` +
        "images per site; class counts from every image.";
      showFlags(statistics);
      showClassTable(statistics);
      showGeometry(statistics);
      drawHistograms(statistics);
    } catch (error) {
      status.textContent = error.message;
      status.className = "error";
    }
  }

  // --- Wiring --------------------------------------------------------------------------

  byId("site-select").addEventListener("change", (event) => changeFilter("site", event.target.value));
  byId("label-select").addEventListener("change", (event) => changeFilter("label", event.target.value));
  byId("previous-page").addEventListener("click", () => {
    state.page = Math.max(1, state.page - 1);
    loadPage();
  });
  byId("next-page").addEventListener("click", () => {
    state.page += 1;
    loadPage();
  });

  byId("slice-slider").addEventListener("input", (event) => {
    state.slice = Number(event.target.value);
    updateSliceLabel();
    clearTimeout(sliderTimer);
    sliderTimer = setTimeout(renderImage, SLIDER_DELAY_MS);
  });
  for (const button of document.querySelectorAll("[data-plane]")) {
    button.addEventListener("click", () => {
      state.plane = button.dataset.plane;
      setUpSlices();
      renderImage();
    });
  }
  for (const button of document.querySelectorAll("[data-preset]")) {
    button.addEventListener("click", () => {
      state.preset = button.dataset.preset;
      state.window = null;
      state.level = null;
      markPreset();
      renderImage();
    });
  }
  byId("window-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const width = Number.parseFloat(byId("window-width").value);
    const level = Number.parseFloat(byId("window-level").value);
    if (!(width > 0) || !Number.isFinite(level)) {
      showError("Give a positive window width and a level.");
      return;
    }
    state.window = width;
    state.level = level;
    markPreset();
    renderImage();
  });
  byId("checkpoint-select").addEventListener("change", loadPrediction);
  if (config.segmentation) {
    byId("show-truth").addEventListener("change", drawOverlay);
    byId("show-prediction").addEventListener("change", drawOverlay);
    byId("overlay-opacity").addEventListener("input", (event) => {
      overlayState.opacity = Number(event.target.value) / 100;
      byId("overlay-opacity-value").textContent = `${event.target.value}%`;
      drawOverlay();
    });
  }
  window.addEventListener("resize", () => {
    if (statistics) drawHistograms(statistics);
  });

  markPreset();
  loadPage();
  loadStatistics();
})();
