// Conversations kept in IndexedDB (database "qwen-chat", object store "conversations", one record per
// conversation keyed by its id). Where IndexedDB is unavailable (some private modes) the page keeps working
// from memory and `persistent` says so.

import { openDB } from "idb";

const DB_NAME = "qwen-chat";
const STORE = "conversations";
const LAST_OPEN = "qwen-chat.last-open";

let db = null;
export let persistent = true;

export async function openStore() {
  try {
    db = await openDB(DB_NAME, 1, {
      upgrade(database) {
        database.createObjectStore(STORE, { keyPath: "id" });
      },
    });
  } catch {
    persistent = false;
  }
  return persistent;
}

export async function loadConversations() {
  return db ? db.getAll(STORE) : [];
}

export async function saveConversation(conversation) {
  if (db) await db.put(STORE, conversation);
}

export async function saveConversations(conversations) {
  if (!db) return;
  const tx = db.transaction(STORE, "readwrite");
  await Promise.all([...conversations.map((conversation) => tx.store.put(conversation)), tx.done]);
}

export async function deleteConversation(id) {
  if (db) await db.delete(STORE, id);
}

export const lastOpen = {
  get: () => localStorage.getItem(LAST_OPEN),
  set: (id) => (id ? localStorage.setItem(LAST_OPEN, id) : localStorage.removeItem(LAST_OPEN)),
};
