// Dovecote console: progressive enhancement only; every page works without this file.
// - pages marked <main data-refresh="N"> re-fetch their content every N seconds
//   (paused while the tab is hidden or while focus is inside the content);
// - "select all" checkboxes; keyboard shortcuts g+o/c/d/m/t to switch pages.
(function () {
  "use strict";
  var main = document.getElementById("main");

  function refresh() {
    if (document.hidden || !main) return;
    var active = document.activeElement;
    if (active && active !== main && main.contains(active)) return;  // do not steal focus
    var status = document.querySelector("[data-status]");
    fetch(window.location.href, {headers: {"X-Console-Partial": "1"}, credentials: "same-origin",
                                 cache: "no-store", redirect: "error"})
      .then(function (response) {
        if (response.status === 401) { window.location.reload(); return null; }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        if (html === null) return;
        main.innerHTML = html;
        bind(main);
        var rendered = document.querySelector("[data-rendered]");
        var now = new Date();
        if (rendered) {
          rendered.textContent = now.toISOString().replace("T", " ").slice(0, 19) + " UTC";
          rendered.setAttribute("datetime", now.toISOString());
        }
        if (status) status.textContent = "Refreshes every " + main.dataset.refresh + " s";
      })
      .catch(function (error) {
        if (status) status.textContent = "Refresh failed (" + error.message + "); retrying";
      });
  }

  function bind(root) {
    root.querySelectorAll("[data-select-all]").forEach(function (box) {
      box.addEventListener("change", function () {
        var name = box.getAttribute("data-select-all");
        box.form.querySelectorAll('input[type="checkbox"][name="' + name + '"]')
          .forEach(function (other) { other.checked = box.checked; });
      });
    });
  }

  bind(document);
  if (main && main.dataset.refresh) {
    window.setInterval(refresh, Math.max(2, Number(main.dataset.refresh)) * 1000);
  }

  var pending = false;
  document.addEventListener("keydown", function (event) {
    var tag = (event.target && event.target.tagName) || "";
    if (event.ctrlKey || event.metaKey || event.altKey || /INPUT|SELECT|TEXTAREA/.test(tag)) return;
    if (event.key === "g") { pending = true; return; }
    if (pending) {
      pending = false;
      var link = document.querySelector('nav a[data-key="' + event.key + '"]');
      if (link) { event.preventDefault(); link.click(); }
    }
  });
})();
