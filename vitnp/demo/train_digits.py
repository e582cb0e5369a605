"""Train the demo model ``vit_digits_patch4_32`` on scikit-learn's digits and write what the package ships.

Run ``python -m vitnp.demo.train_digits`` (needs torch, timm and scikit-learn: ``pip install -e .[test]``). It
writes ``vitnp/demo/digits_vit.npz`` (the timm ``state_dict``, float32, ``np.savez``) and
``vitnp/demo/samples/NNNN_labelD.png`` (test-split digits; NNNN is the digit's index in
``sklearn.datasets.load_digits()``, D its label).

Every image, for training and for the PNGs alike, is made by :func:`digit_image`: the 8x8 digit (values 0..16)
scaled to [0, 1], rounded to 8 bits, upsampled to 32x32 with Pillow's bilinear resize. The PNGs are therefore the
exact pixels the model was trained and tested on, and the demo reads them back unchanged.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.models.vision_transformer import VisionTransformer

from vitnp.demo import MODEL_NAME, SAMPLES_DIR, WEIGHTS_PATH, sample_name
from vitnp.vit import MODELS

SAMPLES_PER_CLASS = 4
MAX_SHIFT = 2  # random translation of up to 2 px (of 32) in training: the only augmentation


def digit_image(pixels):
    """An 8x8 sklearn digit (0..16) as the 32x32 8-bit grey Pillow image the model sees."""
    grey = np.round(pixels / 16.0 * 255.0).astype(np.uint8)
    size = MODELS[MODEL_NAME][1]["input_size"][1:]
    return Image.fromarray(grey).resize(size[::-1], Image.BILINEAR)


def normalized_batch(images, data_config):
    """uint8 (B, H, W) -> float32 (B, 1, H, W): pixels / 255, then the model's mean / std."""
    x = torch.from_numpy(images).float().div(255.0).unsqueeze(1)
    return (x - data_config["mean"][0]) / data_config["std"][0]


def random_shift(x, max_shift, generator):
    """Translate each image by up to ``max_shift`` px on both axes, filling with the background value."""
    B, _, H, W = x.shape
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    padded = F.pad(x - background, (max_shift,) * 4) + background
    shifts = torch.randint(0, 2 * max_shift + 1, (B, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + H, dx : dx + W] for i, (dy, dx) in enumerate(shifts.tolist())])


def split(labels, seed):
    """Indices of a stratified 75 / 25 train / test split of the digits."""
    return train_test_split(np.arange(len(labels)), test_size=0.25, random_state=seed, stratify=labels)


def accuracy(model, x, y, batch_size=256):
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return (predictions == y).float().mean().item()


def train(model, x, y, epochs, batch_size, lr, seed):
    """AdamW with a linear warm-up then cosine decay, label smoothing 0.1, random shifts."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = -(-len(x) // batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = 5 * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup_steps
        if step < warmup_steps
        else 0.5 * (1 + np.cos(np.pi * (step - warmup_steps) / (total_steps - warmup_steps))),
    )
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total_loss = 0.0
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            inputs = random_shift(x[batch], MAX_SHIFT, generator)
            loss = F.cross_entropy(model(inputs), y[batch], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        if (epoch + 1) % 20 == 0 or epoch + 1 == epochs:
            print(f"epoch {epoch + 1:3d}/{epochs}  loss {total_loss / len(x):.4f}")


def write_samples(images, labels, indices):
    """Write SAMPLES_PER_CLASS test digits of each class as NNNN_labelD.png, replacing any earlier samples."""
    SAMPLES_DIR.mkdir(exist_ok=True)
    for old in SAMPLES_DIR.glob("*.png"):
        old.unlink()
    chosen = [i for label in range(10) for i in indices[labels[indices] == label][:SAMPLES_PER_CLASS]]
    for i in sorted(chosen):
        Image.fromarray(images[i]).save(SAMPLES_DIR / sample_name(i, labels[i]))
    return sorted(chosen)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    arch, data_config = MODELS[MODEL_NAME]
    digits = load_digits()
    images = np.stack([np.asarray(digit_image(pixels)) for pixels in digits.images])  # (1797, 32, 32) uint8
    labels = digits.target
    train_idx, test_idx = split(labels, args.seed)
    x = normalized_batch(images, data_config)
    y = torch.from_numpy(labels).long()

    torch.manual_seed(args.seed)
    model = VisionTransformer(**arch)
    print(f"{MODEL_NAME}: timm VisionTransformer({', '.join(f'{k}={v}' for k, v in arch.items())})")
    print(f"train {len(train_idx)} / test {len(test_idx)} digits, {args.epochs} epochs on CPU")
    start = time.perf_counter()
    train(model, x[train_idx], y[train_idx], args.epochs, args.batch_size, args.lr, args.seed)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    print(f"train accuracy {accuracy(model, x[train_idx], y[train_idx]):.4f}")
    print(f"test accuracy  {accuracy(model, x[test_idx], y[test_idx]):.4f}")

    state_dict = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    np.savez(WEIGHTS_PATH, **state_dict)
    print(f"wrote {WEIGHTS_PATH} ({sum(v.size for v in state_dict.values())} parameters)")
    chosen = write_samples(images, labels, test_idx)
    print(f"wrote {len(chosen)} test digits to {SAMPLES_DIR}")
    print(f"accuracy on them {accuracy(model, x[chosen], y[chosen]):.4f}")


if __name__ == "__main__":
    main()
