"""The training core: local contrastive training steps (``train``) and the held-out evaluation
(``evaluate``: zero-shot AUC with intervals, the image-embedding probe, the prompt ceiling, retrieval)."""
