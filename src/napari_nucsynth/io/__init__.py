"""Readers and writers of label maps, images, napari points CSV files and the field's datasets (Qt-free)."""

from ._files import (
    read_image,
    read_labels,
    read_points_csv,
    write_labels,
    write_points_csv,
)
from .export import FORMATS, export_pairs, read_manifest, write_manifest
from .formats import (
    PANNUKE_CLASSES,
    Sample,
    find_pannuke_pair,
    find_tile,
    read_aperio_xml,
    read_coco,
    read_dsb,
    read_hovernet_mat,
    read_hovernet_npy,
    read_pair_folder,
    read_pannuke,
    rle_decode,
    rle_encode,
)

__all__ = [
    "FORMATS",
    "PANNUKE_CLASSES",
    "Sample",
    "export_pairs",
    "find_pannuke_pair",
    "find_tile",
    "read_aperio_xml",
    "read_coco",
    "read_dsb",
    "read_hovernet_mat",
    "read_hovernet_npy",
    "read_image",
    "read_labels",
    "read_manifest",
    "read_pair_folder",
    "read_pannuke",
    "read_points_csv",
    "rle_decode",
    "rle_encode",
    "write_labels",
    "write_manifest",
    "write_points_csv",
]
