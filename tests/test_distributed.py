"""Multi-process plumbing without a model: the launcher, joining a job (flags, environment, timeouts), the
config check across processes, data shards and their positions across a change of process count, and the
layout errors (nothing floored). The trained acceptance run is ``test_multihost.py``."""

import io
import os
import sys
import time

import numpy as np
import pytest

from selmerge_jax.data import TokenWindows
from selmerge_jax.data.tokenizer import ByteTokenizer
from selmerge_jax.main.launch_local import LaunchConfig, cli, free_port, process_env
from selmerge_jax.main.launch_local import main as launch
from selmerge_jax.sharding import distributed
from selmerge_jax.sharding.mesh import MeshConfig, data_shard, make_mesh, process_rows, shard_batch
from selmerge_jax.training import CheckpointConfig, OptimizerConfig, TrainConfig, train
from selmerge_jax.training.loop import _data_states, _my_data_state

TOKENS = (np.arange(40 * 17) % 50 + 1).astype(np.int32)


def _windows(**kw) -> TokenWindows:
    return TokenWindows(TOKENS, seq_len=16, bos_id=0, seed=3, **kw)


def _job(code: str, processes: int = 2, **kw) -> tuple[int, str, float]:
    out, start = io.StringIO(), time.monotonic()
    config = LaunchConfig(command=(sys.executable, "-c", code), processes=processes, timeout_s=60, **kw)
    status = launch(config, out=out)
    return status, out.getvalue(), time.monotonic() - start


def test_launcher_prefixes_output_and_kills_the_rest_when_one_fails(tmp_path):
    # p0 fails once p1 has said hello (under load, p1 could otherwise be killed before it starts talking)
    code = ("import os, time; i = int(os.environ['JAX_PROCESS_ID']); "
            "print('hello', i, os.environ['XLA_FLAGS'], flush=True); "
            f"flag = {str(tmp_path / 'p1_spoke')!r}\n"
            "if i: open(flag, 'w').close(); time.sleep(60)\n"
            "while not os.path.exists(flag): time.sleep(0.05)\n"
            "raise SystemExit(3)")
    status, out, seconds = _job(code, devices_per_process=3)
    assert status == 3 and seconds < 30, out
    # the launcher replaces the device-count flag and keeps the others (conftest's compile flags)
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    assert f"[p0] hello 0 {' '.join([*kept, '--xla_force_host_platform_device_count=3'])}\n" in out, out
    assert "[p1] hello 1" in out
    assert "p0 exited with status 3" in out and "job failed" in out
    env = process_env({"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=8"}, address="h:1",
                      processes=4, process_id=2, devices=2)
    assert env["XLA_FLAGS"] == "--a=1 --xla_force_host_platform_device_count=2"
    assert env["JAX_PROCESS_ID"] == "2" and env["JAX_NUM_PROCESSES"] == "4"
    assert cli(["--processes", "2"]) == 2  # no `--`: usage
    with pytest.raises(ValueError, match=r"LaunchConfig\.processes=0"):
        LaunchConfig(command=("true",), processes=0)


def test_mismatched_configs_fail_at_start_on_every_process():
    code = ("import os; from selmerge_jax.sharding import distributed\n"
            "pid = int(os.environ['JAX_PROCESS_ID'])\n"
            "main = distributed.entry_point(lambda c: print('MAIN' + 'RAN'))\n"
            "main({'train': {'steps': 10 + pid}, 'model': {'d': 4}, 'mesh': {'process_id': pid}})")
    status, out, _ = _job(code, kill_others=False)
    assert status != 0 and "MAINRAN" not in out, out
    assert out.count("process 1's config differs from process 0's in train.steps") == 2, out


def test_a_process_that_cannot_reach_the_coordinator_times_out_naming_the_address():
    address = f"127.0.0.1:{free_port()}"  # nobody listens
    mesh = MeshConfig(coordinator_address=address, num_processes=2, process_id=1, initialization_timeout_s=1)
    with pytest.raises(TimeoutError, match=f"could not reach the JAX coordinator at {address}"):
        distributed.initialize(mesh)  # fails before JAX is asked to join anything


def test_joining_needs_a_consistent_description(monkeypatch):
    for name in (distributed.ENV_ADDRESS, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize(MeshConfig()) is False  # one process: nothing to join
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "1")
    assert distributed.resolve(MeshConfig(process_id=0)) == (None, 2, 0)  # flags win over the environment
    with pytest.raises(ValueError, match="no coordinator"):
        distributed.initialize(MeshConfig())
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "x")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='x'"):
        distributed.resolve(MeshConfig())
    with pytest.raises(ValueError, match=r"MeshConfig\.process_id=2: must be an int in"):
        MeshConfig(num_processes=2, process_id=2)
    with pytest.raises(ValueError, match=r"MeshConfig\.coordinator_address='host'"):
        MeshConfig(coordinator_address="host")
    assert distributed.allgather_json({"a": b"\x00"}) == [{"a": b"\x00"}]


def test_layout_errors_name_the_value_and_nothing_is_floored(tmp_path):
    mesh = make_mesh(MeshConfig(data=2, seq=4))  # 8 host devices, one process
    assert process_rows(mesh, 6) == slice(0, 6) and data_shard(mesh, 6) == (0, 1)
    assert data_shard(None, 5) == (0, 1)
    with pytest.raises(ValueError, match=r"batch_size=3: must be a multiple of the mesh's data\*fsdp = 2"):
        data_shard(mesh, 3)
    with pytest.raises(ValueError, match="!= device count 8"):
        make_mesh(MeshConfig(data=3, seq=2))
    common = dict(optimizer=OptimizerConfig(), checkpoint=CheckpointConfig(), mesh=mesh)
    with pytest.raises(ValueError, match=r"train\.seq_len=30: must be a multiple of the mesh's seq axis = 4"):
        train(None, iter([]), train=TrainConfig(batch_size=2, seq_len=30, output_dir=str(tmp_path)), **common)
    with pytest.raises(ValueError, match=r"train\.batch_size=3"):
        train(None, iter([]), train=TrainConfig(batch_size=3, seq_len=32, output_dir=str(tmp_path)), **common)
    batch = {"tokens": np.arange(6 * 8).reshape(6, 8)}
    np.testing.assert_array_equal(np.asarray(shard_batch(batch, mesh)["tokens"]), batch["tokens"])


def test_token_windows_resume_under_another_shard_count_sees_every_window_once():
    single = _windows(batch_size=4)
    expected = [next(single)["inputs"] for _ in range(6)]
    shards = [_windows(batch_size=2, shard_index=i, shard_count=2) for i in range(2)]
    for step in range(3):  # the global batch, rows in order, does not depend on the shard count
        np.testing.assert_array_equal(np.concatenate([next(s)["inputs"] for s in shards]), expected[step])
    gathered = {"shard_count": 2, "shard_index": [0, 1], "process_states": [s.get_state() for s in shards]}
    resumed = _windows(batch_size=4)
    resumed.set_state(_my_data_state(gathered, (0, 1), resumed))
    for step in range(3, 6):
        np.testing.assert_array_equal(next(resumed)["inputs"], expected[step])
    rows = [r.tobytes() for b in expected for r in b]
    assert len(set(rows)) == len(rows)  # no window twice
    assert _data_states(single, (0, 1)) == {"shard_count": 1, "shard_index": [0],
                                            "process_states": [{"step": 6}]}
    assert _my_data_state({"step": 4}, (0, 1), single) == {"step": 4}  # a checkpoint of the older format


def test_pipelines_whose_position_is_per_shard_refuse_another_shard_count():
    gathered = {"shard_count": 2, "shard_index": [0, 1], "process_states": [{"step": 3}, {"step": 3}]}
    copy_rows = _windows(batch_size=4, copy_ratio=0.5, copy_period=(2, 4), tokenizer=ByteTokenizer())
    assert not copy_rows.reshardable and _windows(batch_size=4).reshardable
    with pytest.raises(ValueError, match="saved by 2 data shards and this run reads 1: TokenWindows"):
        _my_data_state(gathered, (0, 1), copy_rows)

    class Grain:  # the grain document pipeline: per-process positions, no `reshardable`
        pass

    with pytest.raises(ValueError, match="saved by 2 data shards and this run reads 4: Grain"):
        _my_data_state(gathered, (1, 4), Grain())
    assert _my_data_state(gathered, (1, 2), Grain()) == {"step": 3}  # same shard count: its own position


def test_the_summary_and_info_logs_are_written_once_per_job():
    code = ("import logging; from selmerge_jax.sharding import distributed\n"
            "from selmerge_jax.main.config import configure_logging, print_summary\n"
            "configure_logging()\n"
            "def main(config):\n"
            "    logging.getLogger('selmerge_jax.test').info('INFO' + 'LINE')\n"
            "    logging.getLogger('selmerge_jax.test').warning('WARN' + 'LINE')\n"
            "    print_summary({'primary': distributed.is_primary()})\n"
            "distributed.entry_point(main)({'mesh': {}})")
    status, out, _ = _job(code)
    assert status == 0, out
    assert out.count('SUMMARY {"primary": true}') == 1 and "primary\": false" not in out, out
    assert out.count("INFOLINE") == 1 and "[p0]" in out.split("INFOLINE")[0].splitlines()[-1], out
    assert out.count("WARNLINE") == 2, out  # what goes wrong is said by every process
    assert distributed.is_primary()  # a single-process run is its own primary
