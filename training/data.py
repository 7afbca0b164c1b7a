"""Fashion-MNIST / MNIST from the standard IDX `.gz` files: locate, download, verify, read, split.

Files are read with numpy (no torchvision) and the whole set is kept in memory as one float32 tensor in
[0, 1], shaped [N, 1, 28, 28]; training batches by indexing it, so the hot loop does no per-item Python.

Lookup order for the files: `--data-dir`, then `$VAE_DATA_DIR`, then the Debian package's directory
(fashion-mnist only), then `data/<dataset>` (where `download` puts them by default).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.manifest import sha256_file

DATA_DIR_ENV = "VAE_DATA_DIR"
MIRROR_ENV = "VAE_DATA_MIRROR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

IMAGE_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
LABEL_FILES = {"train": "train-labels-idx1-ubyte.gz", "test": "t10k-labels-idx1-ubyte.gz"}
FILES = (*IMAGE_FILES.values(), *LABEL_FILES.values())
"""A data directory holds the release's four files. The VAE reads no labels, but the label files are part
of the release: downloaded and checksummed with the images, they tell one dataset's files from another's."""

# SHA-256 of the official .gz files. Fashion-MNIST: the files of Debian's dataset-fashion-mnist, which are
# Zalando's release. MNIST: the files served by LeCun's page and its PyTorch mirror.
SHA256 = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
}

MIRRORS = {
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
}

IMAGE_SHAPE = (1, 28, 28)
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned-byte IDX with 3 dims (images) / 1 dim (labels)


class DataError(RuntimeError):
    """A data file is missing, corrupt, truncated or fails its checksum; the message names the file."""


@dataclass(frozen=True)
class Splits:
    """Images as float32 [N, 1, 28, 28] in [0, 1]."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def candidate_dirs(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    dirs = []
    if data_dir:
        dirs.append(Path(data_dir))
    if os.environ.get(DATA_DIR_ENV):
        dirs.append(Path(os.environ[DATA_DIR_ENV]))
    if dataset == "fashion-mnist":
        dirs.append(DEBIAN_DIR)
    dirs.append(Path("data") / dataset)
    return dirs


def find_data_dir(
    dataset: str,
    data_dir: str | os.PathLike[str] | None = None,
    prefer: str | os.PathLike[str] | None = None,
) -> Path:
    """The first candidate directory that holds all four files; an explicit `data_dir` must hold them.

    `prefer` (a checkpoint's recorded --data-dir) is tried first but may be gone: a run trained in a
    container under /data is evaluated on the host from the usual places."""
    if data_dir is not None:
        missing = [n for n in FILES if not (Path(data_dir) / n).is_file()]
        if missing:
            raise DataError(f"{data_dir} lacks {', '.join(missing)}")
        return _not_another_dataset(dataset, Path(data_dir))
    candidates = ([Path(prefer)] if prefer else []) + candidate_dirs(dataset)
    for d in candidates:
        if all((d / n).is_file() for n in FILES):
            return _not_another_dataset(dataset, d)
    tried = ", ".join(str(d) for d in candidates)
    raise DataError(
        f"no {dataset} files found (looked in {tried}); run `python -m training download --dataset {dataset}`"
    )


def _not_another_dataset(dataset: str, directory: Path) -> Path:
    """`directory`, unless it holds another known dataset's files (MNIST's under --dataset fashion-mnist, say),
    which would train and be labelled as the wrong one. Files matching no table (a custom set) pass."""
    for other, table in SHA256.items():
        # the 5 KB test labels first: the 26 MB training images are hashed only if everything else matched
        files = sorted(table, key=lambda name: (directory / name).stat().st_size)
        if other != dataset and all(sha256_file(directory / name) == table[name] for name in files):
            raise DataError(
                f"{directory} holds the {other} files, not {dataset}'s: pass --dataset {other}, "
                f"or point --data-dir / ${DATA_DIR_ENV} at the {dataset} files"
            )
    return directory


def read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file of unsigned bytes; anything malformed raises DataError naming the file."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot decompress ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    ndim = raw[3]
    if ndim not in _IDX_MAGIC or magic != _IDX_MAGIC[ndim]:
        raise DataError(f"{path}: bad IDX magic number {magic:#010x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{path}: header says {shape} ({expected} bytes), file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_split(directory: Path, split: str) -> torch.Tensor:
    """The "train" or "test" images as float32 [N, 1, 28, 28] in [0, 1]."""
    image_file = directory / IMAGE_FILES[split]
    images = read_idx(image_file)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[1:]:
        raise DataError(f"{image_file}: expected [N, 28, 28] images, got {list(images.shape)}")
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # [N, 28, 28] -> [N, 1, 28, 28]


def load_splits(
    dataset: str, data_dir: str | None = None, val_size: int = 5000, seed: int = 0, train_subset: int = 0
) -> Splits:
    """Train/validation/test; the validation images are a seeded random draw from the training file."""
    directory = find_data_dir(dataset, data_dir)
    x = load_split(directory, "train")
    if train_subset:
        x = x[:train_subset]
    if val_size >= len(x):
        raise DataError(f"val_size {val_size} leaves no training images out of {len(x)}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return Splits(x[train_idx], x[val_idx], load_split(directory, "test"))


# The fixed binarization of the evaluation images, in numpy so that anyone can repeat it without torch (the
# tests re-derive the shipped figures with numpy and onnxruntime alone). PCG64's stream for a seed is stable
# across numpy versions and machines.
BINARIZATION_METHOD = "numpy.random.default_rng(seed).random(x.shape) < x, x = pixels / 255 as float32"
VAL_SEED_OFFSET = 1  # the validation images use binarize_seed + 1: not the same noise as the test images


def binarize_fixed(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Binary images b ~ Bernoulli(x) drawn once from `seed`: x [N, 1, 28, 28] in [0, 1] -> {0, 1} float32.

    The same (x, seed) always gives the same images, which is what makes an NLL on them repeatable."""
    u = np.random.default_rng(seed).random(tuple(x.shape))  # float64 uniforms in [0, 1)
    return torch.from_numpy(u < x.double().numpy()).to(torch.float32)


def binarized_sha256(b: torch.Tensor) -> str:
    """SHA-256 of binary images as uint8 0/1 bytes in C order: names one binarization exactly."""
    return hashlib.sha256(b.to(torch.uint8).numpy().tobytes()).hexdigest()


def download(dataset: str, dest: Path, mirrors: list[str] | None = None, timeout: float = 60.0) -> list[Path]:
    """Fetch the four files into `dest`, trying each mirror in turn; keep a file only if its SHA-256 matches.

    Files already present with the right checksum are not fetched again. Downloads land in a temporary file
    that is renamed into place after verification, so a failed or tampered transfer never leaves a file that
    later looks valid. Mirrors default to `$VAE_DATA_MIRROR` (one base URL) or the official ones.
    """
    if mirrors is None:
        env = os.environ.get(MIRROR_ENV)
        mirrors = [env] if env else list(MIRRORS[dataset])
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, expected in SHA256[dataset].items():
        target = dest / name
        if target.is_file() and sha256_file(target) == expected:
            paths.append(target)
            continue
        errors = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + name
            fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                    shutil.copyfileobj(response, out)
                actual = sha256_file(tmp)
                if actual != expected:
                    errors.append(f"{url}: sha256 {actual} != expected {expected}")
                    continue
                tmp.replace(target)
                break
            except OSError as e:  # URLError and HTTPError are OSErrors
                errors.append(f"{url}: {e}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise DataError(f"could not fetch {name}: " + "; ".join(errors))
        paths.append(target)
    return paths
