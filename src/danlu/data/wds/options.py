"""The recipe keys of data.name=wds (WebDataset tar shards), validated where the format is defined: a recipe sets
them as data.<key> (`--set data.label_key=json:label`), the data registry (danlu.data.datasets) checks them here.
Light on purpose: the recipe reads this without loading webdataset."""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator


class WdsOptions(BaseModel):
    """How tar shards are read: the label in each sample, the streams an epoch is cut into, where and how many
    decoders work, how long a loader may go without a batch."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    label_key: str = Field("cls", description=(
        "the label's file in a sample: cls, txt, another extension, or json:FIELD"))
    streams: int = Field(8, ge=1, description="the epoch's order is K streams; the number of processes must divide it")
    decode: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "auto: nvJPEG on a CUDA device, else Pillow threads"))
    workers: Optional[int] = Field(None, ge=1, description=(
        "decoders per process (default: every core): training batches decoded on the CPU in that many worker "
        "processes (a divisor of the process's streams), else threads"))
    timeout: float = Field(240.0, gt=0, description=(
        "seconds a loader may go without a batch (a decode process that hangs, a shard read that stalls) before the "
        "run stops, naming the shard and the batch. Generous: an epoch's first batch waits for data.streams shards "
        "read two at a time (8 of 256 MiB over a 10 MB/s link: about 2 minutes); below dist.timeout (300), so with "
        "several processes the rank whose data hangs says so before the others' collective gives up"))

    @field_validator("label_key")
    @classmethod
    def _label_key(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*|json:[^\s.]+(\.[^\s.]+)*", v):
            raise ValueError("expected a sample's file extension (cls, txt) or json:FIELD")
        return v
