// The experiment page: a snapshot and then live events from ws/experiments/<id>/ keep one
// state object; every change redraws from that state, so a reconnect simply starts over.
"use strict";

(function () {
  const page = JSON.parse(document.getElementById("page-data").textContent);
  // The experiment's task's metrics (training/metric_catalog.py): names, labels, which way
  // is better, bounds and digits. Every chart, table and chooser below reads them from here.
  const catalogue = JSON.parse(document.getElementById("metric-catalog").textContent);
  const metricDef = (name) => catalogue.metrics[name] || { name, label: name, bounded: false, digits: 3, unit: "" };
  const primary = metricDef(catalogue.primary);
  const segmentation = catalogue.task === "segmentation";
  // The bounded scores share the global chart's right axis; unbounded ones (HD95) have their own.
  const boundedScores = catalogue.scalar.filter((name) => metricDef(name).bounded);
  const PALETTE = ["#3a7bd5", "#e76f51", "#2a9d8f", "#9b5de5", "#f4a261", "#457b9d",
    "#e63946", "#6a994e", "#b5838d", "#264653"];
  const STATUS_COLOURS = { succeeded: "#2a9d8f", failed: "#c0392b", late: "#e9a23b",
    running: "#3a7bd5", pending: "#adb5bd" };
  const HEARTBEAT_MS = 20000;
  const PONG_TIMEOUT_MS = 10000;

  const state = { experiment: null, classNames: [], rounds: new Map(), updates: new Map(),
    clientsPerRound: new Map(), lostSitesWarning: null,
    checkpoints: new Map(), privacy: null, crossSite: null };
  let chosenRound = null;

  // --- Charts -------------------------------------------------------------------------------
  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;
  const byRound = { type: "linear", title: { display: true, text: "round" }, ticks: { precision: 0 } };

  function lineChart(id, yTitle, extraScales) {
    return new Chart(document.getElementById(id), {
      type: "line",
      data: { datasets: [] },
      options: {
        parsing: false,
        scales: Object.assign({ x: byRound, y: { title: { display: true, text: yTitle } } },
          extraScales || {}),
        plugins: { legend: { position: "bottom" } },
      },
    });
  }

  const charts = {
    global: lineChart("global-chart", "loss", {
      y1: { position: "right", min: 0, max: 1, grid: { drawOnChartArea: false },
        title: { display: true, text: boundedScores.map((n) => metricDef(n).label).join(" / ") } },
    }),
    siteLoss: lineChart("site-loss-chart", "loss"),
    sitePrimary: lineChart("site-primary-chart", primary.label),
    norm: lineChart("norm-chart", "L2 norm of the update"),
    distance: lineChart("distance-chart", "L2 distance"),
    federated: lineChart("federated-chart", primary.label),
    diceByClass: segmentation ? lineChart("dice-class-chart", metricDef("dice_per_class").label) : null,
    hd95: segmentation ? lineChart("hd95-chart", `${metricDef("hd95").label} (${metricDef("hd95").unit})`) : null,
    roc: segmentation ? null : new Chart(document.getElementById("roc-chart"), {
      type: "line",
      data: { datasets: [] },
      options: { parsing: false, scales: {
        x: { type: "linear", min: 0, max: 1, title: { display: true, text: "1 - specificity" } },
        y: { min: 0, max: 1, title: { display: true, text: "sensitivity" } } } },
    }),
    timeline: new Chart(document.getElementById("timeline-chart"), {
      type: "bar",
      data: { datasets: [] },
      options: {
        indexAxis: "y",
        scales: { x: { type: "linear", title: { display: true, text: "seconds" } },
          y: { type: "category" } },
        plugins: { legend: { position: "bottom" }, tooltip: { callbacks: {
          label: (item) => {
            const raw = item.raw;
            return `round ${raw.round}: ${raw.status}, ${(raw.x[1] - raw.x[0]).toFixed(2)} s`;
          } } } },
      },
    }),
  };

  // --- State --------------------------------------------------------------------------------
  function sortedRounds() {
    return [...state.rounds.values()].sort((a, b) => a.number - b.number);
  }

  function sites() {
    return [...new Set([...state.updates.values()].map((u) => u.site))].sort();
  }

  function applySnapshot(snapshot) {
    state.experiment = snapshot.experiment;
    state.classNames = snapshot.class_names || [];
    state.rounds = new Map(snapshot.rounds.map((r) => [r.number, r]));
    state.updates = new Map(snapshot.client_updates.map((u) => [u.id, u]));
    // An experiment of many clients sends the rows of its newest rounds only (and earlier
    // failures): each round's clients counted by status, and the lost sites from all rows,
    // stand in for the rest (visualization/snapshot.py).
    state.clientsPerRound = new Map((snapshot.clients_per_round || []).map((c) => [c.round, c]));
    state.lostSitesWarning = snapshot.lost_sites_warning ?? null;
    state.checkpoints = new Map(snapshot.checkpoints.map((c) => [c.id, c]));
    // Client-level DP settings and ε per round; null when the rounds add no noise.
    state.privacy = snapshot.privacy ? Object.assign({}, snapshot.privacy,
      { epsilon: new Map(snapshot.privacy.epsilon.map((p) => [p.round, p.epsilon])) }) : null;
  }

  function applyEvent(event) {
    switch (event.type) {
      case "round.opened":
        state.rounds.set(event.round.number, event.round);
        event.client_updates.forEach((u) => state.updates.set(u.id, u));
        state.experiment.current_round = event.round.number;
        state.experiment.status = "running";
        break;
      case "client.started":
      case "client.finished":
      case "client.failed":
        state.updates.set(event.client_update.id, event.client_update);
        // A site's cross-site results fill its column as soon as it reports.
        if (event.type !== "client.started" && isCrossSiteRound(event.client_update.round_number)) {
          loadCrossSite();
        }
        break;
      case "round.evaluated": // the sites' evaluation of an earlier round's model arrived
        state.rounds.set(event.round.number, event.round);
        break;
      case "round.closed":
        state.rounds.set(event.round.number, event.round);
        (event.client_updates || []).forEach((u) => state.updates.set(u.id, u));
        if (state.privacy && typeof event.epsilon === "number") {
          state.privacy.epsilon.set(event.round.number, event.epsilon);
        }
        if (event.checkpoint) {
          if (event.checkpoint.is_best) state.checkpoints.forEach((c) => { c.is_best = false; });
          state.checkpoints.set(event.checkpoint.id, event.checkpoint);
        }
        if (event.round.kind === "evaluate") loadCrossSite();
        chosenRound = null; // follow the newest round
        break;
      case "experiment.finished":
      case "experiment.failed":
      case "experiment.stopped":
        Object.assign(state.experiment, event.experiment);
        // Distances and late clients are recorded with the end; take the ledger's word.
        send({ type: "snapshot" });
        break;
      default:
        return;
    }
  }

  // --- Drawing ------------------------------------------------------------------------------
  const fmt = (value, digits = 3) => (typeof value === "number" ? value.toFixed(digits) : "–");
  const colour = (index) => PALETTE[index % PALETTE.length];

  function series(label, points, index, extra) {
    return Object.assign({ label, data: points, borderColor: colour(index),
      backgroundColor: colour(index), pointRadius: 3, tension: 0.15 }, extra || {});
  }

  function drawGlobal() {
    const rounds = sortedRounds().filter((r) => r.metrics && r.metrics.global);
    const pick = (key) => rounds.filter((r) => typeof r.metrics.global[key] === "number")
      .map((r) => ({ x: r.number, y: r.metrics.global[key] }));
    // Scores only a binary task reports (AUC, ...) leave no empty legend entries elsewhere.
    const scores = boundedScores.map((name, index) => [name, pick(name), index])
      .filter(([name, points]) => points.length || name === catalogue.primary);
    charts.global.data.datasets = [
      series("loss", pick("loss"), 1),
      ...scores.map(([name, points, index]) => series(metricDef(name).label, points,
        index === 0 ? 0 : index + 1, Object.assign({ yAxisID: "y1" }, index ? { borderDash: [4, 3] } : {}))),
    ];
    charts.global.update();
  }

  // Segmentation: each foreground class's Dice per round (the held-out evaluation, else the
  // sites' weighted one), and HD95 of the global model and on each site's validation data.
  function perRoundSource(r) {
    if (r.metrics && r.metrics.global) return r.metrics.global;
    return (r.federated_evaluation && r.federated_evaluation.weighted) || null;
  }

  function drawSegmentation() {
    if (!segmentation) return;
    const rounds = sortedRounds().filter((r) => r.kind !== "evaluate");
    const perClass = rounds.map((r) => [r.number, (perRoundSource(r) || {}).dice_per_class])
      .filter(([, values]) => Array.isArray(values));
    const count = Math.max(0, ...perClass.map(([, values]) => values.length));
    // dice_per_class holds the foreground classes 1..K-1 (the background has no Dice).
    const name = (i) => state.classNames[i + 1] || `class ${i + 1}`;
    charts.diceByClass.data.datasets = [...Array(count).keys()].map((i) => series(name(i),
      perClass.filter(([, values]) => typeof values[i] === "number")
        .map(([number, values]) => ({ x: number, y: values[i] })), i));
    charts.diceByClass.options.scales.y.min = 0;
    charts.diceByClass.options.scales.y.max = 1;
    charts.diceByClass.update();
    const hd95 = (metrics) => (metrics && typeof metrics.hd95 === "number" ? metrics.hd95 : null);
    const line = (read) => rounds.filter((r) => hd95(read(r)) !== null).map((r) => ({ x: r.number, y: hd95(read(r)) }));
    const evaluated = rounds.filter((r) => r.federated_evaluation && r.federated_evaluation.sites);
    const names = [...new Set(evaluated.flatMap((r) => Object.keys(r.federated_evaluation.sites)))].sort();
    charts.hd95.data.datasets = [
      ...names.map((site, index) => series(site, line((r) => ((r.federated_evaluation || {}).sites || {})[site]), index)),
      series("global model (held-out)", line((r) => r.metrics && r.metrics.global), 9,
        { borderColor: "#000", backgroundColor: "#000", borderWidth: 3 }),
    ];
    charts.hd95.update();
  }

  function drawPerSite(chart, metric) {
    const updates = [...state.updates.values()].filter((u) => u.metrics && typeof u.metrics[metric] === "number");
    chart.data.datasets = sites().map((site, index) => series(site,
      updates.filter((u) => u.site === site).sort((a, b) => a.round_number - b.round_number)
        .map((u) => ({ x: u.round_number, y: u.metrics[metric] })), index));
    chart.update();
  }

  function drawTimeline() {
    const started = state.experiment.started_at ? Date.parse(state.experiment.started_at) : null;
    const updates = [...state.updates.values()].filter((u) => u.started_at);
    const now = Date.now();
    const byStatus = new Map();
    updates.forEach((u) => {
      const origin = started || Date.parse(u.started_at);
      const start = (Date.parse(u.started_at) - origin) / 1000;
      const end = ((u.finished_at ? Date.parse(u.finished_at) : now) - origin) / 1000;
      if (!byStatus.has(u.status)) byStatus.set(u.status, []);
      byStatus.get(u.status).push({ x: [start, Math.max(end, start + 0.01)], y: u.site,
        round: u.round_number, status: u.status });
    });
    charts.timeline.data.labels = sites();
    charts.timeline.data.datasets = [...byStatus.entries()].map(([status, data]) => ({
      label: status, data, grouped: false, backgroundColor: STATUS_COLOURS[status] || "#888",
      borderSkipped: false, barPercentage: 0.7 }));
    charts.timeline.update();
  }

  function evaluatedRounds() {
    return sortedRounds().filter((r) => r.metrics && r.metrics.global);
  }

  function drawRoundChoice() {
    const select = document.getElementById("round-choice");
    const rounds = evaluatedRounds();
    const current = chosenRound || (rounds.length ? rounds[rounds.length - 1].number : null);
    select.replaceChildren(...rounds.map((r) => new Option(String(r.number), String(r.number),
      false, r.number === current)));
    return current;
  }

  function drawEvaluation() {
    if (segmentation) return; // no confusion matrix or ROC curve for masks
    const number = drawRoundChoice();
    const round = state.rounds.get(number);
    const container = document.getElementById("confusion");
    const evaluation = round && round.metrics && round.metrics.global;
    if (!evaluation) {
      container.innerHTML = '<p class="muted">No evaluated round yet.</p>';
      charts.roc.data.datasets = [];
      charts.roc.update();
      return;
    }
    const names = (i) => state.classNames[i] || `class ${i}`;
    const matrix = evaluation.confusion_matrix || [];
    const table = document.createElement("table");
    table.className = "confusion";
    const head = table.createTHead().insertRow();
    head.insertCell().textContent = "true \\ predicted";
    matrix.forEach((_, j) => { head.insertCell().textContent = names(j); });
    const total = Math.max(1, ...matrix.map((row) => Math.max(...row)));
    matrix.forEach((row, i) => {
      const line = table.insertRow();
      line.insertCell().textContent = names(i);
      row.forEach((count) => {
        const cell = line.insertCell();
        cell.textContent = count;
        cell.style.background = `rgba(58, 123, 213, ${(0.85 * count / total).toFixed(2)})`;
      });
    });
    container.replaceChildren(table);
    const curve = evaluation.roc_curve;
    charts.roc.data.datasets = curve ? [
      series(`round ${number} (AUC ${fmt(evaluation.roc_auc)})`,
        curve.fpr.map((x, i) => ({ x, y: curve.tpr[i] })), 0, { pointRadius: 0 }),
      series("chance", [{ x: 0, y: 0 }, { x: 1, y: 1 }], 9, { pointRadius: 0, borderDash: [4, 4] }),
    ] : [];
    charts.roc.update();
  }

  function cell(row, content) {
    const td = row.insertCell();
    if (content instanceof Node) td.append(content); else td.textContent = content;
    return td;
  }

  function statusBadge(status) {
    const badge = document.createElement("span");
    badge.className = `status status-${status}`;
    badge.textContent = status;
    return badge;
  }

  // --- Evaluation at the sites -------------------------------------------------------------
  function isCrossSiteRound(number) {
    const round = state.rounds.get(number);
    return Boolean(round && round.kind === "evaluate");
  }

  function drawFederated() {
    const rounds = sortedRounds().filter((r) => r.federated_evaluation && r.federated_evaluation.weighted);
    const names = [...new Set(rounds.flatMap((r) => Object.keys(r.federated_evaluation.sites || {})))].sort();
    const key = catalogue.primary;
    const score = (metrics) => (metrics && typeof metrics[key] === "number" ? metrics[key] : null);
    const line = (read) => rounds.filter((r) => score(read(r)) !== null)
      .map((r) => ({ x: r.number, y: score(read(r)) }));
    charts.federated.data.datasets = [
      ...names.map((site, index) => series(site, line((r) => (r.federated_evaluation.sites || {})[site]), index)),
      series("weighted by samples", line((r) => r.federated_evaluation.weighted), 9,
        { borderColor: "#000", backgroundColor: "#000", borderWidth: 3 }),
    ];
    charts.federated.options.scales.y.min = 0;
    charts.federated.options.scales.y.max = 1;
    charts.federated.update();
  }

  let crossSiteRequest = null;

  // The matrix is read from the API (one request per change, not per event of the stream).
  function loadCrossSite() {
    if (crossSiteRequest) return;
    crossSiteRequest = fetch(`/api/experiments/${page.experiment}/cross-site/`, { credentials: "same-origin" })
      .then((response) => (response.ok ? response.json() : null))
      .then((results) => { if (results) { state.crossSite = results; drawCrossSite(); } })
      .catch(() => {})
      .finally(() => { crossSiteRequest = null; });
  }

  function drawCrossSite() {
    const container = document.getElementById("cross-site");
    const results = state.crossSite;
    if (!results || results.round === null || !results.models.length) {
      container.innerHTML = '<p class="muted">No cross-site evaluation yet: it runs after the last round.</p>';
      return;
    }
    const metric = document.getElementById("cross-site-metric").value;
    const definition = metricDef(metric);
    const value = (metrics) => (metrics && typeof metrics[metric] === "number" ? metrics[metric] : null);
    const values = results.models.flatMap((m) => results.sites.map((s) => value(results.cells[m][s])))
      .filter((v) => v !== null);
    const top = definition.bounded ? 1 : Math.max(1e-9, ...values);
    const table = document.createElement("table");
    table.className = "cross-site";
    table.dataset.round = results.round;
    table.dataset.status = results.status;
    const head = table.createTHead().insertRow();
    head.insertCell().textContent = "model \\ data of";
    results.sites.forEach((site) => { head.insertCell().textContent = site; });
    head.insertCell().textContent = "all (weighted)";
    const body = table.createTBody();
    results.models.forEach((model) => {
      const row = body.insertRow();
      row.dataset.model = model;
      row.insertCell().textContent =
        model === "global" ? (results.personalized ? "global (personalized)" : "global") : `${model}'s local`;
      [...results.sites.map((site) => [site, results.cells[model][site]]),
        ["weighted", results.weighted[model]]].forEach(([site, metrics]) => {
        const td = row.insertCell();
        td.dataset.site = site;
        const number = value(metrics);
        if (number === null) {
          td.className = "missing";
          const client = results.clients[site];
          td.textContent = "–";
          td.title = client && client.error ? `${client.status}: ${client.error}` : "no result";
          return;
        }
        td.textContent = number.toFixed(definition.digits);
        // Darker is better: high accuracy or Dice, low loss or HD95.
        const share = number / top;
        const strength = definition.higher_is_better ? share : 1 - share;
        td.style.background = `rgba(42, 157, 143, ${(0.9 * Math.min(1, Math.max(0, strength))).toFixed(2)})`;
        if (strength > 0.6) td.style.color = "#fff";
      });
    });
    container.replaceChildren(table);
  }

  document.getElementById("cross-site-metric").addEventListener("change", drawCrossSite);

  // Every failed or late client with its reason, and the sites that failed in every training
  // round they were picked for (training/faults.py says the same on the server).
  function drawFailures() {
    const failed = [...state.updates.values()]
      .filter((u) => ["failed", "late"].includes(u.status))
      .sort((a, b) => a.round_number - b.round_number || a.site.localeCompare(b.site));
    const body = document.querySelector("#failures-table tbody");
    body.replaceChildren();
    failed.forEach((u) => {
      const row = body.insertRow();
      row.dataset.round = u.round_number;
      row.dataset.site = u.site;
      const round = state.rounds.get(u.round_number);
      cell(row, round && round.kind === "evaluate" ? `${u.round_number} (cross-site)` : String(u.round_number));
      cell(row, u.site);
      cell(row, statusBadge(u.status));
      cell(row, u.error || "").className = "reason";
    });
    document.getElementById("failures-card").hidden = failed.length === 0;
    const outcomes = new Map();
    [...state.updates.values()].forEach((u) => {
      const round = state.rounds.get(u.round_number);
      if (!round || round.kind === "evaluate" || !["succeeded", "failed", "late"].includes(u.status)) return;
      if (!outcomes.has(u.site)) outcomes.set(u.site, []);
      outcomes.get(u.site).push(u);
    });
    const lost = [...outcomes.entries()]
      .filter(([, updates]) => updates.every((u) => u.status !== "succeeded"))
      .map(([site, updates]) => {
        const last = updates.sort((a, b) => a.round_number - b.round_number)[updates.length - 1];
        return `${site} (failed in all ${updates.length} of its rounds; last: ${last.error || last.status})`;
      });
    const warning = document.getElementById("lost-sites");
    if (state.lostSitesWarning !== null) { // the rows here are not all of them
      warning.hidden = !state.lostSitesWarning;
      warning.textContent = state.lostSitesWarning;
      return;
    }
    warning.hidden = lost.length === 0;
    if (lost.length) warning.textContent = `Sites that never contributed: ${lost.join("; ")}.`;
  }

  function drawRoundsTable() {
    const body = document.querySelector("#rounds-table tbody");
    body.replaceChildren();
    sortedRounds().forEach((r) => {
      const evaluation = (r.metrics && r.metrics.global) || {};
      const clients = [...state.updates.values()].filter((u) => u.round_number === r.number);
      // "4/4" on a failed round read as success: count the clients that trained.
      let succeeded = clients.filter((u) => u.status === "succeeded").length;
      let lost = clients.filter((u) => ["failed", "late"].includes(u.status)).length;
      let picked = clients.length;
      const counted = state.clientsPerRound.get(r.number); // a round whose rows were not all sent
      const countedTotal = counted ? Object.entries(counted)
        .filter(([key]) => key !== "round").reduce((sum, [, n]) => sum + n, 0) : 0;
      if (countedTotal > picked) {
        succeeded = counted.succeeded || 0;
        lost = (counted.failed || 0) + (counted.late || 0);
        picked = countedTotal;
      }
      const row = body.insertRow();
      row.dataset.round = r.number;
      cell(row, r.kind === "evaluate" ? `${r.number} (cross-site)` : String(r.number));
      cell(row, statusBadge(r.status));
      cell(row, `${succeeded}/${picked} succeeded${lost ? `, ${lost} failed or late` : ""}`);
      catalogue.scalar.forEach((name) => cell(row, fmt(evaluation[name], metricDef(name).digits)));
      cell(row, fmt(r.metrics && r.metrics.wall_seconds, 2));
      cell(row, new Date(r.opened_at).toLocaleTimeString());
    });
  }

  function drawCheckpoints() {
    const body = document.querySelector("#checkpoints-table tbody");
    body.replaceChildren();
    [...state.checkpoints.values()].sort((a, b) => (a.round_number || 0) - (b.round_number || 0))
      .forEach((c) => {
        const row = body.insertRow();
        cell(row, c.round_number === null ? "initial" : String(c.round_number));
        cell(row, c.num_parameters.toLocaleString());
        cell(row, `${(c.size_bytes / 1024).toFixed(1)} KiB`);
        const hash = document.createElement("code");
        hash.textContent = c.sha256.slice(0, 16) + "…";
        hash.title = c.sha256;
        cell(row, hash);
        cell(row, c.is_best ? "★ best" : "");
        const link = document.createElement("a");
        link.href = `/api/checkpoints/${c.id}/download/`;
        link.textContent = "download";
        cell(row, link);
      });
  }

  // Made when first shown: a chart drawn in a hidden card would have no size.
  let epsilonChart = null;

  function drawPrivacy() {
    const card = document.getElementById("privacy-card");
    card.hidden = !state.privacy;
    if (!state.privacy) return;
    const privacy = state.privacy;
    document.getElementById("privacy-settings").textContent =
      `δ = ${privacy.delta}; clip ${privacy.clip}, noise multiplier ${privacy.noise_multiplier}` +
      ` at the ${privacy.noise_at}`;
    if (!epsilonChart) epsilonChart = lineChart("epsilon-chart", "ε");
    const points = [...privacy.epsilon.entries()].sort((a, b) => a[0] - b[0])
      .map(([round, epsilon]) => ({ x: round, y: epsilon }));
    epsilonChart.data.datasets = [series("ε spent", points, 3)];
    epsilonChart.update();
  }

  function drawHeader() {
    const experiment = state.experiment;
    const status = document.getElementById("status");
    status.className = `status status-${experiment.status}`;
    status.textContent = experiment.status;
    // As Experiment.round_progress: the cross-site round follows the last training round.
    const last = `${experiment.num_rounds}/${experiment.num_rounds}`;
    document.getElementById("round-progress").textContent =
      experiment.current_round <= experiment.num_rounds
        ? `${experiment.current_round}/${experiment.num_rounds}`
        : (experiment.status === "running" ? `${last}, cross-site evaluation` : last);
    const failure = document.getElementById("failure");
    failure.hidden = !experiment.failure_reason;
    failure.textContent = experiment.failure_reason || "";
    const stop = document.getElementById("stop");
    if (stop) stop.hidden = !["queued", "running"].includes(experiment.status);
    // Shown by the server only where it applies; never once the experiment ended.
    const resume = document.getElementById("resume");
    if (resume && experiment.status !== "running") resume.hidden = true;
    const noWorker = document.getElementById("no-worker");
    if (noWorker && experiment.status !== "running") noWorker.hidden = true;
    document.body.dataset.status = experiment.status;
  }

  function draw() {
    if (!state.experiment) return;
    drawHeader();
    drawGlobal();
    drawPerSite(charts.siteLoss, "loss");
    drawPerSite(charts.sitePrimary, catalogue.primary);
    drawPerSite(charts.norm, "update_norm");
    drawPerSite(charts.distance, "distance_to_aggregate");
    drawTimeline();
    drawPrivacy();
    drawFederated();
    drawSegmentation();
    drawEvaluation();
    drawRoundsTable();
    drawFailures();
    drawCheckpoints();
  }

  if (!segmentation) {
    document.getElementById("round-choice").addEventListener("change", (e) => {
      chosenRound = Number(e.target.value);
      drawEvaluation();
    });
  }

  // --- Stop ---------------------------------------------------------------------------------
  const stopButton = document.getElementById("stop");
  if (stopButton) {
    stopButton.addEventListener("click", async () => {
      if (!window.confirm("Stop this experiment? Its open round is marked failed.")) return;
      const csrf = document.cookie.split("; ").find((c) => c.startsWith("csrftoken="));
      const response = await fetch(`/api/experiments/${page.experiment}/stop/`, {
        method: "POST", credentials: "same-origin",
        headers: { "X-CSRFToken": csrf ? csrf.split("=")[1] : "" },
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        window.alert(body.detail || `Stopping failed (${response.status}).`);
      }
    });
  }

  // --- Resume --------------------------------------------------------------------------------
  const resumeButton = document.getElementById("resume");
  if (resumeButton) {
    resumeButton.addEventListener("click", async () => {
      const csrf = document.cookie.split("; ").find((c) => c.startsWith("csrftoken="));
      const response = await fetch(`/api/experiments/${page.experiment}/resume/`, {
        method: "POST", credentials: "same-origin",
        headers: { "X-CSRFToken": csrf ? csrf.split("=")[1] : "" },
      });
      if (response.ok) {
        resumeButton.hidden = true;
        const noWorker = document.getElementById("no-worker");
        if (noWorker) noWorker.hidden = true;
      } else {
        const body = await response.json().catch(() => ({}));
        window.alert(body.detail || `Resuming failed (${response.status}).`);
      }
    });
  }

  // --- WebSocket: reconnects by itself, says when it is disconnected -----------------------
  let socket = null;
  let retryDelay = 1000;
  let heartbeat = null;
  let pongDeadline = null;
  const banner = document.getElementById("connection");

  function send(message) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${window.location.host}/ws/experiments/${page.experiment}/`);
    socket.addEventListener("open", () => {
      banner.hidden = true;
      retryDelay = 1000;
      heartbeat = setInterval(() => {
        send({ type: "ping" });
        pongDeadline = setTimeout(() => socket.close(), PONG_TIMEOUT_MS);
      }, HEARTBEAT_MS);
    });
    socket.addEventListener("message", (message) => {
      const data = JSON.parse(message.data);
      if (data.type === "pong") { clearTimeout(pongDeadline); return; }
      if (data.type === "snapshot") {
        applySnapshot(data);
        if (sortedRounds().some((r) => r.kind === "evaluate")) loadCrossSite();
      } else {
        applyEvent(data);
      }
      draw();
    });
    socket.addEventListener("close", (event) => {
      clearInterval(heartbeat);
      clearTimeout(pongDeadline);
      if (event.code === 4401 || event.code === 4403) {
        banner.textContent = "You may not watch this experiment (log in again?).";
        banner.hidden = false;
        return;
      }
      banner.textContent = "Disconnected from the live stream; reconnecting…";
      banner.hidden = false;
      setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 15000);
    });
  }

  connect();
}());
