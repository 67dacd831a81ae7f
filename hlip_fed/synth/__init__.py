"""The phantom hospital consortium: a non-IID multi-site benchmark in real file formats.

Modules, in the order data flows through them:

* :mod:`~hlip_fed.synth.anatomy`: MNI152 brain + synthetic skull and scalp; subject transforms;
* :mod:`~hlip_fed.synth.findings`: the label names (:data:`FINDINGS`) and how findings are drawn;
* :mod:`~hlip_fed.synth.lesions`: tissue composition with lesions, mass effect and atrophy;
* :mod:`~hlip_fed.synth.contrasts`: CT/MR contrast physics and scanner effects;
* :mod:`~hlip_fed.synth.reports` and :mod:`~hlip_fed.synth.prompts`: report styles, held-out prompts;
* :mod:`~hlip_fed.synth.sites`: hospital archetypes and presets;
* :mod:`~hlip_fed.synth.render`, :mod:`~hlip_fed.synth.writer`, :mod:`~hlip_fed.synth.dicom`,
  :mod:`~hlip_fed.synth.consortium`: one study in memory, on disk, and the whole consortium;
* :mod:`~hlip_fed.synth.truth`: loaders for evaluation; :mod:`~hlip_fed.synth.preview` the picture;
  :mod:`~hlip_fed.synth.probe` the learnability probe.

See ``docs/consortium.md``.
"""

from hlip_fed.synth.findings import FINDINGS
from hlip_fed.synth.truth import load_prompts, load_records, load_truth

__all__ = ["FINDINGS", "load_prompts", "load_records", "load_truth"]
