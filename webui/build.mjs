// Builds the chat page into ../qwen_engine/webui/ (committed, so users never need Node):
//   index.html          copied from src/index.html
//   assets/app.js       src/main.js and its imports, bundled and minified by esbuild
//   assets/app.css      src/style.css (+ KaTeX's CSS, its @font-face rules cut down to woff2 only), minified
//   assets/fonts/*.woff2  KaTeX's woff2 fonts, referenced from app.css as url(fonts/...); a browser fetches a
//                         font only when a glyph of it is drawn, so they cost nothing until math renders
//   build-info.json     {"sources_sha256", "files", "packages"}: what these assets were built from
//
// sources_sha256 (recomputed by a Python test to tell stale assets): SHA-256 over the source files
// package.json, package-lock.json, build.mjs and every file under src/ (recursively), taken in sorted order of
// their paths relative to webui/ written with forward slashes (plain code-unit order, as Python's sorted() on
// ASCII paths); for each file: hash.update(path + "\n"), hash.update(content bytes), hash.update("\n").
//
// Run: npm ci && node build.mjs   (prints each asset's raw and gzip size)

import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import * as esbuild from "esbuild";

const HERE = dirname(fileURLToPath(import.meta.url));
const OUT = join(HERE, "..", "qwen_engine", "webui");
const KATEX_DIST = join(HERE, "node_modules", "katex", "dist");
const FIRST_LOAD_BUDGET = 400 * 1024; // gzip bytes of index.html + app.js + app.css; issue 16's ceiling is 500 KB

function walk(dir) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? walk(path) : [path];
  });
}

function sourcesSha256() {
  const files = ["package.json", "package-lock.json", "build.mjs"].map((name) => join(HERE, name))
    .concat(walk(join(HERE, "src")));
  const paths = files.map((file) => relative(HERE, file).split("\\").join("/")).sort();
  const hash = createHash("sha256");
  for (const path of paths) {
    hash.update(path + "\n");
    hash.update(readFileSync(join(HERE, path)));
    hash.update("\n");
  }
  return hash.digest("hex");
}

// KaTeX lists woff2, woff and ttf for each face; every browser this page supports reads woff2, so the other two
// are cut (and never shipped). url(fonts/...) stays as written and resolves next to app.css.
const katexWoff2Only = {
  name: "katex-woff2-only",
  setup(build) {
    build.onLoad({ filter: /katex[\\/]dist[\\/]katex\.css$/ }, (args) => {
      const css = readFileSync(args.path, "utf8")
        .replace(/,\s*url\(fonts\/[^)]+\.(?:woff|ttf)\)\s*format\("(?:woff|truetype)"\)/g, "");
      if (/\.(?:woff|ttf)\)/.test(css)) throw new Error("katex.css: a non-woff2 font source is left");
      return { contents: css, loader: "css" };
    });
  },
};

function cleanOutput() {
  // Only what this script writes: the packaging around it (Python files) is not ours to remove.
  for (const name of ["assets", "index.html", "build-info.json"]) rmSync(join(OUT, name), { recursive: true, force: true });
  mkdirSync(join(OUT, "assets", "fonts"), { recursive: true });
}

async function bundle() {
  const common = { bundle: true, minify: true, logLevel: "warning", absWorkingDir: HERE, legalComments: "eof" };
  await esbuild.build({
    ...common, entryPoints: ["src/main.js"], outfile: join(OUT, "assets", "app.js"),
    format: "iife", target: ["es2020", "chrome90", "firefox90", "safari15"], charset: "utf8",
  });
  await esbuild.build({
    ...common, entryPoints: ["src/style.css"], outfile: join(OUT, "assets", "app.css"),
    // (the themes' light-dark() colors need these browsers: Chrome 123, Firefox 120, Safari 17.5, all of 2024)
    external: ["fonts/*"], plugins: [katexWoff2Only], target: ["chrome123", "firefox120", "safari17.5"],
  });
  copyFileSync(join(HERE, "src", "index.html"), join(OUT, "index.html"));
  for (const font of readdirSync(join(KATEX_DIST, "fonts")).filter((name) => name.endsWith(".woff2"))) {
    copyFileSync(join(KATEX_DIST, "fonts", font), join(OUT, "assets", "fonts", font));
  }
}

function describe() {
  const files = {};
  for (const file of walk(OUT).filter((path) => !path.endsWith(".py") && !path.includes("__pycache__")).sort()) {
    const body = readFileSync(file);
    files[relative(OUT, file).split("\\").join("/")] = {
      bytes: body.length, gzip_bytes: gzipSync(body, { level: 9 }).length,
      sha256: createHash("sha256").update(body).digest("hex"),
    };
  }
  return files;
}

function packageVersions() {
  const lock = JSON.parse(readFileSync(join(HERE, "package-lock.json"), "utf8"));
  const wanted = Object.keys(JSON.parse(readFileSync(join(HERE, "package.json"), "utf8")).devDependencies);
  return Object.fromEntries(wanted.map((name) => [name, lock.packages[`node_modules/${name}`].version]));
}

function report(files) {
  const kb = (n) => `${(n / 1024).toFixed(1)} KB`.padStart(10);
  const row = (label, raw, note) => console.log(`${label.padEnd(16)} ${kb(raw)} raw ${note}`);
  const sum = (names, key) => names.reduce((total, name) => total + files[name][key], 0);
  const firstLoad = ["index.html", "assets/app.js", "assets/app.css"];
  for (const name of firstLoad) row(name, files[name].bytes, `${kb(files[name].gzip_bytes)} gzip`);
  const gzipped = sum(firstLoad, "gzip_bytes");
  row("first load", sum(firstLoad, "bytes"), `${kb(gzipped)} gzip`);
  const fonts = Object.keys(files).filter((name) => name.startsWith("assets/fonts/"));
  row(`fonts (${fonts.length})`, sum(fonts, "bytes"), "  (fetched only when math is drawn)");
  if (gzipped > FIRST_LOAD_BUDGET) throw new Error(`the first load is over its budget of ${kb(FIRST_LOAD_BUDGET).trim()} gzip`);
}

cleanOutput();
await bundle();
const files = describe();
const info = { sources_sha256: sourcesSha256(), files, packages: packageVersions() };
writeFileSync(join(OUT, "build-info.json"), JSON.stringify(info, null, 2) + "\n");
report(files);
console.log(`sources_sha256   ${info.sources_sha256}`);
