// The comparison page: each chosen experiment's global metrics per round, from the REST API.
"use strict";

(async function () {
  const chosen = JSON.parse(document.getElementById("compare-data").textContent);
  const PALETTE = ["#3a7bd5", "#e76f51", "#2a9d8f", "#9b5de5", "#f4a261", "#457b9d"];
  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;

  async function fetchAll(url) {
    const rows = [];
    for (let next = url; next;) {
      const response = await fetch(next, { credentials: "same-origin" });
      if (!response.ok) throw new Error(`${url}: ${response.status}`);
      const page = await response.json();
      rows.push(...page.results);
      next = page.next;
    }
    return rows;
  }

  const experiments = await Promise.all(chosen.map(async ({ id }) => {
    const [experiment, rounds] = await Promise.all([
      fetch(`/api/experiments/${id}/`, { credentials: "same-origin" }).then((r) => r.json()),
      fetchAll(`/api/rounds/?experiment=${id}&status=closed&ordering=number&page_size=500`),
    ]);
    return { experiment, rounds };
  }));

  function draw(canvasId, key, yTitle, bounded) {
    new Chart(document.getElementById(canvasId), {
      type: "line",
      data: { datasets: experiments.map(({ experiment, rounds }, index) => ({
        label: `${experiment.name} (${experiment.strategy})`,
        data: rounds.filter((r) => r.metrics.global && typeof r.metrics.global[key] === "number")
          .map((r) => ({ x: r.number, y: r.metrics.global[key] })),
        borderColor: PALETTE[index % PALETTE.length],
        backgroundColor: PALETTE[index % PALETTE.length],
        tension: 0.15,
      })) },
      options: { parsing: false, plugins: { legend: { position: "bottom" } }, scales: {
        x: { type: "linear", title: { display: true, text: "round" }, ticks: { precision: 0 } },
        y: Object.assign({ title: { display: true, text: yTitle } }, bounded ? { min: 0, max: 1 } : {}),
      } },
    });
  }

  draw("accuracy-chart", "accuracy", "accuracy", true);
  draw("loss-chart", "loss", "loss", false);
  draw("auc-chart", "roc_auc", "AUC", true);
  draw("balanced-chart", "balanced_accuracy", "balanced accuracy", true);
}());
