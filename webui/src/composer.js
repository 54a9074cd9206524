// The message box: Enter sends, Shift+Enter (or Enter during an IME composition) is a newline; files come in
// through the attach button, a drop on the composer or a paste, and wait as removable chips until sent.

import { h } from "./dom.js";
import { readAttachment } from "./attachments.js";

// options: getModalities() → ["text", ...]; onSend(text, attachments) → true when accepted; onError(message)
export function createComposer(root, options) {
  const box = root.querySelector('[data-testid="composer"]');
  const send = root.querySelector('[data-testid="send"]');
  const stop = root.querySelector('[data-testid="stop"]');
  const attach = root.querySelector('[data-testid="attach"]');
  const chips = root.querySelector("#attachments");
  let attachments = [];
  let busy = false;

  const fit = () => {
    box.style.height = "auto";
    box.style.height = `${Math.min(box.scrollHeight + 2, Math.round(window.innerHeight * 0.4))}px`;
  };

  function submit() {
    if (busy) return;
    const text = box.value;
    if (!text.trim() && !attachments.length) return;
    if (options.onSend(text, attachments) === false) return;
    box.value = "";
    attachments = [];
    drawChips();
    fit();
  }

  async function addFiles(files) {
    for (const file of files) {
      const { attachment, error } = await readAttachment(file, options.getModalities());
      if (error) options.onError(error);
      else attachments.push(attachment);
    }
    drawChips();
  }

  function drawChips() {
    chips.replaceChildren(...attachments.map((attachment) => h("span", {
      class: `chip ${attachment.kind}`, dataset: { testid: "attachment", kind: attachment.kind }, title: attachment.name,
    },
    attachment.kind === "image" ? h("img", { src: attachment.data, alt: "" }) : null,
    h("span", { class: "chip-name" }, attachment.name),
    h("button", { type: "button", class: "icon dismiss", dataset: { testid: "attachment-remove" },
      "aria-label": `Remove ${attachment.name}`, onclick: () => {
        attachments = attachments.filter((other) => other !== attachment);
        drawChips();
        box.focus();
      } }))));
    chips.hidden = !attachments.length;
  }

  box.addEventListener("keydown", (event) => {
    // keyCode 229: Safari reports the Enter that ends a composition that way, with isComposing already false
    if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    submit();
  });
  box.addEventListener("input", fit);
  send.addEventListener("click", submit);
  stop.addEventListener("click", () => options.onStop());
  attach.addEventListener("change", async () => {
    const files = [...attach.files];
    attach.value = ""; // the same file can be attached again
    await addFiles(files);
  });
  box.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (!files.length) return; // plain text pastes as usual
    event.preventDefault();
    addFiles(files);
  });
  root.addEventListener("dragover", (event) => {
    if (!event.dataTransfer?.types.includes("Files")) return;
    event.preventDefault();
    root.classList.add("dropping");
  });
  root.addEventListener("dragleave", () => root.classList.remove("dropping"));
  root.addEventListener("drop", (event) => {
    root.classList.remove("dropping");
    const files = [...(event.dataTransfer?.files || [])];
    if (!files.length) return;
    event.preventDefault();
    addFiles(files);
  });
  drawChips();

  return {
    setBusy(value) {
      busy = value;
      send.hidden = value;
      stop.hidden = !value;
    },
    focus: () => box.focus(),
    setText(text) {
      box.value = text;
      fit();
    },
  };
}
