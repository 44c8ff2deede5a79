// The translation page: a plain client of the public REST API, and an example of one.
//
//   POST v1/translate
//   {"texts": ["..."], "beam_size": 5, "n_best": 1, "length_penalty": 1.5,
//    "return_alignment": true}      (length_penalty left out: the model's own default)
//   Each text (a line of the page) may hold several sentences: the server translates each
//   sentence and joins them; the alignment of such a text is block-diagonal.
//   -> {"translations": [{"text", "score", "n_best": [{"text", "score"}],
//        "alignment": {"source_tokens", "target_tokens", "weights": [[target x source]]}}],
//       "model": {"name", "version"}}
//   errors: 4xx/5xx with {"error": "message"} (validation errors may carry "detail" instead).
//
// No framework and no external resource: everything is built with the DOM API, and text from the
// user or the server is only ever set through textContent (never innerHTML).
"use strict";

(() => {
  const API = "v1/translate"; // relative, so the page also works behind a path prefix
  const $ = (id) => document.getElementById(id);

  const form = $("form");
  const source = $("source");
  const beamSize = $("beam-size");
  const nBest = $("n-best");
  const lengthPenalty = $("length-penalty");
  const button = $("translate");
  const buttonLabel = button.querySelector(".label");
  const status = $("status");
  const errorBox = $("error");
  const output = $("output");
  const results = $("results");
  const attention = $("attention");
  const heatmap = $("heatmap");
  const caption = $("attention-caption");

  let last = null; // {sources, translations} of the last successful request
  let busy = false;

  // -- the request -------------------------------------------------------------------------------

  function lines() {
    return source.value
      .split(/\r?\n/)
      .map((line) => line.trim())
      .filter((line) => line.length > 0);
  }

  function numberOf(input, parse) {
    const value = parse(input.value);
    return Number.isFinite(value) ? value : parse(input.defaultValue);
  }

  async function translate() {
    if (busy) return;
    const texts = lines();
    if (texts.length === 0) {
      showError("Type some English text.");
      source.focus();
      return;
    }
    const body = {
      texts,
      beam_size: numberOf(beamSize, (v) => parseInt(v, 10)),
      n_best: numberOf(nBest, (v) => parseInt(v, 10)),
      return_alignment: true,
    };
    const alpha = parseFloat(lengthPenalty.value);
    if (Number.isFinite(alpha)) body.length_penalty = alpha; // else the model's default
    setBusy(true);
    showError(null);
    const started = performance.now();
    try {
      let response;
      try {
        response = await fetch(API, {
          method: "POST",
          headers: { "Content-Type": "application/json", Accept: "application/json" },
          body: JSON.stringify(body),
        });
      } catch (e) {
        throw new Error("Could not reach the translation server. Is `translator serve` running?");
      }
      if (!response.ok) throw new Error(await errorMessage(response));
      const data = await response.json();
      const seconds = (performance.now() - started) / 1000;
      showModel(data.model);
      last = { sources: texts, translations: data.translations || [] };
      renderResults(last);
      output.classList.remove("stale");
      const n = last.translations.length;
      status.textContent = `${n} ${n === 1 ? "text" : "texts"} in ${seconds.toFixed(2)} s`;
    } catch (e) {
      status.textContent = last ? "The results below are from the previous request." : "";
      output.classList.add("stale");
      showError(e.message || String(e));
    } finally {
      setBusy(false);
    }
  }

  // The API's error JSON is {"error": message}; FastAPI validation errors may come as
  // {"detail": [{"loc": [...], "msg": "..."}]}. Never show a stack trace or raw HTML.
  async function errorMessage(response) {
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (data && typeof data === "object") {
      if (typeof data.error === "string" && data.error) return data.error;
      if (data.error && typeof data.error.message === "string") return data.error.message;
      if (data.detail) return formatDetail(data.detail);
    }
    return `The server answered ${response.status} ${response.statusText}`.trim() + ".";
  }

  function formatDetail(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail
        .map((item) => {
          if (!item || typeof item !== "object") return String(item);
          const where = (item.loc || []).filter((part) => part !== "body").join(".");
          return where ? `${where}: ${item.msg}` : String(item.msg);
        })
        .join("; ");
    }
    return JSON.stringify(detail);
  }

  // -- page state --------------------------------------------------------------------------------

  function setBusy(on) {
    busy = on;
    button.disabled = on;
    button.classList.toggle("busy", on);
    buttonLabel.textContent = on ? "Translating…" : "Translate";
    form.setAttribute("aria-busy", on ? "true" : "false");
    output.setAttribute("aria-busy", on ? "true" : "false");
    if (on) status.textContent = "Translating…";
  }

  function showError(message) {
    errorBox.hidden = !message;
    errorBox.textContent = "";
    if (!message) return;
    const title = document.createElement("strong");
    title.textContent = "Translation failed: ";
    const text = document.createElement("span");
    text.className = "message";
    text.textContent = message;
    errorBox.append(title, text);
  }

  function showModel(model) {
    if (!model) return;
    const version = model.version === undefined || model.version === null ? "" : model.version;
    $("model-name").textContent = `${model.name || "unnamed"}${version !== "" ? ` v${version}` : ""}`;
  }

  // -- results -----------------------------------------------------------------------------------

  function renderResults({ sources, translations }) {
    results.textContent = "";
    translations.forEach((t, i) => {
      const item = document.createElement("li");
      item.className = "result";
      item.dataset.index = String(i);

      const src = document.createElement("p");
      src.className = "source";
      src.lang = "en";
      src.textContent = sources[i] ?? "";

      const line = document.createElement("div");
      line.className = "line";
      const target = document.createElement("p");
      target.className = "target";
      target.lang = "fr";
      if (t.text) {
        target.textContent = t.text;
      } else {
        target.classList.add("empty");
        target.textContent = "(empty translation)";
      }
      const score = document.createElement("span");
      score.className = "score";
      score.title = "Model score (length-normalised log-probability; higher is better)";
      score.textContent = `score ${formatScore(t.score)}`;
      line.append(target, score);

      const tools = document.createElement("div");
      tools.className = "tools";
      const copy = document.createElement("button");
      copy.type = "button";
      copy.className = "secondary copy";
      copy.textContent = "Copy";
      copy.setAttribute("aria-label", `Copy the translation of line ${i + 1}`);
      copy.addEventListener("click", () => copyText(t.text, copy));
      const show = document.createElement("button");
      show.type = "button";
      show.className = "secondary show-attention";
      show.textContent = "Attention";
      show.setAttribute("aria-label", `Show the attention heatmap of line ${i + 1}`);
      show.setAttribute("aria-pressed", "false");
      show.setAttribute("aria-controls", "attention");
      if (!t.alignment) {
        show.disabled = true;
        show.title = "The server returned no alignment for this line";
      }
      show.addEventListener("click", () => selectSentence(i));
      tools.append(copy, show);

      item.append(src, line);
      const alternatives = (t.n_best || []).slice(1);
      if (alternatives.length > 0) item.append(renderNBest(t.n_best));
      item.append(tools);
      results.append(item);
    });
    output.hidden = translations.length === 0;
    closeAttention();
  }

  function renderNBest(hypotheses) {
    const details = document.createElement("details");
    details.className = "nbest";
    details.open = true;
    const summary = document.createElement("summary");
    summary.textContent = `${hypotheses.length} best`;
    const list = document.createElement("ol");
    for (const h of hypotheses) {
      const li = document.createElement("li");
      const text = document.createElement("span");
      text.lang = "fr";
      text.textContent = h.text || "(empty)";
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = formatScore(h.score);
      li.append(text, " ", score);
      list.append(li);
    }
    details.append(summary, list);
    return details;
  }

  function formatScore(score) {
    return typeof score === "number" ? score.toFixed(3).replace("-", "−") : "—";
  }

  async function copyText(text, from) {
    let ok = false;
    try {
      await navigator.clipboard.writeText(text);
      ok = true;
    } catch (e) {
      // No clipboard API (plain http on a non-local host): fall back to a hidden selection.
      const area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.className = "offscreen";
      document.body.append(area);
      area.select();
      try {
        ok = document.execCommand("copy");
      } catch (e2) {
        ok = false;
      }
      area.remove();
    }
    status.textContent = ok ? "Copied to the clipboard." : "Could not copy: select the text instead.";
    if (from && ok) {
      const label = from.textContent;
      from.textContent = "Copied";
      setTimeout(() => (from.textContent = label), 1200);
    }
  }

  // -- attention heatmap -------------------------------------------------------------------------

  // SentencePiece marks the start of a word with "▁" (U+2581): show word starts plainly and
  // mark the pieces that continue a word with a leading "·".
  function readableToken(token) {
    if (token === "▁") return "␣";
    if (token.startsWith("▁")) return token.slice(1);
    if (/^<[^>]*>$/.test(token)) return token; // </s>, <unk>, ...
    return `·${token}`;
  }

  function selectSentence(index) {
    const t = last && last.translations[index];
    if (!t || !t.alignment) return;
    for (const b of results.querySelectorAll(".show-attention")) {
      b.setAttribute("aria-pressed", "false");
    }
    for (const li of results.querySelectorAll(".result")) li.classList.remove("selected");
    const item = results.querySelector(`.result[data-index="${index}"]`);
    item.classList.add("selected");
    item.querySelector(".show-attention").setAttribute("aria-pressed", "true");
    drawHeatmap(t.alignment);
    const french = t.text ? `“${t.text}”` : "(empty translation)";
    caption.textContent = `Line ${index + 1}: “${last.sources[index]}” → ${french}`;
    attention.hidden = false;
    const still = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
    attention.scrollIntoView({ block: "nearest", behavior: still ? "auto" : "smooth" });
  }

  function closeAttention() {
    attention.hidden = true;
    heatmap.textContent = "";
    for (const b of results.querySelectorAll(".show-attention")) {
      b.setAttribute("aria-pressed", "false");
    }
    for (const li of results.querySelectorAll(".result")) li.classList.remove("selected");
  }

  // A table, so screen readers get row and column headers: rows are target (French) subwords,
  // columns source (English) subwords; each cell's shade is the attention weight.
  function drawHeatmap({ source_tokens: src, target_tokens: tgt, weights }) {
    heatmap.textContent = "";
    const cap = document.createElement("caption");
    cap.className = "offscreen";
    cap.textContent = "Attention weights: French subwords (rows) by English subwords (columns)";
    heatmap.append(cap);

    const head = document.createElement("tr");
    const corner = document.createElement("td");
    corner.className = "corner";
    head.append(corner);
    src.forEach((token, j) => {
      const th = document.createElement("th");
      th.scope = "col";
      th.className = "src";
      th.dataset.col = String(j);
      th.title = token;
      const span = document.createElement("span");
      span.textContent = readableToken(token);
      th.append(span);
      head.append(th);
    });
    const thead = document.createElement("thead");
    thead.append(head);

    const tbody = document.createElement("tbody");
    tgt.forEach((token, i) => {
      const row = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "row";
      th.className = "tgt";
      th.title = token;
      th.textContent = readableToken(token);
      row.append(th);
      const values = weights[i] || [];
      src.forEach((sourceToken, j) => {
        const w = Number(values[j]) || 0;
        const td = document.createElement("td");
        td.className = "cell";
        td.dataset.col = String(j);
        td.style.setProperty("--w", Math.max(0, Math.min(1, w)).toFixed(3));
        td.title = `${readableToken(token)} ← ${readableToken(sourceToken)}: ${w.toFixed(2)}`;
        const label = document.createElement("span");
        label.className = "offscreen";
        label.textContent = w.toFixed(2);
        td.append(label);
        row.append(td);
      });
      tbody.append(row);
    });
    heatmap.append(thead, tbody);
  }

  // Hovering a cell highlights its source column header (the row header is styled by CSS).
  heatmap.addEventListener("mouseover", (event) => {
    const cell = event.target.closest("td.cell");
    for (const th of heatmap.querySelectorAll("th.src.hover")) th.classList.remove("hover");
    if (cell) heatmap.querySelector(`th.src[data-col="${cell.dataset.col}"]`)?.classList.add("hover");
  });
  heatmap.addEventListener("mouseleave", () => {
    for (const th of heatmap.querySelectorAll("th.src.hover")) th.classList.remove("hover");
  });

  // -- wiring ------------------------------------------------------------------------------------

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    translate();
  });
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      translate();
    }
  });
  const syncNBestMax = () => {
    const beam = parseInt(beamSize.value, 10);
    if (Number.isFinite(beam) && beam >= 1) nBest.max = String(beam);
  };
  beamSize.addEventListener("input", syncNBestMax);
  syncNBestMax();
  $("copy-all").addEventListener("click", () => {
    if (last) copyText(last.translations.map((t) => t.text).join("\n"), $("copy-all"));
  });
  $("close-attention").addEventListener("click", closeAttention);
})();
