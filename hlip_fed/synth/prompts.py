"""Zero-shot class prompts for the consortium's findings, in held-out wording.

The prompts name each finding with words no report template uses (tumour rather than mass or
neoplasm, bleed rather than haemorrhage, stroke rather than infarct, shrinkage rather than
atrophy), so a model that scores well zero-shot has learnt what the findings look like and how
language relates to it, not matched strings it saw in training reports. Each finding has several
positive and negative phrasings; evaluation averages their text embeddings.
"""

from __future__ import annotations

PROMPTS: dict[str, dict[str, list[str]]] = {
    "mass": {
        "positive": ["a brain tumour", "an intracranial tumor with swelling around it",
                     "a growth inside the brain"],
        "negative": ["no brain tumour", "no intracranial growth", "no tumor in the brain"],
    },
    "haemorrhage": {
        "positive": ["an intracranial bleed", "bleeding within the brain", "a brain bleed"],
        "negative": ["no intracranial bleed", "no bleeding within the brain", "no sign of a brain bleed"],
    },
    "infarct": {
        "positive": ["a stroke", "brain tissue dying from loss of blood supply", "signs of a recent stroke"],
        "negative": ["no stroke", "no sign of a recent stroke", "normal blood supply to the brain tissue"],
    },
    "atrophy": {
        "positive": ["brain shrinkage", "a shrunken brain with widened fluid spaces", "cerebral shrinkage"],
        "negative": ["no brain shrinkage", "normal brain volume for age", "fluid spaces of normal width"],
    },
}

# Words that make the prompts held out: none of them may appear in any generated report.
PROMPT_TERMS = ("tumour", "tumor", "growth", "bleed", "bleeding", "stroke", "shrinkage", "shrunken",
                "blood supply", "fluid spaces")
