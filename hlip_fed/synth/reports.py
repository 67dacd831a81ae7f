"""Radiology reports written from the known findings, in each site's house style.

A report states every finding of its study once in the body (with side, lobe or territory, size
and the contrast-appropriate description) and, depending on the style, again in an impression;
it may list pertinent negatives, but only of findings the study does not have. Every sentence
speaks of at most one finding, so :func:`read_mentions`, a small rule-based reader, can recover
which findings a report asserts or denies (the tests use it to check the generator).

Styles differ in length (terse vs narrative), section headers, spelling (British vs American),
synonyms (mass / lesion / neoplasm, haemorrhage / haematoma, ...), how negatives are phrased and
how sizes are measured. The words in :data:`TEMPLATE_TERMS` are the only finding names reports
use; the zero-shot prompts (:mod:`hlip_fed.synth.prompts`) use none of them.
"""

from __future__ import annotations

import re

import numpy as np

from hlip_fed.synth.findings import FINDINGS, Finding

TEMPLATE_TERMS: dict[str, tuple[str, ...]] = {
    "mass": ("mass", "lesion", "neoplasm"),
    "haemorrhage": ("haemorrhage", "hemorrhage", "haematoma", "hematoma"),
    "infarct": ("infarct", "infarction", "ischaemic change", "ischemic change"),
    "atrophy": ("atrophy", "volume loss", "ventriculomegaly"),
}

STYLES: dict[str, dict] = {
    "terse": {
        "spelling": "uk", "mass": "mass", "haem": "haemorrhage", "infarct": "infarct", "atrophy": "atrophy",
        "measure": "cm", "negatives": 1.0, "neg": "No {term}.", "impression": False, "headers": None,
    },
    "narrative": {
        "spelling": "uk", "mass": "neoplasm", "haem": "haematoma", "infarct": "infarction", "atrophy": "volume loss",
        "measure": "cm_up_to", "negatives": 0.6, "neg": "There is no evidence of {term}.", "impression": True,
        "headers": ("CLINICAL HISTORY", "TECHNIQUE", "FINDINGS", "IMPRESSION"),
    },
    "sections": {
        "spelling": "us", "mass": "lesion", "haem": "hemorrhage", "infarct": "infarct", "atrophy": "atrophy",
        "measure": "mm", "negatives": 0.5, "neg": "Negative for {term}.", "impression": True,
        "headers": ("Indication", "Technique", "Findings", "Impression"),
    },
    "structured": {
        "spelling": "uk", "mass": "mass", "haem": "haemorrhage", "infarct": "ischaemic change", "atrophy": "ventriculomegaly",
        "measure": "cm", "negatives": 0.8, "neg": "{Term}: none.", "impression": True,
        "headers": ("Indication", "Sequences", "Report", "Conclusion"),
    },
}

_INDICATIONS = ("Headache.", "Dizziness.", "Follow-up imaging.", "Confusion.", "Fall at home.", "Seizure.",
                "Visual disturbance.", "Reduced consciousness.", "Memory complaints.", "Weakness.")
_SEQ_NAMES = {"T1": "T1-weighted", "T2": "T2-weighted", "FLAIR": "FLAIR", "T1C": "post-contrast T1-weighted"}
_TERRITORY = {"MCA": "middle cerebral artery", "ACA": "anterior cerebral artery",
              "PCA": "posterior cerebral artery", "lenticulostriate": "lenticulostriate"}
_NEG_CUES = re.compile(r"\b(no|not|without|negative for|none)\b", re.IGNORECASE)


def _us(text: str, spelling: str) -> str:
    if spelling != "us":
        return text
    for uk, us in (("oedema", "edema"), ("haem", "hem"), ("ischaem", "ischem"), ("tumour", "tumor"),
                   ("generalised", "generalized")):
        text = text.replace(uk, us)
    return text


def _size(f: Finding, style: dict) -> str:
    a, b = f.size_cm
    if style["measure"] == "mm":
        return f"{a * 10:.0f} x {b * 10:.0f} mm"
    if style["measure"] == "cm_up_to":
        return f"measuring up to {a:.1f} cm"
    return f"{a:.1f} x {b:.1f} cm"


def _where(f: Finding) -> str:
    if f.region == "basal ganglia":
        return f"{f.laterality} basal ganglia"
    if f.region == "cerebellum":
        return f"{f.laterality} cerebellar hemisphere"
    return f"{f.laterality} {f.region} lobe"


def _bright(sequences: list[str]) -> str:
    """The acquired fluid-sensitive sequences, e.g. "T2/FLAIR", for "hyperintense" phrases."""
    return "/".join(s for s in ("T2", "FLAIR") if s in sequences)


def _article(phrase: str) -> str:
    return ("An " if phrase[:1].lower() in "aeiou" else "A ") + phrase


def describe(f: Finding, modality: str, sequences: list[str], style: dict, rng: np.random.Generator) -> str:
    """One body sentence for finding ``f`` as this style would dictate it."""
    size = _size(f, style) if f.size_cm else ""
    sized = size
    if f.name == "mass":
        term = style["mass"]
        if modality == "CT":
            core = "hypodense centre and " if f.necrosis else ""
            text = (f"{_article(f'{sized} mildly hypodense {term}' if not sized.startswith('measuring') else f'mildly hypodense {term} {sized}')}"
                    f" in the {_where(f)}, with {core}surrounding hypodense oedema.")
        else:
            bright = _bright(sequences)
            if "T1C" in sequences:
                kind = "ring-enhancing" if f.necrosis else "avidly enhancing"
            else:
                kind = f"{bright.split(' and ')[0]} hyperintense" if bright else "T1 hypointense"
            oedema = f"surrounding {bright} hyperintense vasogenic oedema" if bright else "surrounding oedema"
            lead = f"{sized} {kind} {term}" if not sized.startswith("measuring") else f"{kind} {term} {sized}"
            necro = " and central necrosis" if f.necrosis and ("T1C" in sequences or "T2" in sequences) else ""
            text = f"{_article(lead)} in the {_where(f)} with {oedema}{necro}."
        if max(f.size_cm) >= 4.0:
            text = text[:-1] + ", exerting local mass effect."
    elif f.name == "haemorrhage":
        term = style["haem"]
        if modality == "CT":
            lead = f"acute hyperdense intraparenchymal {term}"
            text = f"{_article(lead)} in the {_where(f)}, {size}, with a thin rim of surrounding oedema."
        else:
            lead = f"intraparenchymal {term}"
            signal = [f"{s} hyperintense" for s in ("T1",) if s in sequences or "T1C" in sequences]
            signal += [f"{s} hypointense" for s in ("T2", "FLAIR") if s in sequences]
            text = (f"{_article(lead)} in the {_where(f)}, {size}, {' and '.join(signal)}, "
                    f"in keeping with early subacute blood products.")
    elif f.name == "infarct":
        term = style["infarct"]
        territory = f"{_TERRITORY[f.territory]} territory" if f.territory else "territory"
        if modality == "CT":
            text = (f"Hypodensity with loss of grey-white differentiation in the {f.laterality} {territory} "
                    f"({_where(f)}), consistent with {term}.")
        else:
            sig = f"{_bright(sequences)} hyperintense" if _bright(sequences) else "T1 hypointense"
            text = f"{sig} signal in the {f.laterality} {territory} ({_where(f)}), consistent with {term}."
    else:  # atrophy
        term = style["atrophy"]
        text = f"{(f.severity or 'moderate').capitalize()} generalised {term} with enlarged ventricles and prominent sulci."
    return _us(text, style["spelling"])


def _impression(f: Finding, style: dict) -> str:
    where = _where(f)
    if f.name == "mass":
        what = f"{where} {style['mass']} with oedema"
    elif f.name == "haemorrhage":
        what = f"{where} intraparenchymal {style['haem']}"
    elif f.name == "infarct":
        what = f"{f.laterality} {f.territory} territory {style['infarct']}"
    else:
        what = f"{f.severity} generalised {style['atrophy']}"
    return _us(what[0].upper() + what[1:] + ".", style["spelling"])


def _negative(name: str, style: dict) -> str:
    term = {"mass": style["mass"], "haemorrhage": style["haem"], "infarct": style["infarct"],
            "atrophy": style["atrophy"]}[name]
    if name == "mass" and term == "lesion":
        term = "mass lesion"
    text = style["neg"].format(term=term, Term=term[0].upper() + term[1:])
    return _us(text, style["spelling"])


def write_report(findings: list[Finding], modality: str, sequences: list[str], style_name: str,
                 rng: np.random.Generator, slice_mm: float) -> str:
    """The full report text of a study."""
    style = STYLES[style_name]
    present = [f for f in findings]
    rng.shuffle(present)
    body = [describe(f, modality, sequences, style, rng) for f in present]
    absent = [n for n in FINDINGS if n not in {f.name for f in findings}]
    negs = [_negative(n, style) for n in absent if (n == "haemorrhage" and modality == "CT") or rng.random() < style["negatives"]]
    if not findings:
        body.append(str(rng.choice(["No acute intracranial abnormality.", "Normal appearances of the brain.",
                                    "The brain parenchyma is unremarkable."])))
    body += negs
    if modality == "CT":
        technique = f"Non-contrast axial CT of the head, {slice_mm:g} mm reconstructions."
    else:
        names = [_SEQ_NAMES[s] for s in sequences]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        technique = f"Axial {listed} MRI of the brain."
    impression = [_impression(f, style) for f in present] or ["No acute intracranial abnormality."]
    indication = str(rng.choice(_INDICATIONS))
    headers = style["headers"]
    if headers is None:  # terse: one paragraph, no sections
        prefix = "CT head:" if modality == "CT" else "MRI brain:"
        return " ".join([prefix] + body) + "\n"
    if style_name == "structured":
        impression_text = "; ".join(s[:-1] if i == 0 else s[0].lower() + s[1:-1] for i, s in enumerate(impression)) + "."
    elif len(impression) == 1:
        impression_text = impression[0]
    else:
        impression_text = "\n".join(f"{i}. {s}" for i, s in enumerate(impression, 1))
    sep = ":\n" if style_name == "narrative" else ": "
    lines = [f"{headers[0]}: {indication}", f"{headers[1]}: {technique}",
             f"{headers[2]}{sep}{' '.join(body)}"]
    if style["impression"]:
        lines.append(f"{headers[3]}{sep}{impression_text}")
    return "\n".join(lines) + "\n"


def sentences(text: str) -> list[str]:
    """Sentences of a report (section headers and list numbers removed)."""
    text = re.sub(r"(?m)^[A-Za-z ]+:\s*", " ", text)
    text = re.sub(r"(?m)^\s*\d+\.\s+", " ", text)
    parts = re.split(r"(?<=[.;])\s+", text.replace("\n", " "))
    return [p.strip() for p in parts if p.strip()]


def read_mentions(text: str) -> dict[str, str | None]:
    """Which findings a report asserts ("pos") or denies ("neg"); None when not mentioned.

    A sentence mentioning a finding's term is a denial when a negation cue (no, not, without,
    negative for, none) occurs in it; a finding both asserted and denied reads as "pos".
    """
    out: dict[str, str | None] = {name: None for name in FINDINGS}
    for sent in sentences(text):
        low = sent.lower()
        for name, terms in TEMPLATE_TERMS.items():
            if name == "mass" and re.search(r"\bmass effect\b", low) and not re.search(r"\b(mass|lesion|neoplasm)\b(?! effect)", low):
                continue
            if any(re.search(rf"\b{re.escape(t)}\b", low) for t in terms):
                polarity = "neg" if _NEG_CUES.search(low) else "pos"
                if out[name] != "pos":
                    out[name] = polarity
    return out
