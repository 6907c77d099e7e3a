"""`check_shared` with two real gloo processes: ranks that see other run folders or other caches fail
before step 0, every rank with the same message; ranks that share both pass."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtkd_train.config import ConfigError
from mtkd_train.shared import check_shared


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Scenario = tuple[list[str], list[str]]  # per rank: the run folder, the cache fingerprint


def _rank(rank: int, port: int, scenarios: list[Scenario], result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    messages = []
    try:
        for outs, prints in scenarios:
            try:
                check_shared(Path(outs[rank]), prints[rank], rank=rank, world=2, device=torch.device("cpu"))
                messages.append("ok")
            except ConfigError as e:
                messages.append(str(e))
    finally:
        dist.destroy_process_group()
    Path(f"{result}.{rank}").write_text(json.dumps(messages))


def test_ranks_must_share_out_and_read_the_same_cache(tmp_path: Path) -> None:
    shared, elsewhere = str(tmp_path / "run"), str(tmp_path / "node2_run")
    scenarios = [([shared, shared], ["c", "c"]), ([shared, elsewhere], ["c", "c"]), ([shared, shared], ["c", "d"])]
    result = str(tmp_path / "result")
    mp.spawn(_rank, args=(_free_port(), scenarios, result), nprocs=2, join=True)
    (ok0, blind0, other0), (ok1, blind1, other1) = (json.loads(Path(f"{result}.{r}").read_text()) for r in range(2))
    assert ok0 == ok1 == "ok"
    assert list((tmp_path / "run").iterdir()) == []  # the marker is removed
    for blind in (blind0, blind1):
        assert "ranks [1]" in blind and "store every node shares" in blind, blind
    assert other0 == other1 and "ranks [1] read another cache" in other0
