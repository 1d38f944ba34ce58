"""Readers and writers of label maps, images and napari points CSV files (Qt-free)."""

from ._files import read_image, read_labels, read_points_csv, write_labels, write_points_csv

__all__ = ["read_image", "read_labels", "write_labels", "read_points_csv", "write_points_csv"]
