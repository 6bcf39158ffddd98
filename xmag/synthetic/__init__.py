"""Synthetic whole-slide images with ground truth, for tests and benchmarks.

`make_synthetic_slide` writes a pyramidal, JPEG-tiled TIFF that OpenSlide and
cuCIM both read as an Aperio SVS, and beside it the truth about what it shows:

    slide.svs            the slide (any suffix; readers detect the format by content)
    slide.tissue.png     0/255 tissue mask at `mask_um_per_px`
    slide.lesion.png     0/255 lesion mask at `mask_um_per_px`
    slide.json           sizes, resolution, seed, lesion boxes in level-0 pixels

Everything the slide shows is defined in physical space (micrometres), not in
pixels: the tissue outline is a smooth field on the mask grid, nuclei sit on a
micrometre lattice, stain textures have micrometre texels. A 20x slide of W x H
and a 40x slide of 2W x 2H with the same seed therefore show the same tissue,
the same lesions and the same nuclei, and their masks are identical.

Every pyramid level is rendered procedurally at its own resolution, one tile at
a time while the TIFF is written, so memory stays bounded (the largest arrays
are the mask-resolution fields) whatever the slide size.

The package, file by file:

- `scene`: the geometry, where tissue and lesions are (smooth fields, the masks).
- `stain`: the H&E rendering of any rectangle at any resolution (stains, nuclei, texture).
- `tiff_writer`: the Aperio-style pyramidal JPEG TIFF, written tile by tile.
- `slide`: `make_synthetic_slide`, which composes the three, and `SyntheticSlide`.
"""
