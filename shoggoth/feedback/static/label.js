// Labeler page: rank K completions by keyboard or drag and drop, ties allowed; revise one's own
// last rankings (r: the last one, r again: the one before; Enter saves it, Escape goes back).
// Model output is untrusted: it reaches the DOM only through textContent.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const LETTERS = "ABCDEFGHIJKLMNOP";

  let task = null;        // {task_id, campaign, prompt, messages: [{role, content}], completions: [{id, text}]}
  let groups = [];        // [[completion id, ...], ...] best first; a group of several is a tie
  let history = [];       // earlier `groups`, for undo
  let flags = new Set();
  let focused = null;     // completion id of the picked card
  let busy = false;
  let letter = {};        // completion id -> letter shown on its card (its place in the random order)
  let shownAt = 0;        // when the current task appeared
  let revising = null;    // {list, i} while one of the labeler's own rankings (list[i]) is on screen again
  let stash = null;       // the current task as it was (its ranking in progress too), back when revising ends

  // ---------------------------------------------------------------- server

  async function api(path, body, method = "POST") {
    const res = await fetch(path, method === "GET" ? { credentials: "same-origin" } : {
      method,
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {}),
      credentials: "same-origin",
    });
    let data = {};
    try { data = await res.json(); } catch (e) { /* not JSON */ }
    if (!res.ok) throw Object.assign(new Error(data.error || `request failed (${res.status})`), { status: res.status });
    return data;
  }

  function showProgress(p) {
    if (!p) return;
    $("progress").textContent = `${p.done} ranked · ${p.skipped} skipped · ${p.left + p.open} to go`;
  }

  // 423: the admin paused this labeler; their page says so until a "Check again" finds them resumed
  function paused(e) {
    if (e.status !== 423) return false;
    task = null;
    $("work").hidden = $("empty").hidden = true;
    $("paused").hidden = false;
    $("paused-why").textContent = e.message;
    return true;
  }

  async function loadNext() {
    busy = true;
    try {
      const data = await api("/api/next");
      $("paused").hidden = true;
      showProgress(data.progress);
      await guidelinesFirst(data.task);
      start(data.task);
    } catch (e) {
      if (!paused(e)) toast(e.message, true);
    } finally {
      busy = false;
    }
  }

  // submit or skip the task on screen, then show the next one
  async function act(what) {
    if (!task || busy) return;
    if (revising) return what === "submit" ? saveRevision() : undefined;
    busy = true;
    setBusy(true);
    try {
      const data = what === "submit"
        ? await api(`/api/tasks/${task.task_id}/ranking`, { ranking: groups, flags: [...flags] })
        : await api(`/api/tasks/${task.task_id}/skip`);
      toast(what === "submit" ? "Saved ✓" : "Skipped");
      showProgress(data.progress);
      busy = false;
      await loadNext();
    } catch (e) {
      if (!paused(e)) toast(e.message, true);
    } finally {
      busy = false;
      setBusy(false);
    }
  }

  // ---------------------------------------------------------------- guidelines

  // A campaign's guidelines come before its tasks: shown once per version (the server remembers who
  // read which), again after the admin changes them. Resolves once they are read, or when there are none.
  async function guidelinesFirst(t) {
    const g = t && t.guidelines;
    $("guidelines-link").href = g ? `/guidelines?campaign=${g.campaign_id}` : "/guidelines";
    if (!g || g.read) return;
    const data = await api(`/api/guidelines/${g.campaign_id}`, null, "GET");
    $("guidelines-campaign").textContent = data.campaign;
    // HTML rendered from the admin's Markdown and sanitised on the server (nh3); the CSP forbids inline script too
    $("guidelines-body").innerHTML = data.html;
    $("work").hidden = true;
    $("empty").hidden = true;
    $("guidelines-screen").hidden = false;
    $("guidelines-ok").focus();
    await new Promise((resolve) => { $("guidelines-ok").onclick = resolve; });
    try {
      await api(`/api/guidelines/${g.campaign_id}/read`, { version: data.version });
    } catch (e) {  // changed meanwhile: the new version, from the top
      toast(e.message, true);
      return guidelinesFirst({ guidelines: { campaign_id: g.campaign_id, read: false } });
    } finally {
      $("guidelines-screen").hidden = true;
    }
  }

  // ---------------------------------------------------------------- revising one's own last rankings

  // Show the labeler's last ranking (or, while revising, the one before it) in the ranking widget.
  async function revise() {
    if (busy) return;
    busy = true;
    try {
      const list = revising ? revising.list
        : (await api("/api/rankings?limit=20", null, "GET")).rankings.filter((r) => r.revisable);
      const i = revising ? revising.i + 1 : 0;
      if (i >= list.length) {
        toast(list.length ? "No earlier ranking to revise" : "Nothing to revise yet: rank a task first", true);
        return;
      }
      if (!revising) stash = { task, groups, history, flags, focused, letter };
      revising = { list, i };
      const r = list[i];
      start({ task_id: r.task_id, campaign: r.campaign, prompt: r.prompt, messages: r.messages, completions: r.shown },
        r.groups, r.flags);
    } catch (e) {
      toast(e.message, true);
    } finally {
      busy = false;
    }
  }

  async function saveRevision() {
    const r = revising.list[revising.i];
    busy = true;
    setBusy(true);
    try {
      const data = await api(`/api/rankings/${r.ranking_id}`, { ranking: groups, flags: [...flags] }, "PUT");
      toast(`Revised ✓ (version ${data.version})`);
      endRevision();
    } catch (e) {
      toast(e.message, true);
    } finally {
      busy = false;
      setBusy(false);
    }
  }

  // back to the current task, as it was left
  function endRevision() {
    if (!revising) return;
    revising = null;
    const was = stash;
    stash = null;
    start(was.task);
    if (!was.task) return;
    ({ groups, history, flags, focused, letter } = was);
    render();
  }

  const submit = () => act("submit");
  const skip = () => act("skip");

  function setBusy(on) {
    $("submit").disabled = on;
    $("skip").disabled = on;
  }

  // ---------------------------------------------------------------- state

  // show task t; initial: its ranking so far (groups of completion ids), else the order shown
  function start(t, initial, initialFlags) {
    task = t;
    history = [];
    flags = new Set(initialFlags || []);
    $("work").hidden = !t;
    $("empty").hidden = !!t;
    $("revising").hidden = !revising;
    $("work").classList.toggle("revising", !!revising);
    $("skip").hidden = !!revising;
    $("submit").firstChild.textContent = revising ? "Save revision " : "Submit ";
    if (revising) {
      const r = revising.list[revising.i];
      $("revising-what").textContent = `${revising.i === 0 ? "your last ranking" : `your ranking ${revising.i + 1} back`}`
        + ` (version ${r.version})`;
    }
    if (!t) return;
    letter = {};
    t.completions.forEach((c, i) => { letter[c.id] = LETTERS[i]; });
    groups = initial ? initial.map((g) => g.slice()) : t.completions.map((c) => [c.id]);
    focused = groups[0][0];
    showConversation(t);
    $("task-meta").textContent = `${t.campaign} · task ${t.task_id}`;
    render();
    window.scrollTo(0, 0);
    shownAt = performance.now();
  }

  function where(cid) {
    for (let g = 0; g < groups.length; g++) {
      const i = groups[g].indexOf(cid);
      if (i >= 0) return [g, i];
    }
    return [-1, -1];
  }

  function change(next) {
    history.push(groups.map((g) => g.slice()));
    if (history.length > 200) history.shift();
    groups = next.filter((g) => g.length);
    render();
  }

  // target: {gap: i} makes the card a rank of its own before group i; {tie: g} adds it to group g
  function place(cid, target) {
    const next = groups.map((g) => g.filter((x) => x !== cid));
    if (target.tie !== undefined) next[target.tie].push(cid);
    else next.splice(target.gap, 0, [cid]);
    change(next);
  }

  function moveUp(cid) {
    const [g] = where(cid);
    if (groups[g].length > 1) place(cid, { gap: g });
    else if (g > 0) place(cid, { gap: g - 1 });
  }

  function moveDown(cid) {
    const [g] = where(cid);
    if (groups[g].length > 1) place(cid, { gap: g + 1 });
    else if (g < groups.length - 1) place(cid, { gap: g + 2 });
  }

  function tieUp(cid) {
    const [g] = where(cid);
    if (g > 0) place(cid, { tie: g - 1 });
    else if (groups[0].length === 1 && groups.length > 1) place(cid, { tie: 1 });
  }

  function toRank(cid, n) {
    const [g] = where(cid);
    const others = groups.length - (groups[g].length === 1 ? 1 : 0);
    const at = Math.min(n - 1, others);
    const next = groups.map((x) => x.filter((y) => y !== cid)).filter((x) => x.length);
    next.splice(at, 0, [cid]);
    change(next);
  }

  function undo() {
    if (!history.length) return;
    groups = history.pop();
    render();
  }

  function order() { return groups.flat(); }

  // ---------------------------------------------------------------- drawing

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  const ROLE_NAMES = new Map([["system", "System prompt"], ["user", "User"], ["assistant", "Assistant"]]);

  // The conversation the answers reply to, oldest first: a system prompt marked as such, earlier
  // turns, and the last user message (#prompt), which the answers reply to. Text only.
  function showConversation(t) {
    const msgs = t.messages && t.messages.length ? t.messages : [{ role: "user", content: t.prompt }];
    let last = msgs.map((m) => m.role).lastIndexOf("user");
    if (last < 0) last = msgs.length - 1;
    const list = $("transcript");
    list.replaceChildren();
    msgs.forEach((m, i) => {
      const known = ROLE_NAMES.has(m.role);
      const li = el("li", "turn " + (known ? m.role : "other") + (i === last ? " answered" : ""));
      const name = known ? ROLE_NAMES.get(m.role) : String(m.role);
      const role = i === last && msgs.length > 1 ? `${name} · the answers reply to this` : name;
      li.appendChild(el("div", "turn-role", role));
      const text = el("div", "prompt-text", m.content);  // untrusted: text only
      if (i === last) text.id = "prompt";
      li.appendChild(text);
      list.appendChild(li);
    });
  }

  function render() {
    const list = $("groups");
    list.replaceChildren();
    const texts = Object.fromEntries(task.completions.map((c) => [c.id, c.text]));
    list.appendChild(gap(0));
    groups.forEach((g, gi) => {
      const li = el("li", "group" + (g.length > 1 ? " tied" : ""));
      li.dataset.group = gi;
      const badge = el("div", "rank");
      badge.appendChild(el("span", "rank-n", String(gi + 1)));
      if (g.length > 1) badge.appendChild(el("span", "rank-tie", "tie"));
      li.appendChild(badge);
      const cards = el("div", "cards");
      for (const cid of g) {
        const card = el("article", "card" + (cid === focused ? " focused" : ""));
        card.tabIndex = 0;
        card.dataset.cid = cid;
        card.setAttribute("aria-label", `Answer ${letter[cid]}, rank ${gi + 1}${g.length > 1 ? " (tie)" : ""}`);
        const head = el("div", "card-head");
        head.appendChild(el("span", "letter", letter[cid]));
        head.appendChild(el("span", "grip", "⠿ drag"));
        card.appendChild(head);
        const body = el("div", "card-text", texts[cid]);  // untrusted: text only
        if (!texts[cid].trim()) { body.textContent = "(empty answer)"; body.classList.add("empty"); }
        card.appendChild(body);
        card.addEventListener("focus", () => { focused = cid; markFocus(); });
        card.addEventListener("pointerdown", (ev) => pointerDown(ev, cid, card));
        cards.appendChild(card);
      }
      li.appendChild(cards);
      list.appendChild(li);
      list.appendChild(gap(gi + 1));
    });
    const card = list.querySelector(`.card[data-cid="${focused}"]`);
    if (card && document.activeElement !== card && !$("help").open) card.focus({ preventScroll: false });
    document.querySelectorAll(".flag").forEach((b) => b.setAttribute("aria-pressed", String(flags.has(b.dataset.flag))));
  }

  function gap(i) {
    const li = el("li", "gap");
    li.dataset.gap = i;
    li.setAttribute("aria-hidden", "true");
    li.appendChild(el("span", "gap-label", "new rank here"));
    return li;
  }

  function markFocus() {
    document.querySelectorAll(".card").forEach((c) => c.classList.toggle("focused", Number(c.dataset.cid) === focused));
  }

  function toast(msg, error) {
    const t = $("toast");
    t.textContent = msg;
    t.className = "toast show" + (error ? " error" : "");
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.className = "toast"; }, error ? 5000 : 1400);
  }

  // ---------------------------------------------------------------- drag and drop (pointer events)

  let drag = null;

  function pointerDown(ev, cid, card) {
    if (ev.button !== 0 || busy) return;
    ev.preventDefault();
    card.focus();
    drag = { cid, card, x0: ev.clientX, y0: ev.clientY, active: false, target: null, ghost: null };
    window.addEventListener("pointermove", pointerMove);
    window.addEventListener("pointerup", pointerUp, { once: true });
  }

  function pointerMove(ev) {
    if (!drag) return;
    if (!drag.active) {
      if (Math.hypot(ev.clientX - drag.x0, ev.clientY - drag.y0) < 5) return;
      drag.active = true;
      const r = drag.card.getBoundingClientRect();
      drag.dx = drag.x0 - r.left;
      drag.dy = drag.y0 - r.top;
      drag.ghost = drag.card.cloneNode(true);
      drag.ghost.classList.add("ghost-card");
      drag.ghost.style.width = r.width + "px";
      document.body.appendChild(drag.ghost);
      drag.card.classList.add("lifted");
      document.body.classList.add("dragging");
    }
    drag.ghost.style.left = ev.clientX - drag.dx + "px";
    drag.ghost.style.top = ev.clientY - drag.dy + "px";
    const hit = document.elementFromPoint(ev.clientX, ev.clientY);
    const zone = hit && (hit.closest(".gap") || hit.closest(".group"));
    document.querySelectorAll(".drop-over").forEach((z) => z.classList.remove("drop-over"));
    drag.target = null;
    if (zone) {
      zone.classList.add("drop-over");
      drag.target = zone.classList.contains("gap") ? { gap: Number(zone.dataset.gap) } : { tie: Number(zone.dataset.group) };
    }
    if (ev.clientY < 60) window.scrollBy(0, -12);
    else if (ev.clientY > window.innerHeight - 60) window.scrollBy(0, 12);
  }

  function pointerUp() {
    window.removeEventListener("pointermove", pointerMove);
    const d = drag;
    drag = null;
    if (!d || !d.active) return;
    d.ghost.remove();
    document.body.classList.remove("dragging");
    document.querySelectorAll(".drop-over").forEach((z) => z.classList.remove("drop-over"));
    focused = d.cid;
    if (d.target) place(d.cid, d.target);
    else render();
  }

  // ---------------------------------------------------------------- keyboard

  function toggleFlag(f) {
    if (flags.has(f)) flags.delete(f); else flags.add(f);
    render();
    toast(flags.has(f) ? `Flagged: ${f.replace("_", " ")}` : "Flag removed");
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest && ev.target.closest("input, textarea, select")) return;
    if ($("help").open) return;  // the dialog handles Escape itself
    if (!$("guidelines-screen").hidden) return;  // read first: its button takes Enter
    if (ev.key === "?") { $("help").showModal(); ev.preventDefault(); return; }
    if (ev.key === "r" && !ev.ctrlKey && !ev.metaKey && !ev.altKey) { revise(); ev.preventDefault(); return; }
    if (ev.key === "Escape" && revising && !busy) { endRevision(); toast("Revision cancelled"); ev.preventDefault(); return; }
    if (!task || ev.ctrlKey && ev.key !== "z" || ev.metaKey || ev.altKey) return;
    const o = order();
    const i = o.indexOf(focused);
    const k = ev.key;
    let handled = true;
    if ((k === "ArrowUp" && ev.shiftKey) || k === "K") moveUp(focused);
    else if ((k === "ArrowDown" && ev.shiftKey) || k === "J") moveDown(focused);
    else if (k === "ArrowUp" || k === "k") { focused = o[Math.max(0, i - 1)]; render(); }
    else if (k === "ArrowDown" || k === "j") { focused = o[Math.min(o.length - 1, i + 1)]; render(); }
    else if (/^[1-9]$/.test(k)) toRank(focused, Number(k));
    else if (k === "=" || k === "t") tieUp(focused);
    else if (k === "z") undo();
    else if (k === "Enter" || k === "s") {
      // a held or doubled key must not submit the next task unseen
      if (ev.repeat || performance.now() - shownAt < 400) { ev.preventDefault(); return; }
      if (k === "s") skip();
      else if (!ev.target.closest("button")) submit();
      else handled = false;
    }
    else if (k === "f") toggleFlag("all_bad");
    else if (k === "x") toggleFlag("unsafe");
    else handled = false;
    if (handled) ev.preventDefault();
  });

  // ---------------------------------------------------------------- buttons

  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("again").addEventListener("click", loadNext);
  $("paused-again").addEventListener("click", loadNext);
  $("revise").addEventListener("click", revise);
  $("revise-cancel").addEventListener("click", () => { if (!busy) { endRevision(); toast("Revision cancelled"); } });
  $("help-btn").addEventListener("click", () => $("help").showModal());
  document.querySelectorAll(".flag").forEach((b) => b.addEventListener("click", () => toggleFlag(b.dataset.flag)));

  loadNext();
})();
