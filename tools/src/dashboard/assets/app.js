// Chalk dashboard: a small single-page app over the JSON API of `chalk dashboard`.
//
// Routes live in the URL fragment:
//   #/                                      volumes
//   #/tree/VOLUME?lineage=&version=&path=   a directory of one version
//   #/file/VOLUME?lineage=&version=&path=   a preview of one file
//   #/versions/VOLUME                       lineages as timelines
//   #/diff/VOLUME?a=&b=                     changes between two versions
//
// File content is only ever put into the page as text (textContent) or as an
// <img> from the raw endpoint, never as HTML.
"use strict";

const main = document.getElementById("main");
const crumbs = document.getElementById("breadcrumbs");
const statusLine = document.getElementById("status");

// ---- helpers ---------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(key, value);
  }
  return search.toString();
}

function route(kind, volume, params) {
  const q = query(params || {});
  return "#/" + kind + (volume ? "/" + encodeURIComponent(volume) : "") + (q ? "?" + q : "");
}

function apiUrl(volume, endpoint, params) {
  const q = query(params || {});
  return "/api/volumes/" + encodeURIComponent(volume) + "/" + endpoint + (q ? "?" + q : "");
}

async function api(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || response.status + " " + response.statusText);
  return body;
}

function humanBytes(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let value = Number(bytes);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return unit === 0 ? bytes + " B" : value.toFixed(1) + " " + units[unit];
}

function time(iso) {
  return iso ? iso.replace("T", " ").replace("Z", " UTC") : "";
}

// Ids are ULIDs: the first 10 characters are the creation time in
// milliseconds, so 3 random characters are kept to tell close versions apart.
function shortId(id) {
  return id ? id.slice(0, 13) : "";
}

// Replaces the page content; null and undefined entries are skipped.
function show(...nodes) {
  main.replaceChildren(...nodes.flat().filter((node) => node !== null && node !== undefined));
}

function setStatus(message, isError) {
  statusLine.textContent = message || "";
  statusLine.className = isError ? "error" : "";
}

function setCrumbs(parts) {
  crumbs.replaceChildren();
  parts.forEach((part, i) => {
    if (i > 0) crumbs.append(h("span", { class: "sep", text: "/" }));
    crumbs.append(part.href ? h("a", { href: part.href, text: part.label }) : h("span", { text: part.label }));
  });
}

function versionParams(params) {
  return { lineage: params.get("lineage") || "", version: params.get("version") || "" };
}

// ---- volumes ---------------------------------------------------------------

async function showVolumes() {
  setCrumbs([{ label: "volumes" }]);
  const data = await api("/api/volumes");
  const rows = data.volumes.map((v) =>
    h("tr", { "data-volume": v.name },
      h("td", {}, h("a", { href: route("tree", v.name), text: v.name })),
      h("td", { class: "num", text: v.files }),
      h("td", { class: "num", text: humanBytes(v.bytes) }),
      h("td", { class: "mono", title: v.latest_version.id, text: shortId(v.latest_version.id) }),
      h("td", { text: time(v.latest_version.created_at) }),
      h("td", {}, h("a", { href: route("versions", v.name), text: "versions" }))));
  show(
    h("h1", { text: "Volumes" }),
    data.volumes.length === 0
      ? h("p", { class: "muted", text: "No volumes yet. Create one with `chalk volume create NAME`." })
      : h("table", { id: "volumes-table" },
          h("thead", {}, h("tr", {},
            h("th", { text: "Name" }), h("th", { class: "num", text: "Files" }), h("th", { class: "num", text: "Size" }),
            h("th", { text: "Latest version" }), h("th", { text: "Updated" }), h("th", {}))),
          h("tbody", {}, rows)));
}

// ---- version picker ------------------------------------------------------

async function versionPicker(volume, current, lineage, kind, path) {
  const lineages = await api(apiUrl(volume, "lineages"));
  const lineageName = lineage || current.lineage || "main";
  const versions = await api(apiUrl(volume, "versions", { lineage: lineageName })).catch(() => ({ versions: [] }));
  const lineageSelect = h("select", {
    id: "lineage-select",
    onchange: (e) => { location.hash = route(kind, volume, { lineage: e.target.value, path: kind === "file" ? "" : path }); },
  }, lineages.lineages.map((l) => h("option", { value: l.name, selected: l.name === lineageName, text: l.name })));
  const newestFirst = versions.versions.slice().reverse();
  const versionSelect = h("select", {
    id: "version-select",
    onchange: (e) => { location.hash = route(kind, volume, { lineage: lineageName, version: e.target.value, path }); },
  },
    h("option", { value: "", text: "latest of " + lineageName }),
    newestFirst.map((v) => h("option", {
      value: v.id,
      selected: current.pinned && v.id === current.id,
      text: "#" + v.seq + "  " + shortId(v.id) + "  " + time(v.created_at) + (v.message ? "  " + v.message : ""),
    })));
  return h("div", { class: "toolbar" },
    h("label", { for: "lineage-select", text: "Lineage" }), lineageSelect,
    h("label", { for: "version-select", text: "Version" }), versionSelect,
    h("span", { id: "current-version", class: "mono", "data-version": current.id, title: current.id, text: current.id }),
    h("a", { href: route("versions", volume), text: "versions and diffs" }));
}

function pathCrumbs(volume, params, path) {
  const parts = [{ label: "volumes", href: "#/" }, { label: volume, href: route("tree", volume, versionParams(params)) }];
  const names = path ? path.split("/") : [];
  names.forEach((name, i) => {
    const sub = names.slice(0, i + 1).join("/");
    parts.push({ label: name, href: i < names.length - 1 ? route("tree", volume, { ...versionParams(params), path: sub }) : null });
  });
  setCrumbs(parts);
}

// ---- tree ------------------------------------------------------------------

const treeSort = { key: "name", ascending: true };

function sortEntries(entries) {
  const { key, ascending } = treeSort;
  const dirsFirst = (a, b) => (b.type === "dir") - (a.type === "dir");
  const compare = {
    name: (a, b) => a.name.localeCompare(b.name),
    size: (a, b) => a.size - b.size,
    mtime: (a, b) => (BigInt(a.mtime_ns) < BigInt(b.mtime_ns) ? -1 : BigInt(a.mtime_ns) > BigInt(b.mtime_ns) ? 1 : 0),
  }[key];
  return entries.slice().sort((a, b) => dirsFirst(a, b) || (ascending ? compare(a, b) : -compare(a, b)));
}

async function showTree(volume, params) {
  const path = params.get("path") || "";
  pathCrumbs(volume, params, path);
  const data = await api(apiUrl(volume, "tree", { ...versionParams(params), path }));
  if (data.type !== "dir") {
    location.hash = route("file", volume, { ...versionParams(params), path });
    return;
  }
  const current = { ...data.version, pinned: !!params.get("version") };
  const picker = await versionPicker(volume, current, params.get("lineage"), "tree", path);
  const pinned = { version: data.version.id };
  const table = h("table", { id: "tree-table" });
  const render = () => {
    const header = (key, label, cls) => h("th", {
      class: "sortable " + (cls || ""),
      "data-sort": key,
      onclick: () => {
        treeSort.ascending = treeSort.key === key ? !treeSort.ascending : true;
        treeSort.key = key;
        render();
      },
      text: label + (treeSort.key === key ? (treeSort.ascending ? " ▲" : " ▼") : ""),
    });
    const rows = sortEntries(data.entries).map((e) => {
      const link = e.type === "dir"
        ? h("a", { href: route("tree", volume, { ...versionParams(params), path: e.path }), text: e.name + "/" })
        : e.type === "file"
          ? h("a", { href: route("file", volume, { ...versionParams(params), path: e.path }), text: e.name })
          : h("span", { text: e.name + (e.target ? " → " + e.target : "") });
      const download = e.type === "file" || e.type === "dir"
        ? h("a", { href: apiUrl(volume, "download", { ...pinned, path: e.path }), class: "download", text: e.type === "dir" ? "tar" : "download" })
        : null;
      return h("tr", { "data-path": e.path, "data-type": e.type },
        h("td", {}, link),
        h("td", { class: "num", text: e.type === "file" ? humanBytes(e.size) : "" }),
        h("td", { text: time(e.mtime) }),
        h("td", { class: "mono muted", text: e.mode }),
        h("td", {}, download));
    });
    table.replaceChildren(
      h("thead", {}, h("tr", {}, header("name", "Name"), header("size", "Size", "num"), header("mtime", "Modified"), h("th", { text: "Mode" }), h("th", {}))),
      h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 5, class: "muted", text: "empty directory" }))));
  };
  render();
  const lineage = params.get("lineage") || data.version.lineage || "main";
  show(
    h("h1", {}, volume, path ? h("span", { class: "muted", text: " / " + path }) : null),
    picker,
    h("div", { class: "toolbar" },
      h("a", { class: "button", id: "download-dir", href: apiUrl(volume, "download", { ...pinned, path }), text: "Download this folder as tar" })),
    table,
    uploadPanel(volume, lineage, path));
}

// ---- upload ----------------------------------------------------------------

// Collects files from a dropped directory entry, with paths relative to the drop.
function filesOfEntry(entry, prefix) {
  return new Promise((resolve, reject) => {
    if (entry.isFile) {
      entry.file((file) => resolve([{ file, path: prefix + file.name }]), reject);
      return;
    }
    const reader = entry.createReader();
    const all = [];
    const readMore = () => reader.readEntries(async (batch) => {
      if (batch.length === 0) {
        try {
          const nested = await Promise.all(all.map((child) => filesOfEntry(child, prefix + entry.name + "/")));
          resolve(nested.flat());
        } catch (err) { reject(err); }
        return;
      }
      all.push(...batch);
      readMore();
    }, reject);
    readMore();
  });
}

function uploadPanel(volume, lineage, dir) {
  const progress = h("progress", { id: "upload-progress", max: 1, value: 0, hidden: true });
  const result = h("div", { id: "upload-status" });
  const start = (items) => {
    if (items.length === 0) return;
    const form = new FormData();
    for (const item of items) {
      form.append("path", item.path);
      form.append("file", item.file, item.file.name);
    }
    const xhr = new XMLHttpRequest();
    xhr.open("POST", apiUrl(volume, "upload", { lineage, dir }));
    progress.hidden = false;
    progress.value = 0;
    result.textContent = "Uploading " + items.length + " file(s)…";
    result.className = "";
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) progress.value = e.loaded / e.total; };
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status === 200) {
        progress.value = 1;
        sessionStorage.setItem("chalk-upload-message", "Uploaded " + body.files + " file(s) as version " + body.version.id);
        location.hash = route("tree", volume, { lineage, path: dir, uploaded: body.version.id });
      } else {
        result.textContent = "Upload failed: " + (body.error || xhr.status + " " + xhr.statusText);
        result.className = "error";
      }
    };
    xhr.onerror = () => { result.textContent = "Upload failed: the connection was lost"; result.className = "error"; };
    xhr.send(form);
  };
  const fromInput = (input) => start(Array.from(input.files).map((file) => ({ file, path: file.webkitRelativePath || file.name })));
  const fileInput = h("input", { type: "file", id: "upload-input", multiple: true, onchange: (e) => fromInput(e.target) });
  const folderInput = h("input", { type: "file", id: "upload-folder-input", webkitdirectory: true, multiple: true, onchange: (e) => fromInput(e.target) });
  const zone = h("div", { class: "dropzone", id: "dropzone" },
    h("p", { text: "Drop files or folders here to upload them into " + (dir || "the volume root") + " as one new version of " + lineage + "." }),
    h("label", {}, "Files: ", fileInput), " ",
    h("label", {}, "Folder: ", folderInput));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const entries = Array.from(e.dataTransfer.items).map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
    try {
      const items = entries.length
        ? (await Promise.all(entries.map((entry) => filesOfEntry(entry, "")))).flat()
        : Array.from(e.dataTransfer.files).map((file) => ({ file, path: file.name }));
      start(items);
    } catch (err) {
      result.textContent = "Could not read the dropped files: " + err;
      result.className = "error";
    }
  });
  const done = sessionStorage.getItem("chalk-upload-message");
  if (done) {
    sessionStorage.removeItem("chalk-upload-message");
    result.textContent = done;
  }
  return h("section", {}, h("h2", { text: "Upload" }), zone, progress, result);
}

// ---- preview ---------------------------------------------------------------

function linesTable(text) {
  const lines = text.split("\n");
  if (lines.length > 1 && lines[lines.length - 1] === "") lines.pop();
  return h("table", { class: "lines", id: "preview-text" },
    h("tbody", {}, lines.map((line, i) => h("tr", {}, h("td", { class: "ln", text: i + 1 }), h("td", { text: line })))));
}

function dataTable(columns, rows) {
  const show = (v) => (v === null ? "null" : typeof v === "object" ? JSON.stringify(v) : String(v));
  return h("table", { id: "preview-table" },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { text: c })))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((v) => h("td", { text: show(v) }))))));
}

async function showFile(volume, params) {
  const path = params.get("path") || "";
  pathCrumbs(volume, params, path);
  const data = await api(apiUrl(volume, "preview", { ...versionParams(params), path }));
  const current = { ...data.version, pinned: !!params.get("version") };
  const picker = await versionPicker(volume, current, params.get("lineage"), "file", path);
  const pinned = { version: data.version.id, path };
  const downloadUrl = apiUrl(volume, "download", pinned);
  let body;
  let note = null;
  if (data.kind === "image") {
    body = data.too_large
      ? h("p", { class: "muted", text: "This image is too large to preview; download it instead." })
      : h("img", { id: "preview-image", alt: path, src: apiUrl(volume, "raw", pinned) });
  } else if (data.kind === "table") {
    body = dataTable(data.columns, data.rows);
    note = "Showing the first " + data.rows.length + " rows.";
  } else if (data.kind === "binary") {
    body = h("pre", { class: "code mono", id: "preview-hex", text: data.hex });
    note = "Binary data: the first bytes in hex.";
  } else {
    body = linesTable(data.text);
  }
  if (data.truncated) {
    note = (note ? note + " " : "") + "The preview covers the first " + humanBytes(data.preview_bytes) + " of " + humanBytes(data.size) + "; download the file for the rest.";
  }
  show(
    h("h1", {}, path.split("/").pop()),
    picker,
    h("div", { class: "toolbar" },
      h("span", { class: "muted", text: humanBytes(data.size) }),
      h("a", { class: "button primary", id: "download-link", href: downloadUrl, text: "Download" })),
    note ? h("p", { class: "muted", id: "preview-note", text: note }) : null,
    h("div", { class: "preview", id: "preview", "data-kind": data.kind }, body));
}

// ---- versions --------------------------------------------------------------

async function showVersions(volume) {
  setCrumbs([{ label: "volumes", href: "#/" }, { label: volume, href: route("tree", volume) }, { label: "versions" }]);
  const data = await api(apiUrl(volume, "lineages"));
  const all = await api(apiUrl(volume, "versions"));
  const tagsOf = {};
  for (const t of data.tags) (tagsOf[t.version] = tagsOf[t.version] || []).push(t.tag);
  const sections = [];
  for (const lineage of data.lineages) {
    const entries = (await api(apiUrl(volume, "versions", { lineage: lineage.name }))).versions.slice().reverse();
    sections.push(h("section", { "data-lineage": lineage.name },
      h("h2", {}, lineage.name, lineage.forked_from ? h("span", { class: "muted", text: "  forked from " + shortId(lineage.forked_from) }) : null),
      h("ol", { class: "timeline" }, entries.map((v) => h("li", { class: v.lineage !== lineage.name ? "fork" : "", "data-version": v.id },
        h("div", {},
          h("a", { class: "mono", href: route("tree", volume, { version: v.id }), title: v.id, text: shortId(v.id) }),
          " #" + v.seq + (v.lineage !== lineage.name ? " of " + v.lineage : ""), "  ",
          h("span", { class: "muted", text: time(v.created_at) + "  " + v.files + " files, " + humanBytes(v.bytes) }),
          (tagsOf[v.id] || []).map((t) => h("span", { class: "badge modified", text: t }))),
        h("div", {},
          v.message ? h("span", { text: v.message + "  " }) : null,
          v.parent
            ? h("span", { class: "muted" }, "parent ", h("a", { class: "mono", href: route("tree", volume, { version: v.parent }), text: shortId(v.parent) }), "  ",
                h("a", { href: route("diff", volume, { a: v.parent, b: v.id }), class: "diff-parent", text: "diff with parent" }))
            : h("span", { class: "muted", text: "first version" })))))));
  }
  const options = all.versions.slice().reverse().map((v) => h("option", { value: v.id, text: shortId(v.id) + " " + v.lineage + " #" + v.seq + " " + time(v.created_at) }));
  const selectA = h("select", { id: "diff-a" }, options.map((o) => o.cloneNode(true)));
  const selectB = h("select", { id: "diff-b" }, options);
  if (selectA.options.length > 1) selectA.selectedIndex = 1;
  const compare = h("form", {
    class: "toolbar",
    onsubmit: (e) => { e.preventDefault(); location.hash = route("diff", volume, { a: selectA.value, b: selectB.value }); },
  }, h("label", { for: "diff-a", text: "Compare" }), selectA, h("label", { for: "diff-b", text: "with" }), selectB,
    h("button", { type: "submit", class: "primary", id: "compare-button", text: "Show diff" }));
  show(h("h1", { text: volume + ": versions" }), compare, ...sections);
}

// ---- diff ------------------------------------------------------------------

function hunksTable(hunks) {
  const rows = [];
  hunks.forEach((hunk, i) => {
    if (i > 0) rows.push(h("tr", { class: "hunk" }, h("td", { class: "ln" }), h("td", { class: "ln" }), h("td", { text: "…" })));
    for (const line of hunk.lines) {
      const sign = line.tag === "insert" ? "+ " : line.tag === "delete" ? "- " : "  ";
      rows.push(h("tr", { class: line.tag },
        h("td", { class: "ln", text: line.old_line || "" }),
        h("td", { class: "ln", text: line.new_line || "" }),
        h("td", { text: sign + line.text })));
    }
  });
  return h("table", { class: "lines text-diff" }, h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { text: "no line changes" }))));
}

async function showDiff(volume, params) {
  const a = params.get("a");
  const b = params.get("b");
  setCrumbs([{ label: "volumes", href: "#/" }, { label: volume, href: route("tree", volume) }, { label: "versions", href: route("versions", volume) }, { label: "diff" }]);
  const data = await api(apiUrl(volume, "diff", { a, b }));
  const rows = data.changes.map((c) => {
    const cell = h("td", {});
    if (c.text_diff && c.type === "file") {
      cell.append(h("button", {
        class: "show-text-diff",
        onclick: async (e) => {
          e.target.disabled = true;
          try {
            const diff = await api(apiUrl(volume, "diff/text", { a: data.a.id, b: data.b.id, path: c.path }));
            cell.replaceChildren(hunksTable(diff.hunks));
          } catch (err) {
            cell.replaceChildren(h("span", { class: "error", text: err.message }));
          }
        },
        text: "text diff",
      }));
    }
    const sizes = c.type !== "file" ? "" : c.old_size !== null && c.new_size !== null && c.old_size !== c.new_size
      ? humanBytes(c.old_size) + " → " + humanBytes(c.new_size)
      : humanBytes(c.new_size !== null ? c.new_size : c.old_size);
    return h("tr", { "data-path": c.path, "data-change": c.change },
      h("td", {}, h("span", { class: "badge " + c.change, text: c.change })),
      h("td", { class: "mono" }, c.old_path ? c.old_path + " → " : "", c.path),
      h("td", { class: "num", text: sizes }),
      cell);
  });
  show(
    h("h1", { text: "Diff" }),
    h("p", {}, "From ", h("a", { class: "mono", href: route("tree", volume, { version: data.a.id }), text: data.a.id }),
      " (" + data.a.lineage + " #" + data.a.seq + ") to ",
      h("a", { class: "mono", href: route("tree", volume, { version: data.b.id }), text: data.b.id }),
      " (" + data.b.lineage + " #" + data.b.seq + ")"),
    data.changes.length === 0
      ? h("p", { class: "muted", id: "diff-empty", text: "No differences." })
      : h("table", { id: "diff-table" }, h("thead", {}, h("tr", {}, h("th", { text: "Change" }), h("th", { text: "Path" }), h("th", { class: "num", text: "Size" }), h("th", {}))), h("tbody", {}, rows)));
}

// ---- router ----------------------------------------------------------------

async function render() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [pathPart, search] = hash.split("?");
  const params = new URLSearchParams(search || "");
  const [kind, encodedVolume] = pathPart.split("/");
  const volume = encodedVolume ? decodeURIComponent(encodedVolume) : "";
  setStatus("");
  document.body.dataset.view = kind || "volumes";
  document.body.dataset.ready = "false";
  try {
    if (!kind) await showVolumes();
    else if (kind === "tree") await showTree(volume, params);
    else if (kind === "file") await showFile(volume, params);
    else if (kind === "versions") await showVersions(volume);
    else if (kind === "diff") await showDiff(volume, params);
    else show(h("p", { text: "Unknown page: " + hash }));
  } catch (err) {
    show(h("p", { class: "error", id: "error", text: err.message }));
    setStatus(err.message, true);
  }
  document.body.dataset.ready = "true";
}

window.addEventListener("hashchange", render);
render();
