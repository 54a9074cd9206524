// Light and dark themes (CSS variables keyed by <html data-theme>). Until the toggle is used the page follows
// the system's prefers-color-scheme, live; a choice made with the toggle is remembered in localStorage.

const STORAGE = "qwen-chat.theme";
const systemDark = window.matchMedia("(prefers-color-scheme: dark)");

const chosen = () => {
  const value = localStorage.getItem(STORAGE);
  return value === "light" || value === "dark" ? value : null;
};
const current = () => chosen() || (systemDark.matches ? "dark" : "light");

function apply(button) {
  const theme = current();
  document.documentElement.dataset.theme = theme;
  const next = theme === "dark" ? "light" : "dark";
  button.setAttribute("aria-label", `Switch to the ${next} theme`);
  button.title = `Switch to the ${next} theme`;
}

export function initTheme(button) {
  apply(button);
  systemDark.addEventListener("change", () => apply(button));
  button.addEventListener("click", () => {
    localStorage.setItem(STORAGE, current() === "dark" ? "light" : "dark");
    apply(button);
  });
}
