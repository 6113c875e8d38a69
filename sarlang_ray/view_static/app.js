// sarlang view: the pages of the static site. Data arrive as <script> files (data/*.js) that set SV.<name>,
// so the site opens from file:// (browsers refuse fetch() of local files, not script tags) and needs no server.
window.SV = window.SV || {};
(function () {
  const FILTERS = ["split", "application", "gsd", "scene", "class", "qc", "error"];
  const SPLIT_COLOURS = {train: "#1f77b4", val: "#ff7f0e", test: "#2ca02c", "not exported": "#999999"};
  const CLASS_COLOURS = {ship: "#ff4040", aircraft: "#ffc800", car: "#00dcff", "storage tank": "#ff00ff",
    bridge: "#ff8000", harbour: "#0080ff", building: "#00ff80", road: "#a0a0a0"};
  const main = () => document.getElementById("main");
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const safe = (id) => id.replace(/[^A-Za-z0-9._-]/g, "_");
  const load = (src) => new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = src; s.onload = resolve; s.onerror = () => reject(new Error("cannot load " + src));
    document.head.appendChild(s);
  });
  const params = () => new URLSearchParams(location.hash.slice(1));
  const values = (row, f) => Array.isArray(row[f]) ? row[f] : [row[f]];
  const table = (id, head, rows) => `<table id="${id}"><tr>${head.map((h) => `<th>${esc(h)}</th>`).join("")}</tr>` +
    rows.join("") + "</table>";

  // ---------------------------------------------------------------- tile grid with filters
  async function renderIndex() {
    const m = SV.manifest;
    await load("data/sample.js");
    const p = params();
    const source = p.get("source") || "sample";
    let rows = SV.sample;
    if (source !== "sample") { await load(`data/pages/${source}.js`); rows = SV.pages[source]; }
    const chosen = Object.fromEntries(FILTERS.map((f) => [f, p.get(f) || ""]));
    const shown = rows.filter((r) => FILTERS.every((f) => !chosen[f] || values(r, f).includes(chosen[f])));
    const selects = FILTERS.map((f) => `<label>${f}<select id="f-${f}" data-filter="${f}"><option value="">(any)</option>` +
      Object.entries(m.counts[f] || {}).map(([v, n]) => `<option value="${esc(v)}"${v === chosen[f] ? " selected" : ""}>` +
        `${esc(v)} (${n})</option>`).join("") + "</select></label>").join("");
    const sources = `<label>tiles<select id="f-source"><option value="sample">sample: up to ${m.sample_per_value} per filter value ` +
      `(${m.sampled} tiles)</option>` + m.pages.map((pg) => `<option value="${pg.index}"${String(pg.index) === source ? " selected" : ""}>` +
      `page ${pg.index} (${pg.tiles} tiles)</option>`).join("") + "</select></label>";
    const exact = source !== "sample" || FILTERS.some((f) => chosen[f] && (m.counts[f][chosen[f]] || 0) <= m.sample_per_value);
    main().innerHTML = `<h2>${m.tiles} tiles (${m.exported} exported) of ${esc(m.run_dir)}</h2>` +
      `<div class="filters">${selects}${sources}</div>` +
      `<p><span id="count">${shown.length}</span> tiles shown` +
      (exact ? "" : ` <span class="muted">(from the sample; the counts beside each value are the run's)</span>`) + "</p>" +
      `<div id="grid">${shown.map((r) => `<div class="card split-${r.split.replace(/ /g, "-")}" data-tile-id="${esc(r.id)}">` +
        `<a href="tile.html#${encodeURIComponent(r.id)}"><img loading="lazy" src="thumbs/${r.file}.png" alt="">${esc(r.id)}</a>` +
        `<div>${esc(r.split)} · ${esc(r.gsd)} · ${r.pairs} pairs</div><div>${esc(r.qc.join(", "))}</div></div>`).join("")}</div>`;
    const update = () => {
      const q = new URLSearchParams();
      FILTERS.forEach((f) => { const v = document.getElementById("f-" + f).value; if (v) q.set(f, v); });
      const s = document.getElementById("f-source").value; if (s !== "sample") q.set("source", s);
      location.hash = q.toString();
    };
    document.querySelectorAll("select").forEach((el) => el.addEventListener("change", update));
  }

  // ---------------------------------------------------------------- one tile
  async function renderTile() {
    const id = decodeURIComponent(location.hash.slice(1));
    await load(`data/tiles/${safe(id)}.js`);
    const t = SV.tiles[id];
    const boxes = t.objects.map((o) => {
      const [x0, y0, x1, y1] = o.bbox;
      return `<rect class="box" x="${x0}" y="${y0}" width="${x1 - x0}" height="${y1 - y0}" fill="none" ` +
        `stroke="${CLASS_COLOURS[o.class] || "#fff"}" stroke-width="1.5"><title>${esc(o.class)}</title></rect>`;
    }).join("");
    const overlay = `<svg viewBox="0 0 ${t.width} ${t.height}" class="boxes">${boxes}</svg>`;
    const panel = (src, label) => `<figure class="panel"><img src="${src}" alt="${label}">${overlay}<figcaption>${label}</figcaption></figure>`;
    const classes = [...new Set(t.objects.map((o) => o.class))];
    const pairs = t.pairs.map((p) => {
      const verdict = p.qc_passed ? "passed" : "rejected: " + p.qc_reasons.join(", ");
      const answers = t.models.map((model) => {
        const a = p.answers.find((x) => x.model === model);
        if (!a) return "<td></td>";
        const mark = a.correct === null ? "" : a.correct ? ' <span class="mark-right">✓</span>' : ' <span class="mark-wrong">✗ wrong</span>';
        return `<td class="answer ${a.correct === false ? "wrong" : a.correct ? "right" : ""}" data-model="${esc(model)}">${esc(a.prediction)}${mark}</td>`;
      }).join("");
      return `<tr class="pair${p.qc_passed ? "" : " rejected"}" data-pair-id="${esc(p.pair_id)}"><td>${esc(p.application)}</td>` +
        `<td>${esc(p.question_type)}</td><td>${esc(p.question)}</td><td class="truth">${esc(p.answer)}</td>` +
        `<td class="qc">${esc(verdict)}</td>${answers}</tr>`;
    });
    main().innerHTML = `<h2>${esc(t.tile_id)}</h2><p>scene ${esc(t.scene_id)} · ${esc(t.region)} · ${t.gsd_m} m · split ` +
      `<b id="split">${esc(t.split)}</b></p>` +
      (t.errors.length ? `<p class="rejected">${t.errors.map((e) => `${esc(e.stage)}: ${esc(e.error_class)}: ${esc(e.message)}`).join("<br>")}</p>` : "") +
      `<label><input type="checkbox" id="toggle-boxes" checked> boxes</label> <span class="legend">` +
      classes.map((c) => `<span><i class="swatch" style="background:${CLASS_COLOURS[c] || "#fff"}"></i>${esc(c)}</span>`).join("") +
      `</span><div class="images">${panel(`img/${t.file}.sar.png`, "SAR")}` +
      (t.has_optical ? panel(`img/${t.file}.opt.png`, "optical twin") : "<p>no optical twin</p>") + "</div>" +
      "<h3>Land cover</h3>" + table("landcover", ["class", "fraction"],
        Object.entries(t.landcover).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${(100 * v).toFixed(1)} %</td></tr>`)) +
      `<h3>Pairs (${t.pairs.length})</h3>` + (t.models.length ? `<p class="muted">model answers scored ${esc(t.vqa_mode)}; ✗ marks a wrong answer</p>` : "") +
      table("pairs", ["application", "question type", "question", "truth", "QC", ...t.models], pairs);
    document.getElementById("toggle-boxes").addEventListener("change", (e) =>
      document.querySelectorAll("svg.boxes").forEach((s) => { s.style.display = e.target.checked ? "" : "none"; }));
  }

  // ---------------------------------------------------------------- map: scene and tile footprints per region
  const merc = ([lon, lat]) => {
    const s = Math.sin(lat * Math.PI / 180);
    return [(lon + 180) / 360, 0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI)];
  };
  async function renderMap() {
    const m = SV.manifest;
    await Promise.all(m.pages.map((pg) => load(`data/pages/${pg.index}.js`)));
    const tiles = m.pages.flatMap((pg) => SV.pages[pg.index]);
    const regions = {};
    m.scenes.forEach((s) => (regions[s.region] ||= {scenes: [], tiles: []}).scenes.push(s));
    // coarse tiles first: the finer tiles drawn over them stay visible
    tiles.sort((a, b) => parseFloat(b.gsd) - parseFloat(a.gsd)).forEach((t) => (regions[t.region] ||= {scenes: [], tiles: []}).tiles.push(t));
    const size = 460;
    const panels = Object.entries(regions).map(([region, g]) => {
      const pts = [...g.scenes, ...g.tiles].flatMap((x) => x.fp.flat()).map(merc);
      const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
      const x0 = Math.min(...xs), y0 = Math.min(...ys);
      const span = Math.max(Math.max(...xs) - x0, Math.max(...ys) - y0) * 1.08 || 1e-6;
      const pad = span * 0.04, k = size / span;
      const xy = (ll) => { const [x, y] = merc(ll); return `${((x - x0 + pad) * k).toFixed(1)},${((y - y0 + pad) * k).toFixed(1)}`; };
      const path = (rings) => rings.map((r) => "M" + r.map(xy).join("L") + "Z").join("");
      let base = "";
      if (m.basemap) {  // XYZ tiles under the footprints, when the browser can reach them
        const z = Math.max(0, Math.min(19, Math.floor(Math.log2(size / (span * 256)))));
        const n = 2 ** z;
        for (let tx = Math.floor((x0 - pad) * n); tx <= Math.floor((x0 + span) * n); tx++) {
          for (let ty = Math.floor((y0 - pad) * n); ty <= Math.floor((y0 + span) * n); ty++) {
            const url = m.basemap.replace("{z}", z).replace("{x}", tx).replace("{y}", ty);
            base += `<image href="${esc(url)}" x="${((tx / n - x0 + pad) * k).toFixed(1)}" y="${((ty / n - y0 + pad) * k).toFixed(1)}" ` +
              `width="${(k / n).toFixed(1)}" height="${(k / n).toFixed(1)}"/>`;
          }
        }
      }
      const scenes = g.scenes.map((s) => `<path class="scene" d="${path(s.fp)}" fill="none" stroke="#444" stroke-dasharray="4 2">` +
        `<title>${esc(s.id)}</title></path>`).join("");
      const fps = g.tiles.map((t) => {
        const exported = t.split !== "not exported";
        return `<a href="tile.html#${encodeURIComponent(t.id)}"><path class="${exported ? "tile" : "dropped"}" data-tile-id="${esc(t.id)}" ` +
          `data-split="${esc(t.split)}" d="${path(t.fp)}" fill="${SPLIT_COLOURS[t.split] || "#999"}" fill-opacity="${exported ? 0.45 : 0.15}" ` +
          `stroke="${SPLIT_COLOURS[t.split] || "#999"}" stroke-width="0.6"><title>${esc(t.id)} (${esc(t.split)})</title></path></a>`;
      }).join("");
      return `<div class="region"><h3>${esc(region)}: ${g.scenes.length} scenes, ${g.tiles.filter((t) => t.split !== "not exported").length} ` +
        `exported tiles</h3><svg class="map" width="${size}" height="${size}" style="background:#eef2f5">${base}${scenes}${fps}</svg></div>`;
    });
    const legend = Object.entries(SPLIT_COLOURS).map(([s, c]) => `<span><i class="swatch" style="background:${c}"></i>${s}</span>`).join("") +
      '<span><i class="swatch" style="border:1px dashed #444"></i>scene</span>';
    main().innerHTML = `<h2>Footprints by split</h2><p class="legend">${legend}</p>` +
      `<p class="muted">${m.basemap ? "basemap: " + esc(m.basemap) : "no basemap (sarlang view --basemap URL adds one)"}; ` +
      `the tiles of each GSD overlap: all are drawn.</p>${panels.join("")}`;
  }

  // ---------------------------------------------------------------- reports
  async function renderLeakage() {
    await load("data/leakage.js");
    const l = SV.leakage;
    if (!l) { main().innerHTML = "<p>no export/leakage.json in this run</p>"; return; }
    main().innerHTML = `<h2>Leakage between splits: <span id="verdict">${l.leak_free ? "no leakage" : "LEAKS"}</span></h2>` +
      `<p>split by ${esc(l.split_by)}, buffer ${l.buffer_m} m, ${l.dropped_tiles} boundary tiles dropped, ` +
      `${l.clipped_objects || 0} objects clipped</p>` +
      table("leakage", ["splits", "shared area (m²)", "tile pairs within buffer", "shared objects"],
        Object.entries(l.pairs).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${v.intersection_m2}</td>` +
          `<td>${v.tile_pairs_within_buffer}</td><td>${v.shared_objects}</td></tr>`)) +
      table("split-tiles", ["split", "tiles"], Object.entries(l.tiles || {}).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${v}</td></tr>`));
  }

  async function renderErrors() {
    await load("data/errors.js");
    const e = SV.errors;
    main().innerHTML = `<h2>Errors table: ${e.total} rows</h2>` +
      table("error-counts", ["stage", "reason", "rows"], e.counts.map((c) => `<tr><td>${esc(c.stage)}</td><td>${esc(c.error_class)}</td><td>${c.n}</td></tr>`)) +
      (e.rows.length < e.total ? `<p class="muted">first ${e.rows.length} rows</p>` : "") +
      table("errors", ["stage", "item", "reason", "message"], e.rows.map((r) =>
        `<tr><td>${esc(r.stage)}</td><td><a href="tile.html#${encodeURIComponent(r.item)}">${esc(r.item)}</a></td>` +
        `<td>${esc(r.error_class)}</td><td>${esc(r.message)}</td></tr>`));
  }

  async function renderLeaderboard() {
    await load("data/leaderboard.js");
    const b = SV.leaderboard;
    if (!b) { main().innerHTML = "<p>no evaluation in this run (evaluate/leaderboard.json)</p>"; return; }
    const cols = [...new Set(b.rows.flatMap((r) => Object.keys(r).filter((k) => r[k] === null || typeof r[k] !== "object")))];
    const cell = (v) => typeof v === "number" ? (Number.isInteger(v) ? v : v.toFixed(4)) : esc(v ?? "");
    main().innerHTML = `<h2>Leaderboard (${esc(b.dataset || "")}, VQA ${esc(b.vqa_mode || "")})</h2>` +
      table("leaderboard", cols, b.rows.map((r) => `<tr>${cols.map((c) => `<td>${cell(r[c])}</td>`).join("")}</tr>`)) +
      ((b.failed || []).length ? `<p class="rejected">failed trials: ${esc(JSON.stringify(b.failed))}</p>` : "");
  }

  const PAGES = {index: renderIndex, tile: renderTile, map: renderMap, leakage: renderLeakage, errors: renderErrors,
    leaderboard: renderLeaderboard};
  SV.render = (name) => {
    const go = () => PAGES[name]().then(() => document.body.setAttribute("data-ready", "1"))
      .catch((err) => { main().innerHTML = `<p class="rejected">${esc(err.message)}</p>`; document.body.setAttribute("data-ready", "error"); });
    window.addEventListener("hashchange", () => { document.body.removeAttribute("data-ready"); go(); });
    go();
  };
})();
