"""The demo model's quality bar: generate the held-out prompts and measure, per attribute, how
often the picture matches the words.

``python -m sdrt.engine.demo.quality`` writes ``benchmarks/results/demo_quality.json`` and
``.md`` and the grid ``demo_grid.png``.

The checker classifies every pixel by the nearest palette colour, then, for the described shape:

- **background**: the most frequent colour is the described background;
- **shape colour**: the most frequent other colour is the described one, and its largest
  connected region covers at least 30% of the area the shape would have;
- **position**: the centroid of that region lies in the described cell of the 3×3 grid;
- **shape**: of the three template masks (circle, square, triangle) drawn in that region's
  bounding box, the described one overlaps the region best (IoU).

A missing colour fails position and shape too. On the renderer's own images every check holds
(``tests/test_demo.py``).
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from sdrt.benchmarks.common import cpu_name

from . import world

NAMES = list(world.COLOURS)
_PALETTE = np.array([world.COLOURS[n] for n in NAMES], np.float32)  # (K, 3)
ATTRIBUTES = ("shape_colour", "background", "position", "shape")


def to_uint8(image):
    """A float array (H, W, 3) in [0, 1] (as ``output_type="np"`` gives) → uint8."""
    return (np.clip(np.asarray(image, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def labels(image):
    """(H, W) palette index of each pixel of a uint8 (H, W, 3) image, by nearest RGB."""
    d = ((image[:, :, None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)  # (H, W, K)
    return d.argmin(-1)


def components(mask):
    """The 4-connected regions of a boolean mask as boolean masks, largest first (equal sizes in
    scan order; a breadth-first walk: images are 32²)."""
    seen = np.zeros_like(mask, bool)
    h, w = mask.shape
    parts = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        region, stack = [], [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        part = np.zeros_like(mask, bool)
        part[tuple(np.array(region).T)] = True
        parts.append(part)
    return sorted(parts, key=lambda p: -p.sum())


def classify_shape(region):
    """The template (circle, square, triangle) in the region's bounding box that overlaps the
    region best (IoU)."""
    ys, xs = np.nonzero(region)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    diameter = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)

    def iou(kind):
        t = world.shape_mask(kind, diameter, cy, cx, side=region.shape[0])
        return (t & region).sum() / max((t | region).sum(), 1)
    return max(world.SHAPES, key=iou)


def check(image, scene):
    """Per-attribute verdicts on a uint8 image of a one-shape ``scene``, plus the background
    found, how many regions of the shape's colour are big enough to count (``regions``) and
    each colour's share of the pixels. A shape whose cell is None (a caption naming no
    position) fails the position."""
    (shape,) = scene.shapes
    lab = labels(image)
    counts = np.bincount(lab.ravel(), minlength=len(NAMES))
    order = [NAMES[i] for i in np.argsort(-counts, kind="stable")]
    background = order[0]
    parts = components(lab == NAMES.index(shape.colour)) if shape.colour != background else []
    region = parts[0] if parts else np.zeros(lab.shape, bool)
    expected = world.shape_mask(shape.kind, world.SIZES[shape.size],
                                *world.cell_centre(shape.cell or (1, 1))).sum()
    found = region.sum() >= 0.3 * expected and order[1] == shape.colour
    regions = sum(p.sum() >= 0.3 * expected for p in parts)
    result = {"background": background == scene.background, "shape_colour": bool(found),
              "position": False, "shape": False, "background_found": background,
              "regions": regions,
              "share": {n: float(c) / lab.size for n, c in zip(NAMES, counts)}}
    if region.any():
        ys, xs = np.nonzero(region)
        third = lab.shape[0] / 3
        cell = (min(int(ys.mean() + 0.5) // third, 2), min(int(xs.mean() + 0.5) // third, 2))
        result["position"] = bool(found and cell == shape.cell)
        result["shape"] = bool(found and classify_shape(region) == shape.kind)
    return result


def accuracy(results):
    return {a: sum(r[a] for r in results) / len(results) for a in ATTRIBUTES}


def generate(pipe, prompts, settings, seed, **kwargs):
    """uint8 images (B, H, W, 3) of ``prompts`` at ``settings``; one CPU generator seeded
    ``seed`` draws the whole batch's noise."""
    images = pipe(prompts, num_inference_steps=settings["num_inference_steps"],
                  guidance_scale=settings["guidance_scale"], sampler=settings["sampler"],
                  height=settings["height"], width=settings["width"], seed=seed,
                  output_type="np", **kwargs)
    return to_uint8(images)


def text_to_image(pipe, scenes, settings, seed):
    images = generate(pipe, [s.caption for s in scenes], settings, seed)
    return images, [check(im, s) for im, s in zip(images, scenes)]


def image_to_image(pipe, scenes, settings, seed, strength=0.3):
    """The rendered scenes through img2img at ``strength`` with their own captions: the
    checker's verdicts against the input scene."""
    inputs = torch.from_numpy(np.stack([world.render(s) for s in scenes])).permute(0, 3, 1, 2)
    images = generate(pipe, [s.caption for s in scenes], settings, seed,
                      image=inputs.float() / 255, strength=strength)
    return [check(im, s) for im, s in zip(images, scenes)]


@torch.no_grad()
def reconstruction(vae, scenes):
    """The checker's verdicts on the VAE's reconstructions (the latent mean, decoded) of the
    rendered scenes: the ceiling of what the UNet can reach through this VAE."""
    x = torch.from_numpy(np.stack([world.render(s) for s in scenes])).permute(0, 3, 1, 2)
    mean, _ = vae.encode(x.float() / 127.5 - 1)
    images = to_uint8(((vae.decode(mean) + 1) / 2).permute(0, 2, 3, 1).numpy())
    return [check(im, s) for im, s in zip(images, scenes)]


def negative_colour(pipe, scenes, settings, seed):
    """The shape colour's share of the pixels with and without that colour as the negative
    prompt (same noise)."""
    prompts = [s.caption for s in scenes]
    plain = generate(pipe, prompts, settings, seed)
    negative = generate(pipe, prompts, settings, seed,
                        negative_prompt=[s.shapes[0].colour for s in scenes])
    rows = []
    for a, b, s in zip(plain, negative, scenes):
        colour = NAMES.index(s.shapes[0].colour)
        rows.append({"colour": s.shapes[0].colour,
                     "share_without": float((labels(a) == colour).mean()),
                     "share_with": float((labels(b) == colour).mean())})
    return rows


def grid(images, columns, scale=4):
    """uint8 images (B, H, W, 3) tiled ``columns`` wide, each scaled up ``scale``× (nearest),
    with a 2-pixel gap."""
    b, h, w, _ = images.shape
    rows = -(-b // columns)
    H, W = h * scale, w * scale
    out = np.full((rows * (H + 2) + 2, columns * (W + 2) + 2, 3), 128, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        big = im.repeat(scale, 0).repeat(scale, 1)
        out[2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = big
    return out


VALIDATION_PROMPTS = 63  # 27 left the means one prompt apart; one call takes at most 64


def sweep(pipe, settings, seed=0, guidances=(3.0, 4.0, 5.0, 7.5), steps=(20,)):
    """Mean accuracy on ``world.validation_scenes(VALIDATION_PROMPTS)`` (training-distribution
    prompts, not the held-out ones) for each guidance scale and step count, over two phrasings
    of each scene: naming its size and position, and naming neither ("a red circle on a blue
    background", the README's first command; the position is then not scored)."""
    scenes = world.validation_scenes(VALIDATION_PROMPTS)
    plain = [world.Scene(s.shapes, s.background, world.plain_caption(s.shapes[0], s.background))
             for s in scenes]
    out = []
    for g in guidances:
        for n in steps:
            run = {**settings, "guidance_scale": g, "num_inference_steps": n}
            acc = accuracy(text_to_image(pipe, scenes, run, seed)[1])
            plain_acc = accuracy(text_to_image(pipe, plain, run, seed)[1])
            del plain_acc["position"]
            scores = list(acc.values()) + list(plain_acc.values())
            out.append({"guidance_scale": g, "num_inference_steps": n, **acc,
                        "without_size_and_position": plain_acc,
                        "mean": sum(scores) / len(scores)})
    return out


def choose_defaults(model_folder, seed=0, threads=1, guidances=(3.0, 4.0, 5.0, 7.5)):
    """Pick the guidance scale of ``demo_defaults`` by ``sweep`` on the validation prompts (never
    the held-out ones) and write it, with the sweep, into the folder's ``demo.json``."""
    from ..pipeline import Pipeline
    from .model import demo_components, demo_config
    torch.set_num_threads(threads)
    path = os.path.join(model_folder, "demo.json")
    config = demo_config(path)
    pipe = Pipeline(demo_components(model_folder), "cpu", torch.float32)
    rows = sweep(pipe, config["demo_defaults"], seed, guidances)
    best = max(rows, key=lambda r: r["mean"])  # the first of equals: the smallest scale
    config["demo_defaults"]["guidance_scale"] = best["guidance_scale"]
    config["demo_defaults"]["num_inference_steps"] = best["num_inference_steps"]
    config["demo_defaults_sweep"] = {"prompts": f"world.validation_scenes({VALIDATION_PROMPTS}), "
                                                "with captions naming size and position and "
                                                "with plain_caption",
                                     "seed": seed,
                                     "results": rows}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    return rows


FIRST_COMMAND = "a red circle on a blue background"  # the README's first `sdrt generate`
_FIRST_SCENE = world.Scene((world.Shape("red", "circle", "small", None),), "blue", FIRST_COMMAND)


def first_command(pipe, settings, seeds=range(1, 33)):
    """The README's first command over ``seeds`` (as ``--seed``): per seed, the background
    ``check`` finds, whether it finds a red circle (at least 30% of a small circle's area, red
    the second colour) and how many red regions of that size it finds. Drawn right: one red
    circle on blue."""
    rows = []
    for seed in seeds:
        image = to_uint8(pipe(FIRST_COMMAND, height=settings["height"], width=settings["width"],
                              num_inference_steps=settings["num_inference_steps"],
                              guidance_scale=settings["guidance_scale"],
                              sampler=settings["sampler"], seed=seed, output_type="np")[0])
        r = check(image, _FIRST_SCENE)
        rows.append({"seed": seed, "background": r["background_found"],
                     "circle": r["shape_colour"] and r["shape"], "red_regions": r["regions"]})
    return rows


def _drawn_right(row):
    return row["background"] == "blue" and row["circle"] and row["red_regions"] == 1


def cli_settings(pipe):
    """What ``sdrt generate --model FOLDER PROMPT`` runs on ``pipe`` (for instance the folder
    ``sdrt make-demo`` writes) without options: the CLI's general default steps and guidance
    (diffusers' 50 and 7.5), the sampler of the model's scheduler, the model's default size.
    Without ``--model``, the built-in model runs at its own ``demo_defaults`` instead."""
    from ..cli import _parser
    from ..samplers import default_sampler
    a = _parser().parse_args(["generate", "x"])
    height, width = pipe.default_size()
    return {"sampler": default_sampler(pipe.scheduler_config), "num_inference_steps": a.steps,
            "guidance_scale": a.guidance, "height": height, "width": width}


TARGETS = {"shape_colour": 0.9, "background": 0.9, "position": 0.8, "shape": 0.8}


def run(model_folder, out, seed=0, count=54, threads=1,
        command="python -m sdrt.engine.demo.quality"):
    """Measure the model in ``model_folder`` on ``count`` held-out prompts at its
    ``demo_defaults``, what ``sdrt generate PROMPT`` runs (text-to-image, img2img at strength
    0.3, a negative prompt naming the shape's colour) and, text-to-image only, at the CLI's
    general defaults (``cli_settings``); with the VAE's reconstructions as the ceiling. Write
    ``demo_quality.json``, ``demo_quality.md`` and ``demo_grid.png`` (the text-to-image images
    at ``demo_defaults``) under ``out``."""
    from PIL import Image

    from ..pipeline import Pipeline
    from .model import demo_components, demo_config
    torch.set_num_threads(threads)
    from .model import DATA
    shipped = os.path.samefile(model_folder, DATA)
    config = demo_config(os.path.join(model_folder, "demo.json"))
    pipe = Pipeline(demo_components(model_folder), "cpu", torch.float32)
    settings, general = config["demo_defaults"], cli_settings(pipe)
    scenes = world.held_out_scenes(count)
    start = time.perf_counter()
    images, t2i = text_to_image(pipe, scenes, settings, seed)
    t2i_seconds = time.perf_counter() - start
    _, t2i_general = text_to_image(pipe, scenes, general, seed)
    i2i = image_to_image(pipe, scenes, settings, seed)
    neg = negative_colour(pipe, scenes, settings, seed)
    first = first_command(pipe, settings)
    pairs = world.validation_scenes(9, shapes=2)
    pair_images = generate(pipe, [s.caption for s in pairs], settings, seed)
    wall = time.perf_counter() - start
    report = {
        "model": "built-in demo model" if shipped else "demo model trained elsewhere",
        "weights": "engine/data/demo.safetensors" if shipped else
        os.path.join(model_folder, "demo.safetensors"),
        "held_out_prompts": count, "seed": seed, "settings": settings, "targets": TARGETS,
        "text_to_image": {"accuracy": accuracy(t2i),
                          "more_than_one_region": sum(r["regions"] > 1 for r in t2i)},
        "text_to_image_cli_general_defaults": {"settings": general,
                                               "accuracy": accuracy(t2i_general)},
        "vae_reconstruction": {"accuracy": accuracy(reconstruction(pipe.vae, scenes))},
        "image_to_image_strength_0.3": {"accuracy_against_input": accuracy(i2i)},
        "negative_prompt_colour": {
            "mean_share_without": float(np.mean([r["share_without"] for r in neg])),
            "mean_share_with": float(np.mean([r["share_with"] for r in neg])),
            "fraction_lowered": float(np.mean([r["share_with"] < r["share_without"]
                                               for r in neg]))},
        "first_command": {
            "prompt": FIRST_COMMAND, "seeds": [r["seed"] for r in first],
            "drawn_right": sum(_drawn_right(r) for r in first),
            "per_seed": first},
        "per_prompt": [{"prompt": s.caption, **{a: r[a] for a in ATTRIBUTES}}
                       for s, r in zip(scenes, t2i)],
        "grid_two_shape_prompts": [s.caption for s in pairs],
        "training": config.get("training"),
        "defaults_sweep": config.get("demo_defaults_sweep"),
        "cpu": cpu_name(), "threads": threads, "torch": torch.__version__,
        "python": platform.python_version(),
        "text_to_image_seconds": round(t2i_seconds, 1), "wall_seconds": round(wall, 1),
        "command": command,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "demo_quality.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    columns = 9
    Image.fromarray(grid(np.concatenate([images, pair_images]), columns)).save(
        os.path.join(out, "demo_grid.png"))
    with open(os.path.join(out, "demo_quality.md"), "w", encoding="utf-8") as fh:
        fh.write(_markdown(report, columns))
    return report


def _markdown(r, columns):
    acc, tgt = r["text_to_image"]["accuracy"], r["targets"]
    other = r["text_to_image_cli_general_defaults"]
    vae = r["vae_reconstruction"]["accuracy"]
    i2i = r["image_to_image_strength_0.3"]["accuracy_against_input"]
    neg = r["negative_prompt_colour"]
    s, d = r["settings"], other["settings"]
    lines = [
        "# Demo model quality",
        "",
        f"Model: {r['model']}, `{r['weights']}`.",
        "",
        f"{r['held_out_prompts']} held-out prompts (colour/shape/background combinations never "
        f"rendered in training), seed {r['seed']}, at what `sdrt generate PROMPT` runs without "
        f"options (the built-in model's own defaults): {s['sampler']}, "
        f"{s['num_inference_steps']} steps, guidance {s['guidance_scale']}, "
        f"{s['height']}×{s['width']}. CPU: {r['cpu']} "
        f"({r['threads']} thread), torch {r['torch']}. Text-to-image {r['text_to_image_seconds']} "
        f"s, all measurements {r['wall_seconds']} s. Command: `{r['command']}`.",
        "",
        f"| attribute | text-to-image accuracy | target | at diffusers' defaults, as "
        f"`sdrt generate --model` runs a `make-demo` folder ({d['num_inference_steps']} steps, "
        f"guidance {d['guidance_scale']}) | VAE "
        f"reconstruction of the rendered scene | img2img 0.3, kept from the input |",
        "|---|---|---|---|---|---|",
    ]
    for a in ATTRIBUTES:
        lines.append(f"| {a} | {acc[a]:.1%} | ≥ {tgt[a]:.0%} | {other['accuracy'][a]:.1%} | "
                     f"{vae[a]:.1%} | {i2i[a]:.1%} |")
    first = r["first_command"]
    wrong = [f"{p['seed']} ({p['background']} background, "
             f"{'a red circle' if p['circle'] else 'no red circle'}, {p['red_regions']} red "
             f"region{'' if p['red_regions'] == 1 else 's'})"
             for p in first["per_seed"] if not _drawn_right(p)]
    lines += [
        "",
        f"Text-to-image pictures with more than one region of the shape's colour (each at least "
        f"30% of the shape's area): {r['text_to_image']['more_than_one_region']} of "
        f"{r['held_out_prompts']}.",
        "",
        f"Negative prompt naming the shape's colour: that colour's share of the pixels goes "
        f"from {neg['mean_share_without']:.2%} to {neg['mean_share_with']:.2%} on average, "
        f"lower in {neg['fraction_lowered']:.0%} of the prompts.",
        "",
        f"The README's first command, `sdrt generate \"{first['prompt']}\"`, at seeds "
        f"{first['seeds'][0]}–{first['seeds'][-1]}: one red circle (and no other red region of "
        f"that size) on a blue background in "
        f"{first['drawn_right']} of {len(first['seeds'])}"
        + (f"; not at seeds {', '.join(wrong)}." if wrong else "."),
        "",
        f"`demo_grid.png` (written by the same command): the text-to-image outputs, {columns} "
        f"per row, in this order (✓/✗: colour, background, position, shape):",
        "",
    ]
    mark = lambda ok: "✓" if ok else "✗"
    lines += [f"{i + 1}. {p['prompt']} {''.join(mark(p[a]) for a in ATTRIBUTES)}"
              for i, p in enumerate(r["per_prompt"])]
    n = len(r["per_prompt"])
    lines += ["", "Last row: two-shape prompts from the training distribution (not scored):", ""]
    lines += [f"{n + i + 1}. {c}" for i, c in enumerate(r["grid_two_shape_prompts"])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(here, "..", "data"),
                   help="folder with demo.safetensors and demo.json")
    p.add_argument("--out", default=os.path.join(here, "..", "..", "benchmarks", "results"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=54)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--choose-defaults", action="store_true",
                   help="first pick the default guidance scale on the validation prompts and "
                        "write it into the model's demo.json")
    a = p.parse_args(argv)
    if a.choose_defaults:
        print(json.dumps(choose_defaults(a.model, a.seed, a.threads), indent=2))
    argv = sys.argv[1:] if argv is None else argv
    r = run(a.model, a.out, a.seed, a.count, a.threads,
            " ".join(["python -m sdrt.engine.demo.quality", *argv]))
    print(json.dumps({k: r[k] for k in ("text_to_image", "text_to_image_cli_general_defaults",
                                        "vae_reconstruction", "image_to_image_strength_0.3",
                                        "negative_prompt_colour", "wall_seconds")}, indent=2))


if __name__ == "__main__":
    main()
