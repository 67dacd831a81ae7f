"""Helpers shared by the benchmarks: machine description, tables, JSON, memory, a small consortium."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path

# --- reporting ---------------------------------------------------------------------------------


def machine() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
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


def _proc_kb(path: str, field: str) -> int | None:
    """A ``Field:  N kB`` line of a /proc file, in kB (None where /proc has no such line)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _status_kb(field: str, pid: int | str = "self") -> int | None:
    return _proc_kb(f"/proc/{pid}/status", field)


def mem_total_bytes() -> int | None:
    kb = _proc_kb("/proc/meminfo", "MemTotal")
    return kb * 1024 if kb is not None else None


def mem_available_bytes() -> int | None:
    kb = _proc_kb("/proc/meminfo", "MemAvailable")
    return kb * 1024 if kb is not None else None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kb * 1024


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs`` 5); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kb * 1024


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


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
            pids = set(process_tree(self.root))
            for extra in (self.also() if self.also else []):
                pids.update(process_tree(extra))
            total = sum((_status_kb("VmRSS", p) or 0) * 1024 for p in pids)
            if total > self.peak:
                self.peak, self.peak_processes = total, len(pids)
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
