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
