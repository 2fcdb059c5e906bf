// clipkit search tab: plain JS against the JSON API of clipkit/search/server.py (no build step).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { qid: null, offset: 0, limit: 24, hasMore: false, label: "" };

  function status(msg, isError) {
    const s = $("status");
    s.textContent = msg;
    s.className = isError ? "error" : "muted";
  }

  async function call(url, options) {
    const r = await fetch(url, options);
    let body = null;
    try { body = await r.json(); } catch (e) { body = { error: r.statusText }; }
    if (!r.ok) throw new Error(body && body.error ? body.error : ("HTTP " + r.status));
    return body;
  }

  function render(page) {
    state.qid = page.qid; state.offset = page.offset; state.hasMore = page.has_more; state.label = page.query;
    const box = $("results");
    box.textContent = "";
    for (const r of page.results) {
      const card = document.createElement("article");
      card.className = "result";
      card.dataset.id = r.id;
      const img = document.createElement("img");
      img.src = r.thumb; img.alt = r.path; img.loading = "lazy"; img.title = "search by this picture";
      img.addEventListener("click", () => {
        $("query-preview").hidden = true;
        run("/api/search?id=" + r.id + "&limit=" + state.limit);
      });
      const meta = document.createElement("div");
      meta.className = "meta";
      const rank = document.createElement("span"); rank.textContent = "#" + r.rank;
      const score = document.createElement("span"); score.className = "score"; score.textContent = r.score.toFixed(4);
      meta.append(rank, score);
      const path = document.createElement("div");
      path.className = "path"; path.title = r.path;
      const bdi = document.createElement("bdi");   // the path reads left to right; the ellipsis eats its start
      bdi.textContent = r.path;
      path.append(bdi);
      const cap = document.createElement("div");
      cap.className = "caption"; cap.textContent = r.caption || "";
      const btn = document.createElement("button");
      btn.type = "button"; btn.className = "caption-btn"; btn.textContent = "caption this";
      btn.addEventListener("click", async () => {
        btn.disabled = true; btn.textContent = "captioning\u2026";
        try {
          const c = await call("/api/caption", { method: "POST", headers: { "Content-Type": "application/json" },
                                                 body: JSON.stringify({ id: r.id }) });
          cap.textContent = "\u201c" + c.caption + "\u201d (" + c.clip_score.toFixed(3) + ")";
          cap.classList.add("generated");
          btn.textContent = "captioned";
        } catch (e) { cap.textContent = e.message; cap.classList.add("error"); btn.textContent = "caption this"; btn.disabled = false; }
      });
      card.append(img, meta, path, cap, btn);
      box.append(card);
    }
    const first = page.offset + 1, last = page.offset + page.results.length;
    status(page.results.length ? `${page.query} \u2014 results ${first}\u2013${last} of ${page.indexed} indexed (${page.took_ms} ms)`
                               : `${page.query} \u2014 no results`);
    $("pager").hidden = !(page.has_more || page.offset > 0);
    $("prev").disabled = page.offset === 0;
    $("next").disabled = !page.has_more;
    $("page-no").textContent = "page " + (Math.floor(page.offset / state.limit) + 1);
    const ex = $("export");
    ex.href = "/api/export?qid=" + encodeURIComponent(page.qid) + "&limit=100";
    ex.hidden = false;
  }

  async function run(url, options) {
    status("searching\u2026");
    try { render(await call(url, options)); }
    catch (e) { status(e.message, true); }
  }

  $("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = $("q").value.trim();
    if (!q) { status("type a query first", true); return; }
    $("query-preview").hidden = true;
    run("/api/search?q=" + encodeURIComponent(q) + "&limit=" + state.limit);
  });

  $("upload").addEventListener("change", () => {
    const f = $("upload").files[0];
    if (!f) return;
    $("query-img").src = URL.createObjectURL(f);
    $("query-label").textContent = f.name;
    $("query-preview").hidden = false;
    const fd = new FormData();
    fd.append("image", f);
    fd.append("limit", String(state.limit));
    run("/api/search", { method: "POST", body: fd });
    $("upload").value = "";
  });

  $("prev").addEventListener("click", () => {
    run(`/api/search?qid=${encodeURIComponent(state.qid)}&offset=${Math.max(0, state.offset - state.limit)}&limit=${state.limit}`);
  });
  $("next").addEventListener("click", () => {
    run(`/api/search?qid=${encodeURIComponent(state.qid)}&offset=${state.offset + state.limit}&limit=${state.limit}`);
  });

  (window.clipkitInfo || call("/api/info")).then((i) => {
    if (!(i.tabs || ["search"]).includes("search")) return;     // the studio without an index
    state.limit = i.page_size;
    $("info").textContent = `${i.items} images \u00b7 ${i.model} \u00b7 ${i.structure}` +
      (i.captioner ? ` \u00b7 captioner ${i.captioner}` : "");
    if (!i.text_queries) { $("q").disabled = true; $("q").placeholder = "this index has no CLIP: click a picture"; }
  }).catch((e) => status(e.message, true));
}());
