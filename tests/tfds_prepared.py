"""Writes tiny *prepared* TFDS data sets (array_record) without TensorFlow.

Unlike `tfds.testing.mock_data`, what this writes is read by the real
`tfds.data_source` code path: dataset_info.json, array_record shards and
example deserialization. Records are given already encoded (PNG bytes for an
`Image`, bytes for `Text`, ints for `ClassLabel`), since encoding images needs
TensorFlow. Relies on tfds internals (4.9.x): test helper only.
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import splits as splits_lib


def write_prepared(
    name: str,
    data_dir: str | os.PathLike[str],
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
) -> None:
  """Prepares TFDS data set `name` under `data_dir`, one shard per split."""
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  serializer = example_serializer.ExampleSerializer(
      builder.info.features.get_serialized_info())
  os.makedirs(builder.data_dir, exist_ok=True)
  infos = []
  for split, records in splits.items():
    shard = f"{builder.name}-{split}.array_record-00000-of-00001"
    writer = array_record_module.ArrayRecordWriter(
        os.path.join(builder.data_dir, shard), "group_size:1")
    for record in records:
      writer.write(serializer.serialize_example(dict(record)))
    writer.close()
    infos.append(splits_lib.SplitInfo(
        name=split, shard_lengths=[len(records)], num_bytes=0,
        filename_template=None))
  builder.info.set_splits(splits_lib.SplitDict(infos))
  builder.info.set_file_format("array_record")
  builder.info.write_to_directory(builder.data_dir)
