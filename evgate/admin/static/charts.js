// evgate console charts: line charts drawn as SVG, with no library.
//
// A chart is an <svg> of fixed viewBox that scales with its box; each
// series is one <polyline> (data-series="<label values>") and one legend
// entry.  Colours are SVG presentation attributes, never style attributes,
// so the console's Content-Security-Policy (style-src 'self') holds.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2f5bd3", "#1f8a4c", "#c0392b", "#b7791f", "#7b4fc9", "#0f8b8d", "#d35400", "#5d6d7e"];
  const W = 480, H = 170, LEFT = 52, RIGHT = 10, TOP = 10, BOTTOM = 22;

  function svg(tag, attributes) {
    const node = document.createElementNS(NS, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
    return node;
  }

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
    return 10 * power;
  }

  function format(value, unit) {
    if (unit === "seconds") {
      if (value === 0) return "0";
      return value < 1 ? (value * 1000).toLocaleString("en-US", {maximumFractionDigits: 1}) + " ms"
        : value.toLocaleString("en-US", {maximumFractionDigits: 2}) + " s";
    }
    if (value >= 1000) return (value / 1000).toLocaleString("en-US", {maximumFractionDigits: 1}) + "k";
    return value.toLocaleString("en-US", {maximumFractionDigits: 2});
  }

  function clock(seconds) {
    return new Date(seconds * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  }

  // Draw `series` ([{name, points: [[t, v], ...]}]) into `container`
  // (its children are replaced); `now` is the server's time, `unit` the
  // values' unit.  Shows at least the last five minutes.
  function draw(container, series, now, unit) {
    const chart = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img"});
    let tMin = now - 300, vMax = 0;
    for (const s of series) {
      for (const [t, v] of s.points) {
        if (t < tMin) tMin = t;
        if (v > vMax) vMax = v;
      }
    }
    const tMax = Math.max(now, tMin + 1);
    const yMax = niceMax(vMax);
    const x = (t) => LEFT + (W - LEFT - RIGHT) * (t - tMin) / (tMax - tMin);
    const y = (v) => TOP + (H - TOP - BOTTOM) * (1 - v / yMax);
    for (let i = 0; i <= 4; i++) {
      const v = yMax * i / 4;
      chart.append(svg("line", {x1: LEFT, x2: W - RIGHT, y1: y(v), y2: y(v), stroke: "#e2e5eb"}));
      const label = svg("text", {x: LEFT - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#6b7385"});
      label.textContent = format(v, unit);
      chart.append(label);
    }
    for (const [t, anchor] of [[tMin, "start"], [tMax, "end"]]) {
      const label = svg("text", {x: x(t), y: H - 6, "text-anchor": anchor, "font-size": 10, fill: "#6b7385"});
      label.textContent = clock(t);
      chart.append(label);
    }
    const legend = document.createElement("div");
    legend.className = "legend";
    series.forEach((s, index) => {
      const colour = PALETTE[index % PALETTE.length];
      if (s.points.length) {
        const line = svg("polyline", {
          fill: "none", stroke: colour, "stroke-width": 1.6, "stroke-linejoin": "round",
          points: s.points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
          "data-series": s.name, "data-points": s.points.length,
        });
        chart.append(line);
      }
      const entry = document.createElement("span");
      const swatch = svg("svg", {width: 10, height: 10, viewBox: "0 0 10 10"});
      swatch.append(svg("rect", {width: 10, height: 10, rx: 2, fill: colour}));
      const last = s.points.length ? s.points[s.points.length - 1][1] : null;
      entry.append(swatch, " " + s.name + (last === null ? "" : " · " + format(last, unit)));
      legend.append(entry);
    });
    if (!series.length) {
      const empty = document.createElement("span");
      empty.className = "muted";
      empty.textContent = "no data yet";
      legend.append(empty);
    }
    container.replaceChildren(chart, legend);
  }

  return {draw};
})();
