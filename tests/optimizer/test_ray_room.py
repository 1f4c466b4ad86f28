"""How kiln asks Ray for room: a GPU engine's replica takes a whole GPU and a CPU, so `--replicas 2` on a
one-GPU machine is refused at once, rather than a second replica waiting forever for a GPU that never
comes. Ray here is given logical GPUs (ray.init(num_gpus=1)): Ray places by those counts on a GPU
machine too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray")

from kiln.optimizer.errors import InputError  # noqa: E402
from kiln.optimizer.serve import cluster  # noqa: E402

GPU, CPU = SimpleNamespace(device="cuda"), SimpleNamespace(device="cpu")  # an engine manifest's device


@pytest.fixture
def one_gpu():
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def options(replicas: str, replica_cpus: float = 1.0) -> cluster.ServeOptions:
    low, high = cluster.replicas_range(replicas)
    return cluster.ServeOptions(min_replicas=low, max_replicas=high, replica_cpus=replica_cpus)


def test_a_gpu_replica_takes_a_whole_gpu_and_a_cpu_a_cpu_replica_its_replica_cpus():
    assert cluster.replica_resources(GPU, options("1", replica_cpus=3)) == {"num_gpus": 1, "num_cpus": 1}
    assert cluster.replica_resources(CPU, options("1", replica_cpus=3)) == {"num_cpus": 3}


def test_room_on_one_gpu(one_gpu):
    said = []
    cluster.check_room({"dit": GPU, "block": CPU}, options("1", replica_cpus=3), None, said.append)  # 1 GPU, 1 + 3 CPUs: fits
    assert said == []
    cluster.check_room({"dit": GPU}, options("1..2"), None, said.append)  # autoscaling past the GPUs: a warning
    assert said == ["warning: --replicas ..2 of 1 engine(s) (2 replicas) need 2 GPUs; the Ray cluster has 1: the rest wait until the cluster has room"]
    said.clear()
    cluster.check_room({"dit": GPU}, options("2"), "head:6379", said.append)  # a cluster joined may grow
    assert said == ["warning: --replicas 2 of 1 engine(s) (2 replicas) need 2 GPUs; the Ray cluster has 1: the rest wait until the cluster has room"]
    with pytest.raises(InputError) as refused:  # this machine cannot grow
        cluster.check_room({"dit": GPU}, options("2"), None, said.append)
    assert refused.value.message == "--replicas 2 of 1 engine(s) (2 replicas) need 2 GPUs; the Ray cluster has 1"
    assert not ray.is_initialized()  # refused: the Ray kiln started is stopped


def test_cpu_replicas_that_do_not_fit_are_refused(one_gpu):
    with pytest.raises(InputError) as refused:
        cluster.check_room({"a": CPU, "b": CPU}, options("2", replica_cpus=1.5), None, print)
    assert refused.value.message == "--replicas 2 of 2 engine(s) (4 replicas) need 6 CPUs; the Ray cluster has 4"
    assert "--replica-cpus" in refused.value.hint
