"""Which errors mean "another process died or hung" (the one-line lost-contact message) and which are shown as
they are: an NCCL error is not by itself a lost peer."""

import pytest
import torch
import torch.distributed as dist

from alexdist.distributed.collectives import lost_peer
from alexdist.distributed.launcher import free_port


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("message, lost", [
    ("[gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:1234: Connection reset by peer", True),
    ("[c10d] Application timeout caused pair closure", True),
    ("Timed out waiting 10000ms for send operation to complete", True),
    ("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=42, OpType=ALLREDUCE) ran for 300012 "
     "milliseconds before timing out.", True),
    ("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error", True),
    ("NCCL error in: ProcessGroupNCCL.cpp:1970, invalid usage (run with NCCL_DEBUG=WARN for details)", False),
    ("NCCL error: unhandled cuda error (run with NCCL_DEBUG=INFO for details)", False),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
])
def test_a_collective_that_lost_its_peer_is_told_apart_from_other_errors(process_group, message, lost):
    assert lost_peer(RuntimeError(message)) is lost


def test_a_lost_rendezvous_store_is_a_lost_peer_and_nothing_is_without_a_group():
    assert lost_peer(dist.DistNetworkError("Connection closed by peer"))
    assert not lost_peer(RuntimeError("Connection reset by peer"))  # no process group: not a collective
    assert not lost_peer(ValueError("timeout"))
    assert torch.distributed.is_available()


