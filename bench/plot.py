"""A small PNG line plot drawn with Pillow (shipped by the webuis): no plotting dependency."""

from __future__ import annotations

from PIL import Image, ImageDraw

COLORS = {"shared-prefix": (31, 119, 180), "one-call": (255, 127, 14), "separate": (44, 160, 44),
          "off-schedule": (150, 150, 150)}  # fmt: skip


def ratio_plot(rows, path, title, width=900, height=560):
    """Step-time ratio (SEG / CFG-only) against batch size, one line per path, for the first
    size/layers/sigma configuration in ``rows``."""
    first = rows[0]
    config = [
        r
        for r in rows
        if (r["size"], r["layers"], r["sigma"]) == (first["size"], first["layers"], first["sigma"])
    ]
    config.sort(key=lambda r: r["batch"])
    batches = [r["batch"] for r in config]
    series = {key: [r["times"][key] / r["times"]["cfg"] for r in config] for key in COLORS}
    low = min(0.9, *(min(v) for v in series.values()))
    high = max(1.7, *(max(v) for v in series.values()))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 80, width - 200, 60, height - 70

    def x_of(i):
        return left + (right - left) * (i / max(1, len(batches) - 1))

    def y_of(v):
        return bottom - (bottom - top) * (v - low) / (high - low)

    draw.text((left, 20), title, fill="black")
    draw.text((left, 38), f"{first['size']}, layers {first['layers']}, sigma {first['sigma']}", fill="black")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    step = 0.1
    value = round(low / step) * step
    while value <= high + 1e-9:
        y = y_of(value)
        draw.line([(left - 5, y), (right, y)], fill=(225, 225, 225))
        draw.text((left - 45, y - 6), f"{value:.1f}x", fill="black")
        value += step
    for i, batch in enumerate(batches):
        draw.text((x_of(i) - 4, bottom + 8), str(batch), fill="black")
    draw.text(((left + right) // 2 - 30, bottom + 30), "batch size", fill="black")
    for n, (key, values) in enumerate(series.items()):
        points = [(x_of(i), y_of(v)) for i, v in enumerate(values)]
        if len(points) > 1:
            draw.line(points, fill=COLORS[key], width=3)
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=COLORS[key])
        draw.line([(right + 20, top + 20 * n + 6), (right + 45, top + 20 * n + 6)], fill=COLORS[key], width=3)
        draw.text((right + 52, top + 20 * n), key, fill="black")
    image.save(path)
