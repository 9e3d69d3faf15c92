"""Image folders of mixed sizes and modes: input throughput, search memory, deployed accuracy.

Makes a folder ``train/CLASS``, ``test/CLASS`` of real Fashion-MNIST images (Debian's
``dataset-fashion-mnist`` idx files), each one scaled to a random size (20–96 px a side, aspect
ratio 0.7–1.4), tinted, and re-encoded: PNG RGB, PNG grayscale, PNG RGBA, JPEG RGB. Then, in
one run:

1. images/s of cnnforge's two input paths against ``keras.utils.image_dataset_from_directory``
   over ``train/`` at the same size, each as its first pass and a later epoch, as ratios to
   Keras' figure for the same epoch (alternated, two rounds, the best of each kept): in memory
   (headers scanned, every image decoded once by the one ``Preprocessing`` in worker
   processes; later epochs are the decoded array) and streamed (``ImageFiles.tf_dataset``:
   decoded in worker processes in the first epoch, later epochs from the disk cache of the
   decoded pixels); Keras' loader decodes every epoch;
2. peak memory of a 1-trial, 1-epoch ``cnnforge search`` on the folder (its own process: the
   largest process's ``ru_maxrss``, and the proportional set size of the whole process tree,
   decoding workers included, sampled every 0.1 s), at two folder sizes, decoded into memory
   (the fast path) and read from disk every epoch (``CNNFORGE_DATA_MEMORY_MB=0``, the path a
   folder over the memory bound takes);
3. the accuracy of a short ``cnnforge run`` measured by ``cnnforge predict`` on the original
   test files, beside ``cnnforge evaluate``'s.

    python benchmarks/folder_pipeline.py --images 20000 --out runs/folder_pipeline
    python benchmarks/folder_pipeline.py --images 5000 --throughput-only   # 1. only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FASHION = Path("/usr/share/datasets/fashion-mnist")
SIZE = 32


def make_folder(root: Path, images: int, seed: int = 0) -> dict[str, int]:
    """``images`` training images and a fifth as many test images, mixed sizes and modes."""
    from PIL import Image

    from cnnforge.data.readers import read_idx_folder

    (x_train, y_train), (x_test, y_test) = read_idx_folder(FASHION)
    rng = np.random.default_rng(seed)
    counts = {}
    for split, x, y, n in (
        ("train", x_train, y_train, images),
        ("test", x_test, y_test, max(200, images // 5)),
    ):
        pick = rng.choice(len(x), size=min(n, len(x)), replace=False)
        for index, i in enumerate(pick):
            side = int(rng.integers(20, 97))
            aspect = float(rng.uniform(0.7, 1.4))
            width, height = max(8, round(side * aspect)), side
            gray = Image.fromarray(x[i]).resize((width, height), Image.Resampling.BILINEAR)
            tint = rng.uniform(0.5, 1.0, 3)
            rgb = (np.asarray(gray, np.float32)[..., None] * tint).astype(np.uint8)
            image = Image.fromarray(rgb, "RGB")
            folder = root / split / f"class_{int(y[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            kind = index % 4
            if kind == 0:
                image.save(folder / f"{index}.jpg", quality=90)
            elif kind == 1:
                image.convert("L").save(folder / f"{index}.png")
            elif kind == 2:
                image.convert("RGBA").save(folder / f"{index}.png")
            else:
                image.save(folder / f"{index}.png")
        counts[split] = len(pick)
    return counts


def _epoch(dataset: object) -> int:
    """Images in one pass over a tf.data dataset of (images, labels) batches."""
    return sum(int(batch[0].shape[0]) for batch in dataset)


def _rate(images: int, seconds: float) -> dict[str, float]:
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def cnnforge_throughput(root: Path) -> dict[str, dict[str, float]]:
    """Both of cnnforge's paths over ``train/``, each as its first pass and a later epoch:

    - in memory (a folder under the memory bound): the first pass is ``read_image_folder``'s
      work (headers scanned, every image decoded once by the ``Preprocessing``, in worker
      processes); every later epoch is the training input over the decoded array
      (``from_tensor_slices``, shuffle, batch 64);
    - streamed (over the bound): headers scanned, then ``ImageFiles.tf_dataset`` (shuffled,
      decoded in worker processes every epoch), batch 64; the first epoch and the second.
    """
    import tensorflow as tf

    from cnnforge import Preprocessing
    from cnnforge.data.folders import decode_images, scan_image_folder
    from cnnforge.data.stream import ImageFiles

    start = time.perf_counter()
    scan = scan_image_folder(root)
    files = scan.splits["train"]
    chosen = scan.preprocessing(Preprocessing(size=(SIZE, SIZE)))
    x, y = decode_images(files, chosen, {})
    first = _rate(len(x), time.perf_counter() - start)
    memory = tf.data.Dataset.from_tensor_slices((x, y))
    memory = memory.shuffle(len(x), seed=0, reshuffle_each_iteration=True).batch(64)
    _epoch(memory)  # tf.data's own first-iteration set-up, then a timed epoch
    start = time.perf_counter()
    epoch = _rate(_epoch(memory), time.perf_counter() - start)

    start = time.perf_counter()
    scan = scan_image_folder(root)
    files = scan.splits["train"]
    chosen = scan.preprocessing(Preprocessing(size=(SIZE, SIZE)))
    streamed = ImageFiles([f.path for f in files], chosen)
    labels = np.array([f.label for f in files])
    batches = streamed.tf_dataset(labels, shuffle_seed=0).batch(64)
    stream_first = _rate(_epoch(batches), time.perf_counter() - start)
    start = time.perf_counter()
    stream_epoch = _rate(_epoch(batches), time.perf_counter() - start)
    return {
        "memory_first_pass": first,
        "memory_epoch": epoch,
        "streamed_first_pass": stream_first,
        "streamed_epoch": stream_epoch,
    }


def keras_throughput(root: Path) -> dict[str, dict[str, float]]:
    """``image_dataset_from_directory`` over ``train/`` (it decodes every epoch): the first
    pass (files listed, then every image decoded and resized) and a second epoch."""
    import keras

    start = time.perf_counter()
    data = keras.utils.image_dataset_from_directory(
        root / "train", image_size=(SIZE, SIZE), batch_size=64, shuffle=True, seed=0, verbose=False
    )
    first = _rate(_epoch(data), time.perf_counter() - start)
    start = time.perf_counter()
    epoch = _rate(_epoch(data), time.perf_counter() - start)
    return {"first_pass": first, "epoch": epoch}


def throughput(root: Path, rounds: int = 2) -> dict[str, object]:
    """cnnforge's paths and Keras' loader, alternated ``rounds`` times (the first round warms
    the page cache for both), the best of each kept; ratios of cnnforge's images/s to Keras'
    per epoch (its first pass against Keras' first pass, a later epoch against Keras' later
    epoch)."""
    rounds_run = [(cnnforge_throughput(root), keras_throughput(root)) for _ in range(rounds)]

    def best(side: int, key: str) -> dict[str, float]:
        return max((r[side][key] for r in rounds_run), key=lambda v: v["images_per_s"])

    ours = {key: best(0, key) for key in rounds_run[0][0]}
    keras = {key: best(1, key) for key in rounds_run[0][1]}
    against = {
        "memory_first_pass": "first_pass",
        "memory_epoch": "epoch",
        "streamed_first_pass": "first_pass",
        "streamed_epoch": "epoch",
    }
    ratios = {
        key: round(ours[key]["images_per_s"] / keras[against[key]]["images_per_s"], 2)
        for key in ours
    }
    passes = [
        {k: round(v["images_per_s"]) for k, v in {**r[0], **_prefixed(r[1])}.items()}
        for r in rounds_run
    ]
    return {"cnnforge": ours, "keras": keras, "ratio_to_keras": ratios, "rounds": passes}


def _prefixed(keras: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {f"keras_{k}": v for k, v in keras.items()}


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            pids += _tree(int(child))
    return pids


def _tree_pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` and its descendants, in KiB: pages shared between
    them (a forked worker's copy-on-write pages) are counted once, not once a process."""
    total = 0
    for each in _tree(pid):
        try:
            lines = Path(f"/proc/{each}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in lines if line.startswith("Pss:"))
    return total


def child_peak_rss(command: list[str]) -> tuple[float, float, float]:
    """(peak resident MiB of the largest process, seconds, peak proportional set size MiB of
    the whole process tree, sampled every 0.1 s) of ``command`` run as a child process. With
    decoding worker processes, the tree's figure is the honest one."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    tree_peak = 0
    while child.poll() is None:
        tree_peak = max(tree_peak, _tree_pss_kib(child.pid))
        time.sleep(0.1)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, command)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("ru_maxrss of children did not grow; measure in a fresh process")
    return peak / 1024, seconds, tree_peak / 1024


def search_memory(root: Path, out: Path, stream: bool = False) -> dict[str, float]:
    command = [sys.executable, "-m", "cnnforge.cli", "search", "--data", f"dir:{root}"]
    command += ["--image-size", str(SIZE), "--max-trials", "1", "--epochs", "1"]
    command += ["--fix", "conv_blocks=1", "--run-dir", str(out)]
    # each measurement in its own interpreter, so RUSAGE_CHILDREN holds only that search
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); from folder_pipeline import "
        f"child_peak_rss; print(json.dumps(child_peak_rss({command!r})))"
    )
    env = {**os.environ, "CNNFORGE_DATA_MEMORY_MB": "0"} if stream else None
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env)
    peak, seconds, tree = json.loads(result.stdout.decode().strip().splitlines()[-1])
    return {"peak_rss_mib": peak, "peak_tree_pss_mib": tree, "seconds": seconds}


def deployed_accuracy(root: Path, out: Path, epochs: int) -> dict[str, float]:
    cli = [sys.executable, "-m", "cnnforge.cli"]
    subprocess.run(
        [*cli, "run", "--data", f"dir:{root}", "--image-size", str(SIZE), "--max-trials", "1"]
        + ["--epochs", str(epochs), "--run-dir", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    files = sorted((root / "test").glob("*/*"))
    subprocess.run(
        [*cli, "predict", str(out / "model.onnx"), *map(str, files), "-k", "1"]
        + ["--json", str(out / "predict.json")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    labels = [p["top"][0]["label"] for p in json.loads((out / "predict.json").read_text())]
    predicted = float(
        np.mean([label == f.parent.name for label, f in zip(labels, files, strict=True)])
    )
    evaluated = json.loads((out / "evaluation.json").read_text())["accuracy"]
    return {
        "predict_accuracy": predicted,
        "evaluate_accuracy": evaluated,
        "test_images": len(files),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000, help="training images")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the short run")
    parser.add_argument("--out", type=Path, default=Path("runs/folder_pipeline"))
    parser.add_argument(
        "--throughput-only", action="store_true", help="measure the input pipelines only"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"cpus": os.cpu_count(), "size": SIZE}
    small, large = args.out / "folder_small", args.out / "folder"
    results["folder"] = make_folder(large, args.images)
    results["throughput"] = throughput(large)
    if args.throughput_only:
        print(json.dumps(results, indent=2))
        return
    results["folder_small"] = make_folder(small, max(1000, args.images // 4), seed=1)
    results["search_small"] = search_memory(small, args.out / "search_small")
    results["search"] = search_memory(large, args.out / "search")
    # the same searches with the folder read from disk every epoch (the larger-than-memory path)
    results["streamed_search_small"] = search_memory(small, args.out / "stream_small", True)
    results["streamed_search"] = search_memory(large, args.out / "stream", True)
    results["run"] = deployed_accuracy(large, args.out / "run", args.epochs)
    text = json.dumps(results, indent=2)
    (args.out / "results.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
