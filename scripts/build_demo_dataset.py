"""Rebuild argen's bundled demo dataset (emoji at 64x64 on white) from the npm emoji-datasource packages.

Usage: python scripts/build_demo_dataset.py [--out src/argen/data/demo] [--cache DIR]

Steps: `npm pack` the two pinned packages into a temp (or cache) folder, check the tarballs' sha256,
read `emoji.json` (the 1,911 base emoji; skin-tone variants are left out) and `img/<vendor>/64/<image>`,
composite each RGBA image on white, and write `emoji64.npz` (uint8, written byte-for-byte reproducibly)
plus `README.md` with provenance, checksums and licence notices. The train/val split is a fixed
function of each emoji's code point sequence, so both vendors' images of one emoji share a split.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGES = {
    "twitter": ("emoji-datasource-twitter", "16.0.0",
                "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877"),
    "google": ("emoji-datasource-google", "16.0.0",
               "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"),
}
LICENCES = {
    "twitter": "Twemoji graphics (c) Twitter, Inc. and other contributors, licensed under CC-BY 4.0 "
               "(https://creativecommons.org/licenses/by/4.0/); source https://github.com/twitter/twemoji "
               "(now https://github.com/jdecked/twemoji).",
    "google": "Noto Emoji graphics (c) Google Inc., licensed under the Apache License 2.0 "
              "(https://www.apache.org/licenses/LICENSE-2.0); source https://github.com/googlefonts/noto-emoji.",
}
SIZE = 64
VAL_PERCENT = 10
NPZ_NAME = "emoji64.npz"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npm_pack(package: str, version: str, dest: Path) -> Path:
    tarball = dest / f"{package}-{version}.tgz"
    if not tarball.is_file():
        subprocess.run(["npm", "pack", f"{package}@{version}", "--silent", "--pack-destination", str(dest)],
                       check=True, stdout=subprocess.DEVNULL)
    return tarball


def is_val(unified: str) -> bool:
    return int(hashlib.sha256(unified.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def composite_on_white(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, image).convert("RGB"), dtype=np.uint8)  # (H, W, 3)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed but with fixed zip timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue(), compresslevel=9)


def build(work: Path, out: Path) -> dict:
    images, vendor, unified, names, short_names, category, subcategory, split = [], [], [], [], [], [], [], []
    provenance = {}
    for vendor_id, (vendor_name, (package, version, expected)) in enumerate(PACKAGES.items()):
        tarball = npm_pack(package, version, work)
        data = tarball.read_bytes()
        if sha256(data) != expected:
            sys.exit(f"{tarball.name}: sha256 {sha256(data)} does not match the pinned {expected}")
        provenance[vendor_name] = {"package": f"{package}@{version}", "tarball_sha256": expected}
        with tarfile.open(tarball) as archive:
            emoji = json.loads(archive.extractfile("package/emoji.json").read())
            emoji.sort(key=lambda e: e["sort_order"])
            for entry in emoji:
                if not entry.get(f"has_img_{vendor_name}"):
                    continue
                member = f"package/img/{vendor_name}/{SIZE}/{entry['image']}"
                images.append(composite_on_white(archive.extractfile(member).read()))
                vendor.append(vendor_id)
                unified.append(entry["unified"])
                names.append(entry["name"])
                short_names.append("|".join(entry["short_names"]))
                category.append(entry["category"])
                subcategory.append(entry["subcategory"])
                split.append(1 if is_val(entry["unified"]) else 0)
    category_names = sorted(set(category))
    subcategory_names = sorted(set(subcategory))
    arrays = {
        "images": np.stack(images),  # (N, 64, 64, 3) uint8
        "vendor": np.array(vendor, np.uint8),
        "vendor_names": np.array(list(PACKAGES)),
        "unified": np.array(unified),
        "names": np.array(names),
        "short_names": np.array(short_names),
        "category": np.array([category_names.index(c) for c in category], np.int16),
        "category_names": np.array(category_names),
        "subcategory": np.array([subcategory_names.index(c) for c in subcategory], np.int16),
        "subcategory_names": np.array(subcategory_names),
        "split": np.array(split, np.uint8),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_npz(out / NPZ_NAME, arrays)
    npz_sha = sha256((out / NPZ_NAME).read_bytes())
    counts = {"images": len(images), "train": int((arrays["split"] == 0).sum()), "val": int(arrays["split"].sum()),
              "categories": len(category_names), "subcategories": len(subcategory_names)}
    write_readme(out / "README.md", provenance, npz_sha, counts)
    return {"npz_sha256": npz_sha, **counts}


def write_readme(path: Path, provenance: dict, npz_sha: str, counts: dict) -> None:
    lines = [
        "# argen demo dataset: emoji at 64x64",
        "",
        f"`{NPZ_NAME}` holds {counts['images']} RGB images (uint8, NHWC, 64x64, composited on white): the "
        f"{counts['images'] // 2} base emoji (no skin-tone variants) of Unicode/emoji-datasource 16.0, "
        f"drawn by two vendors. Built by `scripts/build_demo_dataset.py`; do not edit by hand.",
        "",
        "Arrays: `images` (N,64,64,3) uint8; `vendor` (N,) uint8 into `vendor_names`; `unified` (code points); "
        "`names`; `short_names` ('|'-joined); `category` (N,) int16 into `category_names` "
        f"({counts['categories']}); `subcategory` (N,) int16 into `subcategory_names` "
        f"({counts['subcategories']}); `split` (N,) uint8, 0 = train ({counts['train']}), 1 = val ({counts['val']}).",
        "",
        f"Split: an emoji is in val when sha256(unified) mod 100 < {VAL_PERCENT}; both vendors' images of an "
        "emoji are always in the same split.",
        "",
        "## Provenance and checksums",
        "",
        f"- `{NPZ_NAME}` sha256 `{npz_sha}`",
    ]
    for vendor_name, info in provenance.items():
        lines.append(f"- {vendor_name}: npm `{info['package']}` (`npm pack`), tarball sha256 "
                     f"`{info['tarball_sha256']}`; images from `img/{vendor_name}/64/`, metadata from `emoji.json`")
    lines += ["", "## Licences", ""]
    for vendor_name in provenance:
        lines.append(f"- {vendor_name}: {LICENCES[vendor_name]}")
    lines += ["- Emoji metadata (names, categories) from emoji-datasource by Cal Henderson / iamcal, MIT licence "
              "(https://github.com/iamcal/emoji-data).",
              "- Changes: the 64x64 images were not resampled; only their alpha channel was composited onto white.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/argen/data/demo")
    parser.add_argument("--cache", type=Path, default=None, help="keep the npm tarballs here (default: temp dir)")
    args = parser.parse_args()
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
        print(json.dumps(build(args.cache, args.out), indent=2))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(build(Path(tmp), args.out), indent=2))


if __name__ == "__main__":
    main()
