"""`python -m infer_gpu segment`: cell and nucleus label maps plus an overlay for each image.

Writes, per image ID, into --out: `{ID}_cells.png` and `{ID}_nuclei.png` (16-bit label maps,
0 = background, a cell and its nucleus share the id) and `{ID}_overlay.png` (cell outlines
and ids over the RGB composite, nuclei outlined in cyan).

An image that cannot be read (a missing channel, a corrupt file; transient read errors are
retried first, see common.retry) is reported on stderr and skipped; every other image is still
written, and the command then exits 1 naming how many failed.
"""
from __future__ import annotations

import argparse
import sys

from common.segmentation import WORK_SIZE

HELP = "Segment images into cells and nuclei: writes {ID}_cells.png, {ID}_nuclei.png (uint16) and {ID}_overlay.png."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True,
                        help="folder or gs:// prefix with {ID}_{red,green,blue,yellow}.{png,tif,tif.gz,jpg} files")
    parser.add_argument("--ids", nargs="+", default=None,
                        help="image IDs to segment; none given = every ID that has a channel file in --images")
    parser.add_argument("--out", required=True, help="output folder or gs:// prefix")
    parser.add_argument("--backend", choices=("default", "hpa"), default="default",
                        help="'default': classical, no weights; 'hpa': HPA-Cell-Segmentation U-Nets "
                             "(needs torch, hpacellseg, --nuclei-model, --cell-model, --trust-model-files)")
    parser.add_argument("--nuclei-only", action="store_true",
                        help="segment nuclei only (reads only the blue channel); cells = nuclei")
    parser.add_argument("--work-size", type=int, default=WORK_SIZE,
                        help="long side (px) of the labelling's working resolution; 0 = full resolution (slow)")
    parser.add_argument("--nuclei-model", default=None, help="hpa backend: hpacellseg nucleus model file (.pth)")
    parser.add_argument("--cell-model", default=None, help="hpa backend: hpacellseg 3-channel cell model file (.pth)")
    parser.add_argument("--trust-model-files", action="store_true",
                        help="hpa backend: allow loading the .pth files, which are pickled code (only for files you trust)")
    parser.add_argument("--device", default=None,
                        help="hpa backend: 'cuda', 'cuda:N' or 'cpu'; none given = cuda when available")
    parser.add_argument("--batch-size", type=int, default=4, help="hpa backend: images per network batch")
    parser.add_argument("--no-overlay", action="store_true", help="skip the overlay PNGs")


def find_ids(source: str) -> list[str]:
    """Image IDs with at least one `{ID}_{channel}.{ext}` file in a folder or gs:// prefix, sorted."""
    from common import images, storage

    ids = set()
    for name in storage.listdir(source):
        low = name.lower()
        for ext in sorted(images.EXTENSIONS, key=len, reverse=True):
            if low.endswith(ext):
                stem = name[: -len(ext)]
                for channel in images.CHANNELS:
                    if stem.endswith("_" + channel) and len(stem) > len(channel) + 1:
                        ids.add(stem[: -len(channel) - 1])
                break
    return sorted(ids)


def _chunks(items, n):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def run(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from common import images, overlay, retry, storage
    from common import segmentation as seg

    ids = args.ids or find_ids(args.images)
    if not ids:
        print(f"error: no image files ({{ID}}_{{channel}}.png, ...) found in {args.images}", file=sys.stderr)
        return 2
    work_size = args.work_size or None
    options = {}
    if args.backend == "hpa":
        try:
            options = seg.backend_options("hpa", args.nuclei_model, args.cell_model, args.trust_model_files,
                                          device=args.device, nuclei_only=args.nuclei_only)
        except (ValueError, PermissionError, ImportError, FileNotFoundError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        options["batch_size"] = args.batch_size
    storage.makedirs(args.out)
    channels = ("blue",) if args.nuclei_only else images.CHANNELS
    total_cells = 0
    # Images are read one batch at a time, so the U-Nets see full batches and memory stays bounded.
    batch = args.batch_size if args.backend == "hpa" else 1
    failed: list[str] = []
    with tqdm(total=len(ids), desc="segment", unit="img") as bar:
        for chunk in _chunks(ids, batch):
            part, loaded = [], []
            for image_id in chunk:
                try:
                    loaded.append(retry.call(images.load_image, args.images, image_id, channels,
                                             what=f"image {image_id}"))
                    part.append(image_id)
                except Exception as err:  # noqa: BLE001 - only image-data and I/O errors pass
                    if not images.is_image_failure(err):
                        raise
                    failed.append(image_id)
                    tqdm.write(f"error: {image_id}: {err} (skipped)", file=sys.stderr)
                    bar.update(1)
            if not loaded:
                continue
            if args.nuclei_only:
                # A 4-channel frame with only blue filled, so overlays use the usual composite.
                full = []
                for im in loaded:
                    f = np.zeros(im.shape[:2] + (4,), np.uint8)
                    f[..., 2] = im[..., 0]
                    full.append(f)
                loaded = full
            results = _segment_many(loaded, args.backend, args.nuclei_only, work_size, options)
            for image_id, image, s in zip(part, loaded, results):
                seg.save_labels(storage.join(args.out, f"{image_id}_cells.png"), s.cells)
                seg.save_labels(storage.join(args.out, f"{image_id}_nuclei.png"), s.nuclei)
                if not args.no_overlay:
                    rgb = overlay.draw_overlay(image, s.cells, nuclei=s.nuclei, min_side=1024)
                    overlay.save_png(storage.join(args.out, f"{image_id}_overlay.png"), rgb)
                total_cells += s.num_cells
                bar.set_postfix(cells=s.num_cells)
                bar.update(1)
    print(f"segmented {len(ids) - len(failed)} images, {total_cells} cells -> {args.out}")
    if failed:
        print(f"error: {len(failed)} of {len(ids)} image(s) could not be read: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


def _segment_many(loaded, backend, nuclei_only, work_size, options):
    from common import segmentation as seg

    if backend == "hpa" and len(loaded) > 1:
        return seg.segment_batch(loaded, backend=backend, nuclei_only=nuclei_only,
                                 work_size=work_size, **options)
    return [seg.segment(im, backend=backend, nuclei_only=nuclei_only, work_size=work_size, **options)
            for im in loaded]
