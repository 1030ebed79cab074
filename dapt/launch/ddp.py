"""Data-parallel ranks for Hydra jobs, sharing the job's output folder.

Lightning starts DDP ranks by re-running the command line (``_SubprocessScriptLauncher``); under
``dapt train`` that fails: the console entry is not a script Lightning can re-run, and in a multirun
the re-run would repeat the whole sweep and write to ``hydra.run.dir`` instead of the job's folder.
So ``dapt train`` starts the local ranks itself, the way ``torchrun`` does: each child runs
``python -m dapt.cli train <this job's overrides> hydra.run.dir=<this job's folder>`` with
``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` set, and Lightning (seeing ``LOCAL_RANK``) only joins them.
Ranks started by a cluster (SLURM via ``submitit_slurm``, torchrun) are left alone.

``DAPT_RECORD_BLOCKS=1`` adds ``BlockRecorder``: every rank writes the hashes of the training blocks
it consumed to ``<run dir>/rank<k>_blocks.txt`` (a debug hook; the DDP test checks the ranks' data is
disjoint with it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)

RECORD_BLOCKS_ENV = "DAPT_RECORD_BLOCKS"
SIGNAL_ENV = "DAPT_DEBUG_SIGNAL"
# Strategies whose ranks are separate processes started from the command line (not spawn/fork).
_SCRIPT_STRATEGIES = ("ddp", "fsdp", "deepspeed")
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def local_process_count(trainer: dict[str, Any]) -> int:
    """How many processes ``trainer`` (the ``trainer`` config) runs on this machine."""
    devices = trainer.get("devices", 1)
    accelerator = str(trainer.get("accelerator", "auto"))
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1, None):
        if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.cuda.device_count()
        return 1
    return int(devices)


def starts_script_ranks(trainer: dict[str, Any]) -> bool:
    """True when Lightning would re-run the command line to start this trainer's local ranks."""
    strategy = trainer.get("strategy", "auto")
    name = strategy if isinstance(strategy, str) else ""
    if name in ("auto", ""):
        return isinstance(strategy, str) and local_process_count(trainer) > 1
    if any(name.startswith(s) for s in ("ddp_spawn", "ddp_fork", "ddp_notebook")):
        return False
    return name.startswith(_SCRIPT_STRATEGIES) and local_process_count(trainer) > 1


def ranks_started_externally() -> bool:
    """Ranks are already processes of their own (a launched child, torchrun, or a SLURM task)."""
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    try:
        from lightning_fabric.plugins.environments import SLURMEnvironment

        return SLURMEnvironment.detect()
    except Exception:  # noqa: BLE001
        return False


def secondary_rank_process() -> bool:
    """True in a process that is not global rank 0 of a data-parallel job, read from the environment
    that every launcher sets before the process starts (dapt's own local ranks: ``LOCAL_RANK``;
    torchrun: ``RANK``; other nodes: ``NODE_RANK``; SLURM tasks: ``SLURM_PROCID``), so it is known
    before Lightning has initialised anything."""
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "0").strip() or "0"
        if value.isdigit() and int(value) != 0:
            return True
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hydra_quoted(value: str | Path) -> str:
    """``value`` as a single-quoted Hydra override value (any path, spaces and quotes included)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def rank_overrides(overrides: list[str], run_dir: Path, checkpoint: Path | None, precision: str | None = None) -> list[str]:
    """The overrides of the other local ranks: the job's own, pointed at the run folder and checkpoint
    that rank 0 resolved (and locked), so that no rank searches for a run to resume by itself (two
    searches a moment apart can pick different runs, or one that another process holds), and at the
    precision rank 0 resolved (``trainer.precision=auto`` is not re-decided per rank)."""
    pinned = ("paths.output_dir=", "resume=", *(("trainer.precision=",) if precision else ()))
    own = [o for o in overrides if not o.lstrip("+~").startswith(pinned)]
    extra = [f"trainer.precision={precision}"] if precision else []
    return [*own, f"paths.output_dir={hydra_quoted(run_dir)}", f"resume={hydra_quoted(checkpoint) if checkpoint else 'never'}", *extra]


def rank_command(overrides: list[str], run_dir: Path, local_rank: int) -> list[str]:
    """The command line of local rank ``local_rank`` of a job with task ``overrides``."""
    return [
        sys.executable, "-m", "dapt.cli", "train", *overrides,
        f"hydra.run.dir={hydra_quoted(run_dir)}",
        "hydra.output_subdir=null",  # rank 0 already wrote .hydra/
        f"hydra.job.name=dapt_rank{local_rank}",  # its own log file in the shared folder
    ]


@contextlib.contextmanager
def local_ranks(trainer: dict[str, Any], run_dir: Path, overrides: list[str], cwd: str | None = None) -> Iterator[int]:
    """Start local ranks 1..n-1 of a script-launched DDP trainer; yields how many were started.

    The calling process becomes local rank 0. On exit the children are waited for (or stopped if
    rank 0 failed), the DDP environment variables are removed and the process group destroyed, so
    the next job of a sweep in the same process starts clean.
    """
    n = local_process_count(trainer)
    if not starts_script_ranks(trainer) or ranks_started_externally():
        yield 0
        return
    num_nodes = int(trainer.get("num_nodes", 1) or 1)
    saved = {k: os.environ.get(k) for k in _DDP_ENV}
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("NODE_RANK", "0")
    os.environ["WORLD_SIZE"] = str(n * num_nodes)
    os.environ["LOCAL_RANK"] = "0"
    procs: list[subprocess.Popen] = []
    die_with_parent = _die_with_parent_hook()
    for local_rank in range(1, n):
        env = {**os.environ, "LOCAL_RANK": str(local_rank)}
        env.pop("PL_GLOBAL_SEED", None)
        procs.append(subprocess.Popen(rank_command(overrides, run_dir, local_rank), env=env, cwd=cwd,
                                      preexec_fn=die_with_parent))
    log.info("started local ranks 1..%d (pids %s) in %s", n - 1, [p.pid for p in procs], run_dir)
    watcher = _RankWatcher(procs, run_dir)
    watcher.start()
    ok = False
    try:
        yield len(procs)
        ok = True
    finally:
        watcher.stop()
        failed = _finish(procs, wait=ok)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if ok and failed:
            from dapt.errors import TrainingError

            raise TrainingError(f"DDP rank(s) failed: {', '.join(failed)} (logs: {run_dir}/dapt_rank<k>.log)")


def _die_with_parent_hook() -> Any:
    """A ``preexec_fn`` making the kernel kill a child rank when rank 0 dies (Linux ``PR_SET_PDEATHSIG``);
    None elsewhere. Rank 0 killed by SIGKILL or the OOM killer cannot stop its children, which would
    otherwise wait in a collective until the process-group timeout (30 min), holding the machine.
    ``prctl`` is looked up here, in the parent (the child runs no dlopen between fork and exec), and the
    child exits at once if the parent already died before ``prctl`` took effect."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return hook


def _finish(procs: list[subprocess.Popen], *, wait: bool, timeout: float = 600.0) -> list[str]:
    failed = []
    deadline = time.time() + timeout
    for i, proc in enumerate(procs, start=1):
        if not wait:
            proc.terminate()
        try:
            code = proc.wait(timeout=max(deadline - time.time(), 1.0) if wait else 30.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if code != 0 and wait:
            failed.append(f"local rank {i} exit code {code}")
    return failed


class _RankWatcher(threading.Thread):
    """If a child rank dies, rank 0 would wait in a collective forever: record it and stop everything."""

    def __init__(self, procs: list[subprocess.Popen], run_dir: Path, period: float = 2.0) -> None:
        super().__init__(daemon=True, name="dapt-rank-watcher")
        self.procs, self.run_dir, self.period = procs, run_dir, period
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.wait(self.period):
            for i, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code not in (None, 0) and not self._stop.is_set():
                    from dapt.io import atomic_write_json

                    msg = f"local rank {i} exited with code {code}; stopping rank 0 (see {self.run_dir}/dapt_rank{i}.log)"
                    log.error(msg)
                    atomic_write_json(self.run_dir / "failure.json", {"error": "RankFailed", "message": msg})
                    for other in self.procs:
                        if other.poll() is None:
                            other.kill()
                    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- debug hook

def debug_callbacks(run_dir: Path) -> list[Any]:
    """Callbacks switched on by environment variables: ``DAPT_RECORD_BLOCKS=1`` (``BlockRecorder``)
    and ``DAPT_DEBUG_SIGNAL=<step>:<KILL|TERM|INT>`` (``SignalAtStep``, for fault-injection tests)."""
    callbacks: list[Any] = []
    if os.environ.get(RECORD_BLOCKS_ENV, "") not in ("", "0"):
        callbacks.append(BlockRecorder(run_dir))
    if os.environ.get(SIGNAL_ENV):
        callbacks.append(SignalAtStep.from_env(os.environ[SIGNAL_ENV]))
    return callbacks


def _block_hash(row: torch.Tensor) -> str:
    return hashlib.sha1(row.detach().to("cpu", torch.int64).numpy().tobytes()).hexdigest()[:16]


class BlockRecorder(pl.Callback):
    """Appends ``<step> <hash>`` for every training block this rank consumes to ``<run dir>/rank<k>_blocks.txt``.

    Batches arrive masked; the original block is rebuilt from the labels (which hold the original id
    at every masked position), so the hash identifies the block, not its random masking. Lines are
    written as each batch starts, so a killed run leaves its record; a resumed run appends to it
    after a line ``# resumed at step <n>``.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.hashes: list[str] = []

    def _path(self, trainer: Any) -> Path:
        return self.run_dir / f"rank{trainer.global_rank}_blocks.txt"

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if trainer.global_step == 0:  # a new run (not a resumed one) starts a new record
            self._path(trainer).write_text("")
        else:  # a resumed attempt: the lines after this one replace those from this step on
            with self._path(trainer).open("a") as f:
                f.write(f"# resumed at step {trainer.global_step}\n")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        ids, labels = batch["input_ids"], batch.get("labels")
        original = ids if labels is None else torch.where(labels >= 0, labels, ids)
        hashes = [_block_hash(row) for row in original]
        self.hashes.extend(hashes)
        with self._path(trainer).open("a") as f:
            f.write("".join(f"{trainer.global_step} {h}\n" for h in hashes))


class SignalAtStep(pl.Callback):
    """Sends this process a signal at the end of optimizer step ``step`` (fault-injection tests:
    a real SIGKILL/SIGTERM/SIGINT through the real handlers, at a reproducible point).
    ``<step>:<KILL|TERM|INT>[:<rank>]``: with a rank, only that global rank signals itself (what a
    scheduler that signals one process of a job does); without, every rank does."""

    def __init__(self, step: int, signum: int, rank: int | None = None) -> None:
        self.step = step
        self.signum = signum
        self.rank = rank
        self._sent = False

    @classmethod
    def from_env(cls, value: str) -> "SignalAtStep":
        step, name, rank = (value.split(":") + ["", ""])[:3]
        return cls(int(step), int(getattr(signal, f"SIG{name.upper() or 'KILL'}")), int(rank) if rank else None)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self._sent and self.rank in (None, trainer.global_rank):
            self._sent = True  # once, even if several batches (gradient accumulation) end at this step
            os.kill(os.getpid(), self.signum)
