// A sweep's comparison page: everything comes from /api/sweeps/<id>/comparison/ (the
// statistics are computed once, on the server), polled until every experiment has ended.
"use strict";

(function () {
  const page = JSON.parse(document.getElementById("page-data").textContent);
  const PALETTE = ["#3a7bd5", "#e76f51", "#2a9d8f", "#9b5de5", "#f4a261", "#457b9d",
    "#e63946", "#6a994e", "#b5838d", "#264653"];
  const TERMINAL = new Set(["completed", "failed", "stopped"]);
  const POLL_MS = 2000;
  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;

  const chart = new Chart(document.getElementById("curve-chart"), {
    type: "line",
    data: { datasets: [] },
    options: {
      parsing: false,
      plugins: { legend: { position: "bottom" } },
      scales: {
        x: { type: "linear", title: { display: true, text: "round" }, ticks: { precision: 0 } },
        y: { title: { display: true, text: "" } },
      },
    },
  });

  // The same text as training/comparison.py's format_statistic and format_rounds_to_target.
  function statistic(value) {
    if (value.mean === null) return "–";
    if (value.std === null) return value.mean.toFixed(4);
    return `${value.mean.toFixed(4)} ± ${value.std.toFixed(4)}`;
  }

  function roundsToTarget(value) {
    if (!value.reached) return "not reached";
    const spread = value.std === null ? "" : ` ± ${value.std.toFixed(1)}`;
    return `${value.mean.toFixed(1)}${spread} (${value.reached}/${value.runs})`;
  }

  function cells(row, values, { tag = "td", className = "" } = {}) {
    for (const value of values) {
      const cell = document.createElement(tag);
      cell.textContent = value;
      if (className) cell.className = className;
      row.append(cell);
    }
  }

  function table(id, header, rows) {
    const element = document.getElementById(id);
    const headRow = document.createElement("tr");
    cells(headRow, header, { tag: "th" });
    element.querySelector("thead").replaceChildren(headRow);
    element.querySelector("tbody").replaceChildren(...rows.map(([label, ...numbers]) => {
      const row = document.createElement("tr");
      cells(row, [label]);
      cells(row, numbers, { className: "number" });
      return row;
    }));
  }

  function render(comparison) {
    const target = `rounds to ${comparison.target_metric} ${comparison.target_value}`;
    table("comparison-table", ["group", "runs", ...comparison.metrics, target],
      comparison.groups.map((group) => [group.label, String(group.experiments.length),
        ...comparison.metrics.map((metric) => statistic(group.final[metric])),
        roundsToTarget(group.rounds_to_target)]));
    const sources = new Set(comparison.groups.flatMap((g) => g.experiments.map((e) => e.source))
      .filter(Boolean));
    document.getElementById("comparison-source").textContent = sources.size
      ? `Metrics of the last closed round: ${[...sources].join(", ")} evaluation `
        + "(global: the server's held-out data; federated: the sites' validation splits, "
        + "sample-weighted; clients: the clients' training)." : "No round has closed yet.";

    const slugs = [...new Set(comparison.groups.flatMap((g) => Object.keys(g.sites)))].sort();
    const metric = comparison.target_metric;
    table("sites-table", ["group", ...slugs], comparison.groups.map((group) => [group.label,
      ...slugs.map((slug) => (group.sites[slug] && group.sites[slug][metric]
        ? statistic(group.sites[slug][metric]) : "–"))]));
    const siteSources = new Set(comparison.groups.flatMap((g) => g.site_sources));
    document.getElementById("sites-source").textContent = siteSources.has("clients")
      ? "Where the sites did not evaluate the global model, their own training metrics of the last round are shown."
      : "";

    chart.options.scales.y.title.text = metric;
    chart.data.datasets = comparison.groups.map((group, index) => ({
      label: group.label,
      data: group.curve.map((point) => ({ x: point.round, y: point.mean })),
      borderColor: PALETTE[index % PALETTE.length],
      backgroundColor: PALETTE[index % PALETTE.length],
      tension: 0.15,
    }));
    chart.update();

    const body = document.querySelector("#experiments-table tbody");
    body.replaceChildren(...comparison.groups.flatMap((group) => group.experiments.map((experiment) => {
      const row = document.createElement("tr");
      const link = document.createElement("a");
      link.href = `/experiments/${experiment.id}/`;
      link.textContent = experiment.name;
      const first = document.createElement("td");
      first.append(link);
      row.append(first);
      const status = document.createElement("span");
      status.className = `status status-${experiment.status}`;
      status.textContent = experiment.status;
      const statusCell = document.createElement("td");
      statusCell.append(status);
      cells(row, [group.label, String(experiment.seed)]);
      row.append(statusCell);
      cells(row, [String(experiment.rounds_closed),
        experiment.rounds_to_target === null ? "not reached" : String(experiment.rounds_to_target)]);
      return row;
    })));

    const counts = comparison.statuses;
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    const ended = Object.entries(counts).filter(([s]) => TERMINAL.has(s)).reduce((a, [, n]) => a + n, 0);
    document.getElementById("sweep-progress").textContent = `${ended}/${total} ended (`
      + Object.entries(counts).map(([s, n]) => `${n} ${s}`).join(", ") + ")";
    return ended === total;
  }

  async function refresh() {
    let finished = false;
    try {
      const response = await fetch(`/api/sweeps/${page.sweep}/comparison/`, { credentials: "same-origin" });
      if (!response.ok) throw new Error(`comparison: ${response.status}`);
      finished = render(await response.json());
      document.body.dataset.sweep = finished ? "ended" : "running";
    } catch (error) {
      document.getElementById("comparison-source").textContent = `Could not load the comparison: ${error.message}`;
    }
    if (!finished) setTimeout(refresh, POLL_MS);
  }

  refresh();
}());
