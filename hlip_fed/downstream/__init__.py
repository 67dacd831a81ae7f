"""Uses of a saved model: loading it and embedding studies (``inference``), zero-shot prediction with
calibration (``predict``), retrieval (``retrieve``), patch-level explanations (``explain``) and few-shot
fine-tuning (``finetune``)."""
