// A conversation is a tree of messages. Editing a user message or regenerating a reply adds a sibling instead of
// overwriting, so every earlier version stays reachable. What the page shows is one path: from a root down to
// `currentLeaf`. Each message remembers which child was last on that path (`selected`), so switching to a
// sibling goes down the way that branch was last seen, and, below a message never seen, to its most recent leaf.
//
// Conversation (as stored, exported and imported):
//   {id, title, titleEdited, created, updated, system, currentLeaf, messages: {[id]: message}}
// Message:
//   {id, parent (id or null), role ("user" | "assistant"), content (text), children: [ids, oldest first], created,
//    media?: [{kind, name, mime, data, format?}], usage?: {prompt_tokens, completion_tokens},
//    speed?: {ttft_s, tok_s}, stopped?: true, finishReason?, selected?: the child last shown}

const TITLE_LENGTH = 40;

export function newId() {
  // crypto.randomUUID exists only in secure contexts; a LAN address over http is not one.
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

export function newConversation() {
  const now = Date.now();
  return { id: newId(), title: "", titleEdited: false, created: now, updated: now, system: "", currentLeaf: null, messages: {} };
}

export const isEmpty = (conversation) => Object.keys(conversation.messages).length === 0;

export function titleFrom(text) {
  return text.trim().replace(/\s+/g, " ").slice(0, TITLE_LENGTH);
}

// Adds a message under parentId (null: a new root) and makes it the current leaf.
export function addMessage(conversation, parentId, fields) {
  const message = { id: newId(), parent: parentId, children: [], created: Date.now(), content: "", ...fields };
  conversation.messages[message.id] = message;
  if (parentId) conversation.messages[parentId].children.push(message.id);
  showLeaf(conversation, message.id);
  return message;
}

// Makes id the end of the visible path, and remembers along the path which child each message showed.
export function showLeaf(conversation, id) {
  conversation.currentLeaf = id;
  const path = id ? pathTo(conversation, id) : [];
  for (let i = 1; i < path.length; i++) path[i - 1].selected = path[i].id;
}

// From id down: the remembered child at each step, else the child on the way to the most recent leaf.
function leafBelow(conversation, id) {
  let message = conversation.messages[id];
  while (message?.children.length) {
    const next = message.children.includes(message.selected)
      ? message.selected
      : childToward(conversation, message, latestLeaf(conversation, message.id));
    message = conversation.messages[next];
  }
  return message ? message.id : null;
}

function childToward(conversation, message, leafId) {
  const path = pathTo(conversation, leafId);
  return path[path.indexOf(message) + 1]?.id ?? message.children.at(-1);
}

// Removes a leaf (a reply that failed before its first token); the path then ends at its parent.
export function removeLeaf(conversation, id) {
  const message = conversation.messages[id];
  if (!message || message.children.length) return;
  const parent = message.parent && conversation.messages[message.parent];
  if (parent) parent.children = parent.children.filter((child) => child !== id);
  delete conversation.messages[id];
  if (parent && parent.selected === id) delete parent.selected;
  if (conversation.currentLeaf === id) showLeaf(conversation, parent ? parent.id : latestLeaf(conversation, null));
}

export function rootIds(conversation) {
  return Object.values(conversation.messages).filter((m) => !m.parent).sort((a, b) => a.created - b.created).map((m) => m.id);
}

export function siblingsOf(conversation, message) {
  return message.parent ? conversation.messages[message.parent].children : rootIds(conversation);
}

// Root → id, following parent links.
export function pathTo(conversation, id) {
  const path = [];
  const seen = new Set();
  for (let message = conversation.messages[id]; message && !seen.has(message.id); message = conversation.messages[message.parent]) {
    seen.add(message.id);
    path.unshift(message);
    if (!message.parent) break;
  }
  return path;
}

export const visiblePath = (conversation) => (conversation.currentLeaf ? pathTo(conversation, conversation.currentLeaf) : []);

// The most recently created leaf under id (id itself when it has no children; null: under every root).
export function latestLeaf(conversation, id) {
  const starts = id ? [id] : rootIds(conversation);
  let best = null;
  const stack = [...starts];
  const seen = new Set();
  while (stack.length) {
    const message = conversation.messages[stack.pop()];
    if (!message || seen.has(message.id)) continue;
    seen.add(message.id);
    if (!message.children.length && (!best || message.created >= best.created)) best = message;
    stack.push(...message.children);
  }
  return best ? best.id : null;
}

// Shows the sibling `step` places from message (−1: previous, +1: next) and the branch below it.
export function switchSibling(conversation, messageId, step) {
  const message = conversation.messages[messageId];
  const siblings = siblingsOf(conversation, message);
  const target = siblings[siblings.indexOf(messageId) + step];
  if (target) showLeaf(conversation, leafBelow(conversation, target));
}

export function branchPosition(conversation, message) {
  const siblings = siblingsOf(conversation, message);
  return { index: siblings.indexOf(message.id), count: siblings.length };
}

export function searchableText(conversation) {
  return [conversation.title, ...Object.values(conversation.messages).map((m) => m.content)].join("\n").toLowerCase();
}

// Makes a stored or imported object a well-formed conversation, or returns null. Accepts `messages` as the map
// this page writes or as a list; children are rebuilt from the parent links (in creation order), messages not
// reachable from a root are dropped, and a missing or dangling currentLeaf becomes the most recent leaf.
export function normalizeConversation(raw) {
  if (!raw || typeof raw !== "object") return null;
  const list = Array.isArray(raw.messages) ? raw.messages : Object.values(raw.messages || {});
  const now = Date.now();
  const messages = {};
  list.forEach((m, index) => {
    if (!m || typeof m !== "object" || !["user", "assistant"].includes(m.role)) return;
    const id = typeof m.id === "string" && m.id ? m.id : newId();
    const content = typeof m.content === "string" ? m.content : textOfParts(m.content);
    messages[id] = {
      ...m, id, content, parent: typeof m.parent === "string" && m.parent ? m.parent : null, children: [],
      created: Number.isFinite(m.created) ? m.created : now - list.length + index,
    };
  });
  const ordered = Object.values(messages).sort((a, b) => a.created - b.created);
  for (const message of ordered) {
    if (message.parent && !messages[message.parent]) message.parent = null;
    if (message.parent) messages[message.parent].children.push(message.id);
  }
  const conversation = {
    id: typeof raw.id === "string" && raw.id ? raw.id : newId(),
    title: typeof raw.title === "string" ? raw.title : "",
    titleEdited: Boolean(raw.titleEdited),
    created: Number.isFinite(raw.created) ? raw.created : now,
    updated: Number.isFinite(raw.updated) ? raw.updated : Number.isFinite(raw.created) ? raw.created : now,
    system: typeof raw.system === "string" ? raw.system : "",
    currentLeaf: null,
    messages,
  };
  dropUnreachable(conversation);
  for (const message of Object.values(messages)) if (!message.children.includes(message.selected)) delete message.selected;
  const leaf = raw.currentLeaf;
  showLeaf(conversation, typeof leaf === "string" && messages[leaf] ? leaf : latestLeaf(conversation, null));
  if (!conversation.title) {
    const first = Object.values(messages).filter((m) => m.role === "user").sort((a, b) => a.created - b.created)[0];
    conversation.title = first ? titleFrom(first.content) : "";
  }
  return conversation;
}

function textOfParts(parts) {
  if (!Array.isArray(parts)) return "";
  return parts.filter((part) => part?.type === "text").map((part) => String(part.text ?? "")).join("\n");
}

function dropUnreachable(conversation) {
  const reachable = new Set();
  const stack = rootIds(conversation);
  while (stack.length) {
    const id = stack.pop();
    if (reachable.has(id)) continue;
    reachable.add(id);
    stack.push(...conversation.messages[id].children);
  }
  for (const id of Object.keys(conversation.messages)) if (!reachable.has(id)) delete conversation.messages[id];
}
