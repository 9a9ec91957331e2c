"""Token datasets: image folders encoded once into LM token ids, stored as safetensors files.

`format`: the file (one dataset, or rank shards and their index), read and written whole or
streamed; `encode`: image folders into datasets. Whether a dataset's ids fit a model is
`lqae.provenance`.
"""

from lqae.tokendata.encode import TokenFileSummary, encode_folder, encode_folder_to_file
from lqae.tokendata.format import (
    FORMAT,
    TokenDataset,
    TokenDatasetWriter,
    check_overwritable,
    ids_dtype,
    is_token_dataset,
    read_token_dataset,
    shard_path,
    write_token_dataset,
    write_token_index,
)

__all__ = [
    "FORMAT",
    "TokenDataset",
    "TokenDatasetWriter",
    "TokenFileSummary",
    "check_overwritable",
    "encode_folder",
    "encode_folder_to_file",
    "ids_dtype",
    "is_token_dataset",
    "read_token_dataset",
    "shard_path",
    "write_token_dataset",
    "write_token_index",
]
