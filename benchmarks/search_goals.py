"""The default search's goals, measured as a user runs them: ``cnnforge run`` with no options but
the data (and, for the full Fashion-MNIST, the time budget), one after another, each alone.

- ``bundled``: ``cnnforge run``; scored on the bundled 2,000 test images and on the full 10,000
  of Fashion-MNIST (``cnnforge evaluate ... --data fashion_mnist:/usr/share/datasets/fashion-mnist``);
- ``digits``: scikit-learn's real 8×8 digits (1,797 images, in its wheel), split 80/20
  (stratified, seed 0) into an ``.npz``, pixels 0–16 scaled to 0–255;
- ``folder``: a colour folder of mixed sizes (20–96 px, JPEG/PNG/RGBA, tinted Fashion-MNIST
  images: ``benchmarks/folder_pipeline.make_folder``), ``train/`` and ``test/``;
- ``fmnist30``: ``cnnforge run --data fashion_mnist:... --time-budget 30m`` (31 minutes).

    python benchmarks/search_goals.py --out /tmp/goals [--goals bundled,digits,folder,fmnist30]

Writes ``goals.json`` and ``goals.md`` (wall time, test accuracy by onnxruntime on the exported
model, the plan, the winner) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FASHION = "fashion_mnist:/usr/share/datasets/fashion-mnist"
CNNFORGE = [sys.executable, "-m", "cnnforge.cli"]


def make_digits(path: Path) -> str:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype("uint8")
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    classes = np.array([str(i) for i in range(10)])
    np.savez(
        path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=classes
    )
    return str(path)


def make_colour_folder(root: Path) -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    from folder_pipeline import make_folder

    make_folder(root, images=4000)
    return f"dir:{root}"


def run(data: str, run_dir: Path, *extra: str) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh search, not a resumed one
    command = [*CNNFORGE, "run", "--data", data, "--run-dir", str(run_dir), *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    search = json.loads((run_dir / "search.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    return {
        "command": shlex.join(["cnnforge", *command[3:]]),
        "wall_s": round(wall, 1),
        "test_accuracy": evaluation["accuracy"],
        "test_images": evaluation["images"],
        "plan": plan,
        "winner": search["hyperparameters"],
        "final_training": search["final_training"],
        "trials": len(list((run_dir / "tuner").glob("trial_*"))),
    }


def full_fashion_accuracy(run_dir: Path) -> float:
    out = run_dir / "full-test.json"
    subprocess.run(
        [*CNNFORGE, "evaluate", str(run_dir / "model.onnx"), "--data", FASHION, "--json", str(out)],
        check=True,
        capture_output=True,
    )
    return json.loads(out.read_text())["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--goals", default="bundled,digits,folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for goal in args.goals.split(","):
        run_dir = args.out / goal
        if goal == "bundled":
            result = run("fashion_mnist_small", run_dir)
            result["full_fashion_mnist_accuracy"] = full_fashion_accuracy(run_dir)
        elif goal == "digits":
            result = run(make_digits(args.out / "digits.npz"), run_dir)
        elif goal == "folder":
            result = run(make_colour_folder(args.out / "colour-folder"), run_dir)
        elif goal == "fmnist30":
            result = run(FASHION, run_dir, "--time-budget", "30m")
        else:
            raise SystemExit(f"unknown goal {goal!r}")
        results[goal] = result
        print(json.dumps({goal: {k: result[k] for k in ("wall_s", "test_accuracy")}}), flush=True)
    (args.out / "goals.json").write_text(json.dumps(results, indent=2))
    rows = ["| goal | command | wall | test accuracy (onnxruntime) |", "|---|---|---|---|"]
    for goal, r in results.items():
        accuracy = f"{r['test_accuracy']:.2%} on {r['test_images']}"
        if "full_fashion_mnist_accuracy" in r:
            accuracy += f"; {r['full_fashion_mnist_accuracy']:.2%} on the full 10,000"
        rows.append(f"| {goal} | `{r['command']}` | {r['wall_s']:.0f} s | {accuracy} |")
    (args.out / "goals.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
