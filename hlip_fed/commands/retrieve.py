"""``hlip-fed retrieve``: rank reports for a study, or studies for a text, with a saved HLIP model."""

from __future__ import annotations

import argparse
import json

from hlip_fed.commands.predict import STUDY_HELP, add_model_args, setup_torch
from hlip_fed.errors import HlipError


def register(subparsers) -> None:
    p = subparsers.add_parser("retrieve", help="rank reports for a study (--query) or studies for a text (--text)",
                              description="Image-report retrieval by cosine similarity in HLIP's joint space. "
                              "--query STUDY --reports FILE_OR_DIR ranks reports for a study; "
                              "--text TEXT --studies PATH... ranks studies for a text. --cache FILE keeps "
                              "the corpus embeddings for the next call (re-embedding only what changed).")
    add_model_args(p)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--query", action="append", metavar="STUDY", help="study to find reports for (repeatable); " + STUDY_HELP)
    q.add_argument("--text", action="append", help="text to find studies for (repeatable)")
    p.add_argument("--reports", help="reports corpus: a folder (report.txt / *.txt), .jsonl {id, text}, .json {id: text} or one report per line")
    p.add_argument("--studies", nargs="+", metavar="PATH", help="studies corpus; " + STUDY_HELP)
    p.add_argument("--split", help="only this split of site folders and manifests")
    p.add_argument("-k", "--top", type=int, default=5, help="matches to show per query (default 5)")
    p.add_argument("--cache", help="embedding cache file for the corpus (created or updated)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hlip_fed.downstream.inference import embed_studies, find_studies, load_data_config, load_model
    from hlip_fed.downstream.retrieve import (EmbeddingCache, embed_report_corpus, embed_study_corpus,
                                              model_fingerprint, rank, read_reports)
    from hlip_fed.training.evaluate import embed_texts

    if args.top < 1:
        raise HlipError("-k must be at least 1")
    if args.query and not args.reports:
        raise HlipError("--query needs --reports FILE_OR_DIR to rank")
    if args.text and not args.studies:
        raise HlipError("--text needs --studies PATH... to rank")
    setup_torch(args)
    model, tokenizer = load_model(args.model)
    data_cfg = load_data_config(args.config)
    cache = EmbeddingCache(args.cache, model_fingerprint(args.model))
    results, skipped = [], {}
    if args.query:
        reports = read_reports(args.reports)
        corpus = embed_report_corpus(model, tokenizer, reports, cache)
        q_emb, q_studies, skipped = embed_studies(model, find_studies(args.query, args.split), data_cfg, desc="embedding queries")
        if not q_studies:
            raise HlipError("no query study could be read: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        scores, order = rank(q_emb, corpus, args.top)
        for study, sc, idx in zip(q_studies, scores, order):
            results.append({"query": study.study_id, "source": str(study.source), "matches": [
                {"rank": r + 1, "score": float(s), "id": reports[i][0], "text": reports[i][1]}
                for r, (s, i) in enumerate(zip(sc.tolist(), idx.tolist()))]})
        corpus_size = len(reports)
    else:
        corpus, kept, skipped = embed_study_corpus(model, find_studies(args.studies, args.split), data_cfg, cache)
        if not kept:
            raise HlipError("no study of the corpus could be read: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        scores, order = rank(embed_texts(model, tokenizer, args.text), corpus, args.top)
        for text, sc, idx in zip(args.text, scores, order):
            results.append({"query": text, "matches": [
                {"rank": r + 1, "score": float(s), "id": kept[i].study_id, "source": str(kept[i].source),
                 "text": kept[i].report} for r, (s, i) in enumerate(zip(sc.tolist(), idx.tolist()))]})
        corpus_size = len(kept)
    cache.save()
    out = {"corpus_size": corpus_size, "results": results, "skipped": skipped,
           "cache": {"path": args.cache, "reused": cache.hits, "embedded": cache.misses} if args.cache else None}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for res in results:
        print(f"query: {res['query']}")
        for m in res["matches"]:
            snippet = " ".join((m.get("text") or m.get("source") or "").split())
            snippet = snippet[:70] + ("..." if len(snippet) > 70 else "")
            print(f"  {m['rank']:>3}  {m['score']:+.3f}  {m['id']:<20}  {snippet}")
    for sid, why in skipped.items():
        print(f"skipped {sid}: {why}")
    if args.cache:
        print(f"corpus of {corpus_size}: {cache.hits} embeddings reused from {args.cache}, {cache.misses} computed")
    return 0
