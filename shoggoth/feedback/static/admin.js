// Admin page: copy an invite link.
"use strict";
(function () {
  const btn = document.getElementById("copy-invite");
  if (!btn) return;
  btn.addEventListener("click", async () => {
    const link = document.getElementById("invite-link").textContent;
    try { await navigator.clipboard.writeText(link); btn.textContent = "Copied ✓"; }
    catch (e) { window.getSelection().selectAllChildren(document.getElementById("invite-link")); btn.textContent = "Press Ctrl+C"; }
  });
})();

// Admin page: a team lead leaves it open, so it loads itself again every data-refresh seconds (a GET of
// /admin), unless a form field has the focus or an invite link (shown once) is on the page.
(function () {
  const main = document.querySelector("main[data-refresh]");
  const every = main && Number(main.dataset.refresh);
  if (!every) return;
  setInterval(() => {
    const typing = document.activeElement && document.activeElement.matches("input, select, textarea");
    if (typing || document.getElementById("invite-notice")) return;
    window.location.assign("/admin");
  }, every * 1000);
})();
