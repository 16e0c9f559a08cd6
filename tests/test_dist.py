"""alphadecay/dist.py: the process group each device gets (CUDA's NCCL runs in benchmarks/gpu_check.sh)."""

from datetime import timedelta

import pytest
import torch

from alphadecay import dist


@pytest.mark.parametrize("options, minutes", [({}, 10), ({"timeout_minutes": 2.5}, 2.5)])  # --dist_timeout
def test_nccl_is_bound_to_the_ranks_gpu_and_gloo_gets_no_device(monkeypatch, options, minutes):
    gpu = torch.device("cuda", 3)
    assert dist.process_group_options(gpu) == {"backend": "nccl", "device_id": gpu}
    assert dist.process_group_options(torch.device("cpu")) == {"backend": "gloo"}
    calls = []
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = dist.setup("cpu", **options)
    assert calls == [{"backend": "gloo", "rank": 1, "world_size": 2, "timeout": timedelta(minutes=minutes)}]
    assert (info.rank, info.local_rank, info.world_size, info.device) == (1, 1, 2, torch.device("cpu"))
