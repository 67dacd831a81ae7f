"""Image-report retrieval with a saved HLIP model: a study against reports, text against studies.

Both directions rank a corpus by cosine similarity in HLIP's joint space. Embedding a corpus of
studies is the slow part (every scan is read and preprocessed), so corpus embeddings can be kept in
a cache file and reused: an entry is valid while the model weights, the data settings and the
entry's files (size and modification time of every scan) or text are unchanged; anything else is
re-embedded and the file rewritten. The cache stores embeddings only, never images or reports'
text, so it is no more sensitive than the model's output.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from hlip_fed.atomic import write_atomic
from hlip_fed.config import config_hash
from hlip_fed.data.manifest import MANIFEST_NAME, read_manifest
from hlip_fed.downstream.inference import embed_studies
from hlip_fed.errors import HlipError
from hlip_fed.training.evaluate import embed_texts

CACHE_VERSION = 1


# --- corpora ---------------------------------------------------------------------------------
def read_reports(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(id, text)`` pairs from a reports file or folder.

    * ``.jsonl``: one object per line with ``id`` (or ``study_id``) and ``text`` (or ``report``),
    * ``.json``: an object ``{id: text}``,
    * any other file: one report per non-empty line, ids ``line-1``, ``line-2``, ...,
    * a folder: every ``report.txt`` below it (id: its study folder's name) and every other
      ``*.txt`` (id: the file name without ``.txt``), plus ``report_text`` entries of site
      manifests for studies without a report file.
    """
    p = Path(path)
    if not p.exists():
        raise HlipError(f"{p}: reports file or folder not found")
    out: list[tuple[str, str]] = []
    if p.is_dir():

        for f in sorted(p.rglob("*.txt")):
            if any(part.startswith(".") for part in f.relative_to(p).parts):
                continue
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                out.append((f.parent.name if f.name == "report.txt" else f.stem, text))
        have = {i for i, _ in out}
        for m in sorted(p.rglob(MANIFEST_NAME)):
            for e in read_manifest(m):
                if not e.get("report") and e.get("report_text") and e["study_id"] not in have:
                    out.append((e["study_id"], str(e["report_text"]).strip()))
    elif p.suffix == ".jsonl":
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.append((str(rec.get("id", rec.get("study_id", f"line-{n}"))), str(rec.get("text", rec["report"]))))
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise HlipError(f"{p}: line {n}: needs a JSON object with text (or report)") from None
    elif p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise HlipError(f"{p}: not JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise HlipError(f"{p}: a JSON reports file must map ids to report texts")
        out = [(str(k), str(v)) for k, v in data.items()]
    else:
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
        out = [(f"line-{n}", t.strip()) for n, t in enumerate(lines, 1) if t.strip()]
    if not out:
        raise HlipError(f"{p}: holds no reports")
    return out


# --- the embedding cache ---------------------------------------------------------------------
def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """Digest of the saved weights and config: a cache made with other weights is never reused."""
    h = hashlib.sha256()
    for name in ("config.yaml", "model.safetensors"):
        with open(Path(model_dir) / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:24]


def _study_stamp(study, data_hash: str) -> tuple[str, str]:
    """(key, stamp) of a study: its resolved scan paths; their sizes and mtimes plus data settings."""
    paths = [Path(s).resolve() for s in study.scans]
    key = "study:" + "|".join(map(str, paths))
    parts = [data_hash]
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return key, hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


class EmbeddingCache:
    """A file of ``key -> (stamp, embedding)`` for one model; see the module docstring."""

    def __init__(self, path: str | os.PathLike | None, fingerprint: str):
        self.path = Path(path) if path else None
        self.fingerprint = fingerprint
        self.entries: dict[str, tuple[str, torch.Tensor]] = {}
        self.hits = self.misses = 0
        if self.path and self.path.is_file():
            try:
                data = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt, not fatal
                raise HlipError(f"{self.path}: not an embedding cache ({type(exc).__name__}); delete it") from None
            if data.get("version") == CACHE_VERSION and data.get("model") == fingerprint:
                self.entries = {k: (s, e) for k, (s, e) in zip(data["keys"], zip(data["stamps"], data["embeddings"]))}

    def get(self, key: str, stamp: str) -> torch.Tensor | None:
        hit = self.entries.get(key)
        if hit is not None and hit[0] == stamp:
            self.hits += 1
            return hit[1]
        self.misses += 1
        return None

    def put(self, key: str, stamp: str, emb: torch.Tensor) -> None:
        self.entries[key] = (stamp, emb.detach().float().cpu().clone())

    def save(self) -> None:
        if not self.path:
            return
        keys = sorted(self.entries)
        data = {"version": CACHE_VERSION, "model": self.fingerprint, "keys": keys,
                "stamps": [self.entries[k][0] for k in keys],
                "embeddings": [self.entries[k][1] for k in keys]}
        write_atomic(self.path, lambda tmp: torch.save(data, tmp))


def embed_report_corpus(model, tokenizer, reports: list[tuple[str, str]], cache: EmbeddingCache) -> torch.Tensor:
    keys = ["text:" + hashlib.sha256(t.encode()).hexdigest()[:32] for _, t in reports]
    out: list[torch.Tensor | None] = [cache.get(k, "") for k in keys]
    todo = [i for i, e in enumerate(out) if e is None]
    if todo:
        emb = embed_texts(model, tokenizer, [reports[i][1] for i in todo])
        for i, e in zip(todo, emb):
            out[i] = e
            cache.put(keys[i], "", e)
    return torch.stack(out)  # type: ignore[arg-type]


def embed_study_corpus(model, studies, data_cfg, cache: EmbeddingCache) -> tuple[torch.Tensor, list, dict]:
    """Embeddings of the readable studies (cached ones reused), those studies, and skipped ones."""

    data_hash = config_hash(data_cfg)
    stamps = [_study_stamp(s, data_hash) for s in studies]
    found = {i: cache.get(k, st) for i, (k, st) in enumerate(stamps)}
    todo = [studies[i] for i, e in found.items() if e is None]
    skipped: dict[str, str] = {}
    if todo:
        emb, kept, skipped = embed_studies(model, todo, data_cfg, desc="embedding corpus")
        by_id = {s.study_id: e for s, e in zip(kept, emb)}
        for i, s in enumerate(studies):
            if found[i] is None and s.study_id in by_id:
                found[i] = by_id[s.study_id]
                cache.put(*stamps[i], by_id[s.study_id])
    keep = [i for i in range(len(studies)) if found[i] is not None]
    if not keep:
        return torch.zeros(0, model.cfg.embed_dim), [], skipped
    return torch.stack([found[i] for i in keep]), [studies[i] for i in keep], skipped


# --- ranking ---------------------------------------------------------------------------------
def rank(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` ``(scores, indices)`` per query by cosine similarity (ties keep corpus order)."""
    sim = queries @ corpus.T
    k = min(k, corpus.shape[0])
    order = torch.argsort(-sim, dim=1, stable=True)[:, :k]
    return sim.gather(1, order), order
