// The home page's submit form: the templates from GET /api/templates, one
// form field per parameter, and POST /api/jobs.

import { rememberWatchToken } from "./auth.js";
import { $, el } from "./dom.js";
import { api } from "./http.js";

let templates = [];

export async function loadTemplates() {
  const status = $("templates-status");
  try {
    templates = (await api("api/templates")).templates || [];
  } catch (error) {
    status.textContent = `Could not load the templates: ${error.message}`;
    return;
  }
  if (templates.length === 0) {
    status.textContent = "The server offers no templates.";
    return;
  }
  status.hidden = true;
  renderTemplateChoice();
  $("submit-form").hidden = false;
}

function renderTemplateChoice() {
  const box = $("template-choice");
  const chosen = box.querySelector("input:checked")?.value || templates[0].name;
  box.replaceChildren(el("legend", {}, "Template"));
  for (const template of templates) {
    const id = `template-${template.name}`;
    const radio = el("input", { type: "radio", name: "template", id, value: template.name,
                                checked: template.name === chosen });
    radio.addEventListener("change", renderParams);
    box.append(el("div", { className: "choice" }, radio,
      el("label", { htmlFor: id }, el("strong", {}, template.name),
        template.description ? el("span", { className: "muted" }, ` — ${template.description}`) : null)));
  }
  renderParams();
}

function selectedTemplate() {
  const name = $("template-choice").querySelector("input:checked")?.value;
  return templates.find((t) => t.name === name) || templates[0];
}

function renderParams() {
  const template = selectedTemplate();
  const box = $("params");
  box.replaceChildren(...template.params.map(paramField));
  $("inputs-box").hidden = !template.accepts_inputs;
  $("inputs-list").replaceChildren();
  $("submit-error").hidden = true;
}

// One form field per parameter, typed by the parameter's type, default filled.
function paramField(param) {
  const id = `param-${param.name}`;
  const input = paramInput(param, id);
  input.dataset.param = param.name;
  input.dataset.type = param.type;
  const hint = param.description ? el("p", { className: "hint", id: `${id}-hint` }, param.description) : null;
  const error = el("p", { className: "field-error", id: `${id}-error`, hidden: true });
  input.setAttribute("aria-describedby", [hint && hint.id, error.id].filter(Boolean).join(" "));
  const label = el("label", { htmlFor: id }, param.name, param.required ? " (required)" : "");
  if (param.type === "bool") {
    return el("div", { className: "field field-check" }, input, label, hint, error);
  }
  return el("div", { className: "field" }, label, input, hint, error);
}

function paramInput(param, id) {
  const has = (key) => param[key] !== undefined && param[key] !== null;
  switch (param.type) {
    case "bool":
      return el("input", { type: "checkbox", id, checked: param.default === true });
    case "choice": {
      const select = el("select", { id, required: param.required });
      if (!param.required && !has("default")) select.append(el("option", { value: "" }, "—"));
      for (const choice of param.choices || []) {
        select.append(el("option", { value: choice, selected: choice === param.default }, choice));
      }
      return select;
    }
    case "int":
    case "float": {
      const input = el("input", { type: "number", id, required: param.required,
                                  step: param.type === "int" ? "1" : "any", inputMode: param.type === "int" ? "numeric" : "decimal" });
      if (has("min")) input.min = String(param.min);
      if (has("max")) input.max = String(param.max);
      if (has("default")) input.value = String(param.default);
      return input;
    }
    default: {
      // str and url. A long free text gets a textarea (no pattern support there).
      const long = param.type === "str" && !param.pattern && (param.max_length || 1000) > 200;
      const input = long
        ? el("textarea", { id, rows: 3, required: param.required })
        : el("input", { id, type: param.type === "url" ? "url" : "text", required: param.required,
                        spellcheck: param.type !== "url" });
      if (has("max_length")) input.maxLength = param.max_length;
      if (has("pattern") && !long) input.pattern = param.pattern;
      if (param.type === "url") input.placeholder = "https://…";
      if (has("default")) input.value = String(param.default);
      return input;
    }
  }
}

function addInputRow(value = "") {
  const list = $("inputs-list");
  const index = list.children.length + 1;
  const id = `input-url-${Date.now()}-${index}`;
  const input = el("input", { type: "url", id, value, placeholder: "https://…", className: "input-url" });
  const remove = el("button", { type: "button", className: "secondary" }, "Remove");
  const row = el("li", {}, el("label", { htmlFor: id, className: "visually-hidden" }, `Input URL ${index}`), input, remove);
  remove.setAttribute("aria-label", `Remove input URL ${index}`);
  remove.addEventListener("click", () => { row.remove(); $("add-input").focus(); });
  list.append(row);
  input.focus();
}

// The form's values as the API wants them: numbers as numbers, empty optional
// fields left out (the server fills in defaults).
function collectParams() {
  const params = {};
  for (const input of $("params").querySelectorAll("[data-param]")) {
    const { param: name, type } = input.dataset;
    if (type === "bool") params[name] = input.checked;
    else if (input.value.trim() === "") continue;
    else if (type === "int") params[name] = Number.parseInt(input.value, 10);
    else if (type === "float") params[name] = Number(input.value);
    else params[name] = input.value;
  }
  return params;
}

function collectInputs() {
  return [...$("inputs-list").querySelectorAll("input")].map((i) => i.value.trim()).filter(Boolean);
}

function showFieldProblems(problems) {
  for (const node of $("submit-form").querySelectorAll(".field-error")) {
    node.hidden = true;
    node.textContent = "";
  }
  for (const input of $("submit-form").querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  let first = null;
  for (const [name, problem] of Object.entries(problems || {})) {
    const input = $(`param-${name}`);
    const error = $(`param-${name}-error`);
    if (!input || !error) continue;
    error.textContent = `${name}: ${problem}`;
    error.hidden = false;
    input.setAttribute("aria-invalid", "true");
    first = first || input;
  }
  return first;
}

// Submitting: POST /api/jobs, then open the job page, which watches
// WS /ws/jobs/{id}?after=0. We do not use WS /ws/jobs (submit over the
// socket) because (1) a browser cannot send the API key on a websocket, and
// /ws/jobs requires one when keys are configured; (2) POST returns the job's
// id and watch token before any event, so the page is linkable at once and
// a first connection and a reconnection are the very same code path.
async function submitJob(event) {
  event.preventDefault();
  const template = selectedTemplate();
  const button = $("submit-button");
  const errorBox = $("submit-error");
  errorBox.hidden = true;
  showFieldProblems({});
  button.disabled = true;
  try {
    const job = await api("api/jobs", { method: "POST", body: {
      template: template.name, params: collectParams(), inputs: collectInputs() } });
    rememberWatchToken(job);
    location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
  } catch (error) {
    errorBox.textContent = `Not submitted: ${error.message}`;
    errorBox.hidden = false;
    const first = showFieldProblems(error.body && error.body.problems);
    (first || errorBox).focus?.();
  } finally {
    button.disabled = false;
  }
}

export function setupSubmitForm() {
  $("submit-form").addEventListener("submit", submitJob);
  $("add-input").addEventListener("click", () => addInputRow());
}
