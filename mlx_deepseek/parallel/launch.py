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
    if ranks is not None and backend == "ring":  # local ranks: ports that are free here
        cmd += ["--starting-port", str(free_port_range(ranks))]
    if python:
        cmd += ["--python", python]
    return cmd + ["--", *command]


def run_ranks(command: Sequence[str], ranks: Optional[int] = 2, hostfile: Optional[str] = None,
              backend: Optional[str] = None, timeout: Optional[float] = None, env: Optional[dict] = None,
              capture: bool = True) -> subprocess.CompletedProcess:
    """Run `command` on every rank through mlx.launch (one local rank: directly) and wait; raises with the
    ranks' output on failure."""
    single = hostfile is None and ranks == 1  # one local rank is a plain process (mlx.launch needs two)
    cmd = list(command) if single else launch_command(command, ranks if hostfile is None else None, hostfile, backend)
    r = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout, env=env)
    if r.returncode != 0 or (capture and "exited with code" in r.stderr):  # mlx.launch may exit 0 when a rank failed
        raise RuntimeError(f"{' '.join(command)} failed on the ranks (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


LAUNCH_FLAGS = ("--hostfile", "--ranks", "--backend")


def rank_command(argv: Sequence[str]) -> list[str]:
    """The command each rank runs for `mlx-deepseek ARGV`: the same, less the launch flags."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            rest.append(arg)
    return [sys.executable, "-m", "mlx_deepseek.cli", *rest]


def relaunch(argv: Sequence[str], ranks: Optional[int] = None, hostfile: Optional[str] = None,
             backend: Optional[str] = None) -> int:
    """Run `mlx-deepseek ARGV` on every rank through mlx.launch and wait. The ranks' output passes through
    (only rank 0 prints); returns the exit status."""
    return subprocess.run(launch_command(rank_command(argv), ranks, hostfile, backend)).returncode
