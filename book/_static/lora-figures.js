/* The book's figures at the width the page really has, and in the page's theme.
 *
 * lora_ref.figures.finish_layout lays every figure out for the text column of a desktop page:
 * from the top, the title, the legend, the plot, the x-axis title, the slider. Here, after each
 * draw (a slider move or a resize draws again), we
 *   - wrap the title to the figure's width and make the top margin hold the title and the
 *     legend as drawn (a legend wraps into more rows on a phone);
 *   - stack side-by-side panels (xaxis2, xaxis3 beside xaxis) one above the other below 640 px;
 *   - follow pydata-sphinx-theme's light and dark modes (transparent backgrounds, light text).
 * Nothing here changes the data: only where things are drawn and in what colours.
 */
(function () {
  "use strict";
  var NARROW = 640;
  var DARK = {font: "#d6d6d6", grid: "#3a3f44", zero: "#5a6168", black: "#e0e0e0"};

  function isDark() {
    return document.documentElement.getAttribute("data-theme") === "dark";
  }

  function unwrap(text) {
    return String(text || "").replace(/<br>/g, " ");
  }

  function visibleLength(word) {
    return word.replace(/<[^>]+>/g, "").length;
  }

  // Greedy wrapping at `chars` characters, as finish_layout does in Python.
  function wrap(text, chars) {
    var words = unwrap(text).split(" "), lines = [], line = "", n = 0;
    words.forEach(function (w) {
      var k = visibleLength(w);
      if (line && n + 1 + k > chars) { lines.push(line); line = w; n = k; }
      else { n += (line ? 1 : 0) + k; line = line ? line + " " + w : w; }
    });
    lines.push(line);
    return lines.join("<br>");
  }

  function box(el) {
    if (!el) return null;
    var r = el.getBoundingClientRect();
    return r.width || r.height ? r : null;
  }

  // the axes of panel i: "xaxis", "yaxis" for the first, "xaxis2", "yaxis2" for the second, ...
  function axes(i) { return i ? ["xaxis" + (i + 1), "yaxis" + (i + 1)] : ["xaxis", "yaxis"]; }

  function panels(L) {
    var n = 1;
    while (L[axes(n)[0]]) n++;
    return n;
  }

  function stack(gd, update) {
    var L = gd._fullLayout, orig = gd._loraOrig;
    if (!orig || orig.panels < 2) return;
    var narrow = gd.clientWidth < NARROW;
    if (narrow === gd._loraStacked) return;
    gd._loraStacked = narrow;
    var n = orig.panels, gap = 0.24 / (n - 1), h = (1 - gap * (n - 1)) / n;   // 2 panels: 0.62-1 and 0-0.38
    for (var i = 0; i < n; i++) {
      var a = axes(i);
      update[a[0] + ".domain"] = narrow ? [0, 1] : orig.x[i];
      update[a[1] + ".domain"] = narrow ? [1 - (i + 1) * h - i * gap, 1 - i * (h + gap)] : orig.y[i];
    }
    update.height = narrow ? Math.round(orig.height * 0.85 * n + 60) : orig.height;
    gd.style.height = update.height + "px";          // the renderer fixed the div's height: let it grow
  }

  function theme(gd, update) {
    var dark = isDark();
    if (gd._loraDark === dark) return;
    gd._loraDark = dark;
    update.paper_bgcolor = dark ? "rgba(0,0,0,0)" : "white";
    update.plot_bgcolor = dark ? "rgba(0,0,0,0)" : "white";
    update["font.color"] = dark ? DARK.font : "#2a3f5f";
    Object.keys(gd._fullLayout).forEach(function (key) {
      if (/^[xy]axis\d*$/.test(key)) {
        update[key + ".gridcolor"] = dark ? DARK.grid : "#EBF0F8";
        update[key + ".zerolinecolor"] = dark ? DARK.zero : "#EBF0F8";
        update[key + ".linecolor"] = dark ? DARK.zero : "#EBF0F8";
      }
    });
    // traces drawn in black (reference lines) would vanish on a dark page
    var idx = [], colors = [];
    gd.data.forEach(function (t, i) {
      var c = (t.line && t.line.color) || "";
      if (c === "#000000" || c === "black" || c === DARK.black) {
        idx.push(i); colors.push(dark ? DARK.black : "#000000");
      }
    });
    if (idx.length) window.Plotly.restyle(gd, {"line.color": colors}, idx);
  }

  function fit(gd) {
    if (gd._loraBusy || !gd._fullLayout) return;
    var L = gd._fullLayout, update = {};
    if (!gd._loraOrig) {
      var n = panels(L);
      gd._loraOrig = {height: L.height, panels: n, x: [], y: []};
      for (var i = 0; i < n; i++) {
        var a = axes(i);
        gd._loraOrig.x.push(L[a[0]] && L[a[0]].domain.slice());
        gd._loraOrig.y.push(L[a[1]] && L[a[1]].domain.slice());
      }
    }
    stack(gd, update);
    theme(gd, update);
    var fontSize = (L.title && L.title.font && L.title.font.size) || 15;
    var chars = Math.max(22, Math.floor((gd.clientWidth - 24) / (0.56 * fontSize)));
    if (L.title && L.title.pad && L.title.pad.l < 10) update["title.pad.l"] = 10;   // the first letter off the edge
    // y-axis titles wrap to the axis's height (x-axis titles keep their lines: the slider is placed below them)
    Object.keys(L).forEach(function (key) {
      var ax = L[key];
      if (!/^yaxis\d*$/.test(key) || !ax || !ax.title || !ax.title.text || !ax.domain) return;
      var span = (ax.domain[1] - ax.domain[0]) * L._size.h;
      var size = (ax.title.font && ax.title.font.size) || 14;
      var wrappedAxis = wrap(ax.title.text, Math.max(16, Math.floor(span / (0.56 * size))));
      if (wrappedAxis !== ax.title.text) update[key + ".title.text"] = wrappedAxis;
    });
    var text = L.title && L.title.text;
    if (text) {
      var wrapped = wrap(text, chars);
      if (wrapped !== text) update["title.text"] = wrapped;
      var lines = wrapped.split("<br>").length;
      var legend = box(gd.querySelector(".legend"));
      var legendOnTop = L.legend && L.legend.y >= 1 && L.showlegend !== false;
      var legendH = legend && legendOnTop ? legend.height + 8 : 0;
      var top = Math.ceil(12 + lines * fontSize * 1.33 + legendH + 8);
      if (Math.abs(top - L.margin.t) > 2) update["margin.t"] = top;
    }
    if (Object.keys(update).length) {
      gd._loraBusy = true;
      window.Plotly.relayout(gd, update).then(function () {
        gd._loraBusy = false;
        fit(gd);                         // the legend may have re-wrapped at the new margins
      }, function () { gd._loraBusy = false; });
    }
  }

  function attach(gd) {
    if (gd._loraAttached || !gd.on) return;
    gd._loraAttached = true;
    gd.on("plotly_afterplot", function () { fit(gd); });
    fit(gd);
  }

  function scan() {
    if (!window.Plotly) return;
    document.querySelectorAll(".js-plotly-plot").forEach(attach);
  }

  function start() {
    scan();
    new MutationObserver(scan).observe(document.body, {childList: true, subtree: true});
    new MutationObserver(function () {
      document.querySelectorAll(".js-plotly-plot").forEach(fit);
    }).observe(document.documentElement, {attributes: true, attributeFilter: ["data-theme"]});
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
  window.addEventListener("load", scan);
})();
