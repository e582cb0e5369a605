"""``vitnp demo``: classify the shipped digit images with the shipped digits ViT. No download, no PyTorch.

The model is ``vit_digits_patch4_32`` (a timm VisionTransformer for 32x32 grey digits) with weights trained by
``python -m vitnp.demo.train_digits`` on scikit-learn's digits; the samples are digits of that run's test split,
named ``NNNN_labelD.png`` (NNNN: index in ``sklearn.datasets.load_digits()``, D: the true digit).
"""

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backends import default_backend
from ..compiling import kernels_compiling
from ..model import count_params
from ..preprocess import load_image, normalize
from ..reference.ops import softmax
from ..registry import create_model

MODEL_NAME = "vit_digits_patch4_32"
DEMO_DIR = Path(__file__).resolve().parent
WEIGHTS_PATH = DEMO_DIR / "digits_vit.npz"
SAMPLES_DIR = DEMO_DIR / "samples"
_SAMPLE_NAME = re.compile(r"^(\d+)_label(\d)\.png$")
TIMED_RUNS = 3

NEXT_STEPS = """\
Next, a real checkpoint (exporting needs PyTorch once; vitnp itself does not):
  pip install torch timm
  vitnp export vit_base_patch16_224 --pretrained -o vit_base.npz        # a timm model by name
  vitnp export my_model.pth --model vit_small_patch16_224 -o mine.npz    # or your own .pth / .safetensors
  python -c "import vitnp; m = vitnp.create_model('vit_base_patch16_224', weights='vit_base.npz')"
then feed m(x) a (B, 3, 224, 224) float array normalised with vitnp.data_config('vit_base_patch16_224')."""


def sample_name(index, label):
    """File name of the digit at ``index`` of sklearn's digits, whose true class is ``label``."""
    return f"{index:04d}_label{label}.png"


def sample_label(path):
    """The true class written in a sample's file name."""
    match = _SAMPLE_NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: a demo sample is named NNNN_labelD.png")
    return int(match.group(2))


def sample_paths(samples_dir=SAMPLES_DIR):
    return sorted(Path(samples_dir).glob("*.png"))


def load_samples(paths, data_config):
    """Read grey PNGs into one normalised (B, 1, H, W) float32 batch, as the model was trained on them."""
    images = np.stack([load_image(path, mode="L") for path in paths])  # (B, 1, H, W)
    return normalize(images, data_config["mean"], data_config["std"])


@dataclass
class DemoResult:
    files: list
    labels: np.ndarray
    predictions: np.ndarray
    probabilities: np.ndarray  # (B, 10) softmax of the logits
    accuracy: float
    seconds_per_image: float
    first_call_seconds: float


def classify(model, x):
    """Logits of one batch, timed: (first call in seconds, median seconds of TIMED_RUNS further calls, logits)."""
    start = time.perf_counter()
    logits = model(x)
    first_call = time.perf_counter() - start
    timings = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        model(x)
        timings.append(time.perf_counter() - start)
    return first_call, float(np.median(timings)), logits


def run_demo(out=None, weights=WEIGHTS_PATH, samples_dir=SAMPLES_DIR, backend=None):
    """Classify every sample, print each prediction beside the truth, the accuracy and the time per image.

    ``backend``: 'fast', 'reference' or None: ``VITNP_BACKEND``, else 'fast'. On a first run, with no kernels in the
    cache, the fast backend's ops run on the reference's kernels, which compile in about a second, while another
    process compiles the engine's (the note on stderr says so): the first ``vitnp demo`` answers within seconds, and
    the next ones load the engine's kernels from the cache."""
    out = out or sys.stdout
    paths = sample_paths(samples_dir)
    if not paths:
        raise ValueError(f"no sample images (*.png) in {samples_dir}")
    model = create_model(MODEL_NAME, weights=weights, backend=backend or default_backend())
    labels = np.array([sample_label(path) for path in paths])
    x = load_samples(paths, model.data_config)
    first_call, batch_seconds, logits = classify(model, x)
    engine_compiling = model.backend == "fast" and kernels_compiling()
    probabilities = softmax(logits)  # of the model's output, as predict's: not a step of the model
    predictions = logits.argmax(axis=1)
    correct = predictions == labels
    result = DemoResult(
        files=[path.name for path in paths],
        labels=labels,
        predictions=predictions,
        probabilities=probabilities,
        accuracy=float(correct.mean()),
        seconds_per_image=batch_seconds / len(paths),
        first_call_seconds=first_call,
    )

    C, H, W = model.data_config["input_size"]
    print(f"vitnp demo: {MODEL_NAME}, a timm VisionTransformer for {H}x{W} grey digits, "
          f"{count_params(model):,} parameters", file=out)
    print(f"weights {weights} (trained by `python -m vitnp.demo.train_digits`)", file=out)
    print(f"{len(paths)} digits from the test split, {samples_dir}", file=out)
    print("", file=out)
    print(f"{'file':<18} {'truth':>5} {'predicted':>9} {'prob':>6}", file=out)
    for name, label, prediction, probs, ok in zip(result.files, labels, predictions, probabilities, correct):
        mark = "" if ok else "  <- wrong"
        print(f"{name:<18} {label:>5} {prediction:>9} {probs[prediction]:>6.3f}{mark}", file=out)
    print("", file=out)
    print(f"accuracy: {int(correct.sum())}/{len(paths)} = {100 * result.accuracy:.1f}%", file=out)
    kernels = " (its ops on the reference's kernels: the engine's are being compiled)" if engine_compiling else ""
    print(f"time: {1000 * result.seconds_per_image:.3f} ms per image on the {model.backend} backend{kernels} (one "
          f"batch of {len(paths)}, float32, median of {TIMED_RUNS} runs; the first call took {first_call:.2f} s with "
          "Numba compiling or loading its cache)", file=out)
    print("", file=out)
    print(NEXT_STEPS, file=out)
    return result
