// Previews of stored examples, shared by the explain page (app.js) and the review page (clean.js): a PNG thumbnail
// (indexer.previews.image_preview) becomes an image, rows of shade characters joined by "/"
// (indexer.demo.digit_preview) a canvas, anything else (text, tabular rows) stays text.
"use strict";

const SHADES = " .:-=+*#%@";

// An image preview as its pixel rows, else null.
function imageRows(preview) {
  const rows = preview.split("/");
  if (rows.length < 4 || new Set(rows.map((r) => r.length)).size !== 1) return null;
  for (const r of rows) for (const c of r) if (!SHADES.includes(c)) return null;
  return rows;
}

function previewElement(preview, size) {
  preview = String(preview ?? "");
  if (preview.startsWith("data:image/png;base64,")) { // indexer.previews.image_preview: a PNG thumbnail
    const img = document.createElement("img");
    img.src = preview;
    img.width = size;
    img.className = "preview-image";
    img.style.imageRendering = "pixelated";
    return img;
  }
  const rows = imageRows(preview);
  if (rows === null) {
    const p = document.createElement("div");
    p.className = "preview-text";
    p.textContent = preview;
    return p;
  }
  const h = rows.length, w = rows[0].length, scale = Math.max(1, Math.floor(size / Math.max(h, w)));
  const canvas = document.createElement("canvas");
  canvas.width = w * scale;
  canvas.height = h * scale;
  canvas.className = "preview-image";
  const ctx = canvas.getContext("2d");
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const v = 255 - Math.round((255 * SHADES.indexOf(rows[y][x])) / (SHADES.length - 1));
      ctx.fillStyle = `rgb(${v},${v},${v})`;
      ctx.fillRect(x * scale, y * scale, scale, scale);
    }
  }
  return canvas;
}
