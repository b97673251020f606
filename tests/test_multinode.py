"""Two machines, as torchrun sees them: two launchers (`--nnodes 2 --nproc_per_node 1`) meeting at a
c10d rendezvous on loopback, gloo between them, each with its own run folder as two machines
without a shared file system would have. The result equals one process on the same global batch
to fp32 rounding, and only the launcher that got rank 0 writes anything into its folder.
docs/install.md ("Two machines") is the user's version of this."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt_small.checkpoint import find_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "GLOO_SOCKET_IFNAME": "lo"}  # the loopback interface, as a real pair would name their NIC


@pytest.mark.slow
def test_two_nodes_on_loopback_match_one_process_on_the_same_global_batch(verse_data, tmp_path):
    common = ["--data", str(verse_data), "--preset", "tiny", "--max-steps", "4", "--eval-interval", "100",
              "--log-interval", "1", "--no-progress", "--set", "dropout=0", "--set", "final_eval=false",
              "--threads", "1", "--warmup-steps", "1"]
    port = _free_port()
    nodes = []
    for node in ("a", "b"):  # two launchers, as on two machines: each its own run folder
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "gpt-small-test",
               "--max_restarts", "0", "-m", "gpt_small", "train", "--out", str(tmp_path / node),
               "--batch-size", "4", *common]
        nodes.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=tmp_path))
    try:
        results = [p.communicate(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(nodes, results):
        assert p.returncode == 0, err[-3000:]
    written = [n for n in ("a", "b") if (tmp_path / n / "last").exists()]
    assert len(written) == 1, "exactly one node (rank 0) writes checkpoints"
    other = tmp_path / ({"a", "b"} - set(written)).pop()
    assert not other.exists() or list(other.iterdir()) == []  # the other node's folder stays empty
    run_config = json.loads((tmp_path / written[0] / "run_config.json").read_text())
    assert run_config["world_size"] == 2

    single = subprocess.run([sys.executable, "-m", "gpt_small", "train", "--out", str(tmp_path / "one"),
                             "--batch-size", "8", *common], env=_env(), capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    two = load_file(str(find_checkpoint(tmp_path / written[0], "last") / "model.safetensors"))
    one = load_file(str(find_checkpoint(tmp_path / "one", "last") / "model.safetensors"))
    assert two.keys() == one.keys()
    for k in one:  # fp32 rounding: the two halves' gradients are summed in another order
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
