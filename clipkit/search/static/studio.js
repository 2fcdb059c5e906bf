// clipkit studio: tabs, generate (live progress, previews, cancel), gallery, caption, rerank.
// Plain JS against the JSON API of clipkit/studio/app.py (no build step). The search tab is app.js.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const FINISHED = ["done", "failed", "cancelled"];
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };
  const fmt = (x, d) => (typeof x === "number" ? x.toFixed(d === undefined ? 4 : d) : "\u2013");

  async function call(url, options) {
    const r = await fetch(url, options);
    let body = null;
    try { body = await r.json(); } catch (e) { body = { error: r.statusText || ("HTTP " + r.status) }; }
    if (!r.ok) throw new Error(body && body.error ? body.error : ("HTTP " + r.status));
    return body;
  }
  const post = (url, json) => call(url, { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify(json || {}) });

  // A job: submit, then long-poll its state until it finishes; onUpdate sees every version.
  async function runJob(submit, onUpdate) {
    let job = await submit();
    onUpdate(job);
    while (!FINISHED.includes(job.state)) {
      try {
        job = await call(`/api/jobs/${job.id}?after=${job.version}&wait=5`);
      } catch (e) {
        await new Promise((ok) => setTimeout(ok, 500));
        continue;
      }
      onUpdate(job);
    }
    return job;
  }
  function waitingText(job) {
    if (job.state !== "queued") return "";
    return job.ahead ? `waiting: ${job.ahead} job${job.ahead > 1 ? "s" : ""} ahead (place ${job.place} in the queue)`
                     : "waiting: next in the queue";
  }

  // ---- tabs ------------------------------------------------------------------------------------
  let tabs = [];
  const shown = {};
  function show(name) {
    if (!tabs.includes(name)) name = tabs[0];
    for (const t of tabs.concat(["generate", "gallery", "caption", "rerank", "search"])) {
      const p = $("tab-" + t);
      if (p) p.hidden = t !== name;
    }
    for (const a of document.querySelectorAll("#tabs a")) {
      a.classList.toggle("active", a.dataset.tab === name);
      a.setAttribute("aria-selected", a.dataset.tab === name ? "true" : "false");
    }
    if (name === "gallery") loadGallery();
    shown[name] = true;
  }
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));

  const info = call("/api/info");
  window.clipkitInfo = info;
  info.then((i) => {
    tabs = i.tabs || ["search"];
    for (const a of document.querySelectorAll("#tabs a")) a.hidden = !tabs.includes(a.dataset.tab);
    $("tabs").hidden = tabs.length < 2;
    if (tabs.length === 1) { $("title-sub").textContent = tabs[0]; document.title = "clipkit " + tabs[0]; }
    if (i.studio) setupStudio(i.studio);
    show(location.hash.slice(1));
  }).catch((e) => { $("models").textContent = e.message; $("models").className = "error"; });

  // ---- generate --------------------------------------------------------------------------------
  let genJob = null;
  function setupStudio(s) {
    const d = s.defaults;
    $("models").textContent = `profile ${s.profile} \u00b7 diffusion ${s.diffusion} \u00b7 CLIP ${s.clip.join(" + ")}` +
      (s.captioner ? ` \u00b7 captioner ${s.captioner}` : " \u00b7 no captioner") + ` \u00b7 writes to ${s.out}/`;
    $("gen-steps").placeholder = String(d.steps);
    $("gen-best-of").placeholder = String(d.best_of);
    $("gen-clip-scale").value = String(d.clip_scale);
    $("gen-n").max = String(s.limits.n);
    $("gen-steps").max = String(s.limits.steps);
    $("gen-best-of").max = String(s.limits.best_of);
    if (d.negative.length) $("gen-profile-neg-text").textContent = d.negative.join(", ");
    else $("gen-profile-neg").parentElement.hidden = true;
    if (!s.captioner) { $("cap-status").textContent = "No captioner: start the studio with --captioner SPEC."; }
  }

  function cliLine(fd) {
    const q = (t) => "'" + String(t).replace(/'/g, "'\\''") + "'";
    const parts = ["clipkit generate"];
    if (fd.get("prompt")) parts.push(q(fd.get("prompt")));
    for (const [k, opt] of [["n", "-n"], ["seed", "--seed"], ["steps", "--steps"], ["clip_scale", "--clip-scale"],
                            ["best_of", "--best-of"]]) {
      if (fd.get(k)) parts.push(opt, fd.get(k));
    }
    for (const t of String(fd.get("negative") || "").split("\n")) if (t.trim()) parts.push("--negative", q(t.trim()));
    if (fd.get("profile_negatives") === "0") parts.push("--negative ''");
    if (fd.get("force")) parts.push("--force");
    return parts.join(" ");
  }

  $("gen-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const fd = new FormData();
    fd.append("prompt", $("gen-prompt").value);
    fd.append("negative", $("gen-negative").value);
    fd.append("profile_negatives", $("gen-profile-neg").checked ? "1" : "0");
    if ($("gen-force").checked) fd.append("force", "1");
    for (const [k, id] of [["seed", "gen-seed"], ["steps", "gen-steps"], ["clip_scale", "gen-clip-scale"],
                           ["best_of", "gen-best-of"], ["n", "gen-n"]]) {
      if ($(id).value.trim() !== "") fd.append(k, $(id).value.trim());
    }
    const ip = $("gen-image-prompt").files[0], init = $("gen-init").files[0];
    if (ip) { fd.append("image_prompt", ip); fd.append("image_prompt_weight", $("gen-ip-weight").value || "1"); }
    if (init) { fd.append("init_image", init); fd.append("strength", $("gen-strength").value || "0.5"); }
    $("gen-cli").textContent = cliLine(fd);
    await generate(() => call("/api/generate", { method: "POST", body: fd }));
  });

  async function generate(submit) {
    $("gen-go").disabled = true;
    $("gen-results").textContent = "";
    $("gen-warnings").textContent = "";
    $("gen-preview").hidden = true;
    $("gen-preview-label").textContent = "The denoised estimate appears here as the steps run.";
    $("gen-step").textContent = "0"; $("gen-total").textContent = "0";
    $("gen-progress").value = 0;
    const st = $("gen-status");
    st.className = "status";
    st.textContent = "submitting\u2026";
    let lastPreview = null, shownImages = 0;
    try {
      const job = await runJob(submit, (job) => {
        genJob = job;
        st.dataset.job = job.id;
        st.dataset.state = job.state;
        $("gen-cancel").disabled = FINISHED.includes(job.state);
        $("gen-step").textContent = String(job.step);
        $("gen-total").textContent = String(job.total);
        $("gen-progress").max = Math.max(1, job.total);
        $("gen-progress").value = job.step;
        if (job.state === "queued") st.textContent = waitingText(job);
        else if (job.state === "running") st.textContent = job.total ? `generating \u201c${job.label}\u201d` : "loading the models\u2026";
        if (job.preview && job.preview.url !== lastPreview) {
          lastPreview = job.preview.url;
          $("gen-preview").src = job.preview.url;
          $("gen-preview").hidden = false;
          $("gen-preview-label").textContent = `seed ${job.preview.seed} \u00b7 step ${job.preview.step} of ${job.preview.steps}` +
            (job.preview.step < job.preview.steps ? " (denoised estimate)" : " (final)");
        }
        for (; shownImages < job.images.length; shownImages++) $("gen-results").append(thumbLink(job.images[shownImages]));
        $("gen-warnings").textContent = "";
        for (const w of job.warnings || []) $("gen-warnings").append(el("li", "", w));
      });
      if (job.state === "done") {
        const r = job.result;
        st.textContent = `done in ${fmt(r.wall_s, 1)} s: ${job.images.length} image${job.images.length === 1 ? "" : "s"} ` +
          `(first seed ${r.seed}, ${r.candidates} candidate${r.candidates === 1 ? "" : "s"} per prompt) \u2014 in the gallery`;
        st.className = "status ok";
      } else if (job.state === "cancelled") {
        st.textContent = `cancelled after ${job.step} of ${job.total} steps`;
        st.className = "status warn";
      } else {
        st.textContent = job.error || job.state;
        st.className = "status error";
      }
    } catch (e) {
      st.textContent = e.message;
      st.className = "status error";
    } finally {
      $("gen-go").disabled = false;
      $("gen-cancel").disabled = true;
    }
  }

  $("gen-cancel").addEventListener("click", async () => {
    if (!genJob) return;
    $("gen-cancel").disabled = true;
    $("gen-status").textContent = "cancelling\u2026";
    try { await post(`/api/jobs/${genJob.id}/cancel`); } catch (e) { $("gen-status").textContent = e.message; }
  });

  function thumbLink(im) {
    const a = el("a", "thumb");
    a.href = "#gallery";
    a.title = `${im.prompt} \u2014 seed ${im.seed}`;
    const img = el("img");
    img.src = im.thumb; img.alt = im.prompt || "generated image";
    a.append(img, el("span", "muted", `seed ${im.seed}`));
    return a;
  }

  // ---- gallery ---------------------------------------------------------------------------------
  let galleryBusy = false;
  async function loadGallery() {
    if (galleryBusy) return;
    galleryBusy = true;
    try {
      const g = await call("/api/gallery");
      const box = $("gallery");
      box.textContent = "";
      for (const im of g.images) box.append(galleryCard(im));
      galleryOut = g.out;
      galleryCount(g.total, g.images.length);
    } catch (e) {
      $("gal-status").textContent = e.message; $("gal-status").className = "error";
    } finally { galleryBusy = false; }
  }
  $("gal-refresh").addEventListener("click", loadGallery);
  let galleryOut = "";
  function galleryCount(total, shownN) {
    $("gal-status").textContent = total ? `${total} picture${total === 1 ? "" : "s"} in ${galleryOut}/, newest first` +
      (total > shownN ? ` (showing ${shownN})` : "") : `nothing in ${galleryOut}/ yet: generate something`;
    $("gal-status").dataset.total = String(total);
  }

  function paramLine(im) {
    const p = im.parameters || {};
    const bits = [];
    if (p.steps !== undefined) bits.push(`${p.steps} steps`);
    if (p.clip_scale !== undefined) bits.push(`clip ${p.clip_scale}`);
    if (p.best_of !== undefined) bits.push(`best of ${p.best_of}`);
    if (p.strength !== undefined) bits.push(`strength ${p.strength}`);
    if (im.size) bits.push(im.size.join("\u00d7"));
    return bits.join(" \u00b7 ");
  }

  function galleryCard(im) {
    const card = el("article", "card pic");
    card.dataset.id = im.id;
    card.dataset.sha256 = im.sha256 || "";
    const a = el("a", "pic-img");
    a.href = im.image; a.target = "_blank"; a.rel = "noopener";
    const img = el("img");
    img.src = im.thumb; img.alt = im.prompt || "generated image"; img.loading = "lazy";
    a.append(img);
    const body = el("div", "pic-body");
    body.append(el("div", "prompt", im.prompt || "(image prompt)"));
    const meta = el("div", "meta");
    meta.append(el("span", "seed", `seed ${im.seed}`), el("span", "score", `score ${fmt(im.clip_score)}`));
    body.append(meta, el("div", "muted small", paramLine(im)));
    const p = im.parameters || {};
    if (p.negative && p.negative.length) body.append(el("div", "muted small", "not: " + p.negative.join(", ")));
    if (p.init_image) body.append(el("div", "muted small", "from " + p.init_image));
    if (p.image_prompts) body.append(el("div", "muted small", "image prompt " + p.image_prompts.map((x) => x[0]).join(", ")));
    const cap = el("div", "caption");
    if (im.caption) cap.textContent = `\u201c${im.caption.caption}\u201d (${fmt(im.caption.clip_score, 3)})`;
    const status = el("div", "card-status muted small");
    const actions = el("div", "actions");
    const again = el("button", "again", "Same seed again");
    again.type = "button"; again.title = "regenerate this picture from its seed alone (the same bytes)";
    const varyBtn = el("button", "vary", "Vary seed");
    varyBtn.type = "button"; varyBtn.title = "the same parameters with a new random seed";
    const capBtn = el("button", "caption-btn", "Caption");
    capBtn.type = "button";
    const dl = el("a", "button", "Download");
    dl.href = im.download; dl.title = "the PNG and its JSON sidecar (zip)";
    dl.setAttribute("download", "");
    actions.append(again, varyBtn, capBtn, dl);
    const det = el("details", "params");
    det.append(el("summary", "", "parameters"));
    const pre = el("pre", "mono small");
    pre.textContent = JSON.stringify({ name: im.name, models: im.models, ...im.parameters, sha256: im.sha256 }, null, 1);
    const links = el("div", "small");
    const png = el("a", "", "PNG"); png.href = im.image + "?download=1";
    const js = el("a", "", "sidecar JSON"); js.href = im.sidecar;
    links.append(png, document.createTextNode(" \u00b7 "), js);
    det.append(pre, links);
    body.append(cap, actions, status, det);
    card.append(a, body);

    async function regen(vary) {
      again.disabled = varyBtn.disabled = true;
      status.className = "card-status muted small";
      try {
        const job = await runJob(() => post(`/api/gallery/${im.id}/again`, { vary: vary }), (job) => {
          status.textContent = job.state === "queued" ? waitingText(job)
            : job.state === "running" ? `generating: step ${job.step} of ${job.total}` : "";
        });
        if (job.state !== "done") throw new Error(job.error || job.state);
        const made = job.images[0];
        if (!vary && made) {
          const same = made.sha256 === im.sha256;
          status.textContent = same ? `regenerated: the same bytes (sha256 ${made.sha256.slice(0, 12)}\u2026) \u2714`
                                    : `regenerated: different bytes (${made.sha256.slice(0, 12)}\u2026)`;
          status.className = "card-status small " + (same ? "ok" : "warn");
          status.dataset.sha256 = made.sha256;
        } else if (made) {
          status.textContent = `new seed ${made.seed}: first in the gallery`;
        }
        if (made) {
          $("gallery").prepend(galleryCard(made));
          const n = $("gallery").children.length;
          galleryCount(Math.max(n, +($("gal-status").dataset.total || 0) + 1), n);
        }
      } catch (e) {
        status.textContent = e.message; status.className = "card-status small error";
      } finally { again.disabled = varyBtn.disabled = false; }
    }
    again.addEventListener("click", () => regen(false));
    varyBtn.addEventListener("click", () => regen(true));
    capBtn.addEventListener("click", async () => {
      capBtn.disabled = true; cap.className = "caption"; cap.textContent = "captioning\u2026";
      try {
        const job = await runJob(() => post(`/api/gallery/${im.id}/caption`), (job) => {
          if (job.state === "queued") cap.textContent = waitingText(job);
        });
        if (job.state !== "done") throw new Error(job.error || job.state);
        cap.textContent = `\u201c${job.result.caption}\u201d (${fmt(job.result.clip_score, 3)})`;
        cap.classList.add("generated");
      } catch (e) { cap.textContent = e.message; cap.classList.add("error"); }
      finally { capBtn.disabled = false; }
    });
    return card;
  }

  // ---- drop zones ------------------------------------------------------------------------------
  function dropZone(zone, input, onFiles) {
    zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (ev) => {
      ev.preventDefault(); zone.classList.remove("over");
      const files = [...ev.dataTransfer.files].filter((f) => f.type.startsWith("image/"));
      if (files.length) onFiles(files);
    });
    input.addEventListener("change", () => { if (input.files.length) onFiles([...input.files]); });
  }

  // ---- caption ---------------------------------------------------------------------------------
  dropZone($("cap-drop"), $("cap-file"), async (files) => {
    const f = files[0];
    $("cap-img").src = URL.createObjectURL(f);
    $("cap-img").hidden = false;
    const st = $("cap-status"), out = $("cap-out");
    st.className = "status"; st.textContent = `captioning ${f.name}\u2026`;
    out.textContent = "";
    const fd = new FormData();
    fd.append("image", f);
    try {
      const job = await runJob(() => call("/api/caption-image", { method: "POST", body: fd }), (job) => {
        if (job.state === "queued") st.textContent = waitingText(job);
      });
      if (job.state !== "done") throw new Error(job.error || job.state);
      const r = job.result;
      st.textContent = `${r.name} \u2014 scores: ${r.score}`;
      const g = el("div", "cap-best");
      g.append(el("h3", "", "Greedy"), el("p", "big", `\u201c${r.greedy.caption}\u201d`),
               el("p", "muted", `CLIP score ${fmt(r.greedy.clip_score)} \u00b7 mean token log-prob ${fmt(r.greedy.logprob, 3)}`));
      const b = el("div", "cap-best");
      b.append(el("h3", "", "Beam search"), el("p", "big", `\u201c${r.beam.caption}\u201d`),
               el("p", "muted", `CLIP score ${fmt(r.beam.clip_score)} \u00b7 best of ${r.beam.candidates.length || 1} candidates (CLIP score + 0.1 \u00d7 log-prob)`));
      const t = el("table", "cands");
      const head = el("tr");
      for (const h of ["#", "candidate", "CLIP score", "log-prob"]) head.append(el("th", "", h));
      t.append(head);
      r.beam.candidates.forEach((c, k) => {
        const row = el("tr");
        row.append(el("td", "", k + 1), el("td", "", c.caption), el("td", "num", fmt(c.clip_score)), el("td", "num", fmt(c.logprob, 3)));
        t.append(row);
      });
      out.append(g, b, t);
    } catch (e) { st.textContent = e.message; st.className = "status error"; }
    $("cap-file").value = "";
  });

  // ---- rerank ----------------------------------------------------------------------------------
  let rrFiles = [];
  dropZone($("rr-drop"), $("rr-files"), (files) => {
    rrFiles = files;
    $("rr-files-label").textContent = `${files.length} image${files.length === 1 ? "" : "s"} chosen`;
    if ($("rr-query").value.trim()) $("rr-form").requestSubmit();
  });
  $("rr-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const st = $("rr-status"), box = $("rr-results");
    const q = $("rr-query").value.trim();
    if (!q) { st.textContent = "type a query first"; st.className = "status error"; return; }
    if (!rrFiles.length) { st.textContent = "choose or drop some images first"; st.className = "status error"; return; }
    const fd = new FormData();
    fd.append("query", q);
    for (const f of rrFiles) fd.append("images", f);
    const urls = rrFiles.map((f) => URL.createObjectURL(f));
    st.className = "status muted"; st.textContent = "ranking\u2026";
    $("rr-go").disabled = true;
    try {
      const job = await runJob(() => call("/api/rerank", { method: "POST", body: fd }), (job) => {
        if (job.state === "queued") st.textContent = waitingText(job);
      });
      if (job.state !== "done") throw new Error(job.error || job.state);
      const r = job.result;
      st.textContent = `${r.results.length} images ranked by \u201c${r.query}\u201d under ${r.model} (score: ${r.score})`;
      box.textContent = "";
      const top = Math.max(...r.results.map((x) => x.score), 1e-9), low = Math.min(...r.results.map((x) => x.score), 0);
      for (const x of r.results) {
        const card = el("article", "card ranked");
        const img = el("img"); img.src = urls[x.index]; img.alt = x.name;
        const meta = el("div", "meta");
        meta.append(el("span", "rank", "#" + x.rank), el("span", "score", fmt(x.score)));
        const bar = el("div", "scorebar"), fill = el("div");
        fill.style.width = `${Math.max(2, 100 * (x.score - low) / (top - low || 1))}%`;
        bar.append(fill);
        card.append(img, meta, bar, el("div", "path", x.name));
        box.append(card);
      }
    } catch (e) { st.textContent = e.message; st.className = "status error"; }
    finally { $("rr-go").disabled = false; }
  });
}());
