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

  // One chart per compared metric, as the metric catalogue describes it.
  const metrics = JSON.parse(document.getElementById("compare-metrics").textContent);
  const grid = document.getElementById("compare-charts");

  function draw(metric) {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.metric = metric.name;
    const title = document.createElement("h2");
    title.textContent = `Global ${metric.label}${metric.unit ? ` (${metric.unit})` : ""}`;
    const holder = document.createElement("div");
    holder.className = "chart";
    const canvas = document.createElement("canvas");
    canvas.id = `${metric.name}-chart`;
    holder.append(canvas);
    card.append(title, holder);
    grid.append(card);
    new Chart(canvas, {
      type: "line",
      data: { datasets: experiments.map(({ experiment, rounds }, index) => ({
        label: `${experiment.name} (${experiment.strategy})`,
        data: rounds.filter((r) => r.metrics.global && typeof r.metrics.global[metric.name] === "number")
          .map((r) => ({ x: r.number, y: r.metrics.global[metric.name] })),
        borderColor: PALETTE[index % PALETTE.length],
        backgroundColor: PALETTE[index % PALETTE.length],
        tension: 0.15,
      })) },
      options: { parsing: false, plugins: { legend: { position: "bottom" } }, scales: {
        x: { type: "linear", title: { display: true, text: "round" }, ticks: { precision: 0 } },
        y: Object.assign({ title: { display: true, text: metric.label } },
          metric.bounded ? { min: 0, max: 1 } : {}),
      } },
    });
  }

  metrics.forEach(draw);
}());
