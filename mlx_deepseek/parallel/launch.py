"""Starting ranks with `mlx.launch` (MLX's launcher: ring, JACCL, MPI or NCCL; a hostfile or N local ranks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Optional, Sequence

# The `mlx.launch` console script, run by this interpreter (so that every local rank uses the same Python).
MLX_LAUNCH = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; main()"]


def launched() -> bool:
    """True inside a rank that mlx.launch (or MPI) started."""
    return "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def free_port_range(n: int, start: int = 40000, stop: int = 60000) -> int:
    """The first port p in [start, stop) such that p .. p + n - 1 are all free on 127.0.0.1."""
    port = start
    while port + n <= stop:
        ok = True
        for p in range(port, port + n):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    port = p + 1
                    break
        if ok:
            return port
    raise RuntimeError(f"no {n} consecutive free ports in {start}..{stop}")


def launch_command(command: Sequence[str], ranks: Optional[int] = None, hostfile: Optional[str] = None,
                   backend: Optional[str] = None, python: Optional[str] = None) -> list[str]:
    """The mlx.launch command line that runs `command` on the hosts of `hostfile` (its backend, or
    `backend`), or on `ranks` local processes (ring backend over 127.0.0.1 unless `backend` says otherwise)."""
    if (ranks is None) == (hostfile is None):
        raise ValueError("give either a hostfile (several machines) or a number of local ranks")
    cmd = list(MLX_LAUNCH)
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    else:
        cmd += ["-n", str(ranks), "--hosts", "127.0.0.1"]
    backend = backend or (None if hostfile is not None else "ring")
    if backend:
        cmd += ["--backend", backend]
    if backend in (None, "ring"):
        cmd += ["--starting-port", str(free_port_range(ranks or 8))]
    if python:
        cmd += ["--python", python]
    return cmd + ["--", *command]


def run_ranks(command: Sequence[str], ranks: Optional[int] = 2, hostfile: Optional[str] = None,
              backend: Optional[str] = None, timeout: Optional[float] = None, env: Optional[dict] = None,
              capture: bool = True) -> subprocess.CompletedProcess:
    """Run `command` on every rank through mlx.launch and wait; raises with the ranks' output on failure."""
    cmd = launch_command(command, ranks if hostfile is None else None, hostfile, backend)
    r = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout, env=env)
    if r.returncode != 0 or (capture and "exited with code" in r.stderr):  # mlx.launch may exit 0 when a rank failed
        raise RuntimeError(f"{' '.join(command)} failed on the ranks (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r
