"""Image-conditioned adaption prompts (LLaMA-Adapter v1, Eqs. 9-10) and the image features that feed them.

A frozen image encoder gives global features at M scales, I_m (C_m,). They are concatenated and projected
to the model width by a small MLP, I_p = MLP([I_1; ...; I_M]) (dim,), repeated K times and added to the
adaption prompt of every adapted layer: P_l + repeat(I_p). Each sample then has its own prompt, which the
attention op takes as (B, Hkv, K, D) (`LLaMA.forward(prompt_offset=...)`; no per-sample Python loop).
The projector (`llama_adapter.adapter.VisualProjector`) lives on the model as `visual_proj` when
`AdapterConfig.visual_dim` is set, so it trains, saves and loads with the prompts and gates.

The encoder is pluggable and never downloaded. Features come from files (`ImageFeatures`):
  - one tensor for a data set: a .pt holding a tensor (N, ...) or {"features": (N, ...), "ids": [N names]}
    (what `extract-features` writes), or a .npy array (N, ...) with an optional FILE.ids.json list of names;
    without names, image i is called "i";
  - one file per image: a directory of <image id>.pt / <image id>.npy, each (M, C) or (C,).
or from a local CLIP directory through transformers' CLIPVisionModel (`ClipFeatureExtractor`).

Multi-scale choice. The paper takes CLIP's global features "at M scales" without fixing how. We take the
[CLS] token of M hidden layers of the one ViT (default: layers n/3, 2n/3 and n), each through CLIP's
post-layernorm, which for the last layer is exactly CLIP's pooled output; one forward pass gives all M.
Several input resolutions would cost M passes and need interpolated position embeddings, which a ViT was
not trained with. Every scale here has C = hidden_size; the projector accepts any M * C.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FEATURE_SUFFIXES = (".pt", ".npy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class FeatureError(ValueError):
    """Image features that cannot be used; the message names the file and the image."""


# ----------------------------------------------------------------------------- feature files
def _read_array(path: Path):
    """A .pt (tensor or {"features", "ids"}) or .npy file -> (tensor, ids or None)."""
    if path.suffix == ".npy":
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise FeatureError(f"{path}: not a numeric .npy array ({err})") from None
        return torch.from_numpy(np.ascontiguousarray(array)), None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        if "features" not in obj:
            raise FeatureError(f"{path}: a dict of features needs a 'features' tensor, got keys {sorted(obj)}")
        return obj["features"], obj.get("ids")
    return obj, None


def _check_tensor(t, path: Path, per_image: bool) -> torch.Tensor:
    want = "(M, C) or (C,)" if per_image else "(N, M, C) or (N, C)"
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise FeatureError(f"{path}: expected a floating point tensor {want}, got {getattr(t, 'dtype', type(t))}")
    if t.dim() not in ((1, 2) if per_image else (2, 3)):
        raise FeatureError(f"{path}: expected features of shape {want}, got {tuple(t.shape)}")
    return t


class ImageFeatures:
    """Precomputed global image features by image id; `[id]` -> (M*C,) float32, `stack(ids)` -> (B, M*C).

    expected_dim: the projector's input size (AdapterConfig.visual_dim); a file of another size is an error.
    """

    def __init__(self, path, expected_dim: int | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"image feature file or directory {self.path} does not exist")
        self._table: torch.Tensor | None = None
        self._index: dict[str, int] = {}
        self._files: dict[str, Path] = {}
        if self.path.is_dir():
            self._files = {f.stem: f for f in sorted(self.path.iterdir()) if f.suffix in FEATURE_SUFFIXES}
            if not self._files:
                raise FeatureError(f"{self.path} holds no {'/'.join(FEATURE_SUFFIXES)} feature files")
            first = next(iter(self._files.values()))
            self.shape = tuple(_check_tensor(_read_array(first)[0], first, per_image=True).shape)
        else:
            if self.path.suffix not in FEATURE_SUFFIXES:
                raise FeatureError(f"{self.path}: image features must be a .pt or .npy file or a directory")
            table, ids = _read_array(self.path)
            table = _check_tensor(table, self.path, per_image=False)
            if ids is None and self.path.suffix == ".npy" and self.ids_file(self.path).is_file():
                ids = json.loads(self.ids_file(self.path).read_text(encoding="utf-8"))
            ids = [str(i) for i in range(len(table))] if ids is None else [str(i) for i in ids]
            if len(ids) != len(table):
                raise FeatureError(f"{self.path}: {len(table)} feature rows but {len(ids)} image ids")
            if len(set(ids)) != len(ids):
                raise FeatureError(f"{self.path}: image ids are not unique")
            self._table, self._index = table.float(), {name: i for i, name in enumerate(ids)}
            self.shape = tuple(table.shape[1:])
        self.dim = int(torch.Size(self.shape).numel())
        if expected_dim is not None and self.dim != expected_dim:
            raise FeatureError(
                f"{self.path}: features have shape {self.shape} ({self.dim} values per image), "
                f"the model's projector expects {expected_dim} (AdapterConfig.visual_dim)"
            )

    @staticmethod
    def ids_file(npy_path) -> Path:
        return Path(f"{npy_path}.ids.json")

    @property
    def ids(self) -> list[str]:
        return list(self._index or self._files)

    def __len__(self) -> int:
        return len(self._index or self._files)

    def __contains__(self, image_id) -> bool:
        return str(image_id) in (self._index or self._files)

    def __getitem__(self, image_id) -> torch.Tensor:
        key = str(image_id)
        if self._table is not None:
            if key not in self._index:
                raise FeatureError(f"no features for image {key!r} in {self.path} ({len(self)} images)")
            return self._table[self._index[key]].flatten()
        if key not in self._files:
            raise FeatureError(f"no features for image {key!r} in {self.path} (expected {key}.pt or {key}.npy there)")
        file = self._files[key]
        t = _check_tensor(_read_array(file)[0], file, per_image=True)
        if tuple(t.shape) != self.shape:
            raise FeatureError(f"{file}: features of shape {tuple(t.shape)}, the other images' are {self.shape}")
        return t.float().flatten()

    def stack(self, image_ids) -> torch.Tensor:
        return torch.stack([self[i] for i in image_ids])  # (B, M*C)


def attach_image_features(examples: list[dict], path, expected_dim: int | None = None) -> int:
    """Give each instruction record the features of its "image" (zeros without one); returns the feature size.

    A record without an image gets zeros, so the projector's output for it is a learned "no image" offset.
    """
    store = ImageFeatures(path, expected_dim)
    blank = torch.zeros(store.dim)
    for i, example in enumerate(examples):
        image = example.get("image")
        if image is not None and image not in store:
            raise FeatureError(f"record {i} names image {image!r}, which has no features in {store.path}")
        example["image_features"] = blank if image is None else store[image]
    return store.dim


# ----------------------------------------------------------------------------- CLIP encoder
def default_layers(n_layers: int, scales: int = 3) -> list[int]:
    """Evenly spaced hidden layers ending with the last: (4, 8, 12) for CLIP ViT-B's 12."""
    return sorted({max(1, round(n_layers * (m + 1) / scales)) for m in range(scales)})


class ClipFeatureExtractor:
    """A local CLIP vision tower -> (B, M, C) global features: post-layernormed [CLS] of M hidden layers."""

    def __init__(self, clip_dir, layers: list[int] | None = None, device=None):
        from transformers import CLIPVisionModel

        clip_dir = Path(clip_dir)
        if not (clip_dir / "config.json").is_file():
            raise FileNotFoundError(f"{clip_dir} is not a CLIP model directory (no config.json)")
        self.model = CLIPVisionModel.from_pretrained(clip_dir).eval().to(device or "cpu")
        self.device = self.model.device
        n = self.model.config.num_hidden_layers
        self.layers = default_layers(n) if layers is None else list(layers)
        bad = [i for i in self.layers if not 1 <= i <= n]
        if bad:
            raise ValueError(f"CLIP layers must be in 1..{n} (the model's num_hidden_layers), got {bad}")
        self.processor = self._processor(clip_dir, self.model.config.image_size)

    @staticmethod
    def _processor(clip_dir: Path, image_size: int):
        try:  # transformers >= 5 without torchvision: the PIL backend, without its fallback warning
            from transformers import CLIPImageProcessorPil as Processor
        except ImportError:
            from transformers import CLIPImageProcessor as Processor
        if (clip_dir / "preprocessor_config.json").is_file():
            return Processor.from_pretrained(clip_dir)
        size = {"shortest_edge": image_size}
        return Processor(size=size, crop_size={"height": image_size, "width": image_size})

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        out = self.model(pixel_values=pixels.to(self.device, self.model.dtype), output_hidden_states=True)
        cls = torch.stack([out.hidden_states[i][:, 0] for i in self.layers], dim=1)  # (B, M, C)
        tower = getattr(self.model, "vision_model", self.model)  # transformers < 5 nests the tower
        return tower.post_layernorm(cls).float().cpu()


def expand_images(paths) -> list[Path]:
    """Image files from paths and directories (sorted); a missing file is an error before any model loads."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"image {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no images found in {[str(p) for p in paths]}")
    return files


def image_id(path: Path, naming: str) -> str:
    """stem: "cat" for a/cat.png; parent: "17" for images/test/17/image.png (ScienceQA's layout); path: as given."""
    return {"stem": path.stem, "parent": path.parent.name, "path": str(path)}[naming]


def extract_features(
    clip_dir,
    images,
    out,
    *,
    layers=None,
    batch_size: int = 16,
    naming: str = "stem",
    device=None,
    progress: bool = True,
) -> torch.Tensor:
    """Encode `images` with a local CLIP and write (N, M, C) features to `out` (.pt with ids, or .npy + ids)."""
    from PIL import Image
    from tqdm import tqdm

    out = Path(out)
    if out.suffix not in FEATURE_SUFFIXES:
        raise ValueError(f"--out must end in .pt or .npy, got {out}")
    files = expand_images(images)
    ids = [image_id(f, naming) for f in files]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"two images get the id {dup!r} with --ids {naming}; choose another naming")
    encoder = ClipFeatureExtractor(clip_dir, layers, device)
    chunks = []
    for start in tqdm(range(0, len(files), batch_size), desc="extract-features", unit="batch", disable=not progress):
        batch = []
        for f in files[start : start + batch_size]:
            with Image.open(f) as im:
                batch.append(im.convert("RGB"))
        chunks.append(encoder(batch))
    features = torch.cat(chunks)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt":
        torch.save({"features": features, "ids": ids, "layers": encoder.layers, "clip": str(clip_dir)}, out)
    else:
        import numpy as np

        np.save(out, features.numpy())
        ImageFeatures.ids_file(out).write_text(json.dumps(ids), encoding="utf-8")
    return features
