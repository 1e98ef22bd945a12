"""Image editing with a trained generator and no further training: inpainting, outpainting and
conditional editing, by forcing the kept tokens (`argen.generate(..., forced_tokens=...)`).

- `edit(gpt, tokenizer, images, mask, cond, ...)` -> `EditResult` (`argen.editing.edit`): regenerate
  the masked tokens; the mask is rounded to whole tokens (any masked pixel regenerates its token).
- `extend(gpt, tokenizer, image, side, amount, cond, ...)` -> `ExtendResult` (`argen.editing.outpaint`):
  grow an image right, down or left (mirrored) with a sliding window; up is refused.
- `argen.editing.masks`: reading images and mask PNGs (alpha 0 or, without alpha, white = edited),
  boxes, and the pixel -> token rounding.
"""

from argen.editing.edit import EditResult, edit, encode_images, forced_tokens
from argen.editing.masks import box_mask, fit_image, mask_from_image, read_image, token_mask
from argen.editing.outpaint import ExtendResult, extend

__all__ = ["EditResult", "ExtendResult", "box_mask", "edit", "encode_images", "extend", "fit_image",
           "forced_tokens", "mask_from_image", "read_image", "token_mask"]
