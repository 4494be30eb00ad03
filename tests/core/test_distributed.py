"""The one rule for joining a process group: join when the environment holds torch's env://
rendezvous (as torchrun and a spawning launcher set it), one rank included; else run alone."""
import socket

import pytest
import torch.distributed as dist

from advmoe.distributed import RENDEZVOUS, launched, setup, teardown
from advmoe.settings import ConfigError


@pytest.fixture
def no_launcher(monkeypatch):
    for name in (*RENDEZVOUS, "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    return monkeypatch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_plain_process_runs_alone(no_launcher):
    assert not launched()
    assert setup("cpu") == (0, 1, False)
    assert not dist.is_initialized()


@pytest.mark.parametrize("partial", [{"WORLD_SIZE": "1"}, {"WORLD_SIZE": "1", "RANK": "0"},
                                     {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}])
def test_a_partial_rendezvous_of_one_process_runs_alone(no_launcher, partial):
    for name, value in partial.items():
        no_launcher.setenv(name, value)
    assert setup("cpu") == (0, 1, False)
    assert not dist.is_initialized()


def test_several_ranks_without_an_address_are_refused(no_launcher):
    no_launcher.setenv("WORLD_SIZE", "2")
    no_launcher.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT not set"):
        setup("cpu")
    assert not dist.is_initialized()


def test_a_full_rendezvous_of_one_rank_joins_a_group_and_tears_it_down(no_launcher):
    no_launcher.setenv("RANK", "0")
    no_launcher.setenv("WORLD_SIZE", "1")
    no_launcher.setenv("MASTER_ADDR", "127.0.0.1")
    no_launcher.setenv("MASTER_PORT", str(free_port()))
    assert launched()
    rank, world, started = setup("cpu")
    try:
        assert (rank, world, started) == (0, 1, True)
        assert dist.get_backend() == "gloo"
        assert setup("cpu") == (0, 1, False)  # a group that exists is used, not started again
        teardown(False)  # not ours to end
        assert dist.is_initialized()
    finally:
        teardown(started)
    assert not dist.is_initialized()
