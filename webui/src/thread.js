// The visible thread: one element per message on the path root → currentLeaf, with its branch switcher, edit /
// regenerate buttons and speed line. A streaming reply is re-rendered at most every RENDER_INTERVAL ms.

import { copyText, h } from "./dom.js";
import { renderMarkdown } from "./render.js";
import { branchPosition, visiblePath } from "./tree.js";

const RENDER_INTERVAL = 50;

export function speedText(message) {
  const { usage, speed } = message;
  if (!usage) return "";
  const rate = Number.isFinite(speed?.tok_s) ? speed.tok_s.toFixed(1) : "–";
  const first = Number.isFinite(speed?.ttft_s) ? speed.ttft_s.toFixed(2) : "–";
  return `${usage.prompt_tokens} prompt · ${usage.completion_tokens} tokens · ${rate} tok/s · first token ${first} s`;
}

// handlers: onSwitch(messageId, step), onRegenerate(messageId), onEditSave(messageId, text)
export function createThread(el, handlers) {
  let conversation = null;
  let streamingId = null;
  let busy = false;
  let editingId = null;
  const contentElements = new Map(); // message id → its message-content element, for live updates
  let timer = null;
  let lastRender = 0;

  const nearBottom = () => el.scrollHeight - el.scrollTop - el.clientHeight < 80;
  const scrollToBottom = () => {
    el.scrollTop = el.scrollHeight;
  };

  function render(next, options = {}) {
    conversation = next;
    streamingId = options.streamingId ?? null;
    busy = Boolean(options.busy);
    if (options.keepEditing !== true) editingId = null;
    const stick = options.scroll || nearBottom();
    contentElements.clear();
    const path = visiblePath(conversation);
    const items = path.map((message) => messageElement(message));
    if (!items.length) {
      items.push(h("div", { class: "empty-thread" },
        h("p", { class: "empty-title" }, "Ask anything"),
        h("p", {}, "Enter sends, Shift+Enter adds a line. Attach or drop files on the message box.")));
    }
    el.replaceChildren(...items);
    if (stick) scrollToBottom();
  }

  function messageElement(message) {
    const streaming = message.id === streamingId;
    const content = h("div", { class: "message-content", dataset: { testid: "message-content" } });
    contentElements.set(message.id, content);
    const body = editingId === message.id ? editor(message) : [content, mediaElements(message)];
    if (message.role === "user") content.textContent = message.content;
    else renderMarkdown(content, message.content);
    const classes = ["message", message.role, streaming ? "streaming" : "", message.stopped ? "stopped" : ""];
    const dataset = { testid: "message", role: message.role, id: message.id };
    return h("article", { class: classes.filter(Boolean).join(" "), dataset },
      h("div", { class: "bubble" }, body),
      h("div", { class: "message-meta" }, branchControls(message), actions(message, streaming), status(message, streaming)));
  }

  function mediaElements(message) {
    if (!message.media?.length) return null;
    return h("div", { class: "message-media" }, message.media.map((item) => (item.kind === "image"
      ? h("img", { src: item.data, alt: item.name, title: item.name, loading: "lazy" })
      : h("audio", { controls: true, src: `data:${item.mime || "audio/" + item.format};base64,${item.data}`, title: item.name }))));
  }

  function branchControls(message) {
    const { index, count } = branchPosition(conversation, message);
    if (count < 2) return null;
    return h("span", { class: "branch" },
      h("button", { type: "button", class: "icon-text", dataset: { testid: "branch-prev" }, disabled: busy || index === 0,
        "aria-label": "Previous version", onclick: () => handlers.onSwitch(message.id, -1) }, "‹"),
      h("span", { class: "branch-label", dataset: { testid: "branch-label" } }, `${index + 1}/${count}`),
      h("button", { type: "button", class: "icon-text", dataset: { testid: "branch-next" }, disabled: busy || index === count - 1,
        "aria-label": "Next version", onclick: () => handlers.onSwitch(message.id, 1) }, "›"));
  }

  function actions(message, streaming) {
    if (message.role === "user") {
      return h("button", { type: "button", class: "link", dataset: { testid: "edit" }, disabled: busy,
        onclick: () => startEditing(message.id) }, "Edit");
    }
    return h("span", { class: "actions" },
      h("button", { type: "button", class: "link copy", disabled: streaming || !message.content, "aria-label": "Copy reply",
        onclick: (event) => flash(event.currentTarget, copyText(message.content)) }),
      h("button", { type: "button", class: "link", dataset: { testid: "regenerate" }, disabled: busy,
        onclick: () => handlers.onRegenerate(message.id) }, "Regenerate"));
  }

  function status(message, streaming) {
    if (message.role !== "assistant" || streaming) return null;
    const parts = [];
    const speed = speedText(message);
    if (speed) parts.push(h("span", { class: "speed", dataset: { testid: "speed" } }, speed));
    if (message.stopped) parts.push(h("span", { class: "note" }, "stopped"));
    else if (message.finishReason === "length") parts.push(h("span", { class: "note" }, "cut at the token limit"));
    return parts.length ? h("span", { class: "status" }, parts) : null;
  }

  function editor(message) {
    const box = h("textarea", { class: "edit-box", dataset: { testid: "edit-box" }, rows: 3, "aria-label": "Edit message" });
    box.value = message.content;
    const save = () => {
      const text = box.value;
      if (!text.trim()) return;
      editingId = null;
      handlers.onEditSave(message.id, text);
    };
    box.addEventListener("keydown", (event) => {
      if (event.key === "Escape") stopEditing();
      else if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !event.isComposing) {
        event.preventDefault();
        save();
      }
    });
    queueMicrotask(() => {
      box.focus();
      box.setSelectionRange(box.value.length, box.value.length);
    });
    return h("div", { class: "editor" }, box,
      h("div", { class: "editor-buttons" },
        h("button", { type: "button", onclick: stopEditing }, "Cancel"),
        h("button", { type: "button", class: "primary", dataset: { testid: "edit-save" }, onclick: save }, "Save & send")));
  }

  function startEditing(id) {
    if (busy) return;
    editingId = id;
    render(conversation, { streamingId, busy, keepEditing: true });
  }

  function stopEditing() {
    editingId = null;
    render(conversation, { streamingId, busy, keepEditing: true });
  }

  function renderLive() {
    timer = null;
    lastRender = performance.now();
    const message = conversation?.messages[streamingId];
    const content = message && contentElements.get(message.id);
    if (!content || !content.isConnected) return;
    const stick = nearBottom();
    renderMarkdown(content, message.content);
    if (stick) scrollToBottom();
  }

  // The streaming reply grew: redraw it soon, at most every RENDER_INTERVAL ms.
  function streamUpdated() {
    if (timer !== null) return;
    timer = setTimeout(renderLive, Math.max(0, RENDER_INTERVAL - (performance.now() - lastRender)));
  }

  function cancelLive() {
    clearTimeout(timer);
    timer = null;
  }

  el.addEventListener("click", (event) => {
    const button = event.target.closest('[data-testid="copy-code"]');
    if (!button) return;
    const code = button.closest(".code-block")?.querySelector("pre code");
    if (code) flash(button, copyText(code.textContent));
  });

  return { render, streamUpdated, cancelLive, get editing() { return editingId; } };
}

// Copy buttons show "Copy", "Copied" or "Copy failed" by their data-state (labels in CSS).
async function flash(button, done) {
  button.dataset.state = (await done) ? "copied" : "failed";
  setTimeout(() => delete button.dataset.state, 1500);
}
