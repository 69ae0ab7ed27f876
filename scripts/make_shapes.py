"""Write the shipped visual task (src/mlxlab/assets/shapes/, and its held-out pictures as an
evaluation task, shapes_val.jsonl): 64x64 pictures of one to three
shapes of one kind and colour on a light ground, each with a question whose answer only the
picture holds (the colour, the shape or the count), as image chats for data=vision_chat.
Chance is 1/4 for colours and 1/3 for shapes and counts.

    python scripts/make_shapes.py [--train 240] [--val 60] [--out src/mlxlab/assets/shapes]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
QUESTIONS = {"colour": "What colour are the shapes? Answer in one word.",
             "shape": "Which shape is in the picture? Answer in one word.",
             "count": "How many shapes are there? Answer in one word."}
SIZE, CELL = 64, 28


def draw(rng: np.random.Generator, colour: str, shape: str, count: int) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(225, 256, 3)))
    pen = ImageDraw.Draw(image)
    slots = rng.permutation(4)[:count]  # one shape a quarter, so they never overlap
    for slot in slots:
        x0, y0 = (slot % 2) * (SIZE // 2) + 2, (slot // 2) * (SIZE // 2) + 2
        s = int(rng.integers(16, CELL))
        x, y = x0 + int(rng.integers(0, CELL - s + 1)), y0 + int(rng.integers(0, CELL - s + 1))
        fill = COLOURS[colour]
        if shape == "circle":
            pen.ellipse((x, y, x + s, y + s), fill=fill)
        elif shape == "square":
            pen.rectangle((x, y, x + s, y + s), fill=fill)
        else:
            pen.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    return image


def make(out: Path, split: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (out / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape, count = SHAPES[int(rng.integers(3))], int(rng.integers(1, 4))
        name = f"{split}/{i:04d}.png"
        draw(rng, colour, shape, count).save(out / name, optimize=True)
        kind = list(QUESTIONS)[i % 3]
        answer = {"colour": colour, "shape": shape, "count": COUNTS[count - 1]}[kind]
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": name},
                                         {"type": "text", "text": QUESTIONS[kind]}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
    (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if split == "val":  # the same pictures as an evaluation task (mlxlab eval, eval.tasks)
        task = [{"id": f"{i:04d}", "image": f"val/{i:04d}.png",
                 "prompt": r["messages"][0]["content"][1]["text"],
                 "answer": r["messages"][1]["content"][0]["text"]} for i, r in enumerate(rows)]
        (out / "shapes_val.jsonl").write_text("".join(json.dumps(t) + "\n" for t in task))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--val", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("src/mlxlab/assets/shapes"))
    args = parser.parse_args()
    make(args.out, "train", args.train, seed=0)
    make(args.out, "val", args.val, seed=1)


if __name__ == "__main__":
    main()
