"""Helpers shared by the benchmarks: machine description, tables, JSON, memory, a small consortium."""

from __future__ import annotations

import json
import os
import platform
import resource
import threading
import time
from pathlib import Path

import psutil

# --- reporting ---------------------------------------------------------------------------------


def machine() -> dict:
    import torch

    from hlip_fed.training.train import native_bf16

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the widest vector kernels torch runs here
        "bf16_native": native_bf16(),
        "memory_gb": round(total / 2**30, 1) if (total := mem_total_bytes()) else None,
    }
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table; ``columns`` holds ``(key, header, format)`` with format like ``.2f``."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            v = row.get(key)
            if v is None:
                cells.append("–")
            elif isinstance(v, (int, float)) and fmt:
                cells.append(format(v, fmt))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str | Path | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


# --- memory ------------------------------------------------------------------------------------


def mem_total_bytes() -> int:
    return psutil.virtual_memory().total


def mem_available_bytes() -> int:
    return psutil.virtual_memory().available


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs`` 5); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark (``VmHWM``, which psutil does not report), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def process_tree(root: int) -> list[psutil.Process]:
    """``root`` and all its descendants (none where ``root`` has exited)."""
    try:
        proc = psutil.Process(root)
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except psutil.Error:  # exited between listing and reading
        return 0


class TreeMemorySampler:
    """Samples the summed RSS of a process tree in a thread; ``peak`` is the largest sum seen.

    Pass extra PIDs (``also``) for processes that are detached from the tree, such as a daemon
    the root started. Summed RSS counts pages shared between processes once per process.
    """

    def __init__(self, root: int, interval: float = 0.2, also=None):
        self.root, self.interval, self.also = root, interval, also
        self.peak, self.peak_processes = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            procs = {p.pid: p for root in [self.root, *(self.also() if self.also else [])] for p in process_tree(root)}
            total = sum(_rss(p) for p in procs.values())
            if total > self.peak:
                self.peak, self.peak_processes = total, len(procs)
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Timer:
    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
