// The conversation list: newest first, filtered by the search box (title and message text), with inline rename
// (Enter or leaving the field commits, Escape cancels) and delete (no confirmation dialog).

import { h } from "./dom.js";
import { searchableText } from "./tree.js";

// handlers: onOpen(id), onRename(id, title), onDelete(id)
export function createSidebar(list, search, handlers) {
  let conversations = [];
  let currentId = null;
  let renamingId = null;
  let renameField = null; // kept across redraws, so a save elsewhere does not wipe what is being typed

  search.addEventListener("input", () => draw());

  function render(all, openId) {
    conversations = all;
    currentId = openId;
    draw();
  }

  function draw() {
    const query = search.value.trim().toLowerCase();
    const shown = conversations
      .filter((conversation) => !query || searchableText(conversation).includes(query))
      .sort((a, b) => b.updated - a.updated);
    const items = shown.map(item);
    if (!items.length) items.push(h("li", { class: "list-note" }, query ? "No conversation matches." : "No conversations yet."));
    list.replaceChildren(...items);
  }

  function item(conversation) {
    const title = conversation.title || "New chat";
    // A click anywhere on the item opens it, except on its own buttons and the rename field.
    const li = h("li", {
      class: "conversation", dataset: { testid: "conversation", id: conversation.id },
      "aria-current": conversation.id === currentId ? "true" : null, title,
      onclick: (event) => {
        if (!event.target.closest(".rename, .delete, .rename-input")) handlers.onOpen(conversation.id);
      },
    });
    if (renamingId === conversation.id) {
      renameField ??= renameInput(conversation);
      li.append(renameField);
      return li;
    }
    li.append(
      h("button", { type: "button", class: "conversation-open" },
        h("span", { class: "conversation-title", dataset: { testid: "conversation-title" } }, title)),
      h("button", { type: "button", class: "icon rename", dataset: { testid: "rename" }, "aria-label": `Rename “${title}”`,
        onclick: () => startRename(conversation.id) }),
      h("button", { type: "button", class: "icon delete", dataset: { testid: "delete" }, "aria-label": `Delete “${title}”`,
        onclick: () => handlers.onDelete(conversation.id) }));
    return li;
  }

  function renameInput(conversation) {
    const input = h("input", { type: "text", class: "rename-input", dataset: { testid: "rename-input" },
      "aria-label": "New title", maxLength: 200 });
    input.value = conversation.title;
    let settled = false;
    const finish = (commit) => {
      if (settled) return;
      settled = true;
      renamingId = null;
      renameField = null;
      const title = input.value.trim();
      if (commit && title && title !== conversation.title) handlers.onRename(conversation.id, title);
      else draw();
    };
    input.addEventListener("keydown", (event) => {
      if (event.isComposing) return;
      if (event.key === "Enter") {
        event.preventDefault();
        finish(true);
      } else if (event.key === "Escape") {
        finish(false);
      }
    });
    input.addEventListener("blur", () => finish(true));
    queueMicrotask(() => {
      input.focus();
      input.select();
    });
    return input;
  }

  function startRename(id) {
    renamingId = id;
    renameField = null;
    draw();
  }

  return { render };
}
