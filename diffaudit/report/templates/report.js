/* diffaudit report: sort tables by clicking headers, filter the risk table, expand galleries for printing.
   Reads only attributes and textContent and moves existing rows; never builds HTML from data, never evals. */
(function () {
  "use strict";
  var doc = document;
  var each = function (list, fn) { Array.prototype.forEach.call(list, fn); };

  function sortTable(table, th, btn) {
    var col = parseInt(btn.getAttribute("data-col"), 10);
    var num = btn.getAttribute("data-type") === "num";
    var cur = th.getAttribute("aria-sort");
    var asc = (cur === "none" || cur === null) ? !num : cur !== "ascending";
    var tbody = table.tBodies[0];
    var keyed = Array.prototype.map.call(tbody.rows, function (row, i) {
      var cell = row.cells[col];
      var raw = cell ? cell.getAttribute("data-v") : null;
      var v;
      if (num) {
        v = (raw === null || raw === "") ? null : parseFloat(raw);
        if (v !== null && isNaN(v)) { v = null; }
      } else {
        v = cell ? cell.textContent.toLowerCase() : null;
      }
      return { row: row, i: i, v: v };
    });
    keyed.sort(function (a, b) {
      if (a.v === null || b.v === null) {  /* missing values last, whatever the direction */
        return (a.v === null) - (b.v === null) || a.i - b.i;
      }
      var d = num ? a.v - b.v : (a.v < b.v ? -1 : (a.v > b.v ? 1 : 0));
      return (asc ? d : -d) || a.i - b.i;
    });
    var frag = doc.createDocumentFragment();
    keyed.forEach(function (k) { frag.appendChild(k.row); });
    tbody.appendChild(frag);
    each(table.tHead.rows[0].cells, function (c) { c.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
  }

  each(doc.querySelectorAll("table.sortable"), function (table) {
    each(table.querySelectorAll("thead button[data-col]"), function (btn) {
      btn.addEventListener("click", function () { sortTable(table, btn.parentNode, btn); });
    });
  });

  var box = doc.getElementById("risk-filter");
  var table = doc.getElementById("risk-table");
  if (box && table) {
    var sel = doc.getElementById("risk-label");
    var q = doc.getElementById("risk-q");
    var copied = doc.getElementById("risk-copied");
    var count = doc.getElementById("risk-count");
    var apply = function () {
      var want = sel.value, needle = q.value.toLowerCase(), only = copied.checked, shown = 0, rows = table.tBodies[0].rows;
      each(rows, function (row) {
        var ok = (!want || row.getAttribute("data-label") === want) &&
                 (!needle || row.cells[0].textContent.toLowerCase().indexOf(needle) !== -1) &&
                 (!only || row.classList.contains("copied"));
        row.hidden = !ok;
        if (ok) { shown += 1; }
      });
      count.textContent = shown + " of " + rows.length + " rows";
    };
    sel.addEventListener("change", apply);
    q.addEventListener("input", apply);
    copied.addEventListener("change", apply);
    box.hidden = false;
    apply();
  }

  each(doc.querySelectorAll("button[data-details]"), function (btn) {
    btn.parentNode.hidden = false;
    btn.addEventListener("click", function () {
      var open = btn.getAttribute("data-details") === "open";
      each(doc.querySelectorAll("details.ckpt"), function (d) { d.open = open; });
    });
  });

  /* Printing shows every gallery; closed ones close again afterwards. */
  var reopened = [];
  window.addEventListener("beforeprint", function () {
    each(doc.querySelectorAll("details"), function (d) { if (!d.open) { d.open = true; reopened.push(d); } });
  });
  window.addEventListener("afterprint", function () {
    reopened.forEach(function (d) { d.open = false; });
    reopened = [];
  });

  doc.documentElement.setAttribute("data-ready", "1");
}());
