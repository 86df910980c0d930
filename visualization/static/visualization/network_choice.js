// Dataset and network inputs of the experiment and sweep forms: choosing a dataset of
// another task (segmentation, classification) switches the network to one for that task,
// so that a form submitted as it is does not come back with a network error.
"use strict";

(function () {
  const dataset = document.getElementById("dataset");
  const network = document.getElementById("network");
  if (!dataset || !network) return;
  dataset.addEventListener("change", () => {
    const chosen = dataset.selectedOptions[0];
    const current = network.selectedOptions[0];
    if (!chosen || !chosen.dataset.network) return;
    if (!current || current.dataset.task !== chosen.dataset.task) network.value = chosen.dataset.network;
  });
}());
