// agentctl status page: replaces <main> with a fresh server-rendered copy about once a second.
// One request at a time, none while the tab is hidden; nothing here can change state.
(function () {
  "use strict";
  var main = document.getElementById("main");
  var live = document.getElementById("live");
  var url = main && main.getAttribute("data-refresh");
  if (!url || !window.fetch) { if (live) { live.hidden = true; } return; }
  var last = null;
  var PERIOD = 1000;

  function show(ok) {
    live.className = ok ? "live" : "live off";
    live.textContent = ok ? "live" : "offline";
  }

  function tick() {
    if (document.hidden) { setTimeout(tick, PERIOD); return; }
    var ctl = window.AbortController ? new AbortController() : null;
    var timer = setTimeout(function () { if (ctl) { ctl.abort(); } }, 5000);
    fetch(url, { cache: "no-store", credentials: "same-origin", signal: ctl ? ctl.signal : undefined })
      .then(function (r) {
        if (!r.ok && r.status !== 404) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        if (html !== last) { main.innerHTML = html; last = html; }
        show(true);
      })
      .catch(function () { show(false); })
      .then(function () { clearTimeout(timer); setTimeout(tick, PERIOD); });
  }
  setTimeout(tick, PERIOD);
})();
