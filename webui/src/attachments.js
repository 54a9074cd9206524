// Files attached to a message, one path for every kind: MODALITIES says how a file of each kind is recognised,
// read and sent. Text files join the message's text as fenced blocks; images and audio travel as content parts,
// and only to a model whose /v1/models card lists that modality in input_modalities.

const MB = 1024 * 1024;

const CODE_EXTENSIONS = new Set(("txt md markdown rst py pyi ipynb js mjs cjs jsx ts tsx json jsonl yaml yml toml ini cfg conf " +
  "env csv tsv xml html htm css scss less svg c h cc cpp cxx hpp hh cs java kt kts scala go rs swift m mm rb php pl pm " +
  "lua r jl sh bash zsh fish ps1 bat cmd sql graphql proto tex bib dart zig nim ex exs erl hrl clj cljs el vim hs ml " +
  "mli fs fsx vue svelte astro tf hcl gradle cmake mk makefile dockerfile gitignore gitattributes editorconfig diff " +
  "patch log lock properties").split(/\s+/));

const LANGUAGE_OF = { py: "python", js: "javascript", mjs: "javascript", cjs: "javascript", ts: "typescript", tsx: "tsx",
  jsx: "jsx", rs: "rust", rb: "ruby", sh: "bash", zsh: "bash", yml: "yaml", md: "markdown", kt: "kotlin", cs: "csharp",
  hpp: "cpp", cc: "cpp", cxx: "cpp", h: "c", htm: "html", pl: "perl", ps1: "powershell", mk: "makefile", txt: "" };

const AUDIO_FORMATS = { "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
  "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/ogg": "ogg", "audio/flac": "flac", "audio/x-flac": "flac",
  "audio/mp4": "m4a", "audio/x-m4a": "m4a", "audio/aac": "aac", "audio/webm": "webm", "audio/opus": "opus" };

const extensionOf = (name) => {
  const lower = name.toLowerCase();
  const dot = lower.lastIndexOf(".");
  return dot >= 0 ? lower.slice(dot + 1) : lower; // "Makefile" → "makefile"
};

export const MODALITIES = {
  text: {
    label: "text",
    limit: 1 * MB,
    matches: (file) => file.type.startsWith("text/") || /json|xml|javascript|yaml|toml|x-sh/.test(file.type) ||
      CODE_EXTENSIONS.has(extensionOf(file.name)),
    read: async (file) => ({ text: await file.text() }),
  },
  image: {
    label: "images",
    limit: 20 * MB,
    matches: (file) => file.type.startsWith("image/"),
    read: async (file) => ({ data: await dataUrl(file) }),
    part: (media) => ({ type: "image_url", image_url: { url: media.data } }),
  },
  audio: {
    label: "audio",
    limit: 25 * MB,
    matches: (file) => file.type.startsWith("audio/"),
    read: async (file) => ({
      data: (await dataUrl(file)).replace(/^data:[^,]*,/, ""),
      format: AUDIO_FORMATS[file.type] || extensionOf(file.name),
    }),
    part: (media) => ({ type: "input_audio", input_audio: { data: media.data, format: media.format } }),
  },
};

// Media kinds first: an .svg is an image to a model that reads images, text to one that does not.
export function kindOf(file, modalities) {
  if (MODALITIES.image.matches(file) && modalities.includes("image")) return "image";
  if (MODALITIES.audio.matches(file) && modalities.includes("audio")) return "audio";
  if (MODALITIES.text.matches(file)) return "text";
  if (MODALITIES.image.matches(file)) return "image";
  if (MODALITIES.audio.matches(file)) return "audio";
  return null;
}

// → {attachment} or {error} (a sentence for the banner). An attachment is {kind, name, mime, size, text | data, format?}.
export async function readAttachment(file, modalities) {
  const kind = kindOf(file, modalities);
  if (!kind) return { error: `${file.name}: only text files${mediaNote(modalities)} can be attached.` };
  const modality = MODALITIES[kind];
  if (kind !== "text" && !modalities.includes(kind)) {
    return { error: `This model takes no ${modality.label}: ${file.name} was not attached.` };
  }
  if (file.size > modality.limit) {
    return { error: `${file.name} is too large to attach (${(file.size / MB).toFixed(1)} MB; at most ${modality.limit / MB} MB).` };
  }
  try {
    const read = await modality.read(file);
    const name = file.name || `pasted.${file.type.split("/")[1] || "bin"}`; // a pasted screenshot may have none
    return { attachment: { kind, name, mime: file.type, size: file.size, ...read } };
  } catch (err) {
    return { error: `${file.name} could not be read (${err.message || err}).` };
  }
}

function mediaNote(modalities) {
  const media = ["image", "audio"].filter((kind) => modalities.includes(kind)).map((kind) => MODALITIES[kind].label);
  return media.length ? `, ${media.join(" and ")}` : "";
}

// The message text: what was typed, then each text file as a fenced block headed by its name. The fence is
// longer than any run of backticks inside, so a file with its own ``` blocks cannot close it early.
export function composeText(typed, attachments) {
  const blocks = attachments.filter((a) => a.kind === "text").map((file) => {
    const longest = Math.max(0, ...(file.text.match(/`+/g) || []).map((run) => run.length));
    const fence = "`".repeat(Math.max(3, longest + 1));
    const ext = extensionOf(file.name);
    const language = ext in LANGUAGE_OF ? LANGUAGE_OF[ext] : ext;
    return `${file.name}\n${fence}${language}\n${file.text.replace(/\n$/, "")}\n${fence}`;
  });
  return [typed.trim(), ...blocks].filter(Boolean).join("\n\n");
}

// The media kept with a message (images, audio): what content parts are made of.
export const mediaOf = (attachments) => attachments.filter((a) => a.kind !== "text")
  .map(({ kind, name, mime, data, format }) => ({ kind, name, mime, data, ...(format ? { format } : {}) }));

// A user message's `content` for the API: plain text, or parts when it carries media.
export function apiContent(text, media = []) {
  if (!media.length) return text;
  return [{ type: "text", text }, ...media.map((item) => MODALITIES[item.kind].part(item))];
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
