// One widget per input kind. A widget is built from the input's declaration alone (no node knowledge):
//
//   createWidget(spec, value, ctx) -> {el, set(value), wide}
//
// ctx.onInput(value) reports a value while it is being typed (no history entry); ctx.onChange(value) reports a
// finished edit. ctx.api serves uploads and image URLs; ctx.seed = {get(), set(on)} backs the "randomise after
// run" toggle of INT inputs named "seed".

import { defaultValue } from "./graph.js";

export const SAFE_MAX = Number.MAX_SAFE_INTEGER;

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child) el.append(child);
  return el;
}

export { h };

function decimals(step) {
  if (!step) return 0;
  const text = String(step);
  if (text.includes("e-")) return Number(text.split("e-")[1]);
  const dot = text.indexOf(".");
  return dot < 0 ? 0 : text.length - dot - 1;
}

/** A typed number brought within the input's bounds and onto its step (counted from min, as the server checks). */
export function normaliseNumber(spec, raw) {
  let v = typeof raw === "number" ? raw : Number(String(raw).trim());
  if (!Number.isFinite(v)) return null;
  const isInt = spec.kind === "INT";
  let lo = typeof spec.min === "number" ? spec.min : -Infinity;
  let hi = typeof spec.max === "number" ? spec.max : Infinity;
  if (isInt) {
    lo = Math.max(lo, -SAFE_MAX);
    hi = Math.min(hi, SAFE_MAX);
    v = Math.round(v);
  }
  v = Math.min(hi, Math.max(lo, v));
  const step = spec.step;
  if (step) {
    const base = Number.isFinite(lo) ? lo : 0;
    v = base + Math.round((v - base) / step) * step;
    if (v > hi) v -= step;
    if (v < lo) v += step;
  }
  if (!isInt) {
    if (spec.round) v = Math.round(v / spec.round) * spec.round;
    const places = spec.round ? decimals(spec.round) : step ? decimals(step) : null;
    // binary floats: 0.1 * 3 is 0.30000000000000004; print it as the step's decimals say
    if (places !== null) v = Number(v.toFixed(Math.min(places, 12)));
  }
  return v;
}

/** Whether a COMBO input picks an input image: declared with upload: "image" (LoadImage's "image"). */
export function isImagePicker(spec) {
  return spec.kind === "COMBO" && spec.upload === "image";
}

export function randomSeed(spec) {
  const lo = Math.max(typeof spec.min === "number" ? spec.min : 0, 0);
  const hi = Math.min(typeof spec.max === "number" ? spec.max : SAFE_MAX, SAFE_MAX);
  // 53 random bits: two draws, as Math.random alone gives fewer
  const r = Math.floor(Math.random() * 2 ** 21) * 2 ** 32 + Math.floor(Math.random() * 2 ** 32);
  return lo + (r % (hi - lo + 1));
}

let uid = 0;

export function createWidget(spec, value, ctx) {
  switch (spec.kind) {
    case "INT":
    case "FLOAT": return numberWidget(spec, value, ctx);
    case "STRING": return spec.multiline ? textAreaWidget(spec, value, ctx) : textWidget(spec, value, ctx);
    case "BOOLEAN": return booleanWidget(spec, value, ctx);
    case "COMBO": return isImagePicker(spec) ? imageWidget(spec, value, ctx) : comboWidget(spec, value, ctx);
    case "LIST": return listWidget(spec, value, ctx);
    default: return rawWidget(spec, value);
  }
}

function numberWidget(spec, value, ctx) {
  const input = h("input", {
    type: "number", class: "w-number", "data-widget": spec.kind,
    min: spec.min ?? undefined, max: spec.max ?? undefined,
    step: spec.step ?? (spec.kind === "INT" ? 1 : spec.round ?? "any"),
    title: rangeText(spec),
  });
  let current = value;
  const show = (v) => {
    current = v;
    input.value = v === undefined || v === null ? "" : String(v);
  };
  show(value);
  input.addEventListener("input", () => {
    const v = normaliseNumber(spec, input.value);
    if (v !== null && input.value.trim() !== "") ctx.onInput(v);
  });
  input.addEventListener("change", () => {
    if (input.value.trim() === "" && spec.optional) {
      current = undefined;
      ctx.onChange(undefined);
      return;
    }
    const v = normaliseNumber(spec, input.value);
    if (v === null) {
      show(current);
      return;
    }
    show(v);
    ctx.onChange(v);
  });
  const el = h("div", { class: "w-number-wrap" }, input);
  if (spec.kind === "INT" && spec.name === "seed" && ctx.seed) {
    const box = h("input", { type: "checkbox", class: "w-seed-random", title: "randomise after run" });
    box.checked = !!ctx.seed.get();
    box.addEventListener("change", () => ctx.seed.set(box.checked));
    el.append(h("label", { class: "w-seed", title: "pick a new random seed after each run" }, box,
      h("span", { text: "random" })));
  }
  return { el, set: show };
}

function rangeText(spec) {
  const parts = [];
  if (spec.min !== undefined && spec.min !== null) parts.push(`min ${spec.min}`);
  if (spec.max !== undefined && spec.max !== null) parts.push(`max ${spec.max}`);
  if (spec.step) parts.push(`step ${spec.step}`);
  return parts.join(", ") || undefined;
}

function textWidget(spec, value, ctx) {
  const input = h("input", { type: "text", class: "w-text", "data-widget": "STRING", spellcheck: "false" });
  const set = (v) => { input.value = v ?? ""; };
  set(value);
  input.addEventListener("input", () => ctx.onInput(input.value));
  input.addEventListener("change", () => ctx.onChange(input.value));
  return { el: input, set };
}

function textAreaWidget(spec, value, ctx) {
  const area = h("textarea", { class: "w-textarea", "data-widget": "STRING", rows: "3", spellcheck: "false" });
  const set = (v) => { area.value = v ?? ""; };
  set(value);
  area.addEventListener("input", () => ctx.onInput(area.value));
  area.addEventListener("change", () => ctx.onChange(area.value));
  return { el: area, set, wide: true };
}

function booleanWidget(spec, value, ctx) {
  const box = h("input", { type: "checkbox", class: "w-bool", "data-widget": "BOOLEAN" });
  const text = h("span", { class: "w-bool-text" });
  const set = (v) => {
    box.checked = !!v;
    text.textContent = v ? "true" : "false";
  };
  set(value);
  box.addEventListener("change", () => {
    text.textContent = box.checked ? "true" : "false";
    ctx.onChange(box.checked);
  });
  return { el: h("label", { class: "w-bool-wrap" }, box, text), set };
}

function fillSelect(select, options, value) {
  select.replaceChildren();
  const list = [...(options || [])];
  if (value !== undefined && value !== null && value !== "" && !list.includes(value)) {
    select.append(h("option", { value, text: `${value} (missing)`, class: "missing" }));
  }
  if (!list.length && (value === undefined || value === "")) {
    select.append(h("option", { value: "", text: "(none available)", disabled: true }));
  }
  for (const option of list) select.append(h("option", { value: option, text: option }));
  select.value = value ?? "";
}

function comboWidget(spec, value, ctx) {
  if (spec.accepts_other) {
    const id = `ng-list-${++uid}`;
    const input = h("input", {
      type: "text", class: "w-combo-free", list: id, "data-widget": "COMBO", spellcheck: "false",
      placeholder: typeof spec.accepts_other === "string" ? spec.accepts_other : "choose or type",
      title: typeof spec.accepts_other === "string" ? `one of the choices, or ${spec.accepts_other}` : undefined,
    });
    const list = h("datalist", { id });
    for (const option of spec.options || []) list.append(h("option", { value: option }));
    const set = (v) => { input.value = v ?? ""; };
    set(value);
    input.addEventListener("input", () => ctx.onInput(input.value));
    input.addEventListener("change", () => ctx.onChange(input.value));
    return { el: h("div", { class: "w-combo-wrap" }, input, list), set };
  }
  const select = h("select", { class: "w-combo", "data-widget": "COMBO" });
  fillSelect(select, spec.options, value);
  select.addEventListener("change", () => ctx.onChange(select.value));
  return { el: select, set: (v) => fillSelect(select, spec.options, v) };
}

function imageWidget(spec, value, ctx) {
  const select = h("select", { class: "w-combo w-image-select", "data-widget": "COMBO" });
  const file = h("input", { type: "file", accept: "image/*", class: "w-image-file", hidden: true });
  const button = h("button", { type: "button", class: "w-image-upload", text: "Upload…",
    title: "upload an image to the input folder" });
  const thumb = h("img", { class: "w-image-thumb", alt: "", draggable: "false" });
  const note = h("div", { class: "w-image-note" });
  let current = value;

  const showThumb = (v) => {
    if (v) {
      thumb.src = ctx.api.viewUrl({ filename: v, type: "input" });
      thumb.hidden = false;
    } else {
      thumb.removeAttribute("src");
      thumb.hidden = true;
    }
  };
  const set = (v) => {
    current = v;
    fillSelect(select, spec.options, v);
    showThumb(v);
  };
  set(value);
  thumb.addEventListener("error", () => { thumb.hidden = true; });
  thumb.addEventListener("load", () => {
    note.textContent = `${thumb.naturalWidth}×${thumb.naturalHeight}`;
    ctx.onResize?.();
  });
  select.addEventListener("change", () => {
    current = select.value;
    showThumb(current);
    ctx.onChange(current);
  });

  const upload = async (f) => {
    if (!f) return;
    button.disabled = true;
    button.textContent = "Uploading…";
    try {
      const answer = await ctx.api.uploadImage(f);
      const name = answer.subfolder ? `${answer.subfolder}/${answer.name}` : answer.name;
      if (!Array.isArray(spec.options)) spec.options = [];
      if (!spec.options.includes(name)) spec.options.push(name);
      set(name);
      ctx.onChange(name);
    } catch (err) {
      ctx.notify?.(`Upload failed: ${err.message}`, "error");
    } finally {
      button.disabled = false;
      button.textContent = "Upload…";
      file.value = "";
    }
  };
  button.addEventListener("click", () => file.click());
  file.addEventListener("change", () => upload(file.files[0]));
  const el = h("div", { class: "w-image" }, h("div", { class: "w-image-row" }, select, button), file, thumb, note);
  // dropping an image file on the widget uploads it (and does not load it as a workflow)
  el.addEventListener("dragover", (e) => {
    if ([...e.dataTransfer.types].includes("Files")) {
      e.preventDefault();
      e.stopPropagation();
      el.classList.add("drop-target");
    }
  });
  el.addEventListener("dragleave", () => el.classList.remove("drop-target"));
  el.addEventListener("drop", (e) => {
    el.classList.remove("drop-target");
    const f = [...(e.dataTransfer.files || [])].find((x) => x.type.startsWith("image/"));
    if (f) {
      e.preventDefault();
      e.stopPropagation();
      upload(f);
    }
  });
  return { el, set, wide: true };
}

function listWidget(spec, value, ctx) {
  const fields = spec.fields || [];
  const max = spec.max_items ?? 64;
  let rows = Array.isArray(value) ? value.map((r) => ({ ...r })) : [];
  const body = h("tbody");
  const add = h("button", { type: "button", class: "w-list-add", text: "+ Add row" });
  const count = h("span", { class: "w-list-count" });
  const table = h("table", { class: "w-list-table" },
    h("thead", {}, h("tr", {}, ...fields.map((f) => h("th", { text: f.name, title: f.tooltip || undefined })),
      h("th", {}))), body);

  const emit = () => ctx.onChange(rows.map((r) => ({ ...r })));
  const render = () => {
    body.replaceChildren();
    rows.forEach((row, index) => {
      const tr = h("tr", { "data-row": String(index) });
      for (const field of fields) {
        const cellValue = field.name in row ? row[field.name] : defaultValue(field);
        const widget = createWidget(field, cellValue, {
          ...ctx,
          seed: undefined,
          onInput: (v) => { row[field.name] = v; ctx.onInput(rows.map((r) => ({ ...r }))); },
          onChange: (v) => {
            if (v === undefined) delete row[field.name];
            else row[field.name] = v;
            emit();
          },
        });
        tr.append(h("td", { "data-field": field.name }, widget.el));
      }
      const remove = h("button", { type: "button", class: "w-list-remove", title: "remove this row", text: "×" });
      remove.addEventListener("click", () => {
        rows.splice(index, 1);
        render();
        emit();
      });
      tr.append(h("td", { class: "w-list-actions" }, remove));
      body.append(tr);
    });
    add.disabled = rows.length >= max;
    count.textContent = rows.length ? `${rows.length} / ${max}` : "empty";
    ctx.onResize?.();
  };
  add.addEventListener("click", () => {
    if (rows.length >= max) return;
    const row = {};
    for (const field of fields) {
      const v = defaultValue(field);
      if (v !== undefined) row[field.name] = v;
    }
    rows.push(row);
    render();
    emit();
  });
  render();
  const set = (v) => {
    rows = Array.isArray(v) ? v.map((r) => ({ ...r })) : [];
    render();
  };
  return { el: h("div", { class: "w-list", "data-widget": "LIST" }, table, h("div", { class: "w-list-foot" }, add, count)),
    set, wide: true };
}

function rawWidget(spec, value) {
  const code = h("code", { class: "w-raw", title: "an input this canvas does not know; kept as it is" });
  const set = (v) => { code.textContent = JSON.stringify(v); };
  set(value);
  return { el: code, set };
}
