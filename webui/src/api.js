// The same-origin OpenAI-compatible API: /v1/models and a streamed /v1/chat/completions (Server-Sent Events).
// Every failure becomes an ApiError whose `kind` says what the page should do about it.

const KEY_STORAGE = "qwen-chat.api-key";

export const apiKey = {
  get: () => localStorage.getItem(KEY_STORAGE) || "",
  set: (key) => (key ? localStorage.setItem(KEY_STORAGE, key) : localStorage.removeItem(KEY_STORAGE)),
};

// kind: "unreachable" (fetch threw), "auth" (401), "busy" (429), "aborted" (Stop), "server" (anything else)
export class ApiError extends Error {
  constructor(kind, message, status = 0) {
    super(message);
    this.kind = kind;
    this.status = status;
  }
}

function headers(accept, hasBody = false) {
  const out = { Accept: accept };
  if (hasBody) out["Content-Type"] = "application/json";
  const key = apiKey.get();
  if (key) out.Authorization = `Bearer ${key}`; // in a header only: a key in a URL ends up in logs and history
  return out;
}

async function request(path, init, signal) {
  let response;
  try {
    response = await fetch(path, { ...init, signal, cache: "no-store", credentials: "same-origin" });
  } catch (err) {
    if (signal?.aborted) throw new ApiError("aborted", "Stopped");
    throw new ApiError("unreachable", `Cannot reach the server (${err.message || err}). Is qwen serve still running?`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let message = "";
  try {
    message = (await response.json())?.error?.message || "";
  } catch {
    // not JSON (a proxy's page, say): the status says enough
  }
  if (response.status === 401) return new ApiError("auth", message || "This server needs an API key.", 401);
  if (response.status === 429) {
    return new ApiError("busy", `The server is busy (429): ${message || "too many requests"}. Try again in a moment.`, 429);
  }
  return new ApiError("server", message || `The server answered ${response.status} ${response.statusText}`.trim(), response.status);
}

// → [{id, max_model_len, input_modalities}]
export async function listModels() {
  const response = await request("/v1/models", { headers: headers("application/json") });
  const body = await response.json();
  return (body.data || []).map((card) => ({
    id: String(card.id),
    maxModelLen: card.max_model_len ?? null,
    modalities: Array.isArray(card.input_modalities) ? card.input_modalities : ["text"],
  }));
}

// Streams one chat completion. onDelta(text) gets each piece of content as it arrives; the promise resolves with
// {usage, finishReason, firstTokenAt, endAt} (performance.now() times) or rejects with an ApiError — "aborted"
// when `signal` fires (the server cancels the request when the connection drops).
export async function streamChat(body, { signal, onDelta }) {
  const response = await request("/v1/chat/completions", {
    method: "POST", headers: headers("text/event-stream", true), body: JSON.stringify(body),
  }, signal);
  const result = { usage: null, finishReason: null, firstTokenAt: null, endAt: null };
  const onEvent = (data) => {
    if (data === "[DONE]") return true;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      return false; // a line this page does not understand is skipped, not fatal
    }
    if (chunk.error) throw new ApiError("server", chunk.error.message || "The server failed during the reply.");
    if (chunk.usage) result.usage = chunk.usage;
    const choice = chunk.choices?.[0];
    if (choice?.finish_reason) result.finishReason = choice.finish_reason;
    const text = choice?.delta?.content;
    if (text) {
      result.firstTokenAt ??= performance.now();
      onDelta(text);
    }
    return false;
  };
  try {
    await readEvents(response.body, onEvent);
  } catch (err) {
    if (err instanceof ApiError) throw err;
    if (signal?.aborted) throw new ApiError("aborted", "Stopped");
    throw new ApiError("unreachable", `Cannot reach the server: the connection dropped mid-reply (${err.message || err}).`);
  }
  result.endAt = performance.now();
  return result;
}

// Reads an SSE body: events are separated by blank lines; each event's `data:` lines are joined with "\n"
// (comment lines starting with ":" and other fields are ignored). onData returns true to stop early.
export async function readEvents(stream, onData) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  const flush = () => {
    if (!data.length) return false;
    const joined = data.join("\n");
    data = [];
    return onData(joined);
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let newline;
      while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
        if (buffer[newline] === "\r" && newline === buffer.length - 1) break; // a "\r\n" cut between reads
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
        if (line === "") {
          if (flush()) return;
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
      }
    }
    if (buffer.startsWith("data:")) data.push(buffer.slice(buffer.startsWith("data: ") ? 6 : 5));
    flush();
  } finally {
    reader.cancel().catch(() => {});
  }
}
