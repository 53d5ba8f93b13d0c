"""Image folders on disk: class-per-folder (ImageFolder layout) for tasks, any images for shadow sets.

Images come out as [0, 1] tensors at the model's size (resize + centre crop, as CLIP's
preprocessing does); normalisation belongs to the encoder, so triggers are pasted before it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from mergeguard.errors import MergeguardError


def class_key(name: str) -> str:
    """Class names compare case-, underscore- and dash-insensitively ('Annual_Crop' == 'annual crop')."""
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


def preprocess(image_size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
    ])


class ImageFiles(Dataset):
    """A list of image files with labels (-1 for unlabeled), loaded as [0, 1] tensors."""

    def __init__(self, files: list[Path], labels: list[int], image_size: int) -> None:
        self.files, self.labels = files, labels
        self.transform = preprocess(image_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as img:
                image = self.transform(img.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise MergeguardError(f"cannot read the image {self.files[i]}: {exc}.") from exc
        return image, self.labels[i]


def _require_folder(root: Path, what: str) -> None:
    if root.exists() and not root.is_dir():
        raise MergeguardError(f"{root} is a file; give a folder of images.")
    if not root.is_dir():
        raise MergeguardError(f"the {what} folder {root} does not exist.")


def labeled_folder(root: str | Path, classnames: list[str] | None, image_size: int) -> ImageFiles:
    """ROOT/<class>/<image> → dataset whose labels index `classnames` (the head's order).

    Folders are matched to class names by name (see `class_key`), or by index when the
    folders are named 0, 1, 2, ...; without class names, sorted folder order is the label order.
    """
    root = Path(root)
    _require_folder(root, "data")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise MergeguardError(f"{root} has no class folders (expected {root}/<class>/<image>).")
    if classnames is None:
        mapping = {f: i for i, f in enumerate(folders)}
    else:
        keys = {class_key(c): i for i, c in enumerate(classnames)}
        mapping = {}
        numeric = all(f.name.isdigit() for f in folders)
        for f in folders:
            if numeric and int(f.name) < len(classnames):
                mapping[f] = int(f.name)
            elif class_key(f.name) in keys:
                mapping[f] = keys[class_key(f.name)]
            else:
                raise MergeguardError(
                    f"class folder {f.name!r} in {root} matches none of the head's {len(classnames)} classes "
                    f"(e.g. {', '.join(classnames[:4])})."
                )
    files, labels = [], []
    for folder, label in mapping.items():
        found = _images_under(folder)
        files += found
        labels += [label] * len(found)
    if not files:
        raise MergeguardError(f"{root} contains no images ({', '.join(sorted(IMG_EXTENSIONS))}).")
    return ImageFiles(files, labels, image_size)


def unlabeled_folder(root: str | Path, image_size: int) -> ImageFiles:
    """Every image under ROOT (any depth), unlabeled: a shadow set."""
    root = Path(root)
    _require_folder(root, "image")
    files = _images_under(root)
    if not files:
        raise MergeguardError(f"{root} contains no images.")
    return ImageFiles(files, [-1] * len(files), image_size)
