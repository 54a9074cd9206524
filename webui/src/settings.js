// Sampling settings: global, kept in localStorage as the strings typed; an empty field means "the server's
// default" and is not sent. A preset fills every sampling field (those it does not name are emptied); max_tokens
// is a length limit, not a way of sampling, so presets leave it as it is.

const STORAGE = "qwen-chat.sampling";

export const FIELDS = [
  { name: "temperature", label: "Temperature", integer: false, min: 0, max: 2, step: 0.05 },
  { name: "top_p", label: "Top p", integer: false, min: 0, max: 1, step: 0.01 },
  { name: "top_k", label: "Top k", integer: true, min: -1, step: 1 },
  { name: "min_p", label: "Min p", integer: false, min: 0, max: 1, step: 0.01 },
  { name: "repetition_penalty", label: "Repetition penalty", integer: false, min: 0, max: 10, step: 0.05 },
  { name: "presence_penalty", label: "Presence penalty", integer: false, min: -2, max: 2, step: 0.1 },
  { name: "frequency_penalty", label: "Frequency penalty", integer: false, min: -2, max: 2, step: 0.1 },
  { name: "max_tokens", label: "Max tokens", integer: true, min: 1, step: 1 },
  { name: "seed", label: "Seed", integer: true, min: 0, step: 1 },
];

export const PRESETS = {
  Default: {},
  Precise: { temperature: 0.2, top_p: 0.9 },
  Creative: { temperature: 1.0, top_p: 0.95 },
  Deterministic: { temperature: 0, seed: 0 },
};

const empty = () => Object.fromEntries(FIELDS.map((field) => [field.name, ""]));
const PRESET_FIELDS = FIELDS.filter((field) => field.name !== "max_tokens");

export function loadSampling() {
  try {
    const stored = JSON.parse(localStorage.getItem(STORAGE) || "{}");
    const values = empty();
    for (const field of FIELDS) if (typeof stored[field.name] === "string") values[field.name] = stored[field.name];
    return values;
  } catch {
    return empty();
  }
}

export function saveSampling(values) {
  localStorage.setItem(STORAGE, JSON.stringify(values));
}

// The values after choosing preset `name` over `current`.
export function presetValues(name, current) {
  const values = { ...current };
  for (const field of PRESET_FIELDS) values[field.name] = String(PRESETS[name]?.[field.name] ?? "");
  return values;
}

// The preset whose values these are, or "" (custom).
export function matchingPreset(values) {
  return Object.keys(PRESETS).find((name) => {
    const preset = presetValues(name, values);
    return PRESET_FIELDS.every((field) => numberOrEmpty(values[field.name]) === numberOrEmpty(preset[field.name]));
  }) || "";
}

const numberOrEmpty = (text) => (String(text).trim() === "" ? "" : Number(text));

// The request fields for these values: only those set, as numbers.
export function samplingParams(values) {
  const params = {};
  for (const field of FIELDS) {
    const text = String(values[field.name] ?? "").trim();
    if (text === "") continue;
    const number = Number(text);
    if (!Number.isFinite(number)) continue;
    params[field.name] = field.integer ? Math.trunc(number) : number;
  }
  return params;
}
