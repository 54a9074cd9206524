// The settings panel: the open conversation's system prompt, the sampling fields and their presets. Every
// change applies at once (input event) and is saved; the preset select shows which preset the fields match.

import { h } from "./dom.js";
import { FIELDS, PRESETS, loadSampling, matchingPreset, presetValues, saveSampling } from "./settings.js";

// handlers: onSystemChange(text)
export function createSettingsPanel(panel, opener, handlers) {
  const system = panel.querySelector('[data-testid="system"]');
  const preset = panel.querySelector('[data-testid="preset"]');
  const container = panel.querySelector("#sampling-fields");
  let values = loadSampling();

  const inputs = Object.fromEntries(FIELDS.map((field) => {
    const input = h("input", {
      type: "number", inputMode: field.integer ? "numeric" : "decimal", step: field.integer ? "1" : "any",
      min: field.min ?? null, max: field.max ?? null, placeholder: "server default", dataset: { testid: field.name },
      name: field.name,
    });
    input.value = values[field.name];
    input.addEventListener("input", () => {
      values = { ...values, [field.name]: input.value };
      saveSampling(values);
      showPreset();
    });
    container.append(h("label", { class: "field" }, field.label, input));
    return [field.name, input];
  }));

  preset.append(h("option", { value: "", disabled: true }, "Custom"),
    ...Object.keys(PRESETS).map((name) => h("option", { value: name }, name)));

  function showPreset() {
    preset.value = matchingPreset(values);
  }

  preset.addEventListener("change", () => {
    if (!(preset.value in PRESETS)) return;
    values = presetValues(preset.value, values);
    for (const field of FIELDS) inputs[field.name].value = values[field.name];
    saveSampling(values);
  });

  system.addEventListener("input", () => handlers.onSystemChange(system.value));

  const close = () => {
    panel.hidden = true;
    opener.setAttribute("aria-expanded", "false");
  };
  opener.addEventListener("click", () => {
    panel.hidden = !panel.hidden;
    opener.setAttribute("aria-expanded", String(!panel.hidden));
  });
  panel.querySelector('[data-testid="settings-close"]').addEventListener("click", close);
  panel.addEventListener("keydown", (event) => {
    if (event.key === "Escape") close();
  });
  showPreset();

  return {
    sampling: () => values,
    setSystem(text) {
      if (system.value !== text) system.value = text;
    },
  };
}
