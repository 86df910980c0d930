// The new-experiment form: a field per parameter of the chosen strategy (from
// describe_strategies(), with its default and range), switching with the strategy, and the
// server's checks repeated before submitting so that a mistake is shown where it is.
"use strict";

(function () {
  const form = document.getElementById("new-experiment");
  const strategies = JSON.parse(document.getElementById("strategy-descriptions").textContent);
  const initialValues = JSON.parse(document.getElementById("strategy-params-values").textContent);
  const strategySelect = document.getElementById("strategy");
  const paramsBox = document.getElementById("strategy-params");
  const description = document.getElementById("strategy-description");
  const field = (id) => document.getElementById(id);
  // What was typed per strategy and parameter, kept while switching back and forth.
  const typed = {};
  typed[strategySelect.value] = Object.assign({}, initialValues);

  function describe(strategy) {
    return strategies.find((each) => each.name === strategy);
  }

  function rangeText(parameter) {
    const low = parameter.minimum === null || parameter.minimum === undefined ? null
      : `${parameter.exclusive_minimum ? "(" : "["}${parameter.minimum}`;
    const high = parameter.maximum === null || parameter.maximum === undefined ? null
      : `${parameter.maximum}${parameter.exclusive_maximum ? ")" : "]"}`;
    if (low && high) return `range ${low}, ${high}`;
    if (low) return `at least ${parameter.minimum}${parameter.exclusive_minimum ? " (excluded)" : ""}`;
    if (high) return `at most ${parameter.maximum}${parameter.exclusive_maximum ? " (excluded)" : ""}`;
    return "";
  }

  function renderParameters() {
    const strategy = describe(strategySelect.value);
    paramsBox.replaceChildren();
    description.textContent = strategy ? `${strategy.title}: ${strategy.description} (${strategy.paper})` : "";
    if (!strategy) return;
    const values = typed[strategy.name] || {};
    for (const parameter of strategy.parameters) {
      const row = document.createElement("div");
      row.className = "row";
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.id = `param-${parameter.name}`;
      input.name = `strategy_params.${parameter.name}`;
      input.type = "number";
      input.step = parameter.type === "int" ? "1" : "any";
      if (parameter.minimum !== null && parameter.minimum !== undefined) input.min = parameter.minimum;
      if (parameter.maximum !== null && parameter.maximum !== undefined) input.max = parameter.maximum;
      input.placeholder = `default ${parameter.default}`;
      input.value = values[parameter.name] !== undefined ? values[parameter.name] : parameter.default;
      input.dataset.parameter = parameter.name;
      input.addEventListener("input", () => {
        typed[strategy.name] = Object.assign(typed[strategy.name] || {}, { [parameter.name]: input.value });
      });
      label.htmlFor = input.id;
      label.textContent = parameter.name;
      const cell = document.createElement("div");
      const help = document.createElement("div");
      help.className = "param-help";
      help.textContent = [parameter.description, `default ${parameter.default}`, rangeText(parameter)]
        .filter(Boolean).join(" · ");
      cell.append(input, help);
      row.append(label, cell);
      paramsBox.append(row);
    }
  }

  // The same rules as the API's (training/api/serializers.py), each on its own input.
  function parameterProblem(parameter, text) {
    if (text.trim() === "") return "";
    const value = Number(text);
    if (!Number.isFinite(value)) return `${parameter.name} must be a number.`;
    if (parameter.type === "int" && !Number.isInteger(value)) return `${parameter.name} must be a whole number.`;
    const { minimum, maximum } = parameter;
    if (minimum !== null && minimum !== undefined
        && (parameter.exclusive_minimum ? value <= minimum : value < minimum)) {
      return `${parameter.name} must be ${parameter.exclusive_minimum ? "above" : "at least"} ${minimum}.`;
    }
    if (maximum !== null && maximum !== undefined
        && (parameter.exclusive_maximum ? value >= maximum : value > maximum)) {
      return `${parameter.name} must be ${parameter.exclusive_maximum ? "below" : "at most"} ${maximum}.`;
    }
    return "";
  }

  function number(id) {
    const text = field(id).value.trim();
    return text === "" ? null : Number(text);
  }

  function check(id, problem) {
    field(id).setCustomValidity(problem || "");
    return !problem;
  }

  function validate() {
    let ok = true;
    const strategy = describe(strategySelect.value);
    for (const parameter of strategy ? strategy.parameters : []) {
      const input = field(`param-${parameter.name}`);
      ok = check(input.id, parameterProblem(parameter, input.value)) && ok;
    }
    const sites = field("sites").selectedOptions.length;
    const fraction = number("client_fraction");
    ok = check("client_fraction", fraction !== null && !(fraction > 0 && fraction <= 1)
      ? "Give a share of the sites in (0, 1], e.g. 0.5 for half of them." : "") && ok;
    const perRound = fraction !== null ? Math.ceil(fraction * sites - 1e-9) : number("clients_per_round");
    const minimum = number("min_clients");
    ok = check("min_clients", minimum !== null && perRound !== null && minimum > perRound
      ? `Must not exceed the clients a round will have (${perRound}).` : "") && ok;
    ok = check("clients_per_round", fraction === null && perRound !== null && sites < perRound
      ? `Choose at least ${perRound} sites, or fewer clients per round.` : "") && ok;
    const clip = number("dp_clip");
    const noise = number("dp_noise") || 0;
    let clipProblem = "";
    if (clip !== null && clip <= 0) clipProblem = "Give a positive L2 norm, or leave it empty for no clipping.";
    else if (clip === null && noise > 0) clipProblem = "Noise is dp_noise x dp_clip: give a clipping norm with the noise.";
    ok = check("dp_clip", clipProblem) && ok;
    ok = check("dp_at", clip === null && !clipProblem && field("dp_at").value === "client"
      ? "Noise at the clients needs a clipping norm." : "") && ok;
    const delta = number("dp_delta");
    ok = check("dp_delta", noise > 0 && !(delta > 0 && delta < 1)
      ? "Give a delta in (0, 1) for the privacy accounting, e.g. 1e-5." : "") && ok;
    const localNoise = number("local_dp_noise");
    const localClip = number("local_dp_clip");
    const both = "Local DP-SGD needs both its noise multiplier and its gradient norm; give both or neither.";
    ok = check("local_dp_clip", localNoise !== null && localClip === null ? both
      : localClip !== null && localClip <= 0 ? "Give a positive per-sample gradient norm." : "") && ok;
    ok = check("local_dp_noise", localClip !== null && localNoise === null ? both : "") && ok;
    return ok;
  }

  strategySelect.addEventListener("change", renderParameters);
  // A change anywhere may fix a problem shown on another input (the noise on the clip).
  for (const type of ["input", "change"]) {
    form.addEventListener(type, () => {
      for (const element of form.elements) {
        if (element.setCustomValidity) element.setCustomValidity("");
      }
    });
  }
  form.addEventListener("submit", (event) => {
    if (!validate()) {
      event.preventDefault();
      form.reportValidity();
    }
  });
  renderParameters();
}());
