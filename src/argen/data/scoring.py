"""Score tar shards with CLIP (image-text similarity) and LAION's aesthetic head into sidecars (the engine
behind `argen score-shards`).

Contract:
- `score_shards(dataset, clip, aesthetic=None, out=None, ...)` writes one sidecar per shard
  (`argen.data.sidecars`; next to the shard, or in `out`): for every sample with a decodable image,
  `similarity_field` (default `similarity`: cosine of the CLIP image embedding and the embedding of the
  sample's first caption; absent without a caption) and, with a head, `aesthetic_field` (default
  `AESTHETIC_SCORE`). A sample without an image or with an unreadable one is listed under `bad` with
  the reason and has no fields, so a filter counts it as missing. Every sample of the shard is scored:
  no filter applies here.
- Resumable per shard: a shard whose sidecar exists with the same scorers and fields is skipped; a
  sidecar made by other models or with other field names is refused (`ArgenError`: delete it or pass
  another `out`). Under torchrun rank r scores the shards `split_shards` gives it; a barrier precedes
  rank 0's summary. A bad tar stops the job with its name, or is skipped with `skip_bad_shards` (no
  sidecar, so a rerun tries it again).
- Returns (rank 0) {"shards", "scored" (shards done in this call), "samples", "bad", "fields", "scorers",
  "seconds", "samples_per_second"}; None on other ranks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from argen.data.extract import _barrier, dist_env
from argen.data.images import BadImage
from argen.data.shards import ShardDataset, ShardError, split_shards
from argen.data.sidecars import read_sidecar, sidecar_path, write_sidecar
from argen.utils.errors import ArgenError

log = logging.getLogger("argen.data")


def _score_batch(clip, aesthetic, batch: list, similarity_field: str, aesthetic_field: str, samples: dict) -> None:
    """batch: [(key, image, caption or None)] -> fields in `samples`."""
    images = clip.image_embeddings([image for _, image, _ in batch])  # (n, D)
    with_text = [i for i, (_, _, caption) in enumerate(batch) if caption]
    similarity = {}
    if with_text:
        texts = clip.text_embeddings([batch[i][2] for i in with_text])
        similarity = dict(zip(with_text, (images[with_text] * texts).sum(-1).tolist()))
    scores = aesthetic.score(images).tolist() if aesthetic is not None else None
    for i, (key, _, _) in enumerate(batch):
        fields = {}
        if i in similarity:
            fields[similarity_field] = round(similarity[i], 6)
        if scores is not None:
            fields[aesthetic_field] = round(scores[i], 6)
        samples[key] = fields


def score_shards(dataset: ShardDataset, clip, aesthetic=None, aesthetic_identity: dict | None = None,
                 out: str | Path | None = None, batch_size: int = 32, similarity_field: str = "similarity",
                 aesthetic_field: str = "AESTHETIC_SCORE", rank: int | None = None, world_size: int | None = None,
                 progress: bool = True) -> dict | None:
    env_rank, env_world = dist_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if out is not None:
        names = [p.stem for p in dataset.shards]
        if len(set(names)) != len(names):
            raise ArgenError(f"--out {out}: several shards share a name ({len(names) - len(set(names))} repeats); "
                             f"their sidecars would collide, so leave --out out to write them next to the shards")
        Path(out).mkdir(parents=True, exist_ok=True)
    scorers = {"clip": clip.identity, **({"aesthetic": aesthetic_identity} if aesthetic is not None else {})}
    fields = [similarity_field] + ([aesthetic_field] if aesthetic is not None else [])
    todo = []
    for s in split_shards(len(dataset.shards), rank, world_size):
        path = sidecar_path(dataset.shards[s], out)
        if path.is_file():
            old = read_sidecar(path)
            if old.get("scorers") == scorers and old.get("fields") == fields:
                continue
            raise ArgenError(f"{path} was made by other models or with other field names; delete it or pass "
                             f"another --out")
        todo.append(s)
    bar = tqdm(desc=f"score-shards[{rank}]", unit="img", disable=not progress)
    start, counted, bad_count = time.perf_counter(), 0, 0
    for s in todo:
        samples, bad, batch = {}, {}, []
        try:
            for sample in dataset.iter_shard(s, apply_filter=False):
                counted += 1
                try:
                    image = dataset.decode(sample)
                except BadImage as exc:
                    bad[sample.key] = str(exc)
                    samples[sample.key] = {}
                    continue
                batch.append((sample.key, image, sample.captions[0] if sample.captions else None))
                if len(batch) == batch_size:
                    _score_batch(clip, aesthetic, batch, similarity_field, aesthetic_field, samples)
                    bar.update(len(batch))
                    batch = []
            if batch:
                _score_batch(clip, aesthetic, batch, similarity_field, aesthetic_field, samples)
                bar.update(len(batch))
        except ShardError as exc:
            if not dataset.skip_bad_shards:
                raise
            log.warning("skipping shard %s: %s", dataset.shards[s], exc)
            continue
        bad_count += len(bad)
        path = write_sidecar(dataset.shards[s], out, scorers, fields, samples, bad)
        log.info("rank %d scored %s (%d samples, %d bad) -> %s", rank, dataset.names[s], len(samples), len(bad),
                 path)
    bar.close()
    seconds = time.perf_counter() - start
    _barrier(world_size)
    if rank != 0:
        return None
    return {"shards": len(dataset.shards), "scored": len(todo), "samples": counted, "bad": bad_count,
            "fields": fields, "scorers": scorers, "seconds": round(seconds, 3),
            "samples_per_second": round(counted / seconds, 2) if seconds > 0 and counted else None}
