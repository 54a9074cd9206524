// The chat page: wires the header, sidebar, thread, composer and settings to the conversation tree, IndexedDB
// and the API. State lives here; the other modules draw it and report what the user did.

import { apiKey, listModels, streamChat } from "./api.js";
import { apiContent, composeText, mediaOf } from "./attachments.js";
import { createComposer } from "./composer.js";
import { byTestId, download } from "./dom.js";
import { samplingParams } from "./settings.js";
import { createSettingsPanel } from "./settings-panel.js";
import { createSidebar } from "./sidebar.js";
import * as store from "./store.js";
import { initTheme } from "./theme.js";
import { createThread } from "./thread.js";
import * as tree from "./tree.js";

const state = {
  conversations: new Map(), // id → conversation, every saved one
  current: tree.newConversation(), // the open one; a new chat is saved with its first message
  model: null, // {id, maxModelLen, modalities} from /v1/models
  generation: null, // the reply streaming now: {conversation, messageId, controller}
  retry: null, // a reply refused with 401, sent again once a key is saved: {conversation, parentId}
};

const modelName = byTestId("model-name");
const modelContext = byTestId("model-context");
const banner = byTestId("error");
const keyDialog = byTestId("api-key-dialog");
const keyInput = byTestId("api-key-input");

const thread = createThread(document.getElementById("thread"), {
  onSwitch: switchBranch,
  onRegenerate: regenerate,
  onEditSave: saveEdit,
});
const sidebar = createSidebar(document.getElementById("conversation-list"), byTestId("search"), {
  onOpen: openConversation,
  onRename: renameConversation,
  onDelete: deleteConversation,
});
const composer = createComposer(document.getElementById("composer"), {
  getModalities: () => state.model?.modalities || ["text"],
  onSend: send,
  onStop: () => state.generation?.controller.abort(),
  onError: showError,
});
const settings = createSettingsPanel(byTestId("settings-panel"), byTestId("settings"), {
  onSystemChange(text) {
    state.current.system = text;
    if (isSaved(state.current)) persist(state.current);
  },
});

// ---- drawing ----------------------------------------------------------------------------------------------

function redraw(options = {}) {
  const streaming = state.generation?.conversation === state.current ? state.generation.messageId : null;
  thread.render(state.current, { streamingId: streaming, busy: Boolean(state.generation), scroll: options.scroll });
  sidebar.render([...state.conversations.values()], state.current.id);
  document.title = state.current.title ? `${state.current.title} · Qwen chat` : "Qwen chat";
}

function showError(message) {
  banner.querySelector(".error-text").textContent = message || "";
  banner.hidden = !message;
}

function setBusy(busy) {
  if (busy) document.body.dataset.busy = "1";
  else delete document.body.dataset.busy;
  composer.setBusy(busy);
}

// An ApiError → what the user sees: the key dialog for 401, the banner for everything.
function reportApiError(err) {
  if (err.kind === "aborted") return;
  if (err.kind === "auth") {
    const why = apiKey.get() ? "The API key was refused (401)" : "This server needs an API key (401)";
    showError(`${why}: ${err.message}`);
    openKeyDialog();
    return;
  }
  showError(err.kind ? err.message : `Something went wrong: ${err.message || err}`);
}

// ---- the model ------------------------------------------------------------------------------------------------

async function fetchModel() {
  const [model] = await listModels();
  state.model = model || null;
  modelName.textContent = model ? model.id : "no model";
  modelContext.textContent = model?.maxModelLen ? `${model.maxModelLen} tokens` : "";
  modelContext.title = "Context length";
  return model;
}

async function loadModel() {
  try {
    await fetchModel();
    return true;
  } catch (err) {
    if (!state.model) modelName.textContent = "not connected";
    reportApiError(err);
    return false;
  }
}

// ---- persistence ----------------------------------------------------------------------------------------------

const isSaved = (conversation) => state.conversations.has(conversation.id);

async function persist(conversation, { touch = false } = {}) {
  if (touch) conversation.updated = Date.now();
  state.conversations.set(conversation.id, conversation);
  if (conversation === state.current) store.lastOpen.set(conversation.id);
  try {
    await store.saveConversation(conversation);
  } catch (err) {
    showError(`This conversation could not be saved in the browser: ${err.message || err}`);
  }
}

// ---- sending and generating --------------------------------------------------------------------------------

function send(typed, attachments) {
  if (state.generation) return false;
  const conversation = state.current;
  const media = mediaOf(attachments);
  const message = tree.addMessage(conversation, conversation.currentLeaf, {
    role: "user", content: composeText(typed, attachments), ...(media.length ? { media } : {}),
  });
  if (!conversation.title) conversation.title = tree.titleFrom(typed) || tree.titleFrom(attachments.map((a) => a.name).join(", "));
  persist(conversation, { touch: true });
  generate(conversation, message.id);
  return true;
}

function saveEdit(messageId, text) {
  const conversation = state.current;
  const original = conversation.messages[messageId];
  if (!original || state.generation) return;
  const message = tree.addMessage(conversation, original.parent, {
    role: "user", content: text, ...(original.media ? { media: original.media } : {}),
  });
  persist(conversation, { touch: true });
  generate(conversation, message.id);
}

function regenerate(messageId) {
  const reply = state.current.messages[messageId];
  if (reply?.parent && !state.generation) generate(state.current, reply.parent);
}

function switchBranch(messageId, step) {
  if (state.generation) return;
  tree.switchSibling(state.current, messageId, step);
  persist(state.current);
  redraw();
}

function requestBody(conversation, history) {
  const messages = [];
  if (conversation.system.trim()) messages.push({ role: "system", content: conversation.system });
  for (const message of history) {
    if (message.role === "assistant" && !message.content) continue; // a reply stopped before its first token
    const content = message.role === "user" ? apiContent(message.content, message.media) : message.content;
    messages.push({ role: message.role, content });
  }
  return {
    model: state.model.id, messages, stream: true, stream_options: { include_usage: true },
    ...samplingParams(settings.sampling()),
  };
}

// Streams a new assistant reply under parentId (a user message): a new child, so a regenerated reply or the
// reply to an edited message becomes a branch beside the old one.
async function generate(conversation, parentId) {
  if (state.generation) return;
  showError("");
  state.retry = null;
  const history = tree.pathTo(conversation, parentId);
  const reply = tree.addMessage(conversation, parentId, { role: "assistant", content: "" });
  const controller = new AbortController();
  state.generation = { conversation, messageId: reply.id, controller };
  setBusy(true);
  redraw({ scroll: conversation === state.current });
  try {
    if (!state.model) await fetchModel();
    if (!state.model) throw new Error("the server lists no model");
    const started = performance.now();
    const result = await streamChat(requestBody(conversation, history), {
      signal: controller.signal,
      onDelta(text) {
        reply.content += text;
        if (conversation === state.current) thread.streamUpdated();
      },
    });
    reply.usage = result.usage || undefined;
    reply.finishReason = result.finishReason || undefined;
    reply.speed = speedOf(result, started);
  } catch (err) {
    if (err.kind === "aborted") reply.stopped = true;
    else {
      if (err.kind === "auth") state.retry = { conversation, parentId };
      reportApiError(err);
    }
    if (!reply.content && !reply.stopped) tree.removeLeaf(conversation, reply.id);
  } finally {
    thread.cancelLive();
    state.generation = null;
    if (isSaved(conversation)) await persist(conversation, { touch: true });
    redraw();
    setBusy(false);
  }
}

// Time to first token from the request; tokens/s over the time from the first token to the end.
function speedOf(result, started) {
  const ttft = result.firstTokenAt === null ? null : (result.firstTokenAt - started) / 1000;
  const seconds = result.firstTokenAt === null ? 0 : (result.endAt - result.firstTokenAt) / 1000;
  const tokens = result.usage?.completion_tokens;
  return { ttft_s: ttft, tok_s: seconds > 0 && Number.isFinite(tokens) ? tokens / seconds : null };
}

// ---- conversations --------------------------------------------------------------------------------------------

function openConversation(id) {
  const conversation = state.conversations.get(id);
  if (!conversation) return;
  state.current = conversation;
  store.lastOpen.set(id);
  settings.setSystem(conversation.system);
  closeSidebar();
  redraw({ scroll: true });
}

function newChat() {
  if (!tree.isEmpty(state.current)) {
    state.current = tree.newConversation();
    store.lastOpen.set(null);
    settings.setSystem("");
    redraw({ scroll: true });
  }
  closeSidebar();
  composer.focus();
}

function renameConversation(id, title) {
  const conversation = state.conversations.get(id);
  if (!conversation) return;
  conversation.title = title;
  conversation.titleEdited = true;
  persist(conversation);
  redraw();
}

async function deleteConversation(id) {
  if (state.generation?.conversation.id === id) state.generation.controller.abort();
  state.conversations.delete(id);
  if (state.current.id === id) {
    state.current = tree.newConversation();
    settings.setSystem("");
  }
  if (store.lastOpen.get() === id) store.lastOpen.set(null);
  redraw();
  await store.deleteConversation(id);
}

function exportConversations() {
  const conversations = [...state.conversations.values()].sort((a, b) => a.created - b.created);
  const json = JSON.stringify({ version: 1, conversations }, null, 2);
  download(`qwen-chat-${new Date().toISOString().slice(0, 10)}.json`, new Blob([json], { type: "application/json" }));
}

// Merges an export by id: an imported conversation replaces the one with its id, the others are added.
async function importConversations(file) {
  let data;
  try {
    data = JSON.parse(await file.text());
  } catch (err) {
    showError(`${file.name} is not JSON (${err.message}).`);
    return;
  }
  if (!data || !Array.isArray(data.conversations) || (data.version !== undefined && data.version !== 1)) {
    showError(`${file.name} is not a chat export ({"version": 1, "conversations": [...]}).`);
    return;
  }
  const busyId = state.generation?.conversation.id;
  const imported = data.conversations.map(tree.normalizeConversation).filter((c) => c && c.id !== busyId);
  for (const conversation of imported) {
    state.conversations.set(conversation.id, conversation);
    if (conversation.id === state.current.id) state.current = conversation;
  }
  settings.setSystem(state.current.system);
  redraw();
  try {
    await store.saveConversations(imported);
    showError("");
  } catch (err) {
    showError(`The imported conversations could not be saved: ${err.message || err}`);
  }
}

// ---- the API key dialog -------------------------------------------------------------------------------------

function openKeyDialog() {
  if (keyDialog.open) return;
  keyInput.value = apiKey.get();
  keyDialog.showModal();
  keyInput.focus();
}

async function saveKey() {
  apiKey.set(keyInput.value.trim());
  keyDialog.close();
  showError("");
  const retry = state.retry;
  if ((await loadModel()) && retry && !state.generation && isSaved(retry.conversation)) {
    generate(retry.conversation, retry.parentId);
  }
}

byTestId("api-key-save").addEventListener("click", saveKey);
keyInput.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.isComposing) {
    event.preventDefault();
    saveKey();
  }
});
document.getElementById("key-cancel").addEventListener("click", () => keyDialog.close());
document.getElementById("change-key").addEventListener("click", openKeyDialog);

// ---- the rest of the page -----------------------------------------------------------------------------------

const menu = byTestId("menu");
function closeSidebar() {
  document.body.classList.remove("sidebar-open");
  menu.setAttribute("aria-expanded", "false");
}
menu.addEventListener("click", () => {
  const open = document.body.classList.toggle("sidebar-open");
  menu.setAttribute("aria-expanded", String(open));
});
document.getElementById("scrim").addEventListener("click", closeSidebar);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && document.body.classList.contains("sidebar-open")) closeSidebar();
});

banner.querySelector(".dismiss").addEventListener("click", () => showError(""));
byTestId("new-chat").addEventListener("click", newChat);
byTestId("export").addEventListener("click", exportConversations);
const importInput = byTestId("import");
importInput.addEventListener("change", async () => {
  const [file] = importInput.files;
  importInput.value = "";
  if (file) await importConversations(file);
});

// A file dropped beside the composer must not replace the page with itself.
for (const type of ["dragover", "drop"]) {
  window.addEventListener(type, (event) => {
    if (event.dataTransfer?.types.includes("Files")) event.preventDefault();
  });
}
window.addEventListener("unhandledrejection", (event) => showError(`Something went wrong: ${event.reason?.message || event.reason}`));

async function start() {
  initTheme(byTestId("theme-toggle"));
  const modelReady = loadModel();
  if (!(await store.openStore())) {
    showError("This browser does not let the page keep conversations (IndexedDB is unavailable): they last until the tab closes.");
  }
  for (const raw of await store.loadConversations()) {
    const conversation = tree.normalizeConversation(raw);
    if (conversation) state.conversations.set(conversation.id, conversation);
  }
  const last = state.conversations.get(store.lastOpen.get());
  if (last && !state.generation) state.current = last;
  settings.setSystem(state.current.system);
  redraw({ scroll: true });
  await modelReady;
}

start();
