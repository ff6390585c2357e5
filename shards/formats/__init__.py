"""Shard formats: what a sample of a split holds and how the reader decodes and batches it.

A split's manifest.json names its format ("format"); the reader looks the name up here and asks
the format everything that differs between formats:

    name          the manifest's "format" value
    size_key      the manifest key that holds the image side length S
    members       the tar members of one sample (webdataset extensions)
    image_dims    2 (S x S images) or 3 (S^3 volumes)
    label_names   the names of the labels, from the manifest ("label_names"), else the default
    decoder       raw tar sample -> decoded sample (picklable, for loader workers)
    collate       decoded samples -> the format's own batch keys (labels, ids)
    eval_tensors  batch tensors an evaluation gathers for scoring; eval_lists: their strings
    encode        the writer's side: one record's fields -> a tar sample

Two formats exist; a new dataset is an adapter that writes one of them (docs/DATASETS.md), and
only data whose batch keys differ needs a new format:

    medalign-ad-v1   shards/formats/volume_class.py   3-D volume, text, one class label
    medalign-cxr-v1  shards/formats/image_multilabel.py   2-D image, text, several binary labels

A manifest without "format" is read as medalign-ad-v1 (the first shards had none).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

DEFAULT_FORMAT = "medalign-ad-v1"


class ShardFormat:
    """The interface (see the module docstring); one subclass per format, registered by name."""

    name: ClassVar[str]
    size_key: ClassVar[str]
    members: ClassVar[tuple[str, ...]]
    image_dims: ClassVar[int]
    default_label_names: ClassVar[tuple[str, ...]] = ()
    eval_tensors: ClassVar[tuple[str, ...]]
    eval_lists: ClassVar[tuple[str, ...]]

    def label_names(self, manifest: dict[str, Any], where: str = "") -> list[str]:
        """The split's label names: the manifest's "label_names", else the format's default."""
        names = manifest.get("label_names", list(self.default_label_names))
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)
        ):
            raise ValueError(
                f"{where}: label_names {names!r}: expected a non-empty list of distinct names"
            )
        return list(names)

    def class_names(self, names: list[str], label_mode: str, where: str = "") -> list[str]:
        """What a classifier of this format predicts, named (the label names themselves)."""
        return list(names)

    def decoder(self, shards: Any, cfg: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
        raise NotImplementedError

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError


FORMATS: dict[str, ShardFormat] = {}


def register(cls: type[ShardFormat]) -> type[ShardFormat]:
    """Class decorator: the format becomes known to the reader and the writers by its name."""
    if cls.name in FORMATS:
        raise ValueError(f"shard format {cls.name!r} is registered twice")
    FORMATS[cls.name] = cls()
    return cls


def get_format(name: str, where: str = "") -> ShardFormat:
    """The registered format `name`; a ValueError naming `where` and the known formats if none."""
    if name not in FORMATS:
        raise ValueError(
            f"{where + ': ' if where else ''}unknown shard format {name!r}; this reader knows "
            f"{', '.join(sorted(FORMATS))}"
        )
    return FORMATS[name]


# The formats register themselves on import.
from shards.formats import image_multilabel, volume_class  # noqa: E402, F401
