// The trio_bridge web view: the sessions page, one session's live page, and the sign-in page.
// Every value reaches the page through textContent or an attribute, never as HTML: a value holding
// "<script>" shows as text. No inline script or style (the Content-Security-Policy forbids both).

const SVG = "http://www.w3.org/2000/svg";
let sparkPoints = 120; // the most points a sparkline keeps (--web-history-points; bounded memory)
const SESSIONS_EVERY_MS = 2000;
const SESSION_INFO_EVERY_MS = 5000;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "className") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

// Times in the browser's own time zone; the exact moment (UTC) in the tooltip.
function when(seconds) {
  if (!seconds) return el("span", { className: "muted", text: "—" });
  const date = new Date(seconds * 1000);
  return el("time", { datetime: date.toISOString(), title: date.toISOString(), text: date.toLocaleString() });
}

// A number for a summary: four significant digits.
function brief(number) {
  return Number.isInteger(number) ? String(number) : String(Number(number.toPrecision(4)));
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.max(0, Math.round(seconds));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  let body = {};
  try {
    body = await response.json();
  } catch {
    body = { status: "UNKNOWN", message: `the server answered ${response.status}` };
  }
  if (response.status === 401) {
    signIn();
    throw new Error(body.message);
  }
  if (!response.ok) {
    const error = new Error(`${body.status}: ${body.message}`);
    error.status = body.status;
    throw error;
  }
  return body;
}

function signIn() {
  if (location.pathname !== "/login") {
    location.assign(`/login?next=${encodeURIComponent(location.pathname)}`);
  }
}

function show(...nodes) {
  const app = document.getElementById("app");
  app.replaceChildren(...nodes);
  return app;
}

// ---- who is signed in -------------------------------------------------------------------------

async function header(me) {
  const who = document.getElementById("who");
  who.replaceChildren();
  if (me.token_required && me.signed_in_as) {
    const out = el("button", { type: "button", text: "Sign out" });
    out.addEventListener("click", async () => {
      await fetch("/api/logout", { method: "POST", credentials: "same-origin" });
      location.assign("/login");
    });
    who.append(el("span", { className: "muted", text: `signed in as ${me.signed_in_as} ` }), out);
  }
}

function loginPage(me) {
  document.title = "Sign in · trio_bridge";
  const input = el("input", { id: "token", type: "password", autocomplete: "current-password", required: true });
  const problem = el("p", { className: "error", id: "login-error", text: me.problem || "" });
  const form = el(
    "form",
    { className: "login" },
    el("h1", { text: "Sign in" }),
    el("label", { for: "token", text: "This server asks for a token (a line of its --token-file)." }),
    input,
    el("button", { type: "submit", text: "Sign in" }),
    problem,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const response = await fetch("/api/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ token: input.value }),
    });
    const body = await response.json();
    if (response.ok) {
      // Back to the page that sent here: a path of this origin only, never another site.
      const next = new URL(new URLSearchParams(location.search).get("next") || "/", location.origin);
      location.assign(next.origin === location.origin ? next.pathname + next.search : "/");
    } else {
      problem.textContent = body.message;
    }
  });
  show(form);
  input.focus();
}

// ---- the sessions page ----------------------------------------------------------------------

function sessionsPage() {
  document.title = "Sessions · trio_bridge";
  const body = el("tbody");
  const rows = new Map(); // session id → its row
  const table = el(
    "table",
    { id: "sessions" },
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        el("th", { text: "session" }),
        el("th", { className: "num", text: "variables" }),
        el("th", { text: "TTL left" }),
        el("th", { className: "num", text: "open watches" }),
        el("th", { text: "created" }),
      ),
    ),
    body,
  );
  const empty = el("p", { className: "muted", id: "no-sessions", text: "No sessions yet." });
  const problem = el("p", { className: "error" });
  const filter = el("input", { id: "filter", type: "search", placeholder: "filter by id", "aria-label": "filter sessions by id" });
  const counted = el("p", { className: "muted", id: "sessions-counted" });
  show(el("h1", { text: "Sessions" }), el("p", {}, filter), problem, table, counted, empty);
  filter.addEventListener("input", () => refresh());

  let asked = 0; // the latest listing asked for: an older one that answers late is dropped
  async function refresh() {
    const ask = ++asked;
    try {
      const listing = await api(`/api/sessions?filter=${encodeURIComponent(filter.value)}`);
      if (ask !== asked) return;
      problem.textContent = "";
      // Rows are kept and updated in place (a row being clicked is not swapped under the pointer).
      const listed = new Set();
      for (const s of listing.sessions) {
        listed.add(s.id);
        let row = rows.get(s.id);
        if (!row) {
          row = el(
            "tr",
            { "data-session": s.id },
            el("td", {}, el("a", { href: `/sessions/${encodeURIComponent(s.id)}`, text: s.id })),
            el("td", { className: "num" }),
            el("td", {}),
            el("td", { className: "num" }),
            el("td", {}, when(s.created_at)),
          );
          rows.set(s.id, row);
        }
        const cells = row.children;
        cells[1].textContent = String(s.variables);
        cells[2].textContent = s.watches ? "held open by its watches" : duration(s.expires_in);
        cells[3].textContent = String(s.watches);
        body.append(row); // in the server's order (oldest first)
      }
      for (const [id, row] of rows) {
        if (!listed.has(id)) {
          row.remove();
          rows.delete(id);
        }
      }
      empty.hidden = listing.sessions.length > 0;
      counted.textContent =
        listing.total > listing.sessions.length
          ? `Showing ${listing.sessions.length} of ${listing.total} sessions: filter by id to find others.`
          : "";
    } catch (error) {
      problem.textContent = `Cannot list the sessions: ${error.message}`;
    }
  }
  refresh();
  setInterval(refresh, SESSIONS_EVERY_MS);
}

// ---- pictures -----------------------------------------------------------------------------------

function sparkline(points) {
  const width = 220;
  const height = 36;
  const picture = svg("svg", {
    class: "sparkline",
    width,
    height,
    viewBox: `0 0 ${width} ${height}`,
    "data-points": points.length,
    "data-versions": JSON.stringify(points.map((p) => p.version)),
    role: "img",
  });
  const values = points.map((p) => p.value).filter((v) => v !== null);
  if (!values.length) return picture;
  const low = Math.min(...values);
  const high = Math.max(...values);
  const span = high - low || 1;
  const step = points.length > 1 ? (width - 6) / (points.length - 1) : 0;
  const xy = [];
  points.forEach((p, i) => {
    if (p.value === null) return;
    xy.push([3 + i * step, height - 3 - ((p.value - low) / span) * (height - 6)]);
  });
  picture.append(svg("polyline", { points: xy.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ") }));
  const [lastX, lastY] = xy[xy.length - 1];
  picture.append(svg("circle", { cx: lastX.toFixed(1), cy: lastY.toFixed(1), r: 2.5 }));
  const title = svg("title", {});
  title.textContent = `${points.length} values, from ${low} to ${high}`;
  picture.append(title);
  return picture;
}

function states(variable) {
  const plot = variable.value.plot;
  const options =
    variable.type === "boolean" ? [true, false] : variable.constraints.allowed_values || [plot.value];
  return el(
    "div",
    { className: "states" },
    ...options.map((option) =>
      el("span", { className: option === plot.value ? "state on" : "state", text: String(option) }),
    ),
  );
}

function bars(plot) {
  const width = 260;
  const height = 48;
  const picture = svg("svg", { class: "bars", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  const values = plot.bars;
  const low = Math.min(0, plot.min ?? 0);
  const high = Math.max(0, plot.max ?? 0);
  const span = high - low || 1;
  const zero = height - ((0 - low) / span) * height;
  const step = width / Math.max(values.length, 1);
  values.forEach((value, i) => {
    if (value === null) return;
    const y = height - ((value - low) / span) * height;
    picture.append(
      svg("rect", {
        x: (i * step).toFixed(2),
        y: Math.min(y, zero).toFixed(2),
        width: Math.max(step - 0.5, 0.5).toFixed(2),
        height: Math.max(Math.abs(zero - y), 0.5).toFixed(2),
        class: value < 0 ? "negative" : "",
      }),
    );
  });
  const title = svg("title", {});
  title.textContent = `${plot.length} values, from ${plot.min} to ${plot.max}`;
  picture.append(title);
  return picture;
}

function heatmap(plot) {
  const rows = plot.cells.length;
  const cols = rows ? plot.cells[0].length : 0;
  const canvas = el("canvas", { className: "heatmap", width: cols, height: rows, title: `${plot.dtype} ${JSON.stringify(plot.shape)}, from ${plot.min} to ${plot.max}` });
  const scale = Math.max(1, Math.floor(160 / Math.max(rows, cols, 1)));
  canvas.style.width = `${cols * scale}px`; // CSSOM, which the policy allows
  canvas.style.height = `${rows * scale}px`;
  const context = canvas.getContext("2d");
  const span = plot.max - plot.min || 1;
  plot.cells.forEach((line, r) =>
    line.forEach((value, c) => {
      const t = value === null ? null : (value - plot.min) / span;
      context.fillStyle = t === null ? "#999" : `hsl(${(1 - t) * 240}, 75%, ${35 + t * 25}%)`;
      context.fillRect(c, r, 1, 1);
    }),
  );
  return canvas;
}

function picture(variable, history) {
  const plot = variable.value.plot;
  if (!plot) return null;
  if (plot.kind === "number") return sparkline(history);
  if (plot.kind === "state") return states(variable);
  if (plot.kind === "bars") return bars(plot);
  if (plot.kind === "heatmap") return heatmap(plot);
  if (plot.kind === "shape") {
    const range = plot.min !== undefined && plot.min !== null ? `, from ${plot.min} to ${plot.max}` : "";
    return el("div", { className: "muted", text: `${plot.dtype} tensor of shape ${JSON.stringify(plot.shape)}${range}` });
  }
  return null;
}

// ---- one session's page -------------------------------------------------------------------------

function constraintsText(constraints) {
  return Object.entries(constraints)
    .map(([name, rule]) => `${name} ${Array.isArray(rule) ? JSON.stringify(rule) : rule}`)
    .join("; ");
}

function sessionPage(sessionId, me) {
  document.title = `${sessionId} · trio_bridge`;
  const status = el("span", { className: "status", id: "feed-status", text: "connecting…" });
  const banner = el("div", { className: "banner", id: "banner", hidden: true });
  const meta = el("div", { className: "meta", id: "session-meta" });
  const list = el("div", { className: "variables", id: "variables" });
  const empty = el("p", { className: "muted", id: "no-variables", text: "No variables yet." });
  const page = show(
    el("p", {}, el("a", { href: "/", text: "← all sessions" })),
    el("h1", {}, document.createTextNode(`Session ${sessionId} `), status),
    banner,
    meta,
    empty,
    list,
  );
  const rows = new Map(); // variable id → {variable, history, node, deleted}
  let seenThisConnection = new Set();
  let ended = false;
  let writable = me.writable;

  function setStatus(kind, text) {
    status.className = `status ${kind}`;
    status.textContent = text;
  }

  function end(message) {
    ended = true;
    page.classList.add("ended");
    banner.hidden = false;
    banner.textContent = message;
    setStatus("ended", "ended");
  }

  async function refreshInfo() {
    try {
      const info = await api(`/api/sessions/${encodeURIComponent(sessionId)}`);
      const s = info.session;
      writable = info.writable;
      meta.replaceChildren(
        el("span", {}, document.createTextNode("created "), when(s.created_at)),
        el("span", { text: s.watches ? `held open by ${s.watches} watch(es)` : `expires in ${duration(s.expires_in)}` }),
        el("span", { id: "open-watches", text: `${s.watches} open watch(es)` }),
        el("span", { text: `TTL ${duration(s.ttl_seconds)}` }),
      );
    } catch {
      // A session that is gone: the feed's end says so (and how). Signed out: api() went to sign in.
    }
  }

  function render(row) {
    const v = row.variable;
    const value = valueText(v);
    if (row.node?.querySelector("details.value")?.open) value.open = true; // kept unfolded
    const details = el(
      "div",
      { className: "details" },
      el("div", { className: "version", text: `version ${v.version}` }),
      el("div", { className: "source", text: `by ${v.source || "—"}` }),
      el("div", {}, document.createTextNode("at "), when(v.last_updated_at)),
      Object.keys(v.constraints).length ? el("div", { className: "constraints", text: constraintsText(v.constraints) }) : null,
    );
    const middle = el("div", {}, value, el("div", { className: "picture" }, picture(v, row.history)));
    if (writable && !row.deleted && !ended) middle.append(writeForm(row));
    const node = el(
      "div",
      { className: row.deleted ? "variable deleted" : "variable", "data-name": v.name, "data-id": v.id },
      el("div", {}, el("div", { className: "name", text: v.name }), el("div", { className: "type", text: v.type })),
      middle,
      details,
    );
    if (row.node) row.node.replaceWith(node);
    else list.append(node);
    row.node = node;
    empty.hidden = rows.size > 0;
  }

  // Arrays (embeddings, tensors) as a one-line summary, their elements folded away beneath it.
  function valueText(v) {
    const plot = v.value.plot;
    if (!plot || !["bars", "heatmap", "shape"].includes(plot.kind)) {
      return el("div", { className: "value", text: v.value.text });
    }
    const shape = plot.shape ? `${plot.dtype} ${JSON.stringify(plot.shape)}` : `${plot.length} values`;
    const range =
      plot.min !== undefined && plot.min !== null ? `, from ${brief(plot.min)} to ${brief(plot.max)}` : "";
    return el(
      "details",
      { className: "value" },
      el("summary", { text: `${shape}${range}` }),
      el("div", { className: "elements", text: v.value.text }),
    );
  }

  function writeForm(row) {
    const v = row.variable;
    // A value shown cut short (a long array) is not offered for editing as it is.
    const whole = !v.value.text.endsWith("…") && !v.value.text.endsWith("values)]") && !v.value.text.startsWith("tensor ");
    const value = el("input", {
      className: "new-value",
      value: whole ? v.value.text : "",
      placeholder: whole ? "" : "the new value, whole (as the command line takes it)",
      "aria-label": `new value of ${v.name}`,
    });
    const expected = el("input", {
      className: "expected",
      type: "number",
      min: 1,
      value: v.version,
      "aria-label": "expected version",
      title: "the version this write replaces: refused if the variable has moved on",
    });
    const result = el("div", { className: "write-result" });
    const form = el(
      "form",
      { className: "write" },
      value,
      el("label", { text: "if at version" }),
      expected,
      el("button", { type: "submit", text: "Set" }),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const done = await api(
          `/api/sessions/${encodeURIComponent(sessionId)}/variables/${encodeURIComponent(v.name)}`,
          {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify({ value: value.value, expected_version: Number(expected.value) }),
          },
        );
        result.className = "write-result done";
        result.textContent = `set: version ${done.variable.version}`;
        row.edited = false; // done with: the next change redraws it with the new version
        document.activeElement?.blur();
      } catch (error) {
        result.className = "write-result error";
        result.textContent = error.message;
      }
    });
    // A form being edited is kept: a change redraws the row, but not the form.
    const edited = () => {
      row.edited = true;
    };
    value.addEventListener("input", edited);
    expected.addEventListener("input", edited);
    row.edited = false;
    row.form = el("div", {}, form, result);
    return row.form;
  }

  function apply(update) {
    seenThisConnection.add(update.variable_id);
    if (update.type === "variable_deleted") {
      const row = rows.get(update.variable_id);
      if (row && !row.deleted) {
        row.deleted = true;
        render(row);
      }
      return;
    }
    const v = update.variable;
    if (!v) return;
    let row = rows.get(v.id);
    if (row && !row.deleted && v.version <= row.variable.version && update.type !== "resync") return;
    if (!row || row.deleted) {
      if (row) row.node.remove();
      row = { variable: v, history: [], node: null, deleted: false };
      rows.set(v.id, row);
    }
    row.variable = v;
    if (v.value.plot && v.value.plot.kind === "number") {
      if (!row.history.length && update.old_number !== undefined && v.version > 1) {
        row.history.push({ version: v.version - 1, value: update.old_number }); // where the change began
      }
      const last = row.history[row.history.length - 1];
      if (!last || v.version > last.version) row.history.push({ version: v.version, value: v.value.plot.value });
      else if (update.type === "resync") row.history = [{ version: v.version, value: v.value.plot.value }];
      if (row.history.length > sparkPoints) row.history.splice(0, row.history.length - sparkPoints);
    }
    const inUse = row.node && row.form && (row.edited || row.form.contains(document.activeElement));
    if (!inUse) render(row);
    else {
      // Keep the form being typed in; update the rest of the row around it.
      const [form, edited] = [row.form, row.edited];
      render(row);
      const fresh = row.node.querySelector("form.write")?.parentElement;
      if (fresh) fresh.replaceWith(form);
      [row.form, row.edited] = [form, edited];
    }
  }

  function synced(update) {
    setStatus("live", "live");
    if (update.complete_listing) {
      for (const [id, row] of rows) {
        if (!seenThisConnection.has(id) && !row.deleted) {
          row.deleted = true;
          render(row);
        }
      }
    }
  }

  const feed = new EventSource(`/api/sessions/${encodeURIComponent(sessionId)}/events`);
  feed.addEventListener("open", () => {
    seenThisConnection = new Set();
  });
  feed.addEventListener("update", (message) => {
    const update = JSON.parse(message.data);
    if (update.type === "synced") synced(update);
    else if (update.type !== "heartbeat") apply(update);
  });
  feed.addEventListener("end", (message) => {
    const ending = JSON.parse(message.data);
    if (ending.resumable) {
      setStatus("retrying", "reconnecting…");
      banner.hidden = true;
      return; // the browser reconnects, and the feed resumes where it was
    }
    feed.close();
    end(ending.status === "NOT_FOUND" ? `Session ended: ${ending.message}` : `${ending.status}: ${ending.message}`);
    for (const row of rows.values()) render(row);
  });
  feed.addEventListener("error", () => {
    if (ended) return;
    if (feed.readyState === EventSource.CLOSED) {
      end("The live feed was refused; reload the page to try again.");
      refreshInfo(); // signed out (401): off to sign in again
    } else {
      setStatus("retrying", "reconnecting…");
    }
  });
  refreshInfo();
  const refreshing = setInterval(() => (ended ? clearInterval(refreshing) : refreshInfo()), SESSION_INFO_EVERY_MS);
}

// ---- start ------------------------------------------------------------------------------------

async function main() {
  const me = await api("/api/me");
  sparkPoints = Math.max(1, me.history_points);
  await header(me);
  const path = location.pathname;
  if (path === "/login") return loginPage(me);
  if (me.token_required && !me.signed_in_as) return signIn();
  const match = path.match(/^\/sessions\/([^/]+)$/);
  if (match) return sessionPage(decodeURIComponent(match[1]), me);
  return sessionsPage();
}

main().catch((error) => {
  const app = document.getElementById("app");
  if (app) app.replaceChildren(el("p", { className: "error", text: `The web view failed: ${error.message}` }));
});
