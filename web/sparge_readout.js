// The compact end-of-run readout drawn on the Sparge Attention node (a canvas widget).
// Pure formatting + drawing: no ComfyUI imports, so it can be loaded on its own.
//
// The readout dict comes from the server (nodes/readout.py) in the "sparge.readout" event; the
// numbers shown are exactly its fields, formatted:
//   sparsity, pv_skipped_fraction  -> "62.5%"   ((100 * x).toFixed(1))
//   est_attention_speedup          -> "2.41x"   (x.toFixed(2))
//   attention_time_ms              -> "123.4 ms" (x.toFixed(1))
//   dense_calls {reason: n}        -> "cross attention 4, short 2" (reasons sorted)

export const FONT = "Inter, Arial, sans-serif";
const LINE = 17;
const PAD = 8;
const BAR_H = 22;
const COLORS = {
  panel: "rgba(0, 0, 0, 0.28)",
  border: "rgba(255, 255, 255, 0.10)",
  head: "#ffb74d",
  text: "#e6e8ee",
  dim: "#9aa1b1",
  warn: "#ff8a65",
  bar: "#ffb74d",
  barDense: "#5a5d68",
  track: "rgba(255, 255, 255, 0.06)",
};

export function pct(x) {
  return x === null || x === undefined || !Number.isFinite(x) ? "-" : `${(100 * x).toFixed(1)}%`;
}

export function speedup(x) {
  return x === null || x === undefined || !Number.isFinite(x) ? "-" : `${x.toFixed(2)}x`;
}

export function denseText(dense) {
  const items = Object.entries(dense || {}).filter(([, n]) => n > 0);
  if (!items.length) return "none";
  items.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return items.map(([k, n]) => `${k} ${n}`).join(", ");
}

/** The readout as lines of text: [{text, style}] (style: "head" | "text" | "dim" | "warn"). */
export function readoutLines(r, runs = 1) {
  if (!r) return [{ text: "Readout: queue the graph to see what Sparge skipped", style: "dim" }];
  const lines = [];
  lines.push({
    text: `Sparsity ${pct(r.sparsity)} \u00b7 est. attention speed-up ${speedup(r.est_attention_speedup)}`,
    style: "head",
  });
  lines.push({
    text: `PV skipped ${pct(r.pv_skipped_fraction)} \u00b7 ${r.sparse_calls} sparse calls \u00b7 ${r.steps_run} steps`,
    style: "text",
  });
  lines.push({ text: `Dense fallbacks: ${denseText(r.dense_calls)}`, style: "text" });
  if (r.measured_rel_l1 !== null && r.measured_rel_l1 !== undefined) {
    const target = r.target_rel_l1 === null || r.target_rel_l1 === undefined ? "none" : r.target_rel_l1.toFixed(3);
    // below the target with every skippable block skipped: the attention allows no more skipping
    const atMax = r.adaptation?.blocks_at_sparsest;
    const note = atMax ? `; ${atMax}/${r.adaptation.blocks_adapted} blocks at sparsest` : "";
    lines.push({ text: `Measured error ${r.measured_rel_l1.toFixed(3)} (target ${target}${note})`, style: "text" });
  }
  if (r.attention_time_ms !== null && r.attention_time_ms !== undefined && Number.isFinite(r.attention_time_ms)) {
    lines.push({ text: `Sparse attention time ${r.attention_time_ms.toFixed(1)} ms`, style: "text" });
  }
  const extra = [`backend ${r.backend}`];
  if (runs > 1) extra.push(`last of ${runs} sampler runs`);
  if (r.completed === false) extra.push("run interrupted");
  lines.push({ text: extra.join(" \u00b7 "), style: r.completed === false ? "warn" : "dim" });
  return lines;
}

function hasBars(r) {
  return !!(r && Array.isArray(r.per_step_sparsity) && r.per_step_sparsity.length > 0);
}

/** Height in pixels the readout needs. */
export function readoutHeight(r, runs = 1) {
  return PAD * 2 + readoutLines(r, runs).length * LINE + (hasBars(r) ? BAR_H + 4 : 0);
}

function fit(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(text.slice(0, mid) + "\u2026").width <= width) lo = mid;
    else hi = mid - 1;
  }
  return text.slice(0, lo) + "\u2026";
}

function roundRect(ctx, x, y, w, h, r) {
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, w, h, r);
  else ctx.rect(x, y, w, h);
}

/** Draw the readout panel at (margin, y) across the node's width. */
export function drawReadout(ctx, width, y, r, runs = 1, lowQuality = false) {
  const margin = 10;
  const w = Math.max(0, width - 2 * margin);
  const h = readoutHeight(r, runs) - 4;
  ctx.save();
  roundRect(ctx, margin, y + 2, w, h, 6);
  ctx.fillStyle = COLORS.panel;
  ctx.fill();
  ctx.strokeStyle = COLORS.border;
  ctx.lineWidth = 1;
  ctx.stroke();
  if (lowQuality) {
    ctx.restore();
    return;
  }
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  let ty = y + 2 + PAD + LINE / 2;
  for (const line of readoutLines(r, runs)) {
    ctx.font = line.style === "head" ? `bold 13px ${FONT}` : `12px ${FONT}`;
    ctx.fillStyle = COLORS[line.style] || COLORS.text;
    ctx.fillText(fit(ctx, line.text, w - 2 * PAD), margin + PAD, ty);
    ty += LINE;
  }
  if (hasBars(r)) {
    // per-step sparsity: one bar per step (full height = 100% skipped), grey = no sparse call
    const vals = r.per_step_sparsity;
    const label = "per step";
    ctx.font = `11px ${FONT}`;
    ctx.fillStyle = COLORS.dim;
    const lw = ctx.measureText(label).width + 8;
    const top = ty - LINE / 2 + 2;
    ctx.fillText(label, margin + PAD, top + BAR_H / 2);
    const x0 = margin + PAD + lw;
    const bw = Math.max(1, (w - 2 * PAD - lw) / vals.length);
    for (let i = 0; i < vals.length; i++) {
      const v = vals[i];
      const x = x0 + i * bw;
      const gap = bw > 4 ? 1 : 0;
      ctx.fillStyle = COLORS.track;
      ctx.fillRect(x, top, bw - gap, BAR_H);
      if (v === null || v === undefined) {
        ctx.fillStyle = COLORS.barDense;
        ctx.fillRect(x, top + BAR_H - 2, bw - gap, 2);
      } else {
        const bh = Math.max(1, Math.min(1, v) * BAR_H);
        ctx.fillStyle = COLORS.bar;
        ctx.fillRect(x, top + BAR_H - bh, bw - gap, bh);
      }
    }
  }
  ctx.restore();
}
