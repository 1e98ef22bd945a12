"""CLIP score of generated images against their prompts, through torchmetrics' `CLIPScore`.

Contract:
- `clip_score(batch, prompts, clip, batch_size=50)`: `batch` an `ImageBatchFile` (uint8 (N, H, W, 3)),
  `prompts` a list with the prompt of every image in order (len N), `clip` an `argen.models.clip.Clip`
  (a local model, nothing downloaded). `clip_score` is torchmetrics' `CLIPScore` (100 x cosine of the
  CLIP image and text embeddings, averaged over the images and floored at 0), given the local model and
  its processor through the callable torchmetrics accepts; the only argen code on the path is a view of
  the model whose feature methods return tensors (`Clip.tensor_features_model`), which transformers 5 no
  longer does. Prompts longer than CLIP's 77 tokens are truncated by torchmetrics (with its warning).
- torchmetrics (1.9) floors the mean, while Hessel et al. floor each image's score before averaging; the
  two agree unless some image-prompt cosine is negative (which real CLIP models on real pairs practically
  never give). So the same pass also records, from the features torchmetrics computed,
  `clip_negative_pairs` (how many cosines were negative) and `clip_score_per_image_floor` (the mean of
  max(100 x cosine, 0)); when they differ a warning is logged.
- Returns {"clip_score", "clip_score_per_image_floor", "clip_negative_pairs", "clip_model" (the CLIP's
  identity: name, path, sha256 of the weights), "clip_num_samples", "clip_definition"}.
- `read_prompts_for(batch, prompts_path=None)`: the prompts of a sample batch: `prompts_path` (one
  prompt per line, or a JSON list, or COCO captions JSON), else `prompts.json` beside the npz (written by
  `argen sample-batch --captions`), indexed by the batch's `prompt_index` when it has one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from argen.data.caption_files import read_captions
from argen.evaluation.npz import ImageBatchFile
from argen.utils.errors import ArgenError

DEFINITION = "torchmetrics CLIPScore: max(mean over images of 100 * cos(image, text), 0)"
PROMPTS_FILE = "prompts.json"
INDEX_KEY = "prompt_index"  # what sample-batch stores for t2i batches: image i -> its caption row
log = logging.getLogger("argen.evaluation")


def clip_score(batch: ImageBatchFile, prompts: list[str], clip, batch_size: int = 50, progress: bool = False) -> dict:
    from torchmetrics.multimodal.clip_score import CLIPScore
    from tqdm.auto import tqdm

    n = int(batch.shape[0])
    if len(prompts) != n:
        raise ArgenError(f"{batch.path} holds {n} images but {len(prompts)} prompts were given; CLIP score pairs "
                         f"image i with prompt i")
    model = clip.tensor_features_model()
    metric = CLIPScore(model_name_or_path=lambda: (model, clip.processor))
    bar = tqdm(total=n, desc="clip-score", unit="img", disable=not progress)
    with torch.no_grad():
        start, floored, negative = 0, 0.0, 0
        for images in batch.iter_batches(batch_size):  # (b, H, W, 3) uint8
            chunk = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # (b, 3, H, W)
            metric.update(list(chunk), prompts[start:start + len(images)])
            cos = torch.nn.functional.cosine_similarity(model.last["image"], model.last["text"], dim=-1)  # (b,)
            floored += float((100 * cos).clamp(min=0).sum())
            negative += int((cos < 0).sum())
            start += len(images)
            bar.update(len(images))
    bar.close()
    score = float(metric.compute())
    if negative:
        log.warning("%d of %d image-prompt cosines are negative: torchmetrics' CLIP score (mean, then floored) is "
                    "%.4f, floored per image it is %.4f", negative, n, score, floored / n)
    return {"clip_score": score, "clip_score_per_image_floor": floored / n, "clip_negative_pairs": negative,
            "clip_model": clip.identity, "clip_num_samples": n, "clip_definition": DEFINITION}


def read_prompts_for(batch: ImageBatchFile, prompts_path: str | Path | None = None) -> list[str]:
    samples_path = batch.path
    if prompts_path is None:
        default = samples_path.parent / PROMPTS_FILE
        if not default.is_file():
            raise ArgenError(f"CLIP score needs the prompts of {samples_path}: pass --prompts FILE (one per line, or "
                             f"COCO captions JSON), or make the batch with `argen sample-batch --captions`, which "
                             f"writes {PROMPTS_FILE} beside it")
        prompts_path = default
    prompts = read_captions(prompts_path)
    index = batch.load(INDEX_KEY) if batch.has(INDEX_KEY) and Path(prompts_path).name == PROMPTS_FILE else None
    if index is None:
        return prompts
    if index.size and (index.min() < 0 or index.max() >= len(prompts)):
        raise ArgenError(f"{samples_path}'s {INDEX_KEY} points past the {len(prompts)} prompts of "
                         f"{prompts_path}")
    return [prompts[int(i)] for i in index]
