// Model output → HTML: marked (GFM: tables, fenced code) with KaTeX math, highlight.js for code, and every result
// through DOMPurify before it becomes innerHTML. Model output is untrusted: HTML written in a reply is shown as
// the text it is (a coding model writes tags to talk about them), never used as markup; DOMPurify then removes
// whatever else could run (event handlers, javascript: URLs, forms, data-* attributes) as a second net.

import DOMPurify from "dompurify";
import hljs from "highlight.js/lib/common";
import katex from "katex";
import { Marked } from "marked";
import { h } from "./dom.js";

const ENTITIES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ENTITIES[c]);

// While a reply streams, the same blocks are rendered again every few frames: remember the finished ones.
function memo(limit, compute) {
  const cache = new Map();
  return (key, ...args) => {
    if (cache.has(key)) return cache.get(key);
    const value = compute(...args);
    if (cache.size >= limit) cache.delete(cache.keys().next().value);
    cache.set(key, value);
    return value;
  };
}

const mathHtml = memo(500, (tex, display) => katex.renderToString(tex, {
  displayMode: display, throwOnError: false, strict: "ignore", trust: false, maxSize: 50, maxExpand: 1000,
}));
const renderMath = (tex, display) => mathHtml(`${display ? "D" : "I"}${tex}`, tex, display);

const codeHtml = memo(200, (text, language) => (hljs.getLanguage(language)
  ? hljs.highlight(text, { language, ignoreIllegals: true }).value
  : escapeHtml(text)));

// $$…$$ and \[…\] on lines of their own.
const blockMath = {
  name: "blockMath",
  level: "block",
  start(src) {
    const match = src.match(/^ {0,3}(?:\$\$|\\\[)/m);
    return match ? match.index : undefined;
  },
  tokenizer(src) {
    const match = /^ {0,3}\$\$([\s\S]+?)\$\$[ \t]*(?:\n+|$)/.exec(src) || /^ {0,3}\\\[([\s\S]+?)\\\][ \t]*(?:\n+|$)/.exec(src);
    if (match) return { type: "blockMath", raw: match[0], text: match[1].trim() };
  },
  renderer: (token) => `<div class="math-display">${renderMath(token.text, true)}</div>\n`,
};

// $…$, \(…\), and $$…$$ / \[…\] inside a line. A $ opens math only before a non-space and closes after one, not
// before a digit, so "from $5 to $10" stays text; \$ stays a dollar sign.
const inlineMath = {
  name: "inlineMath",
  level: "inline",
  start(src) {
    for (let i = 0; i < src.length; i++) {
      if (src[i] === "\\") {
        if (src[i + 1] === "(" || src[i + 1] === "[") return i;
        i++;
      } else if (src[i] === "$") {
        return i;
      }
    }
    return undefined;
  },
  tokenizer(src) {
    let match = /^\$\$([\s\S]+?)\$\$/.exec(src) || /^\\\[([\s\S]+?)\\\]/.exec(src);
    if (match) return { type: "inlineMath", raw: match[0], text: match[1].trim(), display: true };
    match = /^\\\(([\s\S]+?)\\\)/.exec(src);
    if (match) return { type: "inlineMath", raw: match[0], text: match[1].trim(), display: false };
    match = /^\$(?![\s$])((?:\\.|[^\\$\n])+?)\$(?!\d)/.exec(src);
    if (match && !/\s$/.test(match[1])) return { type: "inlineMath", raw: match[0], text: match[1], display: false };
  },
  renderer: (token) => renderMath(token.text, token.display),
};

const marked = new Marked({
  gfm: true,
  extensions: [blockMath, inlineMath],
  renderer: {
    html({ text, block }) {
      return block ? `<p class="raw-html">${escapeHtml(text.replace(/\n+$/, ""))}</p>\n` : escapeHtml(text);
    },
    code({ text, lang }) {
      const language = (lang || "").trim().split(/\s+/)[0].toLowerCase().replace(/[^\w+#.-]/g, "");
      const label = language ? ` language-${language}` : "";
      return `<pre><code class="hljs${label}">${codeHtml(`${language}\n${text}`, text, language)}</code></pre>\n`;
    },
  },
});

const PURIFY = {
  ALLOW_DATA_ATTR: false, // data-testid and friends belong to the page, not to the model
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option", "dialog", "template"],
  FORBID_ATTR: ["id", "autofocus"],
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  // An image the model names by URL would be a request it makes the browser send (the CSP stops other hosts,
  // not this one); only inline data: images are kept.
  if (node.tagName === "IMG" && !/^data:image\//i.test(node.getAttribute("src") || "")) node.removeAttribute("src");
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

export function markdownToHtml(markdown) {
  let html;
  try {
    html = marked.parse(markdown).trim();
  } catch {
    html = `<p>${escapeHtml(markdown)}</p>`;
  }
  return DOMPurify.sanitize(html, PURIFY);
}

// Renders markdown into el and gives each code block a header with its language and a copy button (added after
// sanitising: these elements are the page's own). Their labels are drawn by CSS, so the content's text stays the
// reply's text; the click is handled by the thread, delegated.
export function renderMarkdown(el, markdown) {
  el.innerHTML = markdownToHtml(markdown);
  for (const pre of el.querySelectorAll("pre")) {
    const language = /\blanguage-([\w+#.-]+)/.exec(pre.querySelector("code")?.className || "")?.[1] || "";
    const block = h("div", { class: "code-block" },
      h("div", { class: "code-head" },
        h("span", { class: "code-lang", dataset: { lang: language } }),
        h("button", { type: "button", class: "copy-code", dataset: { testid: "copy-code" }, "aria-label": "Copy code" })));
    pre.replaceWith(block);
    block.append(pre);
  }
}
